//! Hibernation: a client with nothing in flight that stays quiet for `HIBERNATE_AFTER` leaves
//! the relay loop, whose state (boxed, several KiB) is freed, and waits in a small future for
//! its socket to become readable, a KILL or drain, or its idle timeout; then the relay loop
//! starts again. An app's idle connections cost little memory, while a busy client never
//! pays for hibernating between its transactions.

use super::ClientLoop;
use crate::net::{ClientIo, ClientStream};
use crate::session::SessionError;
use std::time::Duration;
use tokio::time::Instant;

/// How long a client must be quiet, with nothing in flight, before it hibernates.
pub(super) const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

/// When a quiet client hibernates. Activity only sets a flag (no clock read per message):
/// at the deadline a client that was active meanwhile gets another `HIBERNATE_AFTER`.
#[derive(Debug)]
pub(super) struct Quiet {
    /// When to look again.
    pub at: Instant,
    /// Something moved since `at` was set.
    pub active: bool,
}

impl Quiet {
    /// Starting now.
    pub fn new() -> Quiet {
        Quiet { at: Instant::now() + HIBERNATE_AFTER, active: false }
    }

    /// At the deadline: true if the client stayed quiet since it was set; else starts over.
    pub fn is_over(&mut self, now: Instant) -> bool {
        if now < self.at {
            return false;
        }
        if std::mem::take(&mut self.active) {
            self.at = now + HIBERNATE_AFTER;
            return false;
        }
        true
    }
}

impl ClientLoop {
    /// True when nothing would be lost by leaving the relay loop: no server, no bytes held
    /// either way (TLS keeps written bytes in its own buffer until a flush gets them out), no
    /// notifications to deliver, no reply the broker still owes.
    pub(super) fn can_hibernate(&self) -> bool {
        self.server.is_none()
            && self.up.is_released()
            && self.down.is_released()
            && !self.down.unflushed
            && !self.up.in_message()
            && self.pending.is_settled()
            && self.listens.as_ref().is_none_or(|l| !l.is_active())
            && self.cancelling.is_none()
    }

    /// Waits, outside the relay loop, until the client needs it again.
    pub(super) async fn hibernate(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        let _counted = self.shared.admission.hibernate();
        self.recent.forget();
        let client = self.client.clone();
        // Boxed, and only with `client_idle_timeout` set: most clients need no timer here.
        let mut idle_limit = self.timers.deadline(None, false).map(|d| Box::pin(tokio::time::sleep_until(d)));
        let stream = &io.stream;
        tokio::select! {
            r = std::future::poll_fn(|cx| stream.poll_read_ready(cx)) => r.map_err(SessionError::Io),
            () = client.kill.wait() => Ok(()),
            () = client.drain.wait() => Ok(()),
            () = async { if let Some(s) = idle_limit.as_mut() { s.await } }, if idle_limit.is_some() => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_client_is_over_at_the_deadline_and_an_active_one_gets_another_period() {
        let start = Instant::now();
        let mut q = Quiet { at: start + HIBERNATE_AFTER, active: false };
        assert!(!q.is_over(start));
        q.active = true;
        assert!(!q.is_over(start + HIBERNATE_AFTER), "active meanwhile");
        assert_eq!(q.at, start + 2 * HIBERNATE_AFTER);
        assert!(q.is_over(start + 2 * HIBERNATE_AFTER), "quiet for a whole period");
    }
}
