//! Servers coming back to the pool: check-in, closing, and slots passed to waiters or,
//! over a cap a reload lowered, given up.

use super::{Conn, Grant, Inner, Pool, PoolSettings};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

impl Pool {
    /// Returns a clean idle server: to the first live waiter, else to the idle list, unless
    /// it is due for retirement or another pool is starved of a shared limit.
    /// Also ends its record as checked out, if it was.
    pub(super) fn checkin(&self, mut conn: Conn) {
        let settings = self.settings.load();
        let now = Instant::now();
        let retire = conn.expires.is_some_and(|e| now >= e)
            || (settings.max_uses > 0 && conn.uses >= settings.max_uses)
            || conn.generation != self.generation.load(Ordering::Relaxed);
        let mut inner = self.lock();
        inner.active.remove(&conn.id);
        if retire {
            drop(inner);
            tracing::debug!(server = conn.id, pool = %self.key, uses = conn.uses, "retiring server");
            return self.discard(conn);
        }
        conn.last_used = now;
        // Over a cap lowered by a reload: close it even if clients wait; they get capacity
        // back once the count is under the new cap.
        if self.shed_over_cap(&mut inner, &settings) {
            drop(inner);
            self.close(conn);
            return self.notify_limits();
        }
        while let Some(w) = inner.waiters.pop_front() {
            match w.tx.send(Grant::Server(conn)) {
                Ok(()) => return,
                Err(Grant::Server(c)) => conn = c,
                Err(Grant::Slot) => return,
            }
        }
        // No one waits now: the queue gives back the room a burst of waiters left.
        if let Some(room) = crate::memory::shrink_to(0, inner.waiters.capacity()) {
            inner.waiters.shrink_to(room);
        }
        if self.limits.iter().any(|l| l.has_other_waiters(self)) {
            drop(inner);
            return self.discard(conn);
        }
        inner.idle.push(conn);
    }

    /// Closes one idle server (oldest first) to free capacity for another pool.
    pub(crate) fn close_one_idle(&self) -> bool {
        let conn = {
            let mut inner = self.lock();
            if inner.idle.is_empty() {
                return false;
            }
            inner.idle.remove(0)
        };
        self.discard(conn);
        true
    }

    /// Closes one idle server (oldest first) if the pool or a shared limit is over its cap.
    /// True if one was closed.
    pub(crate) fn close_one_idle_over_cap(&self) -> bool {
        let conn = {
            let mut inner = self.lock();
            if inner.idle.is_empty() || !self.shed_over_cap(&mut inner, &self.settings()) {
                return false;
            }
            inner.idle.remove(0)
        };
        self.close(conn);
        self.notify_limits();
        true
    }

    /// Closes a server and frees its slot for a waiter of this pool or another.
    pub(super) fn discard(&self, conn: Conn) {
        self.close(conn);
        self.release_slot();
    }

    /// Closes a server whose slot is dealt with by the caller.
    pub(super) fn close(&self, conn: Conn) {
        tracing::debug!(server = conn.id, pool = %self.key, "closing server");
        self.event("connection_removed", serde_json::json!({"serverId": conn.id, "pid": conn.cancel.pid}));
        // Say goodbye so the backend exits now rather than when it notices the socket closed.
        let _ = conn.stream.try_write(&[crate::proto::tag::TERMINATE, 0, 0, 0, 4]);
        drop(conn);
    }

    /// Takes one server out of the count if the pool or a shared limit holds more than its
    /// cap (a reload lowered it), so the server or slot in hand is given up rather than passed
    /// on and the count falls to the cap with no server opened on the way. Decided and counted
    /// under the locks at once: two servers freed together never both go for one over the cap.
    pub(super) fn shed_over_cap(&self, inner: &mut Inner, settings: &PoolSettings) -> bool {
        let shed = if inner.open > settings.size + settings.reserve_size {
            self.limits.iter().for_each(|l| l.release_quiet());
            true
        } else if let Some(i) = self.limits.iter().position(|l| l.release_if_over()) {
            self.limits.iter().enumerate().filter(|(j, _)| *j != i).for_each(|(_, l)| l.release_quiet());
            true
        } else {
            false
        };
        if shed {
            inner.open -= 1;
        }
        shed
    }

    pub(super) fn release_slot(&self) {
        {
            let mut inner = self.lock();
            if self.shed_over_cap(&mut inner, &self.settings()) {
                drop(inner);
                return self.notify_limits();
            }
            // Frozen: the slot is given up, not passed on.
            if !self.limits.iter().any(|l| l.is_frozen()) {
                // Own waiters first: the slot stays counted and passes to them.
                while let Some(w) = inner.waiters.pop_front() {
                    if w.tx.send(Grant::Slot).is_ok() {
                        return;
                    }
                }
            }
            inner.open -= 1;
        }
        for l in &self.limits {
            l.release_quiet();
        }
        self.notify_limits();
    }

    /// Offers what the limits have free to pools waiting on them. Call with no pool lock held.
    pub(super) fn notify_limits(&self) {
        for l in &self.limits {
            l.notify();
        }
    }
}
