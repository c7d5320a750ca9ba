//! Wiring: the state shared by every task of a broker, and how pools, budgets and hubs are
//! made from the config. Starting, accepting, reloading and stopping live in the submodules.

mod accept;
mod broker;
mod lifecycle;
pub mod logins;
mod reload;
mod upgrade;

pub use accept::ADMIN_RESERVE;
pub use broker::Broker;
pub use lifecycle::{run, wait_for_stop_signal};
pub use reload::ReloadError;
pub use upgrade::UpgradeError;

use crate::budget::{self, BudgetError, Derivation};
use crate::cancel::CancelRegistry;
use crate::config::{Config, Database};
use crate::notify::Hub;
use crate::pool::{Limit, Pool, PoolKey, PoolSettings, Pools};
use crate::server::{Credential, Target};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Period of SHOW STATS averages (PgBouncer's `stats_period`).
const STATS_PERIOD: Duration = Duration::from_secs(15);

/// Budgets by server: how each was derived and the limit enforcing it.
pub type Budgets = BTreeMap<String, (Derivation, Arc<Limit>)>;

/// What a pool was made from.
#[derive(Debug, Clone)]
struct Origin {
    /// Client-facing database name.
    database: String,
    /// The notification listener's pool (size 1).
    listener: bool,
    /// Server login user.
    user: String,
}

/// State shared by every task of one broker. Passed as a handle so tests can run several.
pub struct App {
    live: ArcSwap<Config>,
    /// Server pools.
    pub pools: Pools,
    /// Client cancel keys.
    pub cancels: Arc<CancelRegistry>,
    /// Cancelled when the broker stops for good: every task ends.
    pub shutdown: CancellationToken,
    /// Raised with `shutdown`, for client sessions: checked on every wake-up of each, where
    /// a token's check takes a lock and a flag's one load.
    pub stopped: crate::flag::Flag,
    /// Cancelled when a graceful stop begins: no new clients, idle ones leave, busy ones
    /// finish their transaction first.
    pub draining: CancellationToken,
    /// Cancelled once the client listener is closed after a drain began: until then the
    /// accept loop may still take in queued connections the drain must wait for.
    pub(crate) stopped_accepting: CancellationToken,
    /// Clients connected now, including those logging in (for `max_client_conn`).
    pub(crate) clients_open: AtomicUsize,
    /// Connections still logging in (the oldest make room for newcomers when full).
    pub logging_in: Arc<logins::LoggingIn>,
    /// Clients hibernating now (quiet, their relay state freed).
    pub(crate) hibernating: AtomicUsize,
    /// Per-server budgets and how each was derived; swapped on reload.
    budgets: ArcSwap<Budgets>,
    /// What each pool was made from, so a reload can remake its settings.
    origins: Mutex<HashMap<PoolKey, Origin>>,
    /// `max_db_connections` and `max_user_connections` limits, created on first use.
    shared_limits: Mutex<HashMap<String, Arc<Limit>>>,
    /// Clients per IP address, for `max_client_conn_per_ip`.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Prepared statement definitions shared by all clients.
    pub statements: Arc<crate::session::prepared::Registry>,
    /// LISTEN/NOTIFY hubs by database.
    pub hubs: crate::notify::Hubs,
    /// Open WebSocket connections.
    pub ws: crate::notify::ws::WsCounts,
    /// Logged-in clients.
    pub clients: Arc<crate::clients::Clients>,
    /// Per database: the counters at the last stats period and the averages over it.
    pub(crate) averages: Mutex<HashMap<String, (crate::stats::Snapshot, crate::stats::Averages)>>,
    /// Successful config reloads.
    pub reloads: std::sync::atomic::AtomicU64,
    /// Rejected config reloads.
    pub reload_failures: std::sync::atomic::AtomicU64,
    /// Refused client connections by reason.
    pub refusals: crate::stats::Refusals,
    /// Failed logins per address (`auth.max_failures_per_ip`).
    pub login_throttle: crate::auth::throttle::LoginThrottle,
    /// Prometheus recorder.
    pub metrics: crate::metrics::Metrics,
    /// Operational events (logs and `$pgbroker.events`).
    pub events: Arc<crate::events::Events>,
    /// This broker's id in its fleet (fleet mode).
    pub instance_id: String,
    /// Fleet memberships by server (fleet mode).
    pub fleet: Mutex<BTreeMap<String, Arc<crate::fleet::Member>>>,
    /// The listening sockets, for a hand-over to a new process (`UPGRADE`, SIGUSR2).
    listeners: upgrade::Listeners,
    /// A hand-over is under way.
    upgrading: std::sync::atomic::AtomicBool,
}

/// Pools of the notification listener are named after their database with this suffix.
pub const LISTENER_SUFFIX: &str = " (listener)";

/// Why the bridge cannot serve a database.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// The database is not in the config.
    #[error("database \"{0}\" is not configured")]
    NotConfigured(String),
    /// The listener connection has no login.
    #[error("LISTEN/NOTIFY for database \"{0}\" needs databases.{0}.user (and password) for the listener connection")]
    NoListenerUser(String),
    /// `snapshot_query` has no login to run under.
    #[error("snapshot_query needs databases.{0}.user")]
    NoSnapshotUser(String),
}

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The client listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No server connection budget could be derived.
    #[error("cannot derive the server connection budget")]
    Budget(#[source] BudgetError),
}

