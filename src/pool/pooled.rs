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
    fn tracked(pool: Arc<Pool>, conn: Conn) -> Pooled {
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
    /// The common checkout, without waiting: an idle server due no liveness query. `None`
    /// when `checkout` has more to do (wait, open a server, run `server_check_query`); the
    /// caller can then box that larger future rather than carry its state for good.
    pub fn try_checkout(self: &Arc<Self>) -> Option<Pooled> {
        if *self.paused.borrow() {
            return None;
        }
        let check_delay = self.settings.load().check_delay;
        let mut inner = self.lock();
        let mut conn = self.take_idle(&mut inner)?;
        let now = tokio::time::Instant::now();
        if now.saturating_duration_since(conn.last_used) >= check_delay {
            inner.idle.push(conn);
            return None;
        }
        // Tracked under the same lock: one lock per checkout (and one per checkin).
        Self::track_in(&mut inner, &conn, now);
        drop(inner);
        conn.uses += 1;
        Some(Pooled::tracked(self.clone(), conn))
    }

    /// Server `id` again, if it is idle and nobody has checked it out since its use number
    /// was `uses`: what its last client left in the session (`lastval()`) is still that
    /// client's.
    pub fn try_checkout_again(self: &Arc<Self>, id: u64, uses: u64) -> Option<Pooled> {
        if *self.paused.borrow() {
            return None;
        }
        let mut inner = self.lock();
        let at = inner.idle.iter().position(|c| c.id == id && c.uses == uses)?;
        let mut conn = inner.idle.remove(at);
        if !conn.is_idle_healthy() {
            // `take_idle` closes it in its turn.
            inner.idle.insert(at, conn);
            return None;
        }
        Self::track_in(&mut inner, &conn, tokio::time::Instant::now());
        drop(inner);
        conn.uses += 1;
        Some(Pooled::tracked(self.clone(), conn))
    }

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
