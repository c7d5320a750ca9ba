//! Server pools, one per (database, user): bounded by their own size and by shared limits
//! (the budget), FIFO waiters, and an RAII checkout guard whose `Drop` returns, resets or
//! closes the server. Knows nothing of client bytes.

mod active;
mod defaults;
mod error;
mod guards;
use guards::{ProbeGuard, SlotGuard, Withdraw};
mod checkin;
pub mod limit;
pub use defaults::Defaults;
pub use error::PoolError;
mod maintenance;
mod pooled;
mod view;

use crate::error::SqlState;
use crate::server::{ServerConn, ServerError, Target};
pub use active::ActiveServer;
use arc_swap::ArcSwap;
pub use limit::Limit;
pub use pooled::{Pooled, Release};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
pub use view::{PoolStats, Pools, ServerState, ServerView};

/// Identifies a pool: the client-facing database name and the server login user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Database name as configured (`[databases.NAME]`).
    pub database: String,
    /// Server login user.
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// Settings a pool is built with.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most servers open at once (before the reserve).
    pub size: usize,
    /// Servers kept open even when idle.
    pub min_size: usize,
    /// Extra servers for clients waiting longer than `reserve_timeout`.
    pub reserve_size: usize,
    /// Wait after which the reserve may be used.
    pub reserve_timeout: Duration,
    /// Limit on connect + login.
    pub connect_timeout: Duration,
    /// Query run by `Release::Reset` (empty = none).
    pub reset_query: String,
    /// Limit on a reset or rollback; a slower server is closed.
    pub reset_timeout: Duration,
    /// Age after which a server is retired (0 = never), jittered ±10%.
    pub lifetime: Duration,
    /// Idle time after which a server beyond `min_size` is closed (0 = never).
    pub idle_timeout: Duration,
    /// Checkouts after which a server is retired (0 = unlimited).
    pub max_uses: u64,
    /// Longest wait between login attempts after failures.
    pub login_retry: Duration,
    /// Liveness query for servers idle longer than `check_delay`.
    pub check_query: String,
    /// Idle time after which a server is checked before use.
    pub check_delay: Duration,
    /// Settings PostgreSQL does not report whose defaults are read from the first server.
    pub track_extra: Vec<String>,
    /// Clients that may keep a server between transactions for session state at once.
    pub max_pinned: usize,
    /// Statements that would pin a client are refused (`session_state = "error"`).
    pub refuse_pins: bool,
    /// Histograms of this pool.
    pub metrics: crate::metrics::PoolMetrics,
    /// Where pool events go (none in unit tests).
    pub events: Option<Arc<crate::events::Events>>,
}

/// A server as the pool holds it: boxed once when it connects, so the many hand-overs of a
/// transaction (idle list, guard, waiter) move a pointer rather than the whole connection.
type Conn = Box<ServerConn>;

pub(super) enum Grant {
    /// An idle server, handed over directly.
    Server(Conn),
    /// Permission to open a new server; `open` and the limits already count it.
    Slot,
}

struct Waiter {
    tx: oneshot::Sender<Grant>,
    since: Instant,
}

struct Backoff {
    until: Instant,
    delay: Duration,
    message: String,
    code: SqlState,
}

#[derive(Default)]
pub(crate) struct Inner {
    idle: Vec<Conn>,
    /// Servers open, being opened, in use or being reset.
    open: usize,
    waiters: VecDeque<Waiter>,
    /// Servers checked out, for the admin console.
    active: active::Active,
    /// Waiters that could be served by this pool's size but not by a shared limit.
    blocked: bool,
    /// `pool_limit_reached` was reported and clients still wait (reported once per episode).
    limit_reported: bool,
    backoff: Option<Backoff>,
    /// After a login failure, the one connect attempt allowed at a time is under way: other
    /// clients fail fast rather than each trying the failing server too.
    probing: bool,
}

/// The servers of one (database, user).
pub struct Pool {
    key: PoolKey,
    target: ArcSwap<Target>,
    /// Live: a reload swaps them; each use loads the current ones.
    settings: ArcSwap<PoolSettings>,
    /// Bumped when the server address or login changes: older servers close when returned.
    generation: AtomicU64,
    /// Out of service (its database removed, or the broker stopped): no server is kept warm.
    retired: std::sync::atomic::AtomicBool,
    limits: Vec<Arc<Limit>>,
    inner: Mutex<Inner>,
    /// A fresh server's settings, learned from the first one opened.
    defaults: Mutex<Option<Arc<Defaults>>>,
    /// Traffic counters (SHOW STATS, /metrics).
    pub counters: crate::stats::Counters,
    /// While set (admin PAUSE), no server is handed out.
    paused: tokio::sync::watch::Sender<bool>,
    /// Clients keeping a server between transactions for session state (transaction mode),
    /// counted by the sessions: what `max_pinned_clients` limits.
    pub pinned: std::sync::atomic::AtomicUsize,
}

