//! Fleet mode (`budget.mode = "fleet"`): the brokers of one fleet share a server's
//! connections through the server itself, with no other service.
//!
//! Each broker keeps one lease connection whose `application_name`
//! (`pgbroker/<fleet>/<id>/<claim>`) says it is alive and how many connections it claims; its
//! pool servers log in as `pgbroker/<fleet>/<id>`. Every `fleet_interval` it takes the fleet's
//! advisory lock, counts peers and everything else in `pg_stat_activity`, computes its share
//! ([`share::decide`]) and publishes its new claim before the lock is released. A broker that
//! dies frees its share when its connections vanish from the server.

pub mod share;

use crate::app::App;
use crate::budget;
use crate::config::Config;
use crate::pool::Limit;
use crate::server::{ServerConn, ServerError};
use share::{Decision, Snapshot, Standing};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// First key of the fleet's advisory lock ("pgbr"); the second is a hash of the fleet name.
const LOCK_CLASS: i32 = 0x7067_6272;

/// A round holding the lock longer than this is abandoned (and the server ends a lease
/// left idle in its transaction after `LEASE_IDLE_TIMEOUT`), so one frozen broker cannot
/// stall its fleet.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);
const LEASE_IDLE_TIMEOUT: &str = "10s";

/// How soon a shrinking instance publishes its lower claim again.
const SHRINK_RECHECK: Duration = Duration::from_millis(20);

/// `application_name` prefix of a fleet's connections.
pub fn prefix(fleet: &str) -> String {
    format!("pgbroker/{fleet}/")
}

/// `application_name` of this instance's pool servers.
pub fn server_tag(fleet: &str, id: &str) -> String {
    format!("pgbroker/{fleet}/{id}")
}

fn lease_tag(fleet: &str, id: &str, claim: u32) -> String {
    format!("pgbroker/{fleet}/{id}/{claim}")
}

/// A fresh instance id: unique enough within a fleet, short enough for application_name.
pub fn new_instance_id() -> String {
    format!("{:010x}", random() & 0xff_ffff_ffff)
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// FNV-1a of the fleet name: the advisory lock's second key.
fn lock_key(fleet: &str) -> i32 {
    let h = fleet.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h as i32
}

/// The query of a round, one row: the server's limits, connections that are not the
/// fleet's, and per-application_name counts of the fleet's.
fn snapshot_sql(prefix: &str) -> String {
    let n = prefix.chars().count();
    // The prefix is validated to [A-Za-z0-9_.-/], safe to quote as is.
    format!(
        "SELECT current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
         current_setting('reserved_connections', true), \
         (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE {client} \
            AND left(coalesce(application_name, ''), {n}) <> '{prefix}'), \
         (SELECT string_agg(substr(application_name, {start}) || ' ' || c, ',') FROM \
            (SELECT application_name, count(*) AS c FROM pg_catalog.pg_stat_activity \
             WHERE {client} AND left(application_name, {n}) = '{prefix}' \
             GROUP BY application_name) g)",
        start = n + 1,
        // Without pg_read_all_stats, other roles' sessions show a NULL backend_type (their
        // application_name stays visible): count them, as over-counting only shrinks shares.
        client = "coalesce(backend_type, 'client backend') = 'client backend'"
    )
}

/// What SHOW BUDGET, /metrics and /health show of this instance in its fleet.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last decision, if a round completed.
    pub decision: Option<Decision>,
    /// Where this instance stands now.
    pub standing: Standing,
    /// The claim it published.
    pub claim: u32,
    /// Usable connections of the server (after reservations).
    pub usable: u32,
    /// Client connections that are not the fleet's.
    pub others: u32,
    /// The last error, if the last round failed.
    pub error: Option<String>,
    /// When the last round completed.
    pub at: Option<Instant>,
}

/// This broker's membership in the fleet for one server.
pub struct Member {
    server: String,
    id: String,
    limit: Arc<Limit>,
    status: Mutex<Status>,
}

impl Member {
    /// A member for `server` whose share caps `limit` (which starts at 0).
    pub fn new(server: String, id: String, limit: Arc<Limit>) -> Arc<Member> {
        Arc::new(Member { server, id, limit, status: Mutex::new(Status::default()) })
    }

