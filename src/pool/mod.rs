//! Server pools, one per (database, user): bounded by their own size and by shared limits
//! (the budget), FIFO waiters, and an RAII checkout guard whose `Drop` returns, resets or
//! closes the server. Knows nothing of client bytes.
//!
//! Where each behaviour lives: a server's way through the pool, checkout and check-in
//! (`checkout`); the guard and what its drop does (`pooled`); the background upkeep
//! (`maintenance`); servers in use (`active`); shared caps (`limit`); what the console sees
//! (`view`); and here, the pool itself, its settings and the operator's controls.

mod active;
mod checkout;
mod defaults;
mod error;
mod guards;
pub mod limit;
pub use defaults::Defaults;
pub use error::PoolError;
mod maintenance;
mod pooled;
mod view;

use crate::error::SqlState;
use crate::server::{ServerConn, Target};
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

    /// Stops handing out servers (admin PAUSE); checkouts wait until `resume`.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Hands out servers again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Closes every idle server (admin KILL); checked-out ones close when returned.
    pub fn close_idle(&self) {
        while self.close_one_idle() {}
    }

    /// Takes the pool out of service (its database was removed): idle servers close now,
    /// busy ones when they come back.
    pub fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::Relaxed);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.close_idle();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock cannot leave the counts worse than losing the pool; recover
        // rather than poison every later client.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
