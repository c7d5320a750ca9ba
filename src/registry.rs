//! The pool registry: every server pool of the broker, made from the config on first use
//! with its share of the budget and the shared limits, remade on reload, paused, resumed
//! and killed by the console, and the per-database statistics over them.

use crate::budget::{self, Derivation};
use crate::clients::Clients;
use crate::config::{Config, Database, Live};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::pool::{Limit, Pool, PoolKey, PoolSettings, Pools, ServerState};
use crate::server::{Credential, Target};
use crate::stats::{Averages, Snapshot};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Budgets by server: how each was derived and the limit enforcing it.
pub type Budgets = BTreeMap<String, (Derivation, Arc<Limit>)>;

/// Pools of the notification listener are named after their database with this suffix.
const LISTENER_SUFFIX: &str = " (listener)";

/// The configured database a pool serves (a listener pool's name carries a suffix).
pub fn configured_database(key: &PoolKey) -> &str {
    key.database.trim_end_matches(LISTENER_SUFFIX)
}

/// How long PAUSE waits for active servers before giving up (pools stay paused).
const PAUSE_WAIT: Duration = Duration::from_secs(60);

/// Why PAUSE did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// No pool serves that database (yet).
    #[error("no pool for database {0:?}")]
    NoPool(String),
    /// Servers were still in use when the wait ended; the pools stay paused.
    #[error("servers still active after {}s; the pools stay paused", PAUSE_WAIT.as_secs())]
    StillActive,
}

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

/// The broker's pools and the limits they share.
pub struct Registry {
    live: Live,
    /// Server pools.
    pools: Pools,
    /// Per-server budgets and how each was derived; swapped on reload.
    budgets: ArcSwap<Budgets>,
    /// What each pool was made from, so a reload can remake its settings.
    origins: Mutex<HashMap<PoolKey, Origin>>,
    /// `max_db_connections` and `max_user_connections` limits, created on first use.
    shared_limits: Mutex<HashMap<String, Arc<Limit>>>,
    /// Per database: the counters at the last stats period and the averages over it.
    averages: Mutex<HashMap<String, (Snapshot, Averages)>>,
    /// Where pools record their histograms.
    metrics: Arc<Metrics>,
    /// Where pools report their events.
    events: Arc<Events>,
    /// `application_name` of server connections: the fleet's tag in fleet mode (a
    /// restart-only setting), so peers can tell the fleet's connections from everything else.
    server_tag: Option<String>,
}

impl Registry {
    /// An empty registry enforcing `budgets`.
    pub fn new(
        live: Live,
        budgets: Budgets,
        metrics: Arc<Metrics>,
        events: Arc<Events>,
        server_tag: Option<String>,
    ) -> Registry {
        Registry {
            live,
            pools: Pools::default(),
            budgets: ArcSwap::from_pointee(budgets),
            origins: Mutex::default(),
            shared_limits: Mutex::default(),
            averages: Mutex::default(),
            metrics,
            events,
            server_tag,
        }
    }

