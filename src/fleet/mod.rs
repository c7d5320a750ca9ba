//! Fleet mode (`budget.mode = "fleet"`): the brokers of one fleet share a server's
//! connections through the server itself, with no other service and no connection of their
//! own.
//!
//! Every `fleet_interval` each member *heartbeats* through one of its own pool servers (the
//! fleet's pool keeps one open): in its row of `pgbroker_fleet` it writes what it may hold and
//! reads the share the last round gave it. When a round is due, the member whose heartbeat
//! finds it so runs it under the fleet's advisory lock: it counts the server once
//! (`pg_stat_activity`), decides every member's share ([`share::allocate`]) and writes them.
//! The database's cost is one heartbeat per member and one count per interval for the whole
//! fleet. A member with nothing to heartbeat through (joining, left with nothing, or every
//! server busy) *knocks* with one connection of its own, tagged and counted as its server,
//! and closes it as soon as it has a share and a free server of its own.

pub mod share;
mod sql;

use crate::budget;
use crate::config::{Config, Live};
use crate::error::SqlState;
use crate::pool::{Limit, PoolError, Release};
use crate::registry::Registry;
use crate::server::{QueryError, ServerConn, ServerError};
use crate::shutdown::Shutdown;
use share::{Allocation, Decision, RoundInput, Row, Standing};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A heartbeat (and the round it may run) taking longer than this is abandoned, and the
/// member freezes: one stalled server cannot leave a member acting on an old share.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a statement waits for a row another member has locked (a round in progress).
const LOCK_WAIT: Duration = Duration::from_millis(2500);

/// How soon a shrinking member reports its lower figure again.
const SHRINK_RECHECK: Duration = Duration::from_millis(20);

/// The tables' creation script, for the operator (`conf/pgbroker-fleet.sql`).
pub use sql::CREATE_TABLES;

/// `application_name` prefix of a fleet's connections.
pub fn prefix(fleet: &str) -> String {
    format!("pgbroker/{fleet}/")
}

/// `application_name` of this instance's servers (and of its knock).
pub fn server_tag(fleet: &str, id: &str) -> String {
    format!("pgbroker/{fleet}/{id}")
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

/// Rounds come this often while the fleet is moving (and joiners may run one this soon after
/// the last).
fn quick(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// A member whose row was not written for this long, and that has no server on the server,
/// is gone: the next round deletes its row and shares out what it held. A live member
/// always shows a server (its pool keeps one, or it knocks) and writes its row every
/// interval (±10%).
pub fn stale_after(interval: Duration) -> Duration {
    interval * 3 / 2
}

/// What SHOW BUDGET, /metrics and /health show of this instance in its fleet.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last decision, if a heartbeat completed.
    pub decision: Option<Decision>,
    /// Where this instance stands now.
    pub standing: Standing,
    /// What it last told the fleet it may hold.
    pub claim: u32,
    /// Usable connections of the server (after reservations).
    pub usable: u32,
    /// Client connections that are not the fleet's.
    pub others: u32,
    /// The last error, if the last heartbeat failed.
    pub error: Option<String>,
    /// When the last heartbeat completed.
    pub at: Option<Instant>,
    /// It holds a knock (a connection of its own) after that heartbeat.
    pub knocking: bool,
}

/// The last round as a heartbeat or a round of our own saw it.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    usable: u32,
    others: u32,
    instances: u32,
    fair: u32,
    total: u32,
    settled: bool,
}

/// This broker in its fleets: one membership per server (fleet mode).
pub struct Fleet {
    live: Live,
    registry: Arc<Registry>,
    shutdown: Arc<Shutdown>,
    /// This broker's id in its fleet.
    instance_id: String,
    /// Memberships by server.
    members: Mutex<BTreeMap<String, Arc<Member>>>,
}

impl Fleet {
    /// No membership yet; `instance_id` names this broker in its fleet.
    pub fn new(live: Live, registry: Arc<Registry>, shutdown: Arc<Shutdown>, instance_id: String) -> Fleet {
        Fleet { live, registry, shutdown, instance_id, members: Mutex::default() }
    }

