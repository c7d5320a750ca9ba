//! Connections still logging in, oldest first. When a newcomer finds every client slot
//! taken, one that has been logging in for over [`SLOW_LOGIN`] is told to leave, so
//! connections that never finish logging in (a slowloris) cannot keep out those that do,
//! the admin console's included.

use crate::flag::Flag;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::{Duration, Instant};

/// A login taking longer than this may be evicted for a newcomer when the broker is full;
/// an honest one takes milliseconds.
pub const SLOW_LOGIN: Duration = Duration::from_secs(1);

/// Evicted connections not yet gone at most: the newcomers they made room for are counted
/// past `max_client_conn` until they go, so this bounds how far past it.
pub const MAX_EVICTING: usize = 16;

/// The connections logging in now.
#[derive(Default)]
pub struct LoggingIn {
    /// By arrival: id -> (arrival, whether its slot is the console's only, eviction flag).
    pending: Mutex<BTreeMap<u64, Pending>>,
    next: AtomicU64,
    /// Evicted and not yet gone.
    evicting: AtomicUsize,
}

struct Pending {
    since: Instant,
    admin_only: bool,
    evicted: Arc<Flag>,
}

/// One connection's place among those logging in; dropping it (the login ended) frees it.
pub struct Ticket {
    logins: Arc<LoggingIn>,
    id: u64,
    evicted: Arc<Flag>,
}

impl Ticket {
    /// Resolves once the connection is evicted.
    pub async fn evicted(&self) {
        self.evicted.wait().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.logins.lock().remove(&self.id);
        if self.evicted.is_raised() {
            self.logins.evicting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl LoggingIn {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection as logging in until the ticket is dropped; `admin_only` if its
    /// slot is one of the console's.
    pub fn enter(self: &Arc<Self>, admin_only: bool) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Flag::default());
        self.lock().insert(id, Pending { since: Instant::now(), admin_only, evicted: evicted.clone() });
        Ticket { logins: self.clone(), id, evicted }
    }

    /// Tells the oldest connection that has been logging in for over [`SLOW_LOGIN`] to
    /// leave, and says whether its slot was the console's only (the newcomer takes its
    /// place). `None` if there is none, or [`MAX_EVICTING`] are already on their way out.
    pub fn evict_oldest(&self) -> Option<bool> {
        let mut pending = self.lock();
        if self.evicting.load(Ordering::Relaxed) >= MAX_EVICTING {
            return None;
        }
        let (&id, oldest) = pending.first_key_value()?;
        if oldest.since.elapsed() < SLOW_LOGIN {
            return None;
        }
        let evicted = pending.remove(&id)?;
        self.evicting.fetch_add(1, Ordering::Relaxed);
        evicted.evicted.raise();
        Some(evicted.admin_only)
    }

    /// Connections logging in now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when none is logging in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_login_slower_than_slow_login_is_evicted_oldest_first() {
        let logins = Arc::new(LoggingIn::default());
        let first = logins.enter(true);
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = logins.enter(false);
        assert_eq!(logins.evict_oldest(), None, "an honest login takes milliseconds");
        tokio::time::advance(SLOW_LOGIN).await;
        assert_eq!(logins.evict_oldest(), Some(true), "the newcomer takes the console's slot it had");
        assert!(first.evicted.is_raised() && !second.evicted.is_raised());
        drop(first);
        assert_eq!(logins.evicting.load(Ordering::Relaxed), 0);
        assert_eq!(logins.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn evictions_on_their_way_out_are_bounded() {
        let logins = Arc::new(LoggingIn::default());
        let held: Vec<Ticket> = (0..MAX_EVICTING + 5).map(|_| logins.enter(false)).collect();
        tokio::time::advance(SLOW_LOGIN * 2).await;
        let evicted = (0..MAX_EVICTING + 5).filter(|_| logins.evict_oldest().is_some()).count();
        assert_eq!(evicted, MAX_EVICTING);
        drop(held);
        assert_eq!(logins.evicting.load(Ordering::Relaxed), 0);
    }
}
