//! A cap on open servers shared by several pools: the per-server budget, `max_db_connections`,
//! `max_user_connections`. Pools blocked by a full limit queue on it in FIFO order and are
//! offered capacity as it frees; a blocked pool may ask another pool to close an idle server.

use super::Pool;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

#[derive(Default)]
struct State {
    used: usize,
    /// Pools with clients waiting because this limit is full, oldest first.
    waiting: VecDeque<Weak<Pool>>,
    /// Every pool counted against this limit.
    members: Vec<Weak<Pool>>,
}

/// A shared cap on open servers.
pub struct Limit {
    name: String,
    cap: AtomicUsize,
    /// Mirrors `used` so checkin can test it without the lock.
    used: AtomicUsize,
    /// Mirrors `waiting.len()` so checkin can test it without the lock.
    waiting_count: AtomicUsize,
    /// Frozen (see `freeze`): the cap follows what is held down, and no slot passes on.
    frozen: AtomicBool,
    state: Mutex<State>,
}

impl Limit {
    /// A limit of `cap` servers, named for error messages (e.g. `budget 10.0.0.5:5432`).
    pub fn new(name: impl Into<String>, cap: usize) -> Arc<Limit> {
        Arc::new(Limit {
            name: name.into(),
            cap: AtomicUsize::new(cap),
            used: AtomicUsize::new(0),
            waiting_count: AtomicUsize::new(0),
            frozen: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Servers counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Changes the cap (live reload). Servers over a lowered cap close as they free up.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        self.notify();
    }

    /// Holds no more than is held now, and less as servers close, until `thaw`: for a fleet
    /// member whose claim nobody can see (its lease is gone), so a server restart or a
    /// partition cannot make it reopen what its peers may have taken meanwhile.
    pub fn freeze(&self) {
        let st = self.lock();
        self.frozen.store(true, Ordering::SeqCst);
        self.cap.fetch_min(st.used, Ordering::SeqCst);
    }

    /// Ends a freeze; the cap stays where it is until `set_cap`.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// True while frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// True if some pool is blocked on this limit.
    pub fn has_waiters(&self) -> bool {
        self.waiting_count.load(Ordering::Relaxed) > 0
    }

    /// True if a pool other than `pool` is blocked on this limit.
    pub(super) fn has_other_waiters(&self, pool: &Pool) -> bool {
        self.has_waiters() && self.lock().waiting.iter().any(|w| !std::ptr::eq(w.as_ptr(), pool))
    }

    /// True if no capacity is left.
    pub fn is_full(&self) -> bool {
        self.used() >= self.cap()
    }

    pub(super) fn add_member(&self, pool: Weak<Pool>) {
        let mut st = self.lock();
        st.members.retain(|p| p.strong_count() > 0);
        st.members.push(pool);
    }

    /// Takes one unit if there is room.
    pub(super) fn try_acquire(&self) -> bool {
        let mut st = self.lock();
        if st.used < self.cap() {
            st.used += 1;
            self.used.store(st.used, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Gives one unit back without waking anyone; follow with `notify` once no pool lock is held.
    pub(super) fn release_quiet(&self) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(1);
        self.used.store(st.used, Ordering::SeqCst);
        if self.is_frozen() {
            self.cap.fetch_min(st.used, Ordering::SeqCst);
        }
    }

    /// Gives one unit back if more are counted than the cap allows (a reload lowered it),
    /// deciding and counting at once so two servers freed together never both go for one
    /// over the cap. True if it gave one back.
    pub(super) fn release_if_over(&self) -> bool {
        // Asked at every check-in: the usual answer without the lock. A cap lowered meanwhile
        // is seen at the next one.
        if self.used() <= self.cap() {
            return false;
        }
        let mut st = self.lock();
        if st.used <= self.cap() {
            return false;
        }
        st.used -= 1;
        self.used.store(st.used, Ordering::SeqCst);
        if self.is_frozen() {
            self.cap.fetch_min(st.used, Ordering::SeqCst);
        }
        true
    }

    /// Queues `pool` (once) to be offered capacity.
    pub(super) fn wait(&self, pool: &Arc<Pool>) {
        let mut st = self.lock();
        if !st.waiting.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(pool))) {
            st.waiting.push_back(Arc::downgrade(pool));
            self.waiting_count.store(st.waiting.len(), Ordering::Relaxed);
        }
    }

    /// Offers free capacity to waiting pools, oldest first. Call with no pool lock held.
    pub(super) fn notify(&self) {
        let queued = {
            let mut st = self.lock();
            if st.used >= self.cap() || st.waiting.is_empty() {
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        let mut still = VecDeque::new();
        for weak in queued {
            let Some(pool) = weak.upgrade() else { continue };
            if !self.is_full() {
                pool.on_capacity();
            }
            if pool.has_blocked_waiters() {
                still.push_back(weak);
            }
        }
        let mut st = self.lock();
        // Pools queued meanwhile go after the ones that were already waiting.
        for w in std::mem::take(&mut st.waiting) {
            if !still.iter().any(|s| s.ptr_eq(&w)) {
                still.push_back(w);
            }
        }
        st.waiting = still;
        self.waiting_count.store(st.waiting.len(), Ordering::Relaxed);
    }

    /// Closes idle servers of member pools while more are counted than the cap allows (busy
    /// ones are closed as they come back).
    pub fn shrink_to_cap(&self) {
        let members: Vec<Arc<Pool>> = self.lock().members.iter().filter_map(Weak::upgrade).collect();
        for pool in members {
            while pool.close_one_idle_over_cap() {}
        }
    }

    /// Closes one idle server of another member pool (the one with most idle) so `requester`
    /// can open one. True if a server was closed.
    pub(super) fn evict_for(&self, requester: &Pool) -> bool {
        let members: Vec<Arc<Pool>> = self.lock().members.iter().filter_map(Weak::upgrade).collect();
        let victim = members
            .into_iter()
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), requester))
            .map(|p| (p.stats().idle, p))
            .filter(|(idle, _)| *idle > 0)
            .max_by_key(|(idle, _)| *idle);
        match victim {
            Some((_, pool)) => {
                tracing::debug!(limit = %self.name, from = %pool.key(), to = %requester.key(), "closing an idle server to share the limit");
                pool.close_one_idle()
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_limit_holds_what_it_held_and_less_as_servers_close() {
        let l = Limit::new("budget", 10);
        assert!(l.try_acquire() && l.try_acquire());
        l.freeze();
        assert_eq!(l.cap(), 2);
        assert!(!l.try_acquire(), "no new server while frozen");
        l.release_quiet();
        assert_eq!(l.cap(), 1, "a closed server's room is given up");
        assert!(!l.try_acquire());
        l.thaw();
        l.set_cap(5);
        assert!(l.try_acquire(), "a published claim opens it again");
    }

    #[test]
    fn only_units_over_a_lowered_cap_are_released_as_over() {
        let l = Limit::new("budget", 4);
        for _ in 0..4 {
            assert!(l.try_acquire());
        }
        l.set_cap(2);
        assert!(l.release_if_over() && l.release_if_over());
        assert!(!l.release_if_over(), "at the cap: nothing more is over");
        assert_eq!(l.used(), 2);
    }
}