    /// This broker's id in its fleet.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The membership for `server`, in fleet mode.
    pub fn member(&self, server: &str) -> Option<Arc<Member>> {
        self.lock().get(server).cloned()
    }

    /// Every membership, by server.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Member>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a membership for every budget that has none (fleet mode), waiting up to `wait`
    /// for their first rounds so the broker starts with its share.
    pub async fn join(self: &Arc<Self>, wait: Duration) {
        if self.live.config().budget.mode != crate::config::BudgetMode::Fleet {
            return;
        }
        let mut firsts = Vec::new();
        for (server, (_, limit)) in self.registry.budgets().iter() {
            let mut map = self.lock();
            // A member of an earlier limit for this server (dropped and added again by
            // reloads) is replaced; it leaves at its next round.
            if map.get(server).is_some_and(|m| Arc::ptr_eq(m.limit(), limit)) {
                continue;
            }
            let member = Member::new(server.clone(), self.instance_id.clone(), limit.clone());
            map.insert(server.clone(), member.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(member.run(self.clone(), tx));
            firsts.push(rx);
        }
        let all_first = async {
            for rx in firsts {
                let _ = rx.await;
            }
        };
        let _ = tokio::time::timeout(wait, all_first).await;
    }
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

    /// The status as of the last heartbeat.
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
    fn is_current(&self, fleet: &Fleet) -> bool {
        fleet.registry.budgets().get(&self.server).is_some_and(|(_, l)| Arc::ptr_eq(l, &self.limit))
    }

    /// Heartbeats until the broker stops; `first` is told when the first one has ended.
    pub async fn run(self: Arc<Self>, fleet: Arc<Fleet>, first: tokio::sync::oneshot::Sender<()>) {
        let mut knock: Option<ServerConn> = None;
        let mut first = Some(first);
        // Waiting for busy servers over a lowered share to close: quick at first, then
        // backing off (session-mode servers may stay busy for a whole session).
        let mut shrink_wait = SHRINK_RECHECK;
        loop {
            if !self.is_current(&fleet) {
                // Its server left the config: leave the fleet; its row goes once stale.
                let mut map = fleet.lock();
                if map.get(&self.server).is_some_and(|m| Arc::ptr_eq(m, &self)) {
                    map.remove(&self.server);
                }
                tracing::info!(server = %self.server, "left the fleet: the server is no longer configured");
                return;
            }
            let cfg = fleet.live.config();
            let b = &cfg.budget;
            let quick = quick(b.fleet_interval);
            let beat = tokio::time::timeout(ROUND_TIMEOUT, self.beat(&fleet.registry, &cfg, &mut knock)).await;
            let delay = match beat.unwrap_or(Err(FleetError::Timeout)) {
                Ok(moving) => {
                    if self.limit.used() > self.limit.cap() {
                        // Busy servers over the new share close as their transactions end:
                        // report the lower figure as soon as they have, to make room.
                        let wait = shrink_wait;
                        shrink_wait = (shrink_wait * 2).min(quick);
                        wait
                    } else if self.status().standing == Standing::NoRoom {
                        // Knock again soon, at a random moment so joiners do not collide.
                        quick / 2 + quick.mul_f64((random() % 1000) as f64 / 1000.0)
                    } else if moving {
                        quick
                    } else {
                        // ±10%, so members started together do not beat together.
                        b.fleet_interval.mul_f64(0.9 + (random() % 1000) as f64 / 5000.0)
                    }
                }
                Err(e) => {
                    knock = None;
                    self.on_error(&e);
                    if e.is_full() { quick } else { b.fleet_interval.min(Duration::from_secs(2)) }
                }
            };
            if self.limit.used() <= self.limit.cap() {
                shrink_wait = SHRINK_RECHECK;
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = fleet.shutdown.stopped() => return,
            }
        }
    }

    /// Without a heartbeat the fleet may give our room away: hold no more than the server
    /// already counts, and less as servers close (a restart closes them all), until a
    /// heartbeat finds our share again.
    fn on_error(&self, e: &FleetError) {
        let held = self.limit.used();
        self.limit.freeze();
        let message = e.to_string();
        let was = self.status();
        if was.error.as_deref() != Some(message.as_str()) {
            tracing::warn!(server = %self.server, held, error = %message, "fleet heartbeat failed; the share is frozen at what is held");
        }
        self.set_status(|s| {
            s.standing = if e.is_full() { Standing::NoRoom } else { Standing::Unreachable };
            s.error = Some(message);
            // The caller closes the knock after an error.
            s.knocking = false;
        });
    }

    /// One heartbeat (and the round, if one is due). True while the fleet is moving.
    async fn beat(
        &self,
        registry: &Registry,
        cfg: &Config,
        knock: &mut Option<ServerConn>,
    ) -> Result<bool, FleetError> {
        let pool = registry.fleet_pool(cfg, &self.server).ok_or(FleetError::NoLogin)?;
        let (cap, used) = (self.limit.cap() as u32, self.limit.used() as u32);
        // A server of our own pool if one is free soon; else (joining, left with nothing,
        // or every server busy, as whole sessions may keep them) a knock.
        // Frozen, a member opens nothing new while it holds something: it waits for one of
        // its own servers.
        let frozen = self.limit.is_frozen() && used > 0;
        let mut pooled = None;
        if cap > 0 || used > 0 {
            // With room in its share the pool opens a server of its own for the heartbeat
            // (as for any client); a knock is for when every server it may hold is busy.
            let wait = if frozen || cap > used { ROUND_TIMEOUT / 2 } else { quick(cfg.budget.fleet_interval) };
            match pool.checkout(wait).await {
                Ok(server) => {
                    *knock = None;
                    pooled = Some(server);
                }
                Err(PoolError::Timeout { .. }) if frozen => return Err(FleetError::Busy),
                Err(PoolError::Timeout { .. }) => {}
                Err(e) => return Err(FleetError::Pool(e)),
            }
        }
        if pooled.is_none() && knock.is_none() {
            *knock = Some(ServerConn::connect(pool.target(), cfg.broker.server_connect_timeout).await?);
        }
        let conn: &mut ServerConn = match (pooled.as_mut(), knock.as_mut()) {
            (Some(p), _) => p,
            (None, Some(k)) => k,
            (None, None) => return Err(FleetError::Timeout),
        };
        let result = self.exchange(cfg, conn, cap.max(used), used).await;
        if let (Some(p), Ok(_) | Err(FleetError::Query(_) | FleetError::NoTable(_))) = (pooled.as_mut(), &result) {
            // Every reply was read: the server goes back (rolled back if a statement failed).
            p.release = Release::Reuse;
        }
        let (share, fresh, seen) = result?;
        Ok(self.apply(cfg, share, fresh, seen, cap.max(used), knock))
    }

    /// The heartbeat's statements: says `mine`, reads the share, runs the round if due.
    async fn exchange(
        &self,
        cfg: &Config,
        conn: &mut ServerConn,
        mine: u32,
        used: u32,
    ) -> Result<(i32, bool, Option<Seen>), FleetError> {
        let b = &cfg.budget;
        let sql = sql::heartbeat(&b.fleet, &self.id, used, mine, LOCK_WAIT, quick(b.fleet_interval));
        let row = match query_row(conn, &sql).await {
            Err(FleetError::Query(e)) if e.code == SqlState::UNDEFINED_TABLE => {
                // First use on this database: make the tables, once, if the login may.
                rollback(conn).await?;
                match query_row(conn, sql::CREATE_TABLES).await {
                    Err(FleetError::Query(e)) if e.code == SqlState::INSUFFICIENT_PRIVILEGE => {
                        return Err(FleetError::NoTable(e.message));
                    }
                    r => r?,
                };
                query_row(conn, &sql).await
            }
            r => r,
        };
        let row = match row {
            Err(FleetError::Query(e)) => {
                // A statement failed inside the heartbeat's transaction.
                rollback(conn).await?;
                return Err(FleetError::Query(e));
            }
            r => r?,
        };
        let col = |i: usize| row.get(i).and_then(|v| v.as_deref());
        let num = |i: usize| col(i).and_then(|v| v.parse::<u32>().ok());
        let share = col(0).and_then(|v| v.parse::<i32>().ok()).unwrap_or(0);
        let fresh = col(1) == Some("t");
        let mut seen = num(2).map(|usable| Seen {
            usable,
            others: num(3).unwrap_or(0),
            instances: num(4).unwrap_or(0),
            fair: num(5).unwrap_or(0),
            total: num(6).unwrap_or(0),
            settled: col(8) == Some("t"),
        });
        if col(9) != Some("t") {
            return Ok((share, fresh, seen));
        }
        match self.round(cfg, conn, fresh).await {
            Ok(Some((a, usable, others))) => {
                let mine = a.share_of(&self.id).unwrap_or(share);
                seen = Some(Seen {
                    usable,
                    others,
                    instances: a.instances,
                    fair: a.fair,
                    total: a.total,
                    settled: a.settled,
                });
                // Our row was counted by the round just written: not fresh any more.
                Ok((mine, false, seen))
            }
            Ok(None) => Ok((share, fresh, seen)),
            Err(e) => {
                if matches!(e, FleetError::Query(_)) {
                    rollback(conn).await?;
                }
                Err(e)
            }
        }
    }

    /// Runs a round if no other member is running one and it is still due: counts the
    /// server, decides every share, writes them. `None` if it was not ours to run.
    async fn round(
        &self,
        cfg: &Config,
        conn: &mut ServerConn,
        eager: bool,
    ) -> Result<Option<(Allocation, u32, u32)>, FleetError> {
        let b = &cfg.budget;
        let quick = quick(b.fleet_interval);
        let lock = query_row(conn, &sql::round_lock(&b.fleet, LOCK_WAIT, eager, quick)).await?;
        if lock.first().and_then(|v| v.as_deref()) != Some("t") || lock.get(1).and_then(|v| v.as_deref()) != Some("t") {
            conn.simple_query("ROLLBACK").await??;
            return Ok(None);
        }
        let prefix = prefix(&b.fleet);
        let read = conn.query_rows(&sql::round_read(&b.fleet, &prefix, stale_after(b.fleet_interval))).await??;
        let mut rows = Vec::new();
        let mut servers: HashMap<String, u32> = HashMap::new();
        let (mut others, mut limits) = (0, budget::ServerLimits::default());
        for r in &read {
            let col = |i: usize| r.get(i).and_then(|v| v.as_deref());
            let num = |i: usize| col(i).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
            match col(0) {
                Some("m") => rows.push(Row {
                    id: col(1).unwrap_or_default().to_string(),
                    share: col(2).and_then(|v| v.parse().ok()).unwrap_or(0),
                    held: num(3),
                    servers: 0,
                    stale: col(4) == Some("t"),
                }),
                Some("s") => match col(1) {
                    Some(id) => *servers.entry(id.to_string()).or_default() += num(2),
                    None => others += num(2),
                },
                Some("l") => {
                    limits = budget::ServerLimits {
                        max_connections: num(1),
                        superuser_reserved: num(2),
                        server_reserved: num(3),
                    }
                }
                _ => {}
            }
        }
        for row in &mut rows {
            row.servers = servers.remove(&row.id).unwrap_or(0);
        }
        let usable = budget::usable(b, limits);
        let input = RoundInput { usable, others, strangers: servers.values().sum(), rows };
        let a = share::allocate(&input, b.fleet_min_budget);
        let next = if a.settled { b.fleet_interval } else { quick };
        conn.simple_query(&sql::round_write(&b.fleet, &self.id, &input.rows, &a, usable, others, next)).await??;
        tracing::debug!(server = %self.server, instances = a.instances, fair = a.fair, total = a.total, others, usable, "fleet round");
        Ok(Some((a, usable, others)))
    }

    /// Takes the share a heartbeat read. True while the fleet is moving.
    fn apply(
        &self,
        cfg: &Config,
        share: i32,
        fresh: bool,
        seen: Option<Seen>,
        claim: u32,
        knock: &mut Option<ServerConn>,
    ) -> bool {
        let b = &cfg.budget;
        let seen = seen.unwrap_or_default();
        let old = self.limit.cap() as u32;
        let standing = if fresh {
            // Our row is new: the fleet had no share of ours (it gave us up, or we are
            // joining). Hold what is held until a round counts us.
            self.limit.freeze();
            Standing::Starting
        } else if share < 0 {
            // Our knock does not fit: close it and knock again later.
            *knock = None;
            self.limit.set_cap(0);
            Standing::NoRoom
        } else {
            let share = share as u32;
            if share > 0 && (share > old || self.limit.used() == 0) {
                // The knock goes before the servers it makes room for.
                *knock = None;
            }
            self.limit.thaw();
            if share < old {
                self.limit.set_cap(share as usize);
                self.limit.shrink_to_cap();
            } else if share > old {
                self.limit.set_cap(share as usize);
            }
            share::standing(share as i32, seen.fair, b.fleet_min_budget)
        };
        let d = Decision {
            instances: seen.instances,
            fair: seen.fair,
            share: share.max(0) as u32,
            fleet_total: seen.total,
            standing,
        };
        let was = self.status();
        if was.decision.map(|w| (w.share, w.instances, w.standing)) != Some((d.share, d.instances, d.standing)) {
            tracing::info!(
                server = %self.server, instances = d.instances, fair = d.fair, share = d.share, claim,
                fleet_total = d.fleet_total, others = seen.others, usable = seen.usable, standing = standing.as_str(),
                "fleet share"
            );
        }
        self.set_status(|s| {
            *s = Status {
                decision: Some(d),
                standing,
                claim,
                usable: seen.usable,
                others: seen.others,
                error: None,
                at: Some(Instant::now()),
                knocking: knock.is_some(),
            }
        });
        !seen.settled || fresh || standing.is_starved() || standing == Standing::Growing || share.max(0) as u32 != old
    }
}

/// Ends a transaction a failed statement left open.
async fn rollback(conn: &mut ServerConn) -> Result<(), FleetError> {
    Ok(conn.simple_query("ROLLBACK").await??)
}

/// The first row of `sql`, a statement's failure as `FleetError::Query`.
async fn query_row(conn: &mut ServerConn, sql: &str) -> Result<Vec<Option<String>>, FleetError> {
    Ok(conn.query_row(sql).await??)
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
enum FleetError {
    #[error("no login to count the fleet with: give a database on this server a user and password, or set auth.user")]
    NoLogin,
    #[error(
        "fleet mode needs the tables pgbroker_fleet and pgbroker_fleet_round, and the login cannot create them ({0}): \
         run conf/pgbroker-fleet.sql once as the database owner and GRANT the login SELECT, INSERT, UPDATE, DELETE on them"
    )]
    NoTable(String),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Pool(PoolError),
    #[error("{}", .0.message)]
    Query(QueryError),
    #[error("frozen, and every server of the fleet's pool is busy: the heartbeat waits for one to be free")]
    Busy,
    #[error("the heartbeat took longer than {ROUND_TIMEOUT:?}")]
    Timeout,
}

impl FleetError {
    /// The server has no connection slot left for our knock.
    fn is_full(&self) -> bool {
        matches!(self, FleetError::Server(e) if e.sqlstate() == SqlState::TOO_MANY_CONNECTIONS)
    }
}

impl From<QueryError> for FleetError {
    fn from(e: QueryError) -> Self {
        FleetError::Query(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_in_application_name() {
        let longest = server_tag(&"f".repeat(24), &new_instance_id());
        assert!(longest.len() <= 63, "{longest}");
        assert!(server_tag("web", "ab").starts_with(&prefix("web")));
    }
}