    /// Every pool, in no particular order.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// The current budgets.
    pub fn budgets(&self) -> Arc<Budgets> {
        self.budgets.load_full()
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
            limits.extend(self.shared_limits(cfg, &origin, db));
            tracing::debug!(pool = %key, size = settings.size, "creating pool");
            self.origins.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), origin);
            Pool::new(key.clone(), target, settings, limits)
        })
    }

    /// The pool of the notification listener of `database`, as its configured `user`.
    pub fn listener_pool(&self, cfg: &Config, database: &str, db: &Database, user: &str) -> Arc<Pool> {
        let key = format!("{database}{LISTENER_SUFFIX}");
        self.pool(cfg, &key, db, user, db.password.clone().map(Credential::Password))
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
            application_name: self.server_tag.clone(),
        };
        let settings = PoolSettings {
            size,
            // A fleet member heartbeats through one server of this pool: it stays open.
            min_size: if origin.listener {
                0
            } else if is_fleet_pool(cfg, origin, db) {
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
    /// (`budget::own_login`), which keeps one server open in fleet mode.
    pub fn fleet_pool(&self, cfg: &Config, server: &str) -> Option<Arc<Pool>> {
        let (database, user, password) = budget::own_login(cfg, server)?;
        let db = cfg.databases.get(&database)?;
        Some(self.pool(cfg, &database, db, &user, password.map(Credential::Password)))
    }

    /// The `max_db_connections` and `max_user_connections` limits a pool of `origin` shares
    /// with the other pools of its database or user, created on first use, capped as `cfg` says.
    /// Every pool counts against both, set or not, so that a reload that sets one caps the
    /// servers already open as well as those opened after.
    fn shared_limits(&self, cfg: &Config, origin: &Origin, db: &Database) -> [Arc<Limit>; 2] {
        [
            self.shared_limit(format!("max_db_connections {}", origin.database), db.max_db_connections),
            self.shared_limit(format!("max_user_connections {}", origin.user), cfg.broker.max_user_connections),
        ]
    }

    /// The shared limit `name`, its cap set to `cap` (0: none, as in the config).
    fn shared_limit(&self, name: String, cap: u32) -> Arc<Limit> {
        let cap = if cap == 0 { usize::MAX } else { cap as usize };
        let mut map = self.shared_limits.lock().unwrap_or_else(|e| e.into_inner());
        let limit = map.entry(name.clone()).or_insert_with(|| Limit::new(name, cap)).clone();
        if limit.cap() != cap {
            // Reloaded: the shared cap follows the config.
            limit.set_cap(cap);
        }
        limit
    }

    /// Makes `budgets` the ones new pools and the console see.
    pub fn store_budgets(&self, budgets: Budgets) {
        self.budgets.store(Arc::new(budgets));
    }

    /// Gives every pool its settings under `cfg`; retires pools of removed databases, whose
    /// clients (in `clients`) leave after their transaction.
    pub fn reconfigure(&self, cfg: &Config, clients: &Clients) {
        let origins = self.origins.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for pool in self.pools.all() {
            let Some(origin) = origins.get(pool.key()) else { continue };
            let Some(db) = cfg.databases.get(&origin.database) else {
                tracing::warn!(database = %origin.database, "database removed from the config: its clients leave after their transaction");
                clients.drain_database(
                    &origin.database,
                    &format!("database \"{}\" was removed from pgbroker's configuration", origin.database),
                );
                pool.retire();
                self.pools.remove(pool.key());
                continue;
            };
            let credential = if db.user.is_some() {
                db.password.clone().map(Credential::Password)
            } else {
                // The auth file's password if it has one, else what the clients' logins gave.
                let plain = cfg.auth.users.get(&origin.user).and_then(|e| e.password());
                plain.map(|p| Credential::Password(p.to_owned())).or_else(|| pool.target().credential.clone())
            };
            let (target, settings) = self.pool_setup(cfg, origin, db, credential);
            // Caps follow the config; `pool.reconfigure` then closes idle servers over them.
            self.shared_limits(cfg, origin, db);
            pool.reconfigure(settings, target);
        }
    }

    /// Closes every pool for good (the broker stopped): their servers close, none refills.
    pub fn retire_all(&self) {
        for pool in self.pools.all() {
            self.pools.remove(pool.key());
            pool.retire();
        }
    }

    /// Stops handing out servers for `database` (all if `None`) and waits until none is in use.
    pub async fn pause(&self, database: Option<&str>) -> Result<(), PauseError> {
        let pools: Vec<_> =
            self.pools.all().into_iter().filter(|p| database.is_none_or(|d| p.key().database == d)).collect();
        if pools.is_empty() {
            return Err(PauseError::NoPool(database.unwrap_or("*").to_string()));
        }
        for p in &pools {
            p.pause();
        }
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        while pools.iter().any(|p| p.servers().iter().any(|s| s.state == ServerState::Active)) {
            if tokio::time::Instant::now() >= deadline {
                return Err(PauseError::StillActive);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(database = database.unwrap_or("*"), "paused");
        Ok(())
    }

    /// Hands out servers again for `database` (all if `None`).
    pub fn resume(&self, database: Option<&str>) {
        for p in self.pools.all().into_iter().filter(|p| database.is_none_or(|d| p.key().database == d)) {
            p.resume();
        }
        tracing::info!(database = database.unwrap_or("*"), "resumed");
    }

    /// Disconnects every client of `database` (in `clients`) and closes its idle servers
    /// (busy ones close as their clients go). Returns the number of clients.
    pub fn kill(&self, database: &str, clients: &Clients) -> usize {
        let n = clients.kill_database(database);
        for p in self.pools.all().into_iter().filter(|p| p.key().database == database) {
            p.close_idle();
        }
        n
    }

    /// Per configured database: totals since start and the averages of the last period.
    pub fn database_stats(&self) -> Vec<(String, Snapshot, Averages)> {
        let cfg = self.live.config();
        let averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        cfg.databases
            .keys()
            .map(|db| {
                let total = self.database_totals(db);
                let avg = averages.get(db).map(|(_, a)| *a).unwrap_or_default();
                (db.clone(), total, avg)
            })
            .collect()
    }

    fn database_totals(&self, db: &str) -> Snapshot {
        let mut total = Snapshot::default();
        for p in self.pools.all().into_iter().filter(|p| p.key().database == db) {
            total.add(&p.counters.snapshot());
        }
        total
    }

    /// Recomputes the averages over the period since the last call.
    pub fn roll_stats(&self, period: Duration) {
        let cfg = self.live.config();
        let mut averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        for db in cfg.databases.keys() {
            let now = self.database_totals(db);
            let before = averages.get(db).map(|(s, _)| *s).unwrap_or_default();
            averages.insert(db.to_string(), (now, Averages::between(&before, &now, period)));
        }
    }
}

/// True for the pool fleet members heartbeat through (fleet mode).
fn is_fleet_pool(cfg: &Config, origin: &Origin, db: &Database) -> bool {
    cfg.budget.mode == crate::config::BudgetMode::Fleet
        && !origin.listener
        && budget::own_login(cfg, &budget::server_of(db))
            .is_some_and(|(d, u, _)| d == origin.database && u == origin.user)
}
