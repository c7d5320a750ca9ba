//! Server pools, one per (database, user): bounded size, FIFO waiters, and an RAII checkout
//! guard whose `Drop` returns, resets or closes the server. Knows nothing of client bytes.

use crate::error::SqlState;
use crate::proto::TxnStatus;
use crate::server::{ServerConn, ServerError, Target};
use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Identifies a pool: the client-facing database name and the server login user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Database name as configured (`[databases.NAME]`).
    pub database: String,
    /// Server login user.
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// Why a checkout failed.
#[derive(Debug, Error)]
pub enum PoolError {
    /// No server became free in time.
    #[error("no server connection available in pool {pool} within {waited:?} (pool_size {size})")]
    Timeout {
        /// Pool name.
        pool: String,
        /// The configured wait.
        waited: Duration,
        /// The pool's size.
        size: usize,
    },
    /// Opening a new server failed.
    #[error("cannot open a server connection for pool {pool}")]
    Connect {
        /// Pool name.
        pool: String,
        /// Cause.
        #[source]
        source: ServerError,
    },
}

impl PoolError {
    /// The SQLSTATE a client sees.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::Timeout { .. } => SqlState::TOO_MANY_CONNECTIONS,
            PoolError::Connect { source, .. } => source.sqlstate(),
        }
    }
}

/// How a server goes back when its guard drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Clean and idle: straight back to the pool.
    Reuse,
    /// Roll back if in a transaction, run the reset query, then back to the pool.
    Reset,
    /// State unknown (mid-query, mid-COPY, broken): close it.
    Close,
}

/// Settings a pool is built with.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most servers open at once.
    pub size: usize,
    /// Limit on connect + login.
    pub connect_timeout: Duration,
    /// Query run by `Release::Reset` (empty = none).
    pub reset_query: String,
    /// Limit on a reset; a slower server is closed.
    pub reset_timeout: Duration,
}

enum Grant {
    /// An idle server, handed over directly.
    Server(ServerConn),
    /// Permission to open a new server; `open` already counts it.
    Slot,
}

#[derive(Default)]
struct Inner {
    idle: Vec<ServerConn>,
    /// Servers open, being opened, in use or being reset.
    open: usize,
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

/// The servers of one (database, user).
pub struct Pool {
    key: PoolKey,
    target: Arc<Target>,
    settings: PoolSettings,
    inner: Mutex<Inner>,
}

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

impl Pool {
    /// An empty pool; servers are opened on demand.
    pub fn new(key: PoolKey, target: Target, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            target: Arc::new(target),
            settings,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// This pool's key.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            open: inner.open,
            idle: inner.idle.len(),
            waiting: inner.waiters.iter().filter(|w| !w.is_closed()).count(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counts half-updated in a way worse
        // than losing the pool, so recover the guard rather than poison every later client.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an idle server, opens a new one, or waits in FIFO order up to `wait`.
    ///
    /// # Cancel safety
    /// Dropping the future gives back anything it was granted.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Pooled, PoolError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut rx = {
                let mut inner = self.lock();
                if let Some(conn) = self.take_idle(&mut inner) {
                    return Ok(Pooled::new(self.clone(), conn));
                }
                if inner.open < self.settings.size {
                    inner.open += 1;
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.push_back(tx);
                    Some(rx)
                }
            };
            let Some(rx) = rx.as_mut() else {
                return self.open_granted().await;
            };
            match tokio::time::timeout_at(deadline, &mut *rx).await {
                Ok(Ok(Grant::Server(conn))) => {
                    if conn.is_idle_healthy() {
                        return Ok(Pooled::new(self.clone(), conn));
                    }
                    self.discard(conn);
                }
                Ok(Ok(Grant::Slot)) => return self.open_granted().await,
                Ok(Err(_)) => {}
                Err(_) => {
                    // A grant may have raced the deadline: take it back before giving up.
                    rx.close();
                    match rx.try_recv() {
                        Ok(Grant::Server(conn)) => self.checkin(conn),
                        Ok(Grant::Slot) => self.release_slot(),
                        Err(_) => {}
                    }
                    return Err(PoolError::Timeout {
                        pool: self.key.to_string(),
                        waited: wait,
                        size: self.settings.size,
                    });
                }
            }
        }
    }

