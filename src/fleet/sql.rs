//! The statements of fleet mode, in one place: the tables (`conf/pgbroker-fleet.sql`), a
//! member's heartbeat, and a round's lock, read and write. Each is one simple-protocol string,
//! one round trip; names and numbers are quoted here, never by callers.

use super::share::{Allocation, Row};
use postgres_protocol::escape::escape_literal;
use std::time::Duration;

/// The tables, as the operator's script creates them.
pub const CREATE_TABLES: &str = include_str!("../../conf/pgbroker-fleet.sql");

/// First key of the fleet's advisory lock ("pgbr"); the second is a hash of the fleet name.
const LOCK_CLASS: i32 = 0x7067_6272;

/// Counts only client sessions. Without pg_read_all_stats, other roles' sessions show a NULL
/// backend_type (their application_name stays visible): they are counted, as over-counting
/// only shrinks shares.
const CLIENT: &str = "coalesce(backend_type, 'client backend') = 'client backend'";

/// FNV-1a of the fleet name: the advisory lock's second key.
fn lock_key(fleet: &str) -> i32 {
    let h = fleet.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h as i32
}

fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// A member says it is alive and may hold `mine` (`used` if its row is new: a member the
/// fleet had given up on holds only what the server shows) and reads its share and the last
/// round: `share, fresh, usable, others, instances, fair, total, ran_by, settled, due`. A
/// round is due at its time, or for a new member once `eager` has passed since the last.
pub fn heartbeat(fleet: &str, id: &str, used: u32, mine: u32, lock_timeout: Duration, eager: Duration) -> String {
    let (f, id) = (escape_literal(fleet), escape_literal(id));
    format!(
        "BEGIN; SET LOCAL lock_timeout = '{ms}ms'; \
         WITH me AS (INSERT INTO pgbroker_fleet AS f (fleet, id, held) VALUES ({f}, {id}, {used}) \
           ON CONFLICT (fleet, id) DO UPDATE SET held = {mine}, seen = now() \
           RETURNING f.share, f.xmax = 0 AS fresh) \
         SELECT me.share, me.fresh, r.usable, r.others, r.instances, r.fair, r.total, r.ran_by, r.settled, \
           coalesce(r.next_at <= now() OR (me.fresh AND r.ran_at < now() - interval '{eager} milliseconds'), true) \
         FROM me LEFT JOIN pgbroker_fleet_round r ON r.fleet = {f}; COMMIT",
        ms = millis(lock_timeout),
        eager = millis(eager)
    )
}

/// Opens a round's transaction and tries its lock without waiting: `locked, due` (a round
/// may have just run under another member). A round whose member stalls mid-way is ended by
/// the server (idle in transaction), releasing the rows every heartbeat waits for. `fresh`: asked by a new member, for which a
/// round is due once `eager` has passed since the last.
pub fn round_lock(fleet: &str, lock_timeout: Duration, fresh: bool, eager: Duration) -> String {
    let f = escape_literal(fleet);
    format!(
        "BEGIN; SET LOCAL lock_timeout = '{ms}ms'; SET LOCAL idle_in_transaction_session_timeout = '{ms}ms'; \
         SELECT pg_catalog.pg_try_advisory_xact_lock({LOCK_CLASS}, {key}), \
           coalesce((SELECT next_at <= now() OR ({fresh} AND ran_at < now() - interval '{eager} milliseconds') \
             FROM pgbroker_fleet_round WHERE fleet = {f}), true)",
        ms = millis(lock_timeout),
        key = lock_key(fleet),
        eager = millis(eager)
    )
}

/// What a round reads, rows tagged by their first column: `m` the fleet's rows (locked
/// against heartbeats until the round commits), `s` per-instance servers on the server (a
/// NULL id: connections that are not the fleet's), `l` the server's limits.
pub fn round_read(fleet: &str, prefix: &str, stale_after: Duration) -> String {
    let (f, p) = (escape_literal(fleet), escape_literal(prefix));
    let n = prefix.chars().count();
    format!(
        "SELECT 'm', id, share, held, seen < now() - interval '{stale} milliseconds' \
           FROM pgbroker_fleet WHERE fleet = {f} FOR UPDATE; \
         SELECT 's', CASE WHEN left(coalesce(application_name, ''), {n}) = {p} THEN substr(application_name, {start}) END, \
           count(*), NULL, NULL FROM pg_catalog.pg_stat_activity WHERE {CLIENT} GROUP BY 2; \
         SELECT 'l', current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
           current_setting('reserved_connections', true), NULL",
        stale = millis(stale_after),
        start = n + 1,
    )
}

/// Writes a round's outcome and commits: changed shares, dead rows deleted, the round row.
pub fn round_write(
    fleet: &str,
    me: &str,
    rows: &[Row],
    a: &Allocation,
    usable: u32,
    others: u32,
    next: Duration,
) -> String {
    let f = escape_literal(fleet);
    let mut sql = String::new();
    let previous: std::collections::HashMap<&str, i32> = rows.iter().map(|r| (r.id.as_str(), r.share)).collect();
    let changed: Vec<String> = a
        .shares
        .iter()
        .filter(|(id, s)| previous.get(id.as_str()).is_some_and(|p| p != s))
        .map(|(id, s)| format!("({}, {s})", escape_literal(id)))
        .collect();
    if !changed.is_empty() {
        sql.push_str(&format!(
            "UPDATE pgbroker_fleet AS f SET share = v.share FROM (VALUES {}) AS v(id, share) \
             WHERE f.fleet = {f} AND f.id = v.id; ",
            changed.join(", ")
        ));
    }
    if !a.dead.is_empty() {
        let dead: Vec<String> = a.dead.iter().map(|id| escape_literal(id)).collect();
        sql.push_str(&format!("DELETE FROM pgbroker_fleet WHERE fleet = {f} AND id IN ({}); ", dead.join(", ")));
    }
    sql.push_str(&format!(
        "INSERT INTO pgbroker_fleet_round AS r \
           (fleet, ran_at, next_at, ran_by, usable, others, instances, fair, total, settled) \
         VALUES ({f}, now(), now() + interval '{next} milliseconds', {me}, {usable}, {others}, {n}, {fair}, {total}, {settled}) \
         ON CONFLICT (fleet) DO UPDATE SET ran_at = EXCLUDED.ran_at, next_at = EXCLUDED.next_at, \
           ran_by = EXCLUDED.ran_by, usable = EXCLUDED.usable, others = EXCLUDED.others, \
           instances = EXCLUDED.instances, fair = EXCLUDED.fair, total = EXCLUDED.total, settled = EXCLUDED.settled; \
         COMMIT",
        next = millis(next),
        me = escape_literal(me),
        n = a.instances,
        fair = a.fair,
        total = a.total,
        settled = a.settled,
    ));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_have_distinct_lock_keys() {
        assert_ne!(lock_key("web"), lock_key("api"));
        assert_eq!(lock_key("web"), lock_key("web"));
    }

    #[test]
    fn a_round_writes_only_changed_shares() {
        let rows = vec![
            Row { id: "a".into(), share: 5, ..Row::default() },
            Row { id: "b".into(), share: 2, ..Row::default() },
        ];
        let a = Allocation { shares: vec![("a".into(), 5), ("b".into(), 4)], ..Allocation::default() };
        let sql = round_write("web", "a", &rows, &a, 10, 0, Duration::from_secs(1));
        assert!(sql.contains("(VALUES ('b', 4))"), "{sql}");
        assert!(!sql.contains("DELETE"), "{sql}");
    }
}
