//! Drop guards that undo a pool's bookkeeping however a connect attempt ends.

use super::Pool;
use std::sync::Arc;

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