    fn take_idle(&self, inner: &mut Inner) -> Option<ServerConn> {
        // Most recently used first: its socket and backend caches are warm, and the
        // least used ones age out.
        while let Some(conn) = inner.idle.pop() {
            if conn.is_idle_healthy() {
                return Some(conn);
            }
            tracing::debug!(server = conn.id, pool = %self.key, "idle server closed or spoke; dropping it");
            inner.open -= 1;
        }
        None
    }

    /// Opens a server for a slot already counted in `open`.
    async fn open_granted(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        // If this future is dropped mid-connect the slot must still be returned.
        let slot = SlotGuard(Some(self.clone()));
        match ServerConn::connect(self.target.clone(), self.settings.connect_timeout).await {
            Ok(conn) => {
                std::mem::forget(slot);
                Ok(Pooled::new(self.clone(), conn))
            }
            Err(source) => {
                tracing::warn!(pool = %self.key, error = %source, "server connection failed");
                Err(PoolError::Connect {
                    pool: self.key.to_string(),
                    source,
                })
            }
        }
    }

    /// Returns a clean idle server: to the first live waiter, else to the idle list.
    fn checkin(&self, mut conn: ServerConn) {
        let mut inner = self.lock();
        while let Some(tx) = inner.waiters.pop_front() {
            match tx.send(Grant::Server(conn)) {
                Ok(()) => return,
                Err(Grant::Server(c)) => conn = c,
                Err(Grant::Slot) => unreachable!("sent a server"),
            }
        }
        inner.idle.push(conn);
    }

    /// Closes a server and frees its slot for a waiter.
    fn discard(&self, conn: ServerConn) {
        tracing::debug!(server = conn.id, pool = %self.key, "closing server");
        drop(conn);
        self.release_slot();
    }

    fn release_slot(&self) {
        let mut inner = self.lock();
        inner.open -= 1;
        while let Some(tx) = inner.waiters.pop_front() {
            inner.open += 1;
            if tx.send(Grant::Slot).is_ok() {
                return;
            }
            inner.open -= 1;
        }
    }

    fn release(self: &Arc<Self>, conn: ServerConn, how: Release) {
        match how {
            Release::Reuse if conn.status == TxnStatus::Idle => self.checkin(conn),
            Release::Close | Release::Reuse => self.discard(conn),
            Release::Reset => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let pool = self.clone();
                    rt.spawn(async move { pool.reset_and_checkin(conn).await });
                }
                Err(_) => self.discard(conn),
            },
        }
    }

    async fn reset_and_checkin(self: Arc<Self>, mut conn: ServerConn) {
        let reset = async {
            if conn.status != TxnStatus::Idle {
                conn.simple_query("ROLLBACK").await?.ok();
            }
            if !self.settings.reset_query.is_empty() {
                if let Err(e) = conn.simple_query(&self.settings.reset_query).await? {
                    tracing::warn!(pool = %self.key, code = ?e.code, error = %e.message, "server_reset_query failed");
                    return Ok(false);
                }
            }
            Ok::<bool, ServerError>(conn.status == TxnStatus::Idle)
        };
        match tokio::time::timeout(self.settings.reset_timeout, reset).await {
            Ok(Ok(true)) => self.checkin(conn),
            Ok(Ok(false)) => self.discard(conn),
            Ok(Err(e)) => {
                tracing::debug!(pool = %self.key, error = %e, "server failed during reset");
                self.discard(conn);
            }
            Err(_) => {
                tracing::warn!(pool = %self.key, "server reset timed out; closing it");
                self.discard(conn);
            }
        }
    }
}

/// Frees a counted slot if a connect is abandoned.
struct SlotGuard(Option<Arc<Pool>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.release_slot();
        }
    }
}

/// A checked-out server. Dropping it returns the server as `release` says (default: close,
/// so a session that ends unexpectedly never returns a server in an unknown state).
pub struct Pooled {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    /// What happens to the server when this guard drops.
    pub release: Release,
}

impl Pooled {
    fn new(pool: Arc<Pool>, conn: ServerConn) -> Pooled {
        Pooled {
            conn: Some(conn),
            pool,
            release: Release::Close,
        }
    }

    /// The pool this server belongs to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        // Only `Drop` takes the connection out.
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn, self.release);
        }
    }
}

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    /// The pool for `key`, created with `make` if it does not exist yet.
    pub fn get_or_create(&self, key: &PoolKey, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(key) {
            return p.clone();
        }
        let p = make();
        map.insert(key.clone(), p.clone());
        p
    }

    /// The pool for `key`, if any.
    pub fn get(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Every pool.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
