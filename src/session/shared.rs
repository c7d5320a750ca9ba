//! What every client session needs of the rest of the broker: one per broker, shared by all
//! its sessions (one pointer each).

use super::SessionError;
use super::prepared;
use crate::admission::Admission;
use crate::cancel::CancelRegistry;
use crate::clients::{Client, Clients};
use crate::config::{Config, Live};
use crate::net::{ClientIo, ClientStream};
use crate::notify::Bridge;
use crate::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A console session's future.
pub type ConsoleFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SessionError>> + Send + 'a>>;

/// The admin console, served to a client that logs in to its virtual database. The broker
/// above provides it: the console shows and operates the whole broker.
pub trait Console: Send + Sync {
    /// Serves `user`'s console session on `io` until it ends.
    fn serve<'a>(
        &'a self,
        io: &'a mut ClientIo<ClientStream>,
        user: &'a str,
        client: &'a Arc<Client>,
    ) -> ConsoleFuture<'a>;
}

/// True for the database names that open the console.
pub fn is_console(database: &str) -> bool {
    database == "pgbroker" || database == "pgbouncer"
}

/// The broker's parts a session uses.
pub struct Shared {
    live: Live,
    pub(super) registry: Arc<Registry>,
    pub(super) admission: Arc<Admission>,
    pub(super) cancels: Arc<CancelRegistry>,
    pub(super) clients: Arc<Clients>,
    /// Prepared statement definitions shared by all clients.
    pub(super) statements: Arc<prepared::Registry>,
    pub(super) bridge: Arc<Bridge>,
    pub(super) console: Arc<dyn Console>,
}

impl Shared {
    /// Sessions' view of a broker made of these parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        live: Live,
        registry: Arc<Registry>,
        admission: Arc<Admission>,
        cancels: Arc<CancelRegistry>,
        clients: Arc<Clients>,
        statements: Arc<prepared::Registry>,
        bridge: Arc<Bridge>,
        console: Arc<dyn Console>,
    ) -> Shared {
        Shared { live, registry, admission, cancels, clients, statements, bridge, console }
    }

    /// The current configuration snapshot. Take it once per unit of work and keep the `Arc`.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// The current configuration if a reload replaced `current` (one atomic load otherwise).
    pub fn config_if_changed(&self, current: &Arc<Config>) -> Option<Arc<Config>> {
        self.live.config_if_changed(current)
    }
}
