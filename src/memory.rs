//! Giving memory back to the system after a burst. glibc's allocator keeps what thousands
//! of departed clients freed inside its arenas, so the process's RSS would stay at the burst's
//! high-water mark (PgBouncer's returns to where it started); `malloc_trim` hands the free
//! pages among them back. It is called only when many clients have left or gone quiet since
//! the last call, so a steady broker never pays for it.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the client counts are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How far the footprint must fall below its high-water mark before a trim: about a
/// megabyte of client state, less is not worth walking the arenas for.
const STEP: usize = 256;

/// When a trim is worth it, from a measure of the memory the clients hold (open clients
/// plus awake ones: a client that hibernates frees its relay state, one that leaves frees
/// the rest).
#[derive(Debug, Default)]
pub struct Trim {
    /// The highest footprint seen since the last trim.
    high: usize,
}

impl Trim {
    /// Records the footprint now; true when it fell far enough for a trim (which the caller
    /// then does: the mark starts again from here).
    pub fn due(&mut self, footprint: usize) -> bool {
        self.high = self.high.max(footprint);
        if self.high - footprint < STEP {
            return false;
        }
        self.high = footprint;
        true
    }
}

/// Capacity below which a collection is never shrunk (the reallocation is not worth it).
const SHRINK_ABOVE: usize = 64;

/// The capacity to shrink a map or queue to, if it keeps over four times its length in
/// spare room: one sized for a burst of thousands of clients would otherwise keep that room
/// for good (hashbrown and VecDeque never shrink on their own). Halving on a quarter keeps
/// a collection that breathes from reallocating on every change.
pub fn shrink_to(len: usize, capacity: usize) -> Option<usize> {
    (capacity > SHRINK_ABOVE && len < capacity / 4).then_some(len * 2)
}

/// The footprint [`Trim`] follows: open clients, and again those not hibernating.
pub fn footprint(open: usize, hibernating: usize) -> usize {
    open + open.saturating_sub(hibernating)
}

/// Every `CHECK_EVERY` until `stop`: gives memory back when `footprint` (see [`footprint`])
/// fell by `STEP` since the last time.
pub async fn give_back_after_bursts(footprint: impl Fn() -> usize, stop: CancellationToken) {
    let mut trim = Trim::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if trim.due(footprint()) {
            give_back();
        }
    }
}

/// Returns the allocator's free pages to the system (glibc; elsewhere nothing to do: musl
/// and the BSDs' allocators return memory on their own).
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena).
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_that_leaves_asks_for_one_trim() {
        let mut t = Trim::default();
        assert!(!t.due(10));
        assert!(!t.due(5_000), "arriving");
        assert!(t.due(10), "left");
        assert!(!t.due(10), "nothing freed since");
    }

    #[test]
    fn a_small_fall_asks_for_none() {
        let mut t = Trim::default();
        assert!(!t.due(1_000));
        assert!(!t.due(1_000 - STEP + 1));
        assert!(!t.due(1_000));
    }

    #[test]
    fn a_collection_is_shrunk_only_when_mostly_empty_and_large() {
        assert_eq!(shrink_to(100, 16_384), Some(200));
        assert_eq!(shrink_to(0, 1_024), Some(0));
        assert_eq!(shrink_to(300, 1_024), None, "a quarter full or more");
        assert_eq!(shrink_to(0, SHRINK_ABOVE), None, "small");
    }

    #[test]
    fn clients_going_quiet_count_as_a_fall() {
        let mut t = Trim::default();
        assert!(!t.due(footprint(1_000, 0)));
        assert!(t.due(footprint(1_000, 1_000)), "every relay state freed");
    }
}
