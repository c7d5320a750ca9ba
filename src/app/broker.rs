//! Starting a broker: budgets, listeners (bound with SO_REUSEPORT, or taken from systemd
//! socket activation), background tasks; and stopping it, gracefully or at once.

use super::{App, STATS_PERIOD, StartError};
use crate::budget;
use crate::config::Config;
use crate::pool::Limit;
use crate::registry::Budgets;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

/// A running broker: its listeners, sessions and background tasks.
pub struct Broker {
    app: Arc<App>,
    addr: SocketAddr,
    http_addr: SocketAddr,
    tracker: TaskTracker,
}

/// Binds a listener that another pgbroker may share (SO_REUSEPORT), so a new process can
/// start on the same port while the old one drains.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Sockets passed by systemd (`LISTEN_FDS`): the first is the PostgreSQL listener, the
/// second (if any) the HTTP listener.
fn activated() -> (Option<TcpListener>, Option<TcpListener>) {
    let mut fds = listenfd::ListenFd::from_env();
    let mut take = |i| {
        let l = fds.take_tcp_listener(i).ok().flatten()?;
        l.set_nonblocking(true).ok()?;
        TcpListener::from_std(l).ok()
    };
    (take(0), take(1))
}

async fn bind_listener(passed: Option<TcpListener>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    match passed {
        Some(l) => {
            tracing::info!(addr = ?l.local_addr().ok(), "using a socket passed by systemd");
            Ok(l)
        }
        None => bind_shared(addr).map_err(|source| StartError::Listen { addr, source }),
    }
}

impl Broker {
    /// Derives the budgets (reading servers for `auto`), binds `broker.listen` and
    /// `broker.http_listen` (port 0 picks free ports) and starts serving.
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        let derivations = budget::derive_all(&config).await.map_err(StartError::Budget)?;
        let budgets: Budgets = derivations
            .into_iter()
            .map(|(server, d)| {
                tracing::info!("{d}");
                // In fleet mode the cap is the share the first fleet round grants.
                let cap = if d.fleet { 0 } else { d.budget as usize };
                let limit = Limit::new(format!("budget {server}"), cap);
                (server, (d, limit))
            })
            .collect();
        let (pg_fd, http_fd) = activated();
        let listener = bind_listener(pg_fd, config.broker.listen).await?;
        let http_listener = bind_listener(http_fd, config.broker.http_listen).await?;
        let err = |addr| move |source| StartError::Listen { addr, source };
        let addr = listener.local_addr().map_err(err(config.broker.listen))?;
        let http_addr = http_listener.local_addr().map_err(err(config.broker.http_listen))?;
        if !http_addr.ip().is_loopback() && config.websocket.tokens.is_empty() {
            tracing::warn!(%http_addr, "the WebSocket bridge listens beyond loopback with no tokens: anyone who can reach it may subscribe");
        }
        let (http_max, ws_max) = (config.broker.max_http_connections, config.websocket.max_ws_connections);
        if http_max < ws_max {
            tracing::warn!(
                max_http_connections = http_max,
                max_ws_connections = ws_max,
                "broker.max_http_connections is below websocket.max_ws_connections: WebSockets count against it, so at most {http_max} can connect"
            );
        }
        // Kept for a hand-over: duplicates of the listening sockets, closed on exec.
        let listeners = [listener.as_fd(), http_listener.as_fd()]
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(config.broker.listen))?;
        let app = App::new(config, budgets, super::upgrade::Listeners(listeners));
        app.fleet().join(app.config().broker.server_connect_timeout + Duration::from_secs(1)).await;
        let tracker = TaskTracker::new();
        tracker.spawn(super::accept::accept_loop(app.clone(), listener, tracker.clone()));
        tracker.spawn(super::http::serve(app.clone(), http_listener));
        tracker.spawn(stats_task(app.clone(), STATS_PERIOD));
        tracker.spawn(super::health::monitor(app.clone()));
        let counts = app.clone();
        tracker.spawn(crate::memory::give_back_after_bursts(
            move || crate::memory::footprint(counts.client_count(), counts.hibernating_clients()),
            app.shutdown().stop_token(),
        ));
        // Databases with fixed channels listen from the start.
        let cfg = app.config();
        for (name, db) in &cfg.databases {
            if !db.channels.is_empty()
                && let Err(e) = app.bridge().hub(&cfg, name)
            {
                tracing::warn!(database = %name, error = %e, "cannot start the notification listener");
            }
        }
        tracing::info!(%addr, %http_addr, "listening for PostgreSQL clients and HTTP");
        Ok(Broker { app, addr, http_addr, tracker })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address (metrics, health, WebSocket bridge).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The shared state.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops at once: every session and task ends.
    pub fn stop(&self) {
        self.app.shutdown().stop();
        self.tracker.close();
        // Servers close now, and no pool refills: an in-process broker (tests, benches)
        // leaves nothing on the server once stopped.
        self.app.registry().retire_all();
    }

    /// Stops gracefully: see [`App::drain`]; then everything ends.
    pub async fn drain(&self, timeout: Duration) {
        self.app.drain(timeout).await;
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Rolls the statistics period and the metrics' upkeep until the broker stops.
async fn stats_task(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            () = app.shutdown().stopped() => return,
            _ = tick.tick() => {
                app.registry().roll_stats(period);
                app.metrics.upkeep();
            }
        }
    }
}
