//! A server's way through the pool: checkout (an idle server, a new one, or a FIFO wait
//! for one, within the pool's size and its shared limits) and check-in (to the first live
//! waiter or the idle list, or closed when due or over a lowered cap), with the slots and
//! capacity passed between pools on the way.

use super::guards::{ProbeGuard, SlotGuard, Withdraw};
use super::{Backoff, Conn, Grant, Inner, Pool, PoolError, PoolSettings, Pooled, Waiter, maintenance};
use crate::server::{ServerConn, ServerError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Pool {
    /// Takes an idle server, opens a new one, or waits in FIFO order up to `wait`.
    ///
    /// # Cancel safety
    /// Dropping the future gives back anything it was granted.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Pooled, PoolError> {
        let start = Instant::now();
        let deadline = start + wait;
        if *self.paused.borrow() {
            let mut rx = self.paused.subscribe();
            let resumed = tokio::time::timeout_at(deadline, rx.wait_for(|p| !*p)).await;
            if resumed.is_err() {
                return Err(PoolError::Timeout {
                    pool: self.key.to_string(),
                    waited: wait,
                    size: self.settings().size,
                });
            }
        }
        let mut reserve_at = (self.settings().reserve_size > 0).then(|| start + self.settings().reserve_timeout);
        loop {
            let next = {
                let mut inner = self.lock();
                if let Some(conn) = self.take_idle(&mut inner) {
                    Ok(conn)
                } else if let Some(e) = self.backoff_error(&inner) {
                    return Err(e);
                } else if self.reserve_slot(&mut inner, false) {
                    Err(None)
                } else {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.push_back(Waiter { tx, since: Instant::now() });
                    inner.blocked |= inner.open < self.settings().size;
                    let report = !inner.limit_reported;
                    inner.limit_reported = true;
                    let blocked = inner.blocked;
                    drop(inner);
                    if report {
                        self.event(
                            "pool_limit_reached",
                            serde_json::json!({"poolSize": self.settings().size, "blockedByBudget": blocked}),
                        );
                    }
                    Err(Some((rx, blocked)))
                }
            };
            let (rx, blocked) = match next {
                Ok(conn) => match self.prepare(conn).await {
                    Some(conn) => return Ok(Pooled::new(self.clone(), conn)),
                    None => continue,
                },
                Err(None) => return self.open_granted().await,
                Err(Some(w)) => w,
            };
            // Whichever way the wait ends, including this future being dropped, a grant sent
            // meanwhile goes back to the pool instead of leaking its server or slot.
            let mut waiting = Withdraw { pool: self, rx };
            if blocked {
                self.request_capacity(true);
            }
            loop {
                let until = reserve_at.filter(|r| *r < deadline).unwrap_or(deadline);
                match tokio::time::timeout_at(until, &mut waiting.rx).await {
                    Ok(Ok(Grant::Server(conn))) => match self.prepare(conn).await {
                        Some(conn) => return Ok(Pooled::new(self.clone(), conn)),
                        None => break,
                    },
                    Ok(Ok(Grant::Slot)) => return self.open_granted().await,
                    Ok(Err(_)) => break,
                    Err(_) if until < deadline => {
                        reserve_at = None;
                        let reserved = self.reserve_slot(&mut self.lock(), true);
                        if reserved {
                            drop(waiting);
                            tracing::info!(pool = %self.key, "using the reserve pool");
                            return self.open_granted().await;
                        }
                    }
                    Err(_) => {
                        drop(waiting);
                        self.event("connection_timeout", serde_json::json!({"waitedMs": wait.as_millis() as u64}));
                        return Err(PoolError::Timeout {
                            pool: self.key.to_string(),
                            waited: wait,
                            size: self.settings().size,
                        });
                    }
                }
            }
        }
    }

    /// Withdraws a waiter, returning anything granted to it in the meantime.
    pub(super) fn give_back(&self, rx: &mut oneshot::Receiver<Grant>) {
        rx.close();
        match rx.try_recv() {
            Ok(Grant::Server(conn)) => self.checkin(conn),
            Ok(Grant::Slot) => self.release_slot(),
            Err(_) => {}
        }
    }

    pub(super) fn backoff_error(&self, inner: &Inner) -> Option<PoolError> {
        let b = inner.backoff.as_ref()?;
        let now = Instant::now();
        (now < b.until || inner.probing).then(|| PoolError::Backoff {
            pool: self.key.to_string(),
            message: b.message.clone(),
            code: b.code,
            retry_in: b.until.saturating_duration_since(now),
        })
    }

    /// Counts a new server against the pool size (plus the reserve if allowed) and every limit.
    pub(super) fn reserve_slot(&self, inner: &mut Inner, reserve: bool) -> bool {
        let cap = self.settings().size + if reserve { self.settings().reserve_size } else { 0 };
        if inner.open >= cap {
            return false;
        }
        for (i, l) in self.limits.iter().enumerate() {
            if !l.try_acquire() {
                for taken in &self.limits[..i] {
                    taken.release_quiet();
                }
                return false;
            }
        }
        inner.open += 1;
        true
    }

    /// Queues this pool on every full limit; with `evict`, asks another pool to give up an
    /// idle server.
    fn request_capacity(self: &Arc<Self>, evict: bool) {
        for l in &self.limits {
            if l.is_full() {
                l.wait(self);
                if evict {
                    l.evict_for(self);
                }
            }
        }
    }

    /// A limit has room: serve blocked waiters while it lasts.
    pub(crate) fn on_capacity(self: &Arc<Self>) {
        let mut inner = self.lock();
        if inner.backoff.as_ref().is_some_and(|b| Instant::now() < b.until) {
            return;
        }
        while inner.waiters.iter().any(|w| !w.tx.is_closed()) && self.reserve_slot(&mut inner, false) {
            let mut served = false;
            while let Some(w) = inner.waiters.pop_front() {
                if w.tx.send(Grant::Slot).is_ok() {
                    served = true;
                    break;
                }
            }
            if !served {
                inner.open -= 1;
                for l in &self.limits {
                    l.release_quiet();
                }
                break;
            }
        }
        inner.blocked = inner.open < self.settings().size && inner.waiters.iter().any(|w| !w.tx.is_closed());
    }

    /// True if clients wait for capacity a shared limit withholds.
    pub(crate) fn has_blocked_waiters(&self) -> bool {
        let inner = self.lock();
        inner.blocked && inner.waiters.iter().any(|w| !w.tx.is_closed())
    }

    fn take_idle(&self, inner: &mut Inner) -> Option<Conn> {
        // Most recently used first: warm caches, and the least used age out.
        while let Some(conn) = inner.idle.pop() {
            if conn.is_idle_healthy() {
                return Some(conn);
            }
            tracing::debug!(server = conn.id, pool = %self.key, "idle server closed or spoke; dropping it");
            inner.open -= 1;
            for l in &self.limits {
                l.release_quiet();
            }
        }
        None
    }

    /// Runs the liveness check on a server idle longer than `check_delay`. `None` = it failed
    /// and was closed.
    async fn prepare(self: &Arc<Self>, mut conn: Conn) -> Option<Conn> {
        conn.uses += 1;
        if conn.last_used.elapsed() < self.settings().check_delay {
            return Some(conn);
        }
        let settings = self.settings();
        // Boxed for the same reason as a connect: rare, and sizing every session future.
        let check = Box::pin(tokio::time::timeout(settings.connect_timeout, conn.simple_query(&settings.check_query)));
        match check.await {
            Ok(Ok(Ok(()))) => Some(conn),
            _ => {
                tracing::info!(server = conn.id, pool = %self.key, "server failed server_check_query; closing it");
                self.discard(conn);
                None
            }
        }
    }

    /// Opens a server for a slot already counted.
    async fn open_granted(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        // If this future is dropped mid-connect the slot must still be returned.
        let slot = SlotGuard(Some(self.clone()));
        // While a login failure is waited out, fail fast instead of hammering the server.
        if let Some(e) = self.backoff_error(&self.lock()) {
            return Err(e);
        }
        // Boxed: a connect's state (TLS, authentication) is large and rarely live, and it
        // would otherwise size every client's session future.
        match Box::pin(self.connect()).await {
            Ok(conn) => {
                std::mem::forget(slot);
                Ok(Pooled::new(self.clone(), conn))
            }
            Err(e) => Err(e),
        }
    }

    /// Connects and logs in, recording success or failure for `server_login_retry`: after a
    /// failure, the wait before the next attempt doubles up to `server_login_retry`, and once
    /// it is over a single attempt probes the server while everyone else fails fast.
    pub(super) async fn connect(&self) -> Result<Conn, PoolError> {
        let _probe = {
            let mut inner = self.lock();
            if let Some(e) = self.backoff_error(&inner) {
                return Err(e);
            }
            inner.backoff.is_some().then(|| {
                inner.probing = true;
                ProbeGuard(self)
            })
        };
        let connect = async {
            let mut conn = ServerConn::connect(self.target.load_full(), self.settings().connect_timeout).await?;
            self.learn_defaults(&mut conn).await?;
            Ok::<_, ServerError>(Box::new(conn))
        };
        match connect.await {
            Ok(mut conn) => {
                self.lock().backoff = None;
                conn.expires = maintenance::jittered(self.settings().lifetime).map(|d| conn.created + d);
                conn.generation = self.generation.load(Ordering::Relaxed);
                conn.uses = 1;
                self.event("connection_added", serde_json::json!({"serverId": conn.id, "pid": conn.cancel.pid}));
                Ok(conn)
            }
            Err(source) => {
                let mut inner = self.lock();
                let first = self.settings().login_retry.min(Duration::from_secs(1));
                let delay = match &inner.backoff {
                    // Attempts made together fail together: one round, one doubling.
                    Some(b) if Instant::now() < b.until => b.delay,
                    Some(b) => (b.delay * 2).min(self.settings().login_retry).max(first),
                    None => first,
                };
                inner.backoff = Some(Backoff {
                    until: Instant::now() + delay,
                    delay,
                    message: crate::error::chain(&source),
                    code: source.sqlstate(),
                });
                drop(inner);
                tracing::warn!(pool = %self.key, error = %crate::error::chain(&source), retry_in = ?delay, "server connection failed");
                self.event(
                    "connection_error",
                    serde_json::json!({"error": crate::error::chain(&source), "retryInMs": delay.as_millis() as u64}),
                );
                Err(PoolError::Connect { pool: self.key.to_string(), source })
            }
        }
    }

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
