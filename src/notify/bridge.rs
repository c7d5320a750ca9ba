//! The bridge's state: the LISTEN/NOTIFY hub of each database, started on first use, the
//! open WebSocket connections, and the pools the bridge runs its own queries through.

use super::ws::WsCounts;
use super::{Emit, Hub, Hubs};
use crate::config::{Config, Live};
use crate::events::Events;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::server::Credential;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use thiserror::Error;

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

/// The hubs, the WebSocket connections and what they need of the rest of the broker.
pub struct Bridge {
    live: Live,
    registry: Arc<Registry>,
    events: Arc<Events>,
    shutdown: Arc<Shutdown>,
    /// LISTEN/NOTIFY hubs by database.
    hubs: Hubs,
    /// Open WebSocket connections.
    ws: WsCounts,
}

impl Bridge {
    /// A bridge with no hub started yet.
    pub fn new(live: Live, registry: Arc<Registry>, events: Arc<Events>, shutdown: Arc<Shutdown>) -> Bridge {
        Bridge { live, registry, events, shutdown, hubs: Hubs::default(), ws: WsCounts::default() }
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// The hubs started so far.
    pub fn hubs(&self) -> &Hubs {
        &self.hubs
    }

    /// Open WebSocket connections.
    pub fn ws(&self) -> &WsCounts {
        &self.ws
    }

    /// Operational events (the reserved channels read them).
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// The stop phases (WebSocket sessions close when a drain begins).
    pub fn shutdown(&self) -> &Arc<Shutdown> {
        &self.shutdown
    }

    /// The LISTEN/NOTIFY hub of `database`, started on first use. Its listener connection
    /// logs in as the database's configured user and counts against the budget.
    pub fn hub(&self, cfg: &Config, database: &str) -> Result<Arc<Hub>, BridgeError> {
        let db = cfg.databases.get(database).ok_or_else(|| BridgeError::NotConfigured(database.to_string()))?;
        let user = db.user.as_deref().ok_or_else(|| BridgeError::NoListenerUser(database.to_string()))?;
        Ok(self.hubs.get_or_start(database, || {
            let pool = self.registry.listener_pool(cfg, database, db, user);
            let events = self.events.clone();
            let emit: Emit = Arc::new(move |kind, fields| events.emit(kind, fields));
            Hub::start(database, pool, &db.channels, &cfg.websocket, emit, self.shutdown.stop_token())
        }))
    }

    /// The pool the bridge runs its own queries through (`snapshot_query`): the database's,
    /// as its configured user.
    pub fn pool(&self, cfg: &Config, database: &str) -> Result<Arc<Pool>, BridgeError> {
        let db = cfg.databases.get(database).ok_or_else(|| BridgeError::NotConfigured(database.to_string()))?;
        let user = db.user.as_deref().ok_or_else(|| BridgeError::NoSnapshotUser(database.to_string()))?;
        Ok(self.registry.pool(cfg, database, db, user, db.password.clone().map(Credential::Password)))
    }
}