    /// The status as of the last round.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// This instance's id in the fleet.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The budget limit this membership caps.
    pub fn limit(&self) -> &Arc<Limit> {
        &self.limit
    }

    /// True while the broker's budget for this server is still the one this member caps
    /// (a reload may drop the server, or drop and add it again with a new limit).
    fn is_current(&self, app: &App) -> bool {
        app.budgets().get(&self.server).is_some_and(|(_, l)| Arc::ptr_eq(l, &self.limit))
    }

    /// Rounds until the broker stops; `first` is told when the first round has ended.
    pub async fn run(self: Arc<Self>, app: Arc<App>, first: tokio::sync::oneshot::Sender<()>) {
        let mut lease: Option<ServerConn> = None;
        let mut first = Some(first);
        let mut last_instances = 0;
        // Joins come in bursts: after any change, round quickly for a whole interval so
        // every joiner of the burst is seen soon, not one per interval.
        let mut moving_since = Instant::now();
        // Waiting for busy servers over a lowered share to come back: quick at first, then
        // backing off (session-mode servers may stay busy for a whole session).
        let mut shrink_wait = SHRINK_RECHECK;
        loop {
            if !self.is_current(&app) {
                // Its server left the config: leave the fleet (the lease closes with it).
                let mut map = app.fleet.lock().unwrap_or_else(|e| e.into_inner());
                if map.get(&self.server).is_some_and(|m| Arc::ptr_eq(m, &self)) {
                    map.remove(&self.server);
                }
                tracing::info!(server = %self.server, "left the fleet: the server is no longer configured");
                return;
            }
            let cfg = app.config();
            let b = &cfg.budget;
            let quick = (b.fleet_interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
            let began = Instant::now();
            let result = self.round(&cfg, &mut lease).await;
            tracing::debug!(server = %self.server, took = ?began.elapsed(), ok = result.is_ok(), "fleet round");
            let delay = match result {
                Ok((d, snap)) => {
                    let changed = std::mem::replace(&mut last_instances, d.instances) != d.instances;
                    let claim = self.status().claim;
                    if claim <= d.share {
                        shrink_wait = SHRINK_RECHECK;
                    }
                    if changed || d.standing != Standing::Fair || claim != d.share || share::unsettled(&snap, d.fair) {
                        moving_since = Instant::now();
                    }
                    if d.standing == Standing::NoRoom {
                        // Knock again soon, at a random moment so joiners do not collide.
                        quick / 2 + quick.mul_f64((random() % 1000) as f64 / 1000.0)
                    } else if claim > d.share {
                        // Busy servers over the new share close as their transactions end:
                        // publish the lower claim as soon as they have, to make room.
                        let wait = shrink_wait;
                        shrink_wait = (shrink_wait * 2).min(quick);
                        wait
                    } else if moving_since.elapsed() < b.fleet_interval {
                        quick
                    } else {
                        b.fleet_interval
                    }
                }
                Err(e) => {
                    self.on_error(&e);
                    // A statement refused (a lock timeout) leaves the lease and its claim
                    // standing; anything else may have broken the connection.
                    if !matches!(e, RoundError::Query(_)) {
                        lease = None;
                    }
                    b.fleet_interval.min(Duration::from_secs(2))
                }
            };
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = app.shutdown.cancelled() => return,
            }
        }
    }

    /// Without a published claim peers may take our room: hold no more than the server
    /// already counts, and less as servers close (a restart closes them all), until a round
    /// publishes a claim again.
    fn on_error(&self, e: &RoundError) {
        let held = self.limit.used();
        self.limit.freeze();
        let message = e.to_string();
        let was = self.status();
        if was.error.as_deref() != Some(message.as_str()) {
            tracing::warn!(server = %self.server, held, error = %message, "fleet round failed; the share is frozen at what is held");
        }
        self.set_status(|s| {
            s.standing = Standing::Unreachable;
            s.error = Some(message);
        });
    }

