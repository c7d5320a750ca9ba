//! Sockets: setup in one place (TCP_NODELAY and keepalive for client, server and HTTP
//! sockets), and a client's connection with its buffers.

pub mod io;
pub mod stream;

pub use io::{ClientIo, ClientIoError};
pub use stream::ClientStream;

use socket2::{SockRef, TcpKeepalive};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;

/// Idle time before the first keepalive probe; finds dead peers well before the OS default of 2 h.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Interval between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Applies the broker's socket options. Failures are logged, not fatal: the socket still works.
pub fn tune(stream: &TcpStream, keepalive: bool) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if keepalive {
        let ka = TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
        if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

/// The key per-address limits count a peer under: one host for the whole loopback range
/// (127.0.0.0/8, `::1`), an IPv6 peer by its /64 (what one machine or subscriber is
/// usually given), an IPv4-mapped IPv6 address as the IPv4 one. Otherwise a local process
/// or one IPv6 host could rotate addresses to get around the limit.
pub fn peer_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    match ip {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Connections counted by client address (a [`peer_key`]), for per-address limits.
#[derive(Default)]
pub struct PerIp(Mutex<Counts>);

/// Connections by address, and their sum (kept, so no limit check walks the map).
#[derive(Default)]
struct Counts {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// One connection in a [`PerIp`] count; released on drop.
pub struct IpSlot {
    counts: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection from `ip` unless `ip` has `per_ip` of them already or all
    /// addresses together have `total`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, per_ip: usize, total: usize) -> Option<IpSlot> {
        let mut c = self.lock();
        if c.total >= total || c.by_ip.get(&ip).copied().unwrap_or(0) >= per_ip {
            return None;
        }
        *c.by_ip.entry(ip).or_insert(0) += 1;
        c.total += 1;
        Some(IpSlot { counts: self.clone(), ip })
    }

    /// Connections counted now, from every address.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let c = &mut *self.counts.lock();
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            c.total -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PerIp, peer_key};
    use std::net::IpAddr;
    use std::sync::Arc;

    fn key(s: &str) -> String {
        peer_key(s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]))).to_string()
    }

    #[test]
    fn loopback_addresses_are_one_host() {
        for a in ["127.0.0.1", "127.0.0.2", "127.255.1.9", "::1", "::ffff:127.0.0.5"] {
            assert_eq!(key(a), "127.0.0.1", "{a}");
        }
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64() {
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn other_ipv4_peers_are_counted_by_address() {
        assert_eq!(key("10.0.0.7"), "10.0.0.7");
        assert_eq!(key("::ffff:10.0.0.7"), "10.0.0.7");
    }

    #[test]
    fn per_ip_counts_refuse_past_either_limit_and_free_on_drop() {
        let counts = Arc::new(PerIp::default());
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = counts.take(a, 1, 2).unwrap();
        assert!(counts.take(a, 1, 2).is_none(), "a's own limit");
        let second = counts.take(b, 1, 2).unwrap();
        assert!(counts.take(IpAddr::from([10, 0, 0, 3]), 1, 2).is_none(), "the total");
        assert_eq!(counts.total(), 2);
        drop((first, second));
        assert_eq!(counts.total(), 0);
        assert!(counts.take(a, 1, 2).is_some());
    }
}
