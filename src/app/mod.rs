//! The broker: its parts (each owning its state: the live config, the stop phases,
//! admission, the pool registry, the bridge, the fleet, the client registry), how they are
//! put together, and what works on the whole of them: starting, accepting, reloading,
//! upgrading and stopping, and the operator's surfaces (admin console, HTTP, health).

mod accept;
pub mod admin;
mod broker;
pub mod health;
pub mod http;
mod lifecycle;
mod reload;
mod scrape;
mod upgrade;

pub use crate::admission::ADMIN_RESERVE;
pub use broker::Broker;
pub use lifecycle::{run, wait_for_stop_signal};
pub use reload::ReloadError;
pub use upgrade::UpgradeError;

use crate::admission::Admission;
use crate::budget::BudgetError;
use crate::cancel::CancelRegistry;
use crate::clients::Clients;
use crate::config::{Config, Live};
use crate::events::Events;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::notify::Bridge;
use crate::registry::{Budgets, Registry};
use crate::session::Shared;
use crate::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use thiserror::Error;

/// Period of SHOW STATS averages (PgBouncer's `stats_period`).
const STATS_PERIOD: Duration = Duration::from_secs(15);

/// One broker: its parts, shared by every task. Passed as a handle so tests can run several.
pub struct App {
    live: Live,
    shutdown: Arc<Shutdown>,
    admission: Arc<Admission>,
    registry: Arc<Registry>,
    bridge: Arc<Bridge>,
    fleet: Arc<Fleet>,
    /// Logged-in clients.
    clients: Arc<Clients>,
    /// Client cancel keys.
    cancels: Arc<CancelRegistry>,
    /// What client sessions see of the above.
    session: Arc<Shared>,
    /// Prometheus recorder.
    metrics: Arc<Metrics>,
    /// Operational events (logs and `$pgbroker.events`).
    events: Arc<Events>,
    /// Successful config reloads.
    reloads: AtomicU64,
    /// Rejected config reloads.
    reload_failures: AtomicU64,
    /// The listening sockets, for a hand-over to a new process (`UPGRADE`, SIGUSR2).
    listeners: upgrade::Listeners,
    /// A hand-over is under way.
    upgrading: AtomicBool,
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
    /// A broker running `config` within `budgets`, its listening sockets `listeners`.
    fn new(config: Config, budgets: Budgets, listeners: upgrade::Listeners) -> Arc<App> {
        let instance_id = crate::fleet::new_instance_id();
        // `application_name` of server connections: the fleet's tag in fleet mode (restart-only).
        let server_tag = (config.budget.mode == crate::config::BudgetMode::Fleet)
            .then(|| crate::fleet::server_tag(&config.budget.fleet, &instance_id));
        let live = Live::new(config);
        let shutdown = Arc::new(Shutdown::default());
        let metrics = Arc::new(Metrics::default());
        let events = Arc::new(Events::default());
        let registry = Arc::new(Registry::new(live.clone(), budgets, metrics.clone(), events.clone(), server_tag));
        let bridge = Arc::new(Bridge::new(live.clone(), registry.clone(), events.clone(), shutdown.clone()));
        let fleet = Arc::new(Fleet::new(live.clone(), registry.clone(), shutdown.clone(), instance_id));
        let admission = Arc::new(Admission::default());
        let clients = Arc::new(Clients::default());
        let cancels = Arc::new(CancelRegistry::default());
        Arc::new_cyclic(|app| App {
            session: Arc::new(Shared::new(
                live.clone(),
                registry.clone(),
                admission.clone(),
                cancels.clone(),
                clients.clone(),
                Arc::default(),
                bridge.clone(),
                Arc::new(admin::Console(app.clone())),
            )),
            live,
            shutdown,
            admission,
            registry,
            bridge,
            fleet,
            clients,
            cancels,
            metrics,
            events,
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            listeners,
            upgrading: AtomicBool::new(false),
        })
    }

    /// The current configuration snapshot. Take it once per unit of work and keep the `Arc`.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// Makes `config` the one new work sees.
    pub fn store_config(&self, config: Config) {
        self.live.store(config);
    }

    /// The stop phases.
    pub fn shutdown(&self) -> &Arc<Shutdown> {
        &self.shutdown
    }

    /// Client admission: counts, limits, refusals.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The pools and their budgets.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The LISTEN/NOTIFY bridge.
    pub fn bridge(&self) -> &Arc<Bridge> {
        &self.bridge
    }

    /// This broker in its fleets (fleet mode).
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Logged-in clients.
    pub fn clients(&self) -> &Arc<Clients> {
        &self.clients
    }

    /// Client cancel keys.
    pub fn cancels(&self) -> &Arc<CancelRegistry> {
        &self.cancels
    }

    /// What client sessions see of the broker.
    pub fn session(&self) -> &Arc<Shared> {
        &self.session
    }

    /// Operational events.
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Clients connected now (including those still logging in).
    pub fn client_count(&self) -> usize {
        self.admission.client_count()
    }

    /// Clients hibernating now (quiet, their relay state freed).
    pub fn hibernating_clients(&self) -> usize {
        self.admission.hibernating_clients()
    }

    /// Successful config reloads.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Relaxed)
    }

    /// Rejected config reloads.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Relaxed)
    }
}
