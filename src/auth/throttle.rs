//! Failed logins per address: past `auth.max_failures_per_ip` in a minute, further logins
//! from that address are refused before authentication until the minute is over. Guessing
//! passwords through the broker then costs a minute per handful of guesses, not a round trip.
//!
//! An exchange in flight counts against the limit from its start, so guesses sent together
//! cannot all be evaluated before the first failure is counted: past the limit, a new
//! exchange waits for one in flight to end (an honest pool opening many connections at once
//! is only slowed), and one that ends without success, abandoned included, is a failure.
//! Addresses are grouped as [`crate::net::peer_key`] says.
//!
//! Failures from all addresses together are held to `auth.max_failures_global` a minute: past
//! it, exchanges from addresses with no success in the window start no closer together than
//! one per `WINDOW / limit`. They are slowed, never refused, so a spray from many addresses
//! cannot lock everyone out, and an address that logged in recently is not slowed at all.

use crate::config::Throttle;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Addresses tracked at most; beyond it new addresses are not counted (each one is still
/// slowed by `failure_delay` and the global rate), so a spray from many addresses cannot
/// grow memory.
const MAX_TRACKED: usize = 65_536;

/// Failure counts per address and in all. Only touched on the login path, never while relaying.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    state: Mutex<State>,
    /// An exchange ended: waiters look again.
    ended: Notify,
    /// Exchanges made to wait by the global failure rate.
    pub slowed: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    addresses: HashMap<IpAddr, Window>,
    global: Global,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
    /// Exchanges under way, not yet known to fail or succeed.
    in_flight: u32,
    /// The address's last successful login.
    succeeded_at: Option<Instant>,
}

/// Failures from every address in the current window, and when the next slowed exchange
/// may start.
#[derive(Debug, Default, Clone, Copy)]
struct Global {
    start: Option<Instant>,
    count: u32,
    next_start: Option<Instant>,
}

impl Global {
    fn roll(&mut self, now: Instant) {
        if self.start.is_none_or(|s| now >= s + WINDOW) {
            (self.start, self.count) = (Some(now), 0);
        }
    }
}

