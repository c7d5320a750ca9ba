//! The checkout guard: derefs to the server; dropping it returns the server as told.

use super::{Conn, Pool};
use crate::proto::TxnStatus;
use crate::server::{ServerConn, ServerError};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// How a server goes back when its guard drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Idle and clean: straight back to the pool (a server found inside a transaction is
    /// rolled back first).
    Reuse,
    /// Roll back if inside a transaction, run the reset query, then back to the pool.
    Reset,
    /// State unknown (mid-query, mid-COPY, broken): close it.
    Close,
}

/// A checked-out server. Dropping it returns the server as `release` says (default: close,
/// so a session that ends unexpectedly never returns a server in an unknown state).
pub struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// What happens to the server when this guard drops.
    pub release: Release,
}

impl Pooled {
    pub(super) fn new(pool: Arc<Pool>, conn: Conn) -> Pooled {
        pool.track_active(&conn);
        Self::tracked(pool, conn)
    }

    /// A guard for a server already recorded as checked out.
    pub(super) fn tracked(pool: Arc<Pool>, conn: Conn) -> Pooled {
        Pooled { conn: Some(conn), pool, release: Release::Close }
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
        self.conn.as_deref().expect("connection present until drop")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_deref_mut().expect("connection present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn, self.release);
        }
    }
}

impl Pool {
    fn release(self: &Arc<Self>, conn: Conn, how: Release) {
        let needs_work = how == Release::Reset || conn.status != TxnStatus::Idle;
        if how != Release::Close && !needs_work {
            // Untracked under checkin's lock.
            return self.checkin(conn);
        }
        self.untrack_active(conn.id);
        match how {
            Release::Close => self.discard(conn),
            _ => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let pool = self.clone();
                    rt.spawn(async move { pool.clean_and_checkin(conn, how == Release::Reset).await });
                }
                Err(_) => self.discard(conn),
            },
        }
    }

    /// Rolls back (and with `reset`, runs the reset query), bounded by `reset_timeout`.
    async fn clean_and_checkin(self: Arc<Self>, mut conn: Conn, reset: bool) {
        let clean = async {
            if conn.status != TxnStatus::Idle
                && let Err(e) = conn.simple_query("ROLLBACK").await?
            {
                tracing::warn!(pool = %self.key, error = %e.message, "ROLLBACK failed");
                return Ok(false);
            }
            let reset_query = &self.settings().reset_query;
            if reset && !reset_query.is_empty() {
                if let Err(e) = conn.simple_query(reset_query).await? {
                    tracing::warn!(pool = %self.key, code = ?e.code, error = %e.message, "server_reset_query failed");
                    return Ok(false);
                }
                conn.after_reset(reset_query);
            }
            Ok::<bool, ServerError>(conn.status == TxnStatus::Idle)
        };
        match tokio::time::timeout(self.settings().reset_timeout, clean).await {
            Ok(Ok(true)) => self.checkin(conn),
            Ok(Ok(false)) => self.discard(conn),
            Ok(Err(e)) => {
                tracing::debug!(pool = %self.key, error = %e, "server failed during cleanup");
                self.discard(conn);
            }
            Err(_) => {
                tracing::warn!(pool = %self.key, "server cleanup timed out; closing it");
                self.discard(conn);
            }
        }
    }
}
