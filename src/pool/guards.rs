//! Drop guards that undo a pool's bookkeeping however a connect attempt or a wait ends.

use super::{Grant, Pool};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Ends a probe (see `Pool::connect`) however the attempt ends, dropped futures included.
pub(super) struct ProbeGuard<'a>(pub(super) &'a Pool);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().probing = false;
    }
}

/// Frees a counted slot if a connect is abandoned or fails.
pub(super) struct SlotGuard(pub(super) Option<Arc<Pool>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.release_slot();
        }
    }
}

/// A checkout's place in the queue: dropped, it withdraws, giving back what was granted.
pub(super) struct Withdraw<'a> {
    pub(super) pool: &'a Pool,
    pub(super) rx: oneshot::Receiver<Grant>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.pool.give_back(&mut self.rx);
    }
}
