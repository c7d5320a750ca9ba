//! Failed logins per address: past `auth.max_failures_per_ip` in a minute, further logins
//! from that address are refused before authentication until the minute is over. Guessing
//! passwords through the broker then costs a minute per handful of guesses, not a round trip.
//!
//! An exchange in flight counts against the limit from its start, so guesses sent together
//! cannot all be evaluated before the first failure is counted: past the limit, a new
//! exchange waits for one in flight to end (an honest pool opening many connections at once
//! is only slowed), and one that ends without success, abandoned included, is a failure.
//! Addresses are grouped as [`crate::net::peer_key`] says.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
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
    /// An exchange ended: waiters look again.
    ended: Notify,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
    /// Exchanges under way, not yet known to fail or succeed.
    in_flight: u32,
}

/// One login exchange counted against its address's limit: a failure unless
/// [`succeeded`](Attempt::succeeded) is called before it is dropped.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    /// The address's key, when counted.
    key: Option<IpAddr>,
    succeeded: bool,
}

impl Attempt<'_> {
    /// The credentials were right: the exchange is not a failure.
    pub fn succeeded(mut self) {
        self.succeeded = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let now = Instant::now();
        let mut map = self.throttle.lock();
        if let Some(w) = map.get_mut(&key) {
            w.in_flight = w.in_flight.saturating_sub(1);
            if !self.succeeded {
                if now >= w.start + WINDOW {
                    (w.start, w.count) = (now, 0);
                }
                w.count = w.count.saturating_add(1);
            }
        }
        drop(map);
        self.throttle.ended.notify_waiters();
    }
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts an exchange from `ip`: `Err(retry_after)` if its address has failed `limit`
    /// times in the current window (0 = off); waits while failures and exchanges in flight
    /// fill the limit.
    pub async fn begin(&self, ip: IpAddr, limit: u32) -> Result<Attempt<'_>, Duration> {
        let key = crate::net::peer_key(ip);
        let untracked = Attempt { throttle: self, key: None, succeeded: false };
        if limit == 0 {
            return Ok(untracked);
        }
        loop {
            // Registered before looking, so an end between the look and the wait wakes it.
            let ended = self.ended.notified();
            let until = {
                let now = Instant::now();
                let mut map = self.lock();
                if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
                    map.retain(|_, w| now < w.start + WINDOW || w.in_flight > 0);
                    if map.len() >= MAX_TRACKED {
                        return Ok(untracked);
                    }
                }
                let w = map.entry(key).or_insert(Window { start: now, count: 0, in_flight: 0 });
                if now >= w.start + WINDOW {
                    (w.start, w.count) = (now, 0);
                }
                if w.count >= limit {
                    return Err(w.start + WINDOW - now);
                }
                if w.count.saturating_add(w.in_flight) < limit {
                    w.in_flight += 1;
                    return Ok(Attempt { throttle: self, key: Some(key), succeeded: false });
                }
                w.start + WINDOW
            };
            // The caller's login timeout bounds the wait.
            let _ = tokio::time::timeout_at(until, ended).await;
        }
    }

    /// Addresses currently refused (for metrics and SHOW output).
    pub fn blocked(&self, limit: u32) -> usize {
        if limit == 0 {
            return 0;
        }
        let now = Instant::now();
        self.lock().values().filter(|w| w.count >= limit && now < w.start + WINDOW).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    async fn fail(t: &LoginThrottle, ip: IpAddr, limit: u32) {
        drop(t.begin(ip, limit).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_limit_failures_until_the_window_ends() {
        let t = LoginThrottle::default();
        for _ in 0..3 {
            fail(&t, A, 3).await;
        }
        let wait = t.begin(A, 3).await.unwrap_err();
        assert!(wait <= WINDOW && wait > WINDOW - Duration::from_secs(1), "{wait:?}");
        assert!(t.begin(B, 3).await.is_ok(), "other addresses are not affected");
        tokio::time::advance(WINDOW).await;
        assert!(t.begin(A, 3).await.is_ok(), "the window has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_of_zero_never_refuses() {
        let t = LoginThrottle::default();
        for _ in 0..100 {
            fail(&t, A, 0).await;
        }
        assert!(t.begin(A, 0).await.is_ok());
        assert_eq!(t.blocked(0), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_window_start_a_new_count() {
        let t = LoginThrottle::default();
        fail(&t, A, 2).await;
        fail(&t, A, 2).await;
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        fail(&t, A, 2).await;
        t.begin(A, 2).await.expect("only one failure in the new window").succeeded();
        assert_eq!(t.blocked(2), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_not_a_failure() {
        let t = LoginThrottle::default();
        for _ in 0..10 {
            t.begin(A, 2).await.unwrap().succeeded();
        }
        assert!(t.begin(A, 2).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn guesses_sent_together_are_evaluated_no_more_than_the_limit() {
        let t = std::sync::Arc::new(LoginThrottle::default());
        let held: Vec<_> = futures_free_begin(&t, 3).await;
        // A fourth waits for one of the three in flight to end.
        let fourth = tokio::spawn({
            let t = t.clone();
            async move { t.begin(A, 3).await.map(|a| a.succeeded()) }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!fourth.is_finished(), "the limit is full of exchanges in flight");
        // All three fail: the fourth is refused, not evaluated.
        drop(held);
        assert!(fourth.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_honest_burst_waits_rather_than_being_refused() {
        let t = std::sync::Arc::new(LoginThrottle::default());
        let held = futures_free_begin(&t, 3).await;
        let fourth = tokio::spawn({
            let t = t.clone();
            async move { t.begin(A, 3).await.map(|a| a.succeeded()) }
        });
        for a in held {
            a.succeeded();
        }
        assert!(fourth.await.unwrap().is_ok(), "served once one in flight succeeded");
    }

    #[tokio::test(start_paused = true)]
    async fn rotating_loopback_addresses_share_one_count() {
        let t = LoginThrottle::default();
        for last in 2..5u8 {
            fail(&t, IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last)), 3).await;
        }
        assert!(t.begin(IpAddr::V4(std::net::Ipv4Addr::new(127, 9, 9, 9)), 3).await.is_err());
        assert!(t.begin("::1".parse().unwrap(), 3).await.is_err());
    }

    /// `n` attempts from `A` with a limit of `n`, held.
    async fn futures_free_begin(t: &LoginThrottle, n: u32) -> Vec<Attempt<'_>> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(t.begin(A, n).await.unwrap());
        }
        held
    }
}
