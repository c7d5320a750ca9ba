//! Wiring: shared state, the client listener and its accept loop, and process signals.

use crate::budget::{self, BudgetError, Derivation};
use crate::cancel::CancelRegistry;
use crate::config::{Config, Database};
use crate::error::SqlState;
use crate::notify::Hub;
use crate::pool::{Limit, Pool, PoolKey, PoolSettings, Pools};
use crate::proto::build::{self, Severity};
use crate::server::Target;
use crate::session;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Period of SHOW STATS averages (PgBouncer's `stats_period`).
const STATS_PERIOD: Duration = Duration::from_secs(15);

/// State shared by every task of one broker. Passed as a handle so tests can run several.
pub struct App {
    live: ArcSwap<Config>,
    /// Server pools.
    pub pools: Pools,
    /// Client cancel keys.
    pub cancels: Arc<CancelRegistry>,
    /// Cancelled when the broker stops.
    pub shutdown: CancellationToken,
    client_slots: Arc<Semaphore>,
    /// Per-server budgets and how each was derived.
    pub budgets: BTreeMap<String, (Derivation, Arc<Limit>)>,
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
    /// Prometheus recorder.
    pub metrics: crate::metrics::Metrics,
    /// Operational events (logs and `$pgbroker.events`).
    pub events: Arc<crate::events::Events>,
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

    /// Makes `config` the one new work sees.
    pub fn store_config(&self, config: Config) {
        self.live.store(Arc::new(config));
    }

    /// Clients connected now (including those still logging in).
    pub fn client_count(&self) -> usize {
        self.config().broker.max_client_conn - self.client_slots.available_permits()
    }

    /// The pool for a client of `database` whose server login is `server_user`, created on
    /// first use with its share of the budget and the shared limits.
    pub fn pool(
        &self,
        cfg: &Config,
        database: &str,
        db: &Database,
        server_user: &str,
        password: Option<String>,
    ) -> Arc<Pool> {
        let key = PoolKey { database: database.to_string(), user: server_user.to_string() };
        self.pools.get_or_create(&key, || {
            let server = budget::server_of(db);
            let mut limits = Vec::new();
            let mut split = usize::MAX;
            if let Some((d, limit)) = self.budgets.get(&server) {
                limits.push(limit.clone());
                let dbs_here = cfg.databases.values().filter(|x| budget::server_of(x) == server).count();
                split = (d.budget as usize / dbs_here.max(1)).max(1);
            }
            let b = &cfg.broker;
            if db.max_db_connections > 0 {
                limits.push(self.shared_limit(format!("max_db_connections {database}"), db.max_db_connections));
            }
            if b.max_user_connections > 0 {
                limits.push(self.shared_limit(format!("max_user_connections {server_user}"), b.max_user_connections));
            }
            let size = db.pool_size.or(b.default_pool_size).map_or(split, |n| n as usize);
            let target = Target {
                host: db.host.clone(),
                port: db.port,
                dbname: db.dbname.clone(),
                user: server_user.to_string(),
                password,
                keepalive: b.tcp_keepalive,
            };
            let settings = PoolSettings {
                size,
                min_size: db.min_pool_size as usize,
                reserve_size: db.reserve_pool_size as usize,
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
                metrics: self.metrics.pool(database, server_user),
                events: Some(self.events.clone()),
            };
            tracing::debug!(pool = %key, size, "creating pool");
            Pool::new(key.clone(), target, settings, limits)
        })
    }

    /// The LISTEN/NOTIFY hub of `database`, started on first use. Its listener connection
    /// logs in as the database's configured user and counts against the budget.
    pub fn hub(&self, cfg: &Config, database: &str) -> Result<Arc<Hub>, String> {
        let db = cfg.databases.get(database).ok_or_else(|| format!("database \"{database}\" is not configured"))?;
        let user = db
            .user
            .as_deref()
            .ok_or_else(|| format!("LISTEN/NOTIFY for database \"{database}\" needs databases.{database}.user (and password) for the listener connection"))?;
        let mut listener_db = db.clone();
        listener_db.pool_size = Some(1);
        listener_db.min_pool_size = 0;
        listener_db.reserve_pool_size = 0;
        let listener_key = format!("{database} (listener)");
        Ok(self.hubs.get_or_start(database, || {
            let pool = self.pool(cfg, &listener_key, &listener_db, user, db.password.clone());
            Hub::start(database, pool, &db.channels, self.shutdown.clone())
        }))
    }

    fn shared_limit(&self, name: String, cap: u32) -> Arc<Limit> {
        let mut map = self.shared_limits.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.clone()).or_insert_with(|| Limit::new(name, cap as usize)).clone()
    }
}

/// A running broker: its listener task and sessions.
pub struct Broker {
    app: Arc<App>,
    addr: SocketAddr,
    http_addr: SocketAddr,
    tracker: TaskTracker,
}

