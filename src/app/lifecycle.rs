//! The process lifecycle: signals (SIGHUP reloads; SIGUSR2 hands over to a new process;
//! SIGTERM or SIGINT drains gracefully; a second one, or SIGQUIT, stops at once), systemd
//! notifications and the watchdog, and the graceful drain itself.

use super::{App, Broker};
use crate::config::Config;
use crate::sdnotify;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

/// How long running queries get to notice their cancel before everything is closed.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Runs the broker until it is stopped by a signal or the admin console.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP right after READY=1 must reload, not kill (its default action).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let broker = Broker::start(config).await?;
    let app = broker.app().clone();
    sdnotify::ready();
    if let Some(interval) = sdnotify::watchdog_interval() {
        // Pinged from the runtime itself: a wedged runtime stops the pings and systemd acts.
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    () = app.shutdown().stopped() => return,
                    _ = tick.tick() => sdnotify::notify("WATCHDOG=1"),
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = hup.recv() => {
                sdnotify::reloading();
                // A rejected reload is logged (once) and counted by `reload` itself.
                let _ = app.reload().await;
                sdnotify::notify("READY=1");
            }
            _ = usr2.recv() => {
                // A binary upgrade: a new process takes the sockets; once it is ready this one
                // drains (the loop ends on `draining`). A failure is logged and changes nothing.
                tracing::info!("SIGUSR2: handing the listening sockets to a new process");
                let app = app.clone();
                tokio::spawn(async move { let _ = app.upgrade().await; });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = app.shutdown().drain_begun() => break,
            _ = quit.recv() => {
                tracing::warn!("SIGQUIT: stopping at once");
                broker.stop();
                return Ok(());
            }
        }
    }
    sdnotify::notify("STOPPING=1");
    let timeout = app.config().broker.shutdown_timeout;
    tracing::info!(?timeout, "stopping: draining clients");
    tokio::select! {
        _ = broker.drain(timeout) => tracing::info!("drained; bye"),
        _ = term.recv() => stop_now(&broker),
        _ = int.recv() => stop_now(&broker),
        _ = quit.recv() => stop_now(&broker),
    }
    Ok(())
}

fn stop_now(broker: &Broker) {
    tracing::warn!("second stop signal: stopping at once");
    broker.stop();
}

/// Waits for SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C).
pub async fn wait_for_stop_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

impl App {
    /// Graceful stop: stop accepting (health turns `unavailable` and readiness fails first);
    /// idle clients are told (57P01) and closed at once, clients inside a transaction at its
    /// end; after `timeout` running queries are cancelled and everything left is closed.
    pub async fn drain(&self, timeout: Duration) {
        self.shutdown.begin_drain();
        self.clients.drain_all("pgbroker is shutting down");
        let deadline = Instant::now() + timeout;
        // The accept loop's last sweep may still admit queued connections: counting clients
        // before it is done would end the drain under them (they would be reset).
        let _ = tokio::time::timeout_at(deadline, self.shutdown.accepting_stopped()).await;
        // Count connections, not logged-in clients: one still logging in must not be cut off.
        while self.client_count() > 0 || self.bridge.ws().total() > 0 {
            if Instant::now() >= deadline {
                let left = self.client_count();
                tracing::warn!(clients = left, "shutdown_timeout reached: cancelling running queries");
                for p in self.registry.pools().all() {
                    p.cancel_active().await;
                }
                let grace = Instant::now() + CANCEL_GRACE;
                while self.client_count() > 0 && Instant::now() < grace {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
