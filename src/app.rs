//! Wiring: shared state, the client listener and its accept loop, and process signals.

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::error::SqlState;
use crate::pool::Pools;
use crate::proto::build::{self, Severity};
use crate::session;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
}

impl App {
    /// The current configuration snapshot. Take it once per unit of work and keep the `Arc`.
    pub fn config(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// Clients connected now (including those still logging in).
    pub fn client_count(&self) -> usize {
        self.config().broker.max_client_conn - self.client_slots.available_permits()
    }
}

/// A running broker: its listener task and sessions.
pub struct Broker {
    app: Arc<App>,
    addr: SocketAddr,
    tracker: TaskTracker,
}

impl Broker {
    /// Binds `broker.listen` (port 0 picks a free port) and starts accepting clients.
    pub async fn start(config: Config) -> std::io::Result<Broker> {
        let listener = TcpListener::bind(config.broker.listen).await?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            client_slots: Arc::new(Semaphore::new(config.broker.max_client_conn)),
            live: ArcSwap::from_pointee(config),
            pools: Pools::default(),
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: CancellationToken::new(),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(app.clone(), listener, tracker.clone()));
        tracing::info!(%addr, "listening for PostgreSQL clients");
        Ok(Broker { app, addr, tracker })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        match accepted {
            Ok((stream, peer)) => {
                crate::net::tune(&stream, app.config().broker.tcp_keepalive);
                match app.client_slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let app = app.clone();
                        let shutdown = app.shutdown.clone();
                        tracker.spawn(async move {
                            tokio::select! {
                                _ = session::run(app, stream, peer) => {}
                                _ = shutdown.cancelled() => {}
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "max_client_conn reached; refusing client");
                        tokio::spawn(refuse(stream, app.config().broker.max_client_conn));
                    }
                }
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, limit: usize) {
    let mut buf = BytesMut::new();
    build::error_response(
        &mut buf,
        Severity::Fatal,
        SqlState::TOO_MANY_CONNECTIONS,
        &format!("no more connections allowed (max_client_conn = {limit})"),
        None,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&buf).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Runs the broker until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let broker = Broker::start(config).await?;
    wait_for_stop_signal().await?;
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