impl Broker {
    /// Derives the budgets (reading servers for `auto`), binds `broker.listen` (port 0
    /// picks a free port) and starts accepting clients.
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        let derivations = budget::derive_all(&config).await.map_err(StartError::Budget)?;
        let budgets = derivations
            .into_iter()
            .map(|(server, d)| {
                tracing::info!("{d}");
                let limit = Limit::new(format!("budget {server}"), d.budget as usize);
                (server, (d, limit))
            })
            .collect();
        let listen = config.broker.listen;
        let bind_err = |source| StartError::Listen { addr: listen, source };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let http_listen = config.broker.http_listen;
        let http_err = |source| StartError::Listen { addr: http_listen, source };
        let http_listener = TcpListener::bind(http_listen).await.map_err(http_err)?;
        let http_addr = http_listener.local_addr().map_err(http_err)?;
        if !http_addr.ip().is_loopback() && config.websocket.tokens.is_empty() {
            tracing::warn!(%http_addr, "the WebSocket bridge listens beyond loopback with no tokens: anyone who can reach it may subscribe");
        }
        let app = Arc::new(App {
            budgets,
            shared_limits: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            statements: Arc::default(),
            hubs: Default::default(),
            ws: Default::default(),
            clients: Arc::default(),
            averages: Mutex::new(HashMap::new()),
            reloads: Default::default(),
            reload_failures: Default::default(),
            refusals: Default::default(),
            metrics: Default::default(),
            events: Arc::default(),
            client_slots: Arc::new(Semaphore::new(config.broker.max_client_conn)),
            live: ArcSwap::from_pointee(config),
            pools: Pools::default(),
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: CancellationToken::new(),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(app.clone(), listener, tracker.clone()));
        tracker.spawn(crate::http::serve(app.clone(), http_listener));
        tracker.spawn(crate::admin::stats_task(app.clone(), STATS_PERIOD));
        tracker.spawn(crate::health::monitor(app.clone()));
        // Databases with fixed channels listen from the start.
        let cfg = app.config();
        for (name, db) in &cfg.databases {
            if !db.channels.is_empty() {
                if let Err(e) = app.hub(&cfg, name) {
                    tracing::warn!(database = %name, error = %e, "cannot start the notification listener");
                }
            }
        }
        tracing::info!(%addr, %http_addr, "listening for PostgreSQL clients and HTTP");
        Ok(Broker { app, addr, http_addr, tracker })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address (WebSocket bridge).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The shared state.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops accepting; sessions in progress are dropped with the runtime.
    pub fn stop(&self) {
        self.app.shutdown.cancel();
        self.tracker.close();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(app: Arc<App>, listener: TcpListener, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cfg = app.config();
        crate::net::tune(&stream, cfg.broker.tcp_keepalive);
        let Ok(permit) = app.client_slots.clone().try_acquire_owned() else {
            app.refusals.max_client_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, "max_client_conn reached; refusing client");
            let msg = format!("no more connections allowed (max_client_conn = {})", cfg.broker.max_client_conn);
            tokio::spawn(refuse(stream, msg));
            continue;
        };
        let Ok(per_ip) = IpSlot::take(&app, peer.ip(), cfg.broker.max_client_conn_per_ip) else {
            app.refusals.max_client_conn_per_ip.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, "max_client_conn_per_ip reached; refusing client");
            let msg = format!(
                "too many connections from {} (max_client_conn_per_ip = {})",
                peer.ip(),
                cfg.broker.max_client_conn_per_ip
            );
            tokio::spawn(refuse(stream, msg));
            continue;
        };
        let app = app.clone();
        let shutdown = app.shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = session::run(app, stream, peer) => {}
                _ = shutdown.cancelled() => {}
            }
            drop((permit, per_ip));
        });
    }
}

/// One client's count against `max_client_conn_per_ip`; released on drop.
struct IpSlot {
    app: Arc<App>,
    ip: IpAddr,
}

impl IpSlot {
    /// Counts a client from `ip` (`Ok(None)`: no limit, nothing counted); `Err` if that
    /// would exceed `limit`.
    fn take(app: &Arc<App>, ip: IpAddr, limit: usize) -> Result<Option<IpSlot>, ()> {
        if limit == 0 {
            return Ok(None);
        }
        let mut map = app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(());
        }
        *n += 1;
        Ok(Some(IpSlot { app: app.clone(), ip }))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, message: String) {
    let mut buf = BytesMut::new();
    build::error_response(&mut buf, Severity::Fatal, SqlState::TOO_MANY_CONNECTIONS, &message, None);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&buf).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Runs the broker until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let broker = Broker::start(config).await?;
    tokio::select! {
        r = wait_for_stop_signal() => r?,
        _ = broker.app().shutdown.cancelled() => {}
    }
    tracing::info!("stopping");
    broker.stop();
    Ok(())
}

/// Waits for SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C).
pub async fn wait_for_stop_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Without a handler SIGHUP would kill the process; reload is not implemented yet.
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => tracing::warn!("SIGHUP received: live reload is not available in this version; restart to apply config changes"),
        }
    }
}
