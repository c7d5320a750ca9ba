//! Binary upgrade by hand-over: the running broker starts the binary now on disk with its own
//! listening sockets (passed as systemd passes them: `LISTEN_FDS`, first at fd 3), waits until
//! the new process says it is ready, then drains as on SIGTERM. The sockets never close, so
//! no connection is refused or reset: the kernel queue is one, and the old process serves
//! what it accepted to the end of its current work. If the new process exits or is not ready
//! in time, the old one keeps serving and says why.

use super::App;
use crate::sdnotify;
use command_fds::{CommandFdExt, FdMapping};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use thiserror::Error;

/// How long a new process has to start: derive its budget (reading servers with `auto`),
/// take the sockets and say READY=1.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an upgrade did not happen; the running process keeps serving.
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// A hand-over is under way, or the broker is stopping.
    #[error("the broker is already upgrading or stopping")]
    Busy,
    /// The new process could not be started.
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// It exited before it was ready (a bad config, a port it could not use, ...).
    #[error("the new process exited before it was ready ({0}); its log says why")]
    Exited(String),
    /// It was not ready in time; it was stopped.
    #[error("the new process was not ready within {READY_TIMEOUT:?}; it was stopped")]
    NotReady,
}

/// The sockets a hand-over passes on, in the order the new process takes them: the
/// PostgreSQL listener, then the HTTP listener.
#[derive(Debug, Default)]
pub struct Listeners(pub Vec<OwnedFd>);

impl App {
    /// Hands this broker's listening sockets to a new process of the binary on disk and,
    /// once it is ready, drains this one. Returns the new process's pid.
    pub async fn upgrade(self: &Arc<Self>) -> Result<u32, UpgradeError> {
        if self.shutdown.is_draining() || self.upgrading.swap(true, Ordering::SeqCst) {
            return Err(UpgradeError::Busy);
        }
        let result = self.hand_over().await;
        match &result {
            Ok(pid) => {
                tracing::info!(pid, "upgrade: the new process is ready; this one drains");
                // systemd (NotifyAccess=all) follows the new process as the service's main one.
                sdnotify::notify(&format!("MAINPID={pid}"));
                self.shutdown.begin_drain();
            }
            Err(e) => {
                tracing::error!(error = %crate::error::chain(e), "upgrade failed; this process keeps serving");
                self.upgrading.store(false, Ordering::SeqCst);
            }
        }
        result
    }

    async fn hand_over(&self) -> Result<u32, UpgradeError> {
        let exe = current_binary();
        let spawn_err = |e| UpgradeError::Spawn(exe.clone(), e);
        let dir = tempfile::tempdir().map_err(spawn_err)?;
        let path = dir.path().join("ready");
        let ready = tokio::net::UnixDatagram::bind(&path).map_err(spawn_err)?;
        let mut mappings = Vec::new();
        for (i, fd) in self.listeners.0.iter().enumerate() {
            mappings.push(FdMapping { parent_fd: fd.try_clone().map_err(spawn_err)?, child_fd: 3 + i as i32 });
        }
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .env("LISTEN_FDS", mappings.len().to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS_FIRST_FD")
            .env(sdnotify::HANDOVER_SOCKET, &path)
            .stdin(std::process::Stdio::null());
        cmd.fd_mappings(mappings).map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, exe = %exe.display(), "upgrade: started the new process with the listening sockets");
        let mut buf = [0u8; 512];
        let wait = async {
            loop {
                tokio::select! {
                    got = ready.recv(&mut buf) => {
                        if got.is_ok_and(|n| buf.get(..n).is_some_and(|m| m.windows(7).any(|w| w == b"READY=1"))) {
                            return Ok(());
                        }
                    }
                    status = child.wait() => {
                        return Err(UpgradeError::Exited(status.map_or_else(|e| e.to_string(), |s| s.to_string())));
                    }
                }
            }
        };
        match tokio::time::timeout(READY_TIMEOUT, wait).await {
            Ok(Ok(())) => Ok(pid),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let _ = child.start_kill();
                Err(UpgradeError::NotReady)
            }
        }
    }
}

/// The binary on disk now: after a package upgrade replaced it, `/proc/self/exe` names the
/// old file "(deleted)" and the path holds the new one.
fn current_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pgbroker"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(on_disk) => PathBuf::from(on_disk),
        None => exe,
    }
}