impl App {
    /// The current configuration snapshot. Take it once per unit of work and keep the `Arc`.
    pub fn config(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// The current configuration if it is not `current` any more (a reload happened): one
    /// atomic load, no reference count traffic, when it is unchanged.
    pub fn config_if_changed(&self, current: &Arc<Config>) -> Option<Arc<Config>> {
        let live = self.live.load();
        (!Arc::ptr_eq(&live, current)).then(|| Arc::clone(&live))
    }

    /// Makes `config` the one new work sees.
    pub fn store_config(&self, config: Config) {
        self.live.store(Arc::new(config));
    }

    /// Clients hibernating now: quiet for a moment with nothing in flight, holding only
    /// their session's small state until they speak again.
    pub fn hibernating_clients(&self) -> usize {
        self.hibernating.load(Relaxed)
    }

    /// Clients connected now (including those still logging in).
    pub fn client_count(&self) -> usize {
        self.clients_open.load(Relaxed)
    }

    /// The current budgets.
    pub fn budgets(&self) -> Arc<Budgets> {
        self.budgets.load_full()
    }

    /// The fleet membership for `server`, in fleet mode.
    pub fn fleet_member(&self, server: &str) -> Option<Arc<crate::fleet::Member>> {
        self.fleet.lock().unwrap_or_else(|e| e.into_inner()).get(server).cloned()
    }

    /// `application_name` of server connections: the fleet's tag in fleet mode, so peers
    /// can tell the fleet's connections from everything else.
    fn fleet_tag(&self, cfg: &Config) -> Option<String> {
        (cfg.budget.mode == crate::config::BudgetMode::Fleet)
            .then(|| crate::fleet::server_tag(&cfg.budget.fleet, &self.instance_id))
    }

    /// Starts a fleet membership for every budget that has none (fleet mode), waiting up
    /// to `wait` for their first rounds so the broker starts with its share.
    pub async fn join_fleets(self: &Arc<Self>, wait: Duration) {
        if self.config().budget.mode != crate::config::BudgetMode::Fleet {
            return;
        }
        let mut firsts = Vec::new();
        for (server, (_, limit)) in self.budgets().iter() {
            let mut map = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
            // A member of an earlier limit for this server (dropped and added again by
            // reloads) is replaced; it leaves at its next round.
            if map.get(server).is_some_and(|m| Arc::ptr_eq(m.limit(), limit)) {
                continue;
            }
            let member = crate::fleet::Member::new(server.clone(), self.instance_id.clone(), limit.clone());
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

    /// The pool for a client of `database` whose server login is `server_user`, created on
    /// first use with its share of the budget and the shared limits.
    pub fn pool(
        &self,
        cfg: &Config,
        database: &str,
        db: &Database,
        server_user: &str,
        credential: Option<Credential>,
    ) -> Arc<Pool> {
        let key = PoolKey { database: database.to_string(), user: server_user.to_string() };
        self.pools.get_or_create(&key, || {
            let listener = database.ends_with(LISTENER_SUFFIX);
            let real = database.trim_end_matches(LISTENER_SUFFIX);
            let origin = Origin { database: real.to_string(), listener, user: server_user.to_string() };
            let (target, settings) = self.pool_setup(cfg, &origin, db, credential);
            let mut limits = Vec::new();
            if let Some((_, limit)) = self.budgets().get(&budget::server_of(db)) {
                limits.push(limit.clone());
            }
            if db.max_db_connections > 0 {
                limits.push(self.shared_limit(format!("max_db_connections {real}"), db.max_db_connections));
            }
            if cfg.broker.max_user_connections > 0 {
                let name = format!("max_user_connections {server_user}");
                limits.push(self.shared_limit(name, cfg.broker.max_user_connections));
            }
            tracing::debug!(pool = %key, size = settings.size, "creating pool");
            self.origins.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), origin);
            Pool::new(key.clone(), target, settings, limits)
        })
    }

    /// A pool's server address and settings under `cfg`.
    fn pool_setup(
        &self,
        cfg: &Config,
        origin: &Origin,
        db: &Database,
        credential: Option<Credential>,
    ) -> (Target, PoolSettings) {
        let b = &cfg.broker;
        let server = budget::server_of(db);
        let split = match self.budgets().get(&server) {
            Some((d, _)) => {
                let dbs_here = cfg.databases.values().filter(|x| budget::server_of(x) == server).count();
                (d.budget as usize / dbs_here.max(1)).max(1)
            }
            None => usize::MAX,
        };
        let size = if origin.listener { 1 } else { db.pool_size.or(b.default_pool_size).map_or(split, |n| n as usize) };
        let target = Target {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone(),
            user: origin.user.clone(),
            credential,
            keepalive: b.tcp_keepalive,
            tls: cfg.tls.server.clone(),
            application_name: self.fleet_tag(cfg),
        };
        let settings = PoolSettings {
            size,
            // A fleet member heartbeats through one server of this pool: it stays open.
            min_size: if origin.listener {
                0
            } else if self.is_fleet_pool(cfg, origin, db) {
                (db.min_pool_size as usize).max(1)
            } else {
                db.min_pool_size as usize
            },
            reserve_size: if origin.listener { 0 } else { db.reserve_pool_size as usize },
            reserve_timeout: b.reserve_pool_timeout,
            connect_timeout: b.server_connect_timeout,
            reset_query: b.server_reset_query.clone(),
            reset_timeout: b.server_reset_timeout,
            lifetime: b.server_lifetime,
            idle_timeout: b.server_idle_timeout,
            max_uses: b.server_max_uses,
            login_retry: b.server_login_retry,
            check_query: b.server_check_query.clone(),
            check_delay: b.server_check_delay,
            track_extra: b.track_extra_parameters.clone(),
            max_pinned: crate::config::max_pinned(db.max_pinned_clients, size),
            refuse_pins: db.session_state == crate::config::SessionState::Error,
            metrics: self.metrics.pool(&origin.database, &origin.user),
            events: Some(self.events.clone()),
        };
        (target, settings)
    }

    /// The pool a fleet member heartbeats through on `server`: its own login's
    /// ([`budget::own_login`]), which keeps one server open in fleet mode.
    pub fn fleet_pool(&self, cfg: &Config, server: &str) -> Option<Arc<Pool>> {
        let (database, user, password) = budget::own_login(cfg, server)?;
        let db = cfg.databases.get(&database)?;
        Some(self.pool(cfg, &database, db, &user, password.map(Credential::Password)))
    }

    /// True for the pool fleet members heartbeat through (fleet mode).
    fn is_fleet_pool(&self, cfg: &Config, origin: &Origin, db: &Database) -> bool {
        cfg.budget.mode == crate::config::BudgetMode::Fleet
            && !origin.listener
            && budget::own_login(cfg, &budget::server_of(db))
                .is_some_and(|(d, u, _)| d == origin.database && u == origin.user)
    }

    /// The LISTEN/NOTIFY hub of `database`, started on first use. Its listener connection
    /// logs in as the database's configured user and counts against the budget.
    pub fn hub(&self, cfg: &Config, database: &str) -> Result<Arc<Hub>, BridgeError> {
        let db = cfg.databases.get(database).ok_or_else(|| BridgeError::NotConfigured(database.to_string()))?;
        let user = db.user.as_deref().ok_or_else(|| BridgeError::NoListenerUser(database.to_string()))?;
        let listener_key = format!("{database}{LISTENER_SUFFIX}");
        Ok(self.hubs.get_or_start(database, || {
            let pool = self.pool(cfg, &listener_key, db, user, db.password.clone().map(Credential::Password));
            let events = self.events.clone();
            let emit: crate::notify::Emit = Arc::new(move |kind, fields| events.emit(kind, fields));
            Hub::start(database, pool, &db.channels, &cfg.websocket, emit, self.shutdown.clone())
        }))
    }

    /// The pool the bridge runs its own queries through (`snapshot_query`): the database's,
    /// as its configured user.
    pub fn bridge_pool(&self, cfg: &Config, database: &str) -> Result<Arc<Pool>, BridgeError> {
        let db = cfg.databases.get(database).ok_or_else(|| BridgeError::NotConfigured(database.to_string()))?;
        let user = db.user.as_deref().ok_or_else(|| BridgeError::NoSnapshotUser(database.to_string()))?;
        Ok(self.pool(cfg, database, db, user, db.password.clone().map(Credential::Password)))
    }

    fn shared_limit(&self, name: String, cap: u32) -> Arc<Limit> {
        let mut map = self.shared_limits.lock().unwrap_or_else(|e| e.into_inner());
        let limit = map.entry(name.clone()).or_insert_with(|| Limit::new(name, cap as usize)).clone();
        if limit.cap() != cap as usize {
            // Reloaded: the shared cap follows the config.
            limit.set_cap(cap as usize);
        }
        limit
    }
}
