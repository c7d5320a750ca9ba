//! The one replay of a batch whose cached plan went stale (a migration changed a table under
//! a prepared statement): the batch is recorded from its first Bind of a named statement,
//! the error held back, and the batch sent again once with the statement prepared afresh.

use super::{Expect, Prepared};
use crate::proto::TxnStatus;
use bytes::BytesMut;
use std::sync::atomic::Ordering;

/// Where the recording of the current batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Batch {
    Off,
    Recording,
    /// Recorded up to its Sync; kept until its ReadyForQuery.
    Complete,
}

/// Largest batch kept for a replay; bigger ones just pass the error on.
pub(super) const MAX_REPLAY: usize = 1024 * 1024;

/// PostgreSQL's answer when a statement's result columns changed under it.
fn is_stale_plan(error: &[u8]) -> bool {
    let has = |needle: &[u8]| error.windows(needle.len()).any(|w| w == needle);
    has(b"\0C0A000\0") && has(b"cached plan must not change result type")
}

impl Prepared {
    /// A stale cached plan at the first Bind of a recorded batch outside a transaction: the
    /// statement gets a new server-side name for every client, and the error is held back so
    /// the batch can run again. True if held.
    pub(super) fn hold_stale_plan_error(&mut self, msg: &[u8], status: TxnStatus) -> bool {
        let Some(Expect::Bind(Some((def, version)), first)) = self.expect.front() else { return false };
        if !is_stale_plan(msg) {
            return false;
        }
        // Whoever sees it first renames it; every server then prepares it afresh.
        let _ = def.version.compare_exchange(*version, version + 1, Ordering::Relaxed, Ordering::Relaxed);
        let alone = self.expect.iter().skip_while(|e| !matches!(e, Expect::Sync)).nth(1).is_none();
        let retry = *first && alone && self.batch == Batch::Complete && status == TxnStatus::Idle && !self.replaying;
        if retry {
            self.held_error = Some(BytesMut::from(msg));
        }
        retry
    }

    /// The batch to send again after a stale plan, once.
    pub fn take_replay(&mut self) -> Option<BytesMut> {
        self.replay.take()
    }
}