impl Pool {
    /// An empty pool counted against `limits`; servers are opened on demand, and a
    /// background task keeps `min_size` warm and retires old and idle servers.
    pub fn new(key: PoolKey, target: Target, settings: PoolSettings, limits: Vec<Arc<Limit>>) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            key,
            target: ArcSwap::from_pointee(target),
            settings: ArcSwap::from_pointee(settings),
            generation: AtomicU64::new(0),
            retired: Default::default(),
            limits,
            inner: Mutex::new(Inner::default()),
            defaults: Mutex::new(None),
            counters: crate::stats::Counters::default(),
            paused: tokio::sync::watch::Sender::new(false),
            pinned: Default::default(),
        });
        for l in &pool.limits {
            l.add_member(Arc::downgrade(&pool));
        }
        maintenance::spawn(&pool);
        pool
    }

    /// This pool's key.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// This pool's settings.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// `(refuse_pins, max_pinned)` of the live settings, read per transaction without a
    /// reference count.
    pub fn pin_policy(&self) -> (bool, usize) {
        let s = self.settings.load();
        (s.refuse_pins, s.max_pinned)
    }

    /// This pool's histograms, without taking a reference to the settings (per transaction).
    pub fn record_metrics<R>(&self, f: impl FnOnce(&crate::metrics::PoolMetrics) -> R) -> R {
        f(&self.settings.load().metrics)
    }

    /// The server address and login new connections use.
    pub fn target(&self) -> Arc<Target> {
        self.target.load_full()
    }

    /// Logs new servers in with `credential` from now on (a client proved a newer one, e.g.
    /// after a password change); servers already logged in stay.
    pub fn set_credential(&self, credential: crate::server::Credential) {
        let mut target = (*self.target.load_full()).clone();
        target.credential = Some(credential);
        self.target.store(Arc::new(target));
    }

    /// Applies reloaded settings: a smaller pool closes idle servers now and busy ones as
    /// they come back; a bigger one serves waiters at once. A changed server address or
    /// login retires every existing server.
    pub fn reconfigure(self: &Arc<Self>, settings: PoolSettings, target: Target) {
        if **self.target.load() != target {
            self.target.store(Arc::new(target));
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.close_idle();
        }
        self.settings.store(Arc::new(settings));
        while self.close_one_idle_over_cap() {}
        self.on_capacity();
    }

    /// Reports a pool event (log line and `$pgbroker.events`).
    fn event(&self, kind: &str, extra: serde_json::Value) {
        if let Some(events) = &self.settings().events {
            let mut fields = serde_json::json!({"database": self.key.database, "user": self.key.user});
            if let (Some(f), serde_json::Value::Object(e)) = (fields.as_object_mut(), extra) {
                f.extend(e);
            }
            events.emit(kind, fields);
        }
    }

    /// True while a recent server login failure is being waited out.
    pub fn is_failing(&self) -> bool {
        self.backoff_error(&self.lock()).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock cannot leave the counts worse than losing the pool; recover
        // rather than poison every later client.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an idle server, opens a new one, or waits in FIFO order up to `wait`.
    ///
    /// # Cancel safety
    /// Dropping the future gives back anything it was granted.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Pooled, PoolError> {
        let start = Instant::now();
        let deadline = start + wait;
        if *self.paused.borrow() {
            let mut rx = self.paused.subscribe();
            let resumed = tokio::time::timeout_at(deadline, rx.wait_for(|p| !*p)).await;
            if resumed.is_err() {
                return Err(PoolError::Timeout {
                    pool: self.key.to_string(),
                    waited: wait,
                    size: self.settings().size,
                });
            }
        }
        let mut reserve_at = (self.settings().reserve_size > 0).then(|| start + self.settings().reserve_timeout);
        loop {
            let next = {
                let mut inner = self.lock();
                if let Some(conn) = self.take_idle(&mut inner) {
                    Ok(conn)
                } else if let Some(e) = self.backoff_error(&inner) {
                    return Err(e);
                } else if self.reserve_slot(&mut inner, false) {
                    Err(None)
                } else {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.push_back(Waiter { tx, since: Instant::now() });
                    inner.blocked |= inner.open < self.settings().size;
                    let report = !inner.limit_reported;
                    inner.limit_reported = true;
                    let blocked = inner.blocked;
                    drop(inner);
                    if report {
                        self.event(
                            "pool_limit_reached",
                            serde_json::json!({"poolSize": self.settings().size, "blockedByBudget": blocked}),
                        );
                    }
                    Err(Some((rx, blocked)))
                }
            };
            let (rx, blocked) = match next {
                Ok(conn) => match self.prepare(conn).await {
                    Some(conn) => return Ok(Pooled::new(self.clone(), conn)),
                    None => continue,
                },
                Err(None) => return self.open_granted().await,
                Err(Some(w)) => w,
            };
            // Whichever way the wait ends, including this future being dropped, a grant sent
            // meanwhile goes back to the pool instead of leaking its server or slot.
            let mut waiting = Withdraw { pool: self, rx };
            if blocked {
                self.request_capacity(true);
            }
            loop {
                let until = reserve_at.filter(|r| *r < deadline).unwrap_or(deadline);
                match tokio::time::timeout_at(until, &mut waiting.rx).await {
                    Ok(Ok(Grant::Server(conn))) => match self.prepare(conn).await {
                        Some(conn) => return Ok(Pooled::new(self.clone(), conn)),
                        None => break,
                    },
                    Ok(Ok(Grant::Slot)) => return self.open_granted().await,
                    Ok(Err(_)) => break,
                    Err(_) if until < deadline => {
                        reserve_at = None;
                        let reserved = self.reserve_slot(&mut self.lock(), true);
                        if reserved {
                            drop(waiting);
                            tracing::info!(pool = %self.key, "using the reserve pool");
                            return self.open_granted().await;
                        }
                    }
                    Err(_) => {
                        drop(waiting);
                        self.event("connection_timeout", serde_json::json!({"waitedMs": wait.as_millis() as u64}));
                        return Err(PoolError::Timeout {
                            pool: self.key.to_string(),
                            waited: wait,
                            size: self.settings().size,
                        });
                    }
                }
            }
        }
    }

    /// Withdraws a waiter, returning anything granted to it in the meantime.
    fn give_back(&self, rx: &mut oneshot::Receiver<Grant>) {
        rx.close();
        match rx.try_recv() {
            Ok(Grant::Server(conn)) => self.checkin(conn),
            Ok(Grant::Slot) => self.release_slot(),
            Err(_) => {}
        }
    }

    fn backoff_error(&self, inner: &Inner) -> Option<PoolError> {
        let b = inner.backoff.as_ref()?;
        let now = Instant::now();
        (now < b.until || inner.probing).then(|| PoolError::Backoff {
            pool: self.key.to_string(),
            message: b.message.clone(),
            code: b.code,
            retry_in: b.until.saturating_duration_since(now),
        })
    }

    /// Counts a new server against the pool size (plus the reserve if allowed) and every limit.
    fn reserve_slot(&self, inner: &mut Inner, reserve: bool) -> bool {
        let cap = self.settings().size + if reserve { self.settings().reserve_size } else { 0 };
        if inner.open >= cap {
            return false;
        }
        for (i, l) in self.limits.iter().enumerate() {
            if !l.try_acquire() {
                for taken in &self.limits[..i] {
                    taken.release_quiet();
                }
                return false;
            }
        }
        inner.open += 1;
        true
    }

    /// Queues this pool on every full limit; with `evict`, asks another pool to give up an
    /// idle server.
    fn request_capacity(self: &Arc<Self>, evict: bool) {
        for l in &self.limits {
            if l.is_full() {
                l.wait(self);
                if evict {
                    l.evict_for(self);
                }
            }
        }
    }

    /// A limit has room: serve blocked waiters while it lasts.
    pub(crate) fn on_capacity(self: &Arc<Self>) {
        let mut inner = self.lock();
        if inner.backoff.as_ref().is_some_and(|b| Instant::now() < b.until) {
            return;
        }
        while inner.waiters.iter().any(|w| !w.tx.is_closed()) && self.reserve_slot(&mut inner, false) {
            let mut served = false;
            while let Some(w) = inner.waiters.pop_front() {
                if w.tx.send(Grant::Slot).is_ok() {
                    served = true;
                    break;
                }
            }
            if !served {
                inner.open -= 1;
                for l in &self.limits {
                    l.release_quiet();
                }
                break;
            }
        }
        inner.blocked = inner.open < self.settings().size && inner.waiters.iter().any(|w| !w.tx.is_closed());
    }

    /// True if clients wait for capacity a shared limit withholds.
    pub(crate) fn has_blocked_waiters(&self) -> bool {
        let inner = self.lock();
        inner.blocked && inner.waiters.iter().any(|w| !w.tx.is_closed())
    }

    fn take_idle(&self, inner: &mut Inner) -> Option<Conn> {
        // Most recently used first: warm caches, and the least used age out.
        while let Some(conn) = inner.idle.pop() {
            if conn.is_idle_healthy() {
                return Some(conn);
            }
            tracing::debug!(server = conn.id, pool = %self.key, "idle server closed or spoke; dropping it");
            inner.open -= 1;
            for l in &self.limits {
                l.release_quiet();
            }
        }
        None
    }

    /// Runs the liveness check on a server idle longer than `check_delay`. `None` = it failed
    /// and was closed.
    async fn prepare(self: &Arc<Self>, mut conn: Conn) -> Option<Conn> {
        conn.uses += 1;
        if conn.last_used.elapsed() < self.settings().check_delay {
            return Some(conn);
        }
        let settings = self.settings();
        // Boxed for the same reason as a connect: rare, and sizing every session future.
        let check = Box::pin(tokio::time::timeout(settings.connect_timeout, conn.simple_query(&settings.check_query)));
        match check.await {
            Ok(Ok(Ok(()))) => Some(conn),
            _ => {
                tracing::info!(server = conn.id, pool = %self.key, "server failed server_check_query; closing it");
                self.discard(conn);
                None
            }
        }
    }

    /// Opens a server for a slot already counted.
    async fn open_granted(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        // If this future is dropped mid-connect the slot must still be returned.
        let slot = SlotGuard(Some(self.clone()));
        // While a login failure is waited out, fail fast instead of hammering the server.
        if let Some(e) = self.backoff_error(&self.lock()) {
            return Err(e);
        }
        // Boxed: a connect's state (TLS, authentication) is large and rarely live, and it
        // would otherwise size every client's session future.
        match Box::pin(self.connect()).await {
            Ok(conn) => {
                std::mem::forget(slot);
                Ok(Pooled::new(self.clone(), conn))
            }
            Err(e) => Err(e),
        }
    }

    /// Connects and logs in, recording success or failure for `server_login_retry`: after a
    /// failure, the wait before the next attempt doubles up to `server_login_retry`, and once
    /// it is over a single attempt probes the server while everyone else fails fast.
    async fn connect(&self) -> Result<Conn, PoolError> {
        let _probe = {
            let mut inner = self.lock();
            if let Some(e) = self.backoff_error(&inner) {
                return Err(e);
            }
            inner.backoff.is_some().then(|| {
                inner.probing = true;
                ProbeGuard(self)
            })
        };
        let connect = async {
            let mut conn = ServerConn::connect(self.target.load_full(), self.settings().connect_timeout).await?;
            self.learn_defaults(&mut conn).await?;
            Ok::<_, ServerError>(Box::new(conn))
        };
        match connect.await {
            Ok(mut conn) => {
                self.lock().backoff = None;
                conn.expires = maintenance::jittered(self.settings().lifetime).map(|d| conn.created + d);
                conn.generation = self.generation.load(Ordering::Relaxed);
                conn.uses = 1;
                self.event("connection_added", serde_json::json!({"serverId": conn.id, "pid": conn.cancel.pid}));
                Ok(conn)
            }
            Err(source) => {
                let mut inner = self.lock();
                let first = self.settings().login_retry.min(Duration::from_secs(1));
                let delay = match &inner.backoff {
                    // Attempts made together fail together: one round, one doubling.
                    Some(b) if Instant::now() < b.until => b.delay,
                    Some(b) => (b.delay * 2).min(self.settings().login_retry).max(first),
                    None => first,
                };
                inner.backoff = Some(Backoff {
                    until: Instant::now() + delay,
                    delay,
                    message: crate::error::chain(&source),
                    code: source.sqlstate(),
                });
                drop(inner);
                tracing::warn!(pool = %self.key, error = %crate::error::chain(&source), retry_in = ?delay, "server connection failed");
                self.event(
                    "connection_error",
                    serde_json::json!({"error": crate::error::chain(&source), "retryInMs": delay.as_millis() as u64}),
                );
                Err(PoolError::Connect { pool: self.key.to_string(), source })
            }
        }
    }
}
