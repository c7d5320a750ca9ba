//! The pool's background task: keeps `min_pool_size` servers warm, closes servers idle past
//! `server_idle_timeout` or older than `server_lifetime`, and retries blocked waiters once a
//! login backoff ends. It holds only a weak reference, so it ends with its pool.

use super::Pool;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

const TICK: Duration = Duration::from_secs(1);

pub(super) fn spawn(pool: &Arc<Pool>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(pool);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = Weak::upgrade(&weak) else { return };
            pool.maintain().await;
        }
    });
}

impl Pool {
    async fn maintain(self: &Arc<Self>) {
        self.close_stale();
        self.on_capacity();
        self.fill_min().await;
    }

    /// Closes idle servers past their lifetime, or idle too long beyond `min_size`.
    fn close_stale(&self) {
        let now = Instant::now();
        let stale = {
            let mut inner = self.lock();
            let mut keep = Vec::with_capacity(inner.idle.len());
            let mut stale = Vec::new();
            let mut open = inner.open;
            // Oldest-used first, so the freshest servers are the ones kept.
            inner.idle.sort_by_key(|c| c.last_used);
            for conn in inner.idle.drain(..) {
                let expired = conn.expires.is_some_and(|e| now >= e);
                let idle_long = !self.settings().idle_timeout.is_zero()
                    && now.duration_since(conn.last_used) >= self.settings().idle_timeout
                    && open > self.settings().min_size;
                if expired || idle_long || !conn.is_idle_healthy() {
                    open -= 1;
                    stale.push(conn);
                } else {
                    keep.push(conn);
                }
            }
            inner.idle = keep;
            stale
        };
        for conn in stale {
            self.discard(conn);
        }
    }

    /// Opens servers up to `min_size`, one at a time, within the limits.
    async fn fill_min(self: &Arc<Self>) {
        if self.settings().min_size == 0 || self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        loop {
            let reserved = {
                let mut inner = self.lock();
                inner.open < self.settings().min_size
                    && self.backoff_error(&inner).is_none()
                    && self.reserve_slot(&mut inner, false)
            };
            if !reserved {
                return;
            }
            match self.connect().await {
                Ok(conn) => self.checkin(conn),
                Err(_) => {
                    self.release_slot();
                    return;
                }
            }
        }
    }
}

/// `d` ±10%, so a fleet started together does not reconnect together.
pub(super) fn jittered(d: Duration) -> Option<Duration> {
    if d.is_zero() {
        return None;
    }
    let factor = 0.9 + rand::random::<f64>() * 0.2;
    Some(d.mul_f64(factor))
}