/// One login exchange counted against its address's limit and the global rate: a failure
/// unless [`succeeded`](Attempt::succeeded) is called before it is dropped.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    /// The address's key, when counted.
    key: Option<IpAddr>,
    /// Counted in the global failures.
    global: bool,
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
        if self.key.is_none() && !self.global {
            return;
        }
        let now = Instant::now();
        let mut state = self.throttle.lock();
        if self.global && !self.succeeded {
            state.global.roll(now);
            state.global.count = state.global.count.saturating_add(1);
        }
        if let Some(w) = self.key.and_then(|k| state.addresses.get_mut(&k)) {
            w.in_flight = w.in_flight.saturating_sub(1);
            if self.succeeded {
                w.succeeded_at = Some(now);
            } else {
                if now >= w.start + WINDOW {
                    (w.start, w.count) = (now, 0);
                }
                w.count = w.count.saturating_add(1);
            }
        }
        drop(state);
        self.throttle.ended.notify_waiters();
    }
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts an exchange from `ip`: `Err(retry_after)` if its address has failed
    /// `max_failures_per_ip` times in the current window (0 = off); waits while failures and
    /// exchanges in flight fill that limit, and while the global failure rate is spent.
    pub async fn begin(&self, ip: IpAddr, limits: &Throttle) -> Result<Attempt<'_>, Duration> {
        let key = crate::net::peer_key(ip);
        let key = match limits.max_failures_per_ip {
            0 => None,
            limit => self.admit(key, limit).await?,
        };
        let global = limits.max_failures_global > 0;
        // From here a dropped attempt (the caller gave up while slowed) is a failure.
        let attempt = Attempt { throttle: self, key, global, succeeded: false };
        if let Some(at) = self.global_slot(crate::net::peer_key(ip), limits.max_failures_global) {
            self.slowed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until(at).await;
        }
        Ok(attempt)
    }

    /// Counts an exchange in flight for `key` (`None`: too many addresses to track), or the
    /// time until its window ends if it is refused.
    async fn admit(&self, key: IpAddr, limit: u32) -> Result<Option<IpAddr>, Duration> {
        loop {
            // Registered before looking, so an end between the look and the wait wakes it.
            let ended = self.ended.notified();
            let until = {
                let now = Instant::now();
                let mut state = self.lock();
                let map = &mut state.addresses;
                if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
                    map.retain(|_, w| now < w.start + WINDOW || w.in_flight > 0);
                    if map.len() >= MAX_TRACKED {
                        return Ok(None);
                    }
                }
                let w = map.entry(key).or_insert(Window { start: now, count: 0, in_flight: 0, succeeded_at: None });
                if now >= w.start + WINDOW {
                    (w.start, w.count) = (now, 0);
                }
                if w.count >= limit {
                    return Err(w.start + WINDOW - now);
                }
                if w.count.saturating_add(w.in_flight) < limit {
                    w.in_flight += 1;
                    return Ok(Some(key));
                }
                w.start + WINDOW
            };
            // The caller's login timeout bounds the wait.
            let _ = tokio::time::timeout_at(until, ended).await;
        }
    }

    /// When an exchange from `key` may start, if the global failure rate makes it wait:
    /// past `limit` failures in the window, unless the address logged in successfully within
    /// the window, exchanges are spaced `WINDOW / limit` apart.
    fn global_slot(&self, key: IpAddr, limit: u32) -> Option<Instant> {
        if limit == 0 {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        state.global.roll(now);
        if state.global.count < limit {
            return None;
        }
        let trusted = state.addresses.get(&key).and_then(|w| w.succeeded_at).is_some_and(|t| now < t + WINDOW);
        if trusted {
            return None;
        }
        let at = state.global.next_start.map_or(now, |n| n.max(now));
        state.global.next_start = Some(at + WINDOW / limit);
        (at > now).then_some(at)
    }

    /// Addresses currently refused (for metrics and SHOW output).
    pub fn blocked(&self, limit: u32) -> usize {
        if limit == 0 {
            return 0;
        }
        let now = Instant::now();
        self.lock().addresses.values().filter(|w| w.count >= limit && now < w.start + WINDOW).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn per_ip(limit: u32) -> Throttle {
        Throttle { failure_delay: Duration::ZERO, max_failures_per_ip: limit, max_failures_global: 0 }
    }

    fn both(per_ip: u32, global: u32) -> Throttle {
        Throttle { failure_delay: Duration::ZERO, max_failures_per_ip: per_ip, max_failures_global: global }
    }

    /// An address of the 10.1.0.0/16 range, each `n` counted apart.
    fn nth(n: u16) -> IpAddr {
        let [a, b] = n.to_be_bytes();
        IpAddr::V4(std::net::Ipv4Addr::new(10, 1, a, b))
    }

    async fn fail(t: &LoginThrottle, ip: IpAddr, limit: u32) {
        drop(t.begin(ip, &per_ip(limit)).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_limit_failures_until_the_window_ends() {
        let t = LoginThrottle::default();
        for _ in 0..3 {
            fail(&t, A, 3).await;
        }
        let wait = t.begin(A, &per_ip(3)).await.unwrap_err();
        assert!(wait <= WINDOW && wait > WINDOW - Duration::from_secs(1), "{wait:?}");
        assert!(t.begin(B, &per_ip(3)).await.is_ok(), "other addresses are not affected");
        tokio::time::advance(WINDOW).await;
        assert!(t.begin(A, &per_ip(3)).await.is_ok(), "the window has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_of_zero_never_refuses() {
        let t = LoginThrottle::default();
        for _ in 0..100 {
            fail(&t, A, 0).await;
        }
        assert!(t.begin(A, &per_ip(0)).await.is_ok());
        assert_eq!(t.blocked(0), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_window_start_a_new_count() {
        let t = LoginThrottle::default();
        fail(&t, A, 2).await;
        fail(&t, A, 2).await;
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        fail(&t, A, 2).await;
        t.begin(A, &per_ip(2)).await.expect("only one failure in the new window").succeeded();
        assert_eq!(t.blocked(2), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_not_a_failure() {
        let t = LoginThrottle::default();
        for _ in 0..10 {
            t.begin(A, &per_ip(2)).await.unwrap().succeeded();
        }
        assert!(t.begin(A, &per_ip(2)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn guesses_sent_together_are_evaluated_no_more_than_the_limit() {
        let t = std::sync::Arc::new(LoginThrottle::default());
        let held: Vec<_> = futures_free_begin(&t, 3).await;
        // A fourth waits for one of the three in flight to end.
        let fourth = tokio::spawn({
            let t = t.clone();
            async move { t.begin(A, &per_ip(3)).await.map(|a| a.succeeded()) }
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
            async move { t.begin(A, &per_ip(3)).await.map(|a| a.succeeded()) }
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
        assert!(t.begin(IpAddr::V4(std::net::Ipv4Addr::new(127, 9, 9, 9)), &per_ip(3)).await.is_err());
        assert!(t.begin("::1".parse().unwrap(), &per_ip(3)).await.is_err());
    }

    /// `n` attempts from `A` with a limit of `n`, held.
    async fn futures_free_begin(t: &LoginThrottle, n: u32) -> Vec<Attempt<'_>> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(t.begin(A, &per_ip(n)).await.unwrap());
        }
        held
    }

    #[tokio::test(start_paused = true)]
    async fn below_the_global_limit_nobody_waits() {
        let t = LoginThrottle::default();
        let start = Instant::now();
        for n in 0..10 {
            drop(t.begin(nth(n), &both(30, 10)).await.unwrap());
        }
        assert_eq!(Instant::now(), start, "ten failures fit in a limit of ten");
        assert_eq!(t.slowed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_global_limit_new_addresses_are_spaced_out_not_refused() {
        let t = LoginThrottle::default();
        for n in 0..10 {
            drop(t.begin(nth(n), &both(30, 10)).await.unwrap());
        }
        // 10 a minute: one exchange every 6 s, each from a fresh address, none refused.
        let start = Instant::now();
        for n in 10..14 {
            drop(t.begin(nth(n), &both(30, 10)).await.expect("slowed, never refused"));
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(18), "the first goes at once, then every 6 s");
        assert_eq!(t.slowed.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_logged_in_recently_is_not_slowed_by_the_global_limit() {
        let t = LoginThrottle::default();
        let app = nth(1000);
        t.begin(app, &both(30, 10)).await.unwrap().succeeded();
        for n in 0..12 {
            drop(t.begin(nth(n), &both(30, 10)).await.unwrap());
        }
        let start = Instant::now();
        t.begin(app, &both(30, 10)).await.unwrap().succeeded();
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_counts_anew_each_window() {
        let t = LoginThrottle::default();
        for n in 0..10 {
            drop(t.begin(nth(n), &both(30, 10)).await.unwrap());
        }
        tokio::time::advance(WINDOW).await;
        let start = Instant::now();
        drop(t.begin(nth(20), &both(30, 10)).await.unwrap());
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_applies_with_the_per_address_limit_off() {
        let t = LoginThrottle::default();
        for n in 0..12 {
            drop(t.begin(nth(n), &both(0, 10)).await.unwrap());
        }
        assert_eq!(t.slowed.load(Ordering::Relaxed), 1, "the 12th waited");
    }
}
