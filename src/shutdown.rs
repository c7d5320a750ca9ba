//! How far the broker is in stopping: draining (no new clients, busy ones finish their
//! transaction), stopped accepting, stopped for good.

use crate::flag::Flag;
use tokio_util::sync::CancellationToken;

/// The stop phases every task watches.
#[derive(Default)]
pub struct Shutdown {
    /// Cancelled when the broker stops for good: every task ends.
    stop: CancellationToken,
    /// Raised with `stop`, for client sessions: checked on every wake-up of each, where a
    /// token's check takes a lock and a flag's one load.
    stopped: Flag,
    /// Cancelled when a graceful stop begins: no new clients, idle ones leave, busy ones
    /// finish their transaction first.
    draining: CancellationToken,
    /// Cancelled once the client listener is closed after a drain began: until then the
    /// accept loop may still take in queued connections the drain must wait for.
    stopped_accepting: CancellationToken,
}

impl Shutdown {
    /// Stops for good: every task ends.
    pub fn stop(&self) {
        self.draining.cancel();
        self.stop.cancel();
        self.stopped.raise();
    }

    /// Begins a graceful stop.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// True once a graceful stop began.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// True once the broker stopped for good.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when a graceful stop begins.
    pub async fn drain_begun(&self) {
        self.draining.cancelled().await;
    }

    /// Resolves when the broker stops for good (a token wait, for long-lived tasks).
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Resolves when the broker stops for good (a flag wait, for client sessions).
    pub async fn stopped_flag(&self) {
        self.stopped.wait().await;
    }

    /// The token cancelled when the broker stops for good, for tasks that keep their own.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The token cancelled when a graceful stop begins, for tasks that keep their own.
    pub fn drain_token(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// The accept loop closed its listener after a drain began.
    pub fn stop_accepting(&self) {
        self.stopped_accepting.cancel();
    }

    /// Resolves once the accept loop has closed its listener.
    pub async fn accepting_stopped(&self) {
        self.stopped_accepting.cancelled().await;
    }
}
