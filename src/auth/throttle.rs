//! Failed logins per IP address: past `auth.max_failures_per_ip` in a minute, further logins
//! from that address are refused before authentication until the minute is over. Guessing
//! passwords through the broker then costs a minute per handful of guesses, not a round trip.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Addresses tracked at most; beyond it new addresses are not counted (each one is still
/// slowed by `failure_delay`), so a spray from many addresses cannot grow memory.
const MAX_TRACKED: usize = 65_536;

/// Failure counts per address. Only touched on the login path, never while relaying.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl LoginThrottle {
    /// `Err(retry_after)` if `ip` has failed `limit` times in the current window (0 = off).
    pub fn check(&self, ip: IpAddr, limit: u32) -> Result<(), Duration> {
        if limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(&ip) {
            Some(w) if w.count >= limit && now < w.start + WINDOW => Err(w.start + WINDOW - now),
            _ => Ok(()),
        }
    }

    /// Counts a failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, w| now < w.start + WINDOW);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let w = map.entry(ip).or_insert(Window { start: now, count: 0 });
        if now >= w.start + WINDOW {
            *w = Window { start: now, count: 0 };
        }
        w.count = w.count.saturating_add(1);
    }

    /// Addresses currently refused (for metrics and SHOW output).
    pub fn blocked(&self, limit: u32) -> usize {
        if limit == 0 {
            return 0;
        }
        let now = Instant::now();
        let map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.values().filter(|w| w.count >= limit && now < w.start + WINDOW).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_limit_failures_until_the_window_ends() {
        let t = LoginThrottle::default();
        for _ in 0..3 {
            assert!(t.check(A, 3).is_ok());
            t.record_failure(A);
        }
        let wait = t.check(A, 3).unwrap_err();
        assert!(wait <= WINDOW && wait > WINDOW - Duration::from_secs(1), "{wait:?}");
        assert!(t.check(B, 3).is_ok(), "other addresses are not affected");
        tokio::time::advance(WINDOW).await;
        assert!(t.check(A, 3).is_ok(), "the window has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_of_zero_never_refuses() {
        let t = LoginThrottle::default();
        for _ in 0..100 {
            t.record_failure(A);
        }
        assert!(t.check(A, 0).is_ok());
        assert_eq!(t.blocked(0), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_window_start_a_new_count() {
        let t = LoginThrottle::default();
        t.record_failure(A);
        t.record_failure(A);
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        t.record_failure(A);
        assert!(t.check(A, 2).is_ok(), "only one failure in the new window");
        assert_eq!(t.blocked(2), 0);
    }
}
