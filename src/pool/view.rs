//! What the admin console and metrics see of pools: counts, waiting times, servers; and the
//! registry of all pools.

use super::{ActiveServer, Pool, PoolKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A point-in-time view of a pool, for logs, tests and the admin console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Servers open (idle, in use, connecting or resetting).
    pub open: usize,
    /// Idle servers.
    pub idle: usize,
    /// Clients waiting for a server.
    pub waiting: usize,
}

/// Whether a server is checked out or waiting in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Checked out by a client (or the broker's own work).
    Active,
    /// In the pool.
    Idle,
}

impl ServerState {
    /// The name SHOW SERVERS prints.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Active => "active",
            ServerState::Idle => "idle",
        }
    }
}

/// A server as SHOW SERVERS lists it.
#[derive(Debug, Clone)]
pub struct ServerView {
    /// Server id.
    pub id: u64,
    /// Backend process id.
    pub pid: i32,
    /// Checked out or in the pool.
    pub state: ServerState,
    /// When it connected.
    pub connected_at: std::time::SystemTime,
    /// Time in the current state.
    pub in_state: Duration,
}

impl Pool {
    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let mut inner = self.lock();
        if inner.waiters.iter().all(|w| w.tx.is_closed()) {
            // The episode that reported `pool_limit_reached` is over.
            inner.limit_reported = false;
        }
        PoolStats {
            open: inner.open,
            idle: inner.idle.len(),
            waiting: inner.waiters.iter().filter(|w| !w.tx.is_closed()).count(),
        }
    }

    /// How long the oldest waiting client has waited.
    pub fn max_wait(&self) -> Duration {
        let inner = self.lock();
        inner.waiters.iter().filter(|w| !w.tx.is_closed()).map(|w| w.since.elapsed()).max().unwrap_or_default()
    }

    /// Every open server, checked out or idle.
    pub fn servers(&self) -> Vec<ServerView> {
        let inner = self.lock();
        let active = inner.active.values().map(|a: &ActiveServer| ServerView {
            id: a.id,
            pid: a.pid,
            state: ServerState::Active,
            connected_at: a.connected_at,
            in_state: a.since.elapsed(),
        });
        let idle = inner.idle.iter().map(|c| ServerView {
            id: c.id,
            pid: c.cancel.pid,
            state: ServerState::Idle,
            connected_at: c.connected_at,
            in_state: c.last_used.elapsed(),
        });
        let mut v: Vec<ServerView> = active.chain(idle).collect();
        v.sort_by_key(|s| s.id);
        v
    }
}

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool for `key`, created with `make` if it does not exist yet.
    pub fn get_or_create(&self, key: &PoolKey, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        let mut map = self.lock();
        if let Some(p) = map.get(key) {
            return p.clone();
        }
        let p = make();
        map.insert(key.clone(), p.clone());
        p
    }

    /// The pool for `key`, if any.
    pub fn get(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.lock().get(key).cloned()
    }

    /// Forgets a pool (its database was removed).
    pub fn remove(&self, key: &PoolKey) {
        self.lock().remove(key);
    }

    /// Every pool, sorted by key.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}