    async fn round(&self, cfg: &Config, lease: &mut Option<ServerConn>) -> Result<(Decision, Snapshot), RoundError> {
        let b = &cfg.budget;
        let conn = match lease {
            Some(c) => c,
            None => {
                let mut target = budget::login_for(cfg, &self.server).ok_or(RoundError::NoLogin)?;
                target.application_name = Some(lease_tag(&b.fleet, &self.id, 0));
                let mut c = ServerConn::connect(Arc::new(target), cfg.broker.server_connect_timeout).await?;
                c.simple_query(&format!("SET idle_in_transaction_session_timeout = '{LEASE_IDLE_TIMEOUT}'")).await??;
                lease.insert(c)
            }
        };
        match tokio::time::timeout(ROUND_TIMEOUT, self.exchange(cfg, conn)).await {
            Ok(Ok(out)) => {
                if out.0.standing == Standing::NoRoom && self.limit.used() == 0 {
                    // Our lease alone overcommits the server: leave and knock again later.
                    *lease = None;
                }
                Ok(out)
            }
            Ok(Err(RoundError::Query(e))) => {
                // The server refused a statement (a lock timeout): the connection is fine.
                let _ = conn.simple_query("ROLLBACK").await;
                Err(RoundError::Query(e))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RoundError::Timeout),
        }
    }

    async fn exchange(&self, cfg: &Config, conn: &mut ServerConn) -> Result<(Decision, Snapshot), RoundError> {
        let b = &cfg.budget;
        let prefix = prefix(&b.fleet);
        // Lock and count in one round trip: the lock is held from here to the COMMIT of the
        // claim, one more round trip, whatever the number of peers waiting for it.
        let row = conn
            .query_row(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'; \
                 DO $$BEGIN PERFORM pg_catalog.pg_advisory_xact_lock({LOCK_CLASS}, {}); END$$; {}",
                (ROUND_TIMEOUT / 2).as_millis(),
                lock_key(&b.fleet),
                snapshot_sql(&prefix)
            ))
            .await??;
        let col = |i: usize| row.get(i).and_then(|v| v.as_deref());
        let num = |i: usize| col(i).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        let limits =
            budget::ServerLimits { max_connections: num(0), superuser_reserved: num(1), server_reserved: num(2) };
        let usable = budget::usable(b, limits);
        let snap = Snapshot { usable, others: num(3), peers: share::parse_peers(col(4).unwrap_or_default()) };
        let d = share::decide(&snap, &self.id, b.fleet_min_budget);

        // Lower the cap before publishing a lower claim, raise it only after the claim that
        // covers it is committed: what we hold never exceeds what the fleet sees us claim.
        let old = self.limit.cap() as u32;
        if d.share < old {
            self.limit.set_cap(d.share as usize);
            self.limit.shrink_to_cap();
        }
        let claim = d.share.max(self.limit.used() as u32);
        let tag = lease_tag(&b.fleet, &self.id, claim);
        conn.simple_query(&format!("SELECT pg_catalog.set_config('application_name', '{tag}', false); COMMIT"))
            .await??;
        // The claim is published: a freeze after a lost lease ends.
        self.limit.thaw();
        if d.share > old {
            self.limit.set_cap(d.share as usize);
        }
        let was = self.status();
        if was.decision.map(|w| (w.share, w.instances, w.standing)) != Some((d.share, d.instances, d.standing)) {
            tracing::info!(
                server = %self.server, instances = d.instances, fair = d.fair, share = d.share, claim,
                fleet_total = d.fleet_total, others = snap.others, usable, standing = d.standing.as_str(),
                "fleet share"
            );
        }
        self.set_status(|s| {
            *s = Status {
                decision: Some(d),
                standing: d.standing,
                claim,
                usable,
                others: snap.others,
                error: None,
                at: Some(Instant::now()),
            }
        });
        Ok((d, snap))
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("no login to count the fleet with: give a database on this server a user and password, or set auth.user")]
    NoLogin,
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("{}", .0.message)]
    Query(crate::server::QueryError),
    #[error("the round took longer than {ROUND_TIMEOUT:?}")]
    Timeout,
}

impl From<crate::server::QueryError> for RoundError {
    fn from(e: crate::server::QueryError) -> Self {
        RoundError::Query(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_in_application_name() {
        let longest = lease_tag(&"f".repeat(24), &new_instance_id(), u32::MAX);
        assert!(longest.len() <= 63, "{longest}");
        assert!(server_tag("web", "ab").starts_with(&prefix("web")));
    }

    #[test]
    fn fleets_have_distinct_lock_keys() {
        assert_ne!(lock_key("web"), lock_key("api"));
        assert_eq!(lock_key("web"), lock_key("web"));
    }
}
