//! Socket setup in one place: TCP_NODELAY and keepalive for client and server sockets.

use socket2::{SockRef, TcpKeepalive};
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
