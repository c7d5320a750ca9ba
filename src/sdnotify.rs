//! systemd's notification protocol (`Type=notify`): datagrams to `$NOTIFY_SOCKET`, and the
//! watchdog pings. A few lines over a Unix datagram socket; nothing to do outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The environment variable naming the socket a new process sends READY=1 to.
pub const HANDOVER_SOCKET: &str = "PGBROKER_HANDOVER_SOCKET";

/// Sends `state` (e.g. `READY=1`) if systemd asked for notifications. Errors are logged:
/// a broken notification socket must not stop the broker.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// `READY=1`: to systemd, and to the process that started this one in a hand-over
/// (`PGBROKER_HANDOVER_SOCKET`), which drains once it hears it.
pub fn ready() {
    notify("READY=1");
    if let Some(path) = std::env::var_os(HANDOVER_SOCKET) {
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to(b"READY=1", &path));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot tell the process handing over that this one is ready");
        }
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd wants next to it.
pub fn reloading() {
    match monotonic_usec() {
        Some(us) => notify(&format!("RELOADING=1\nMONOTONIC_USEC={us}")),
        None => notify("RELOADING=1"),
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd reads it next to `RELOADING=1`.
fn monotonic_usec() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    u64::try_from(t.tv_sec()).ok()?.checked_mul(1_000_000)?.checked_add(u64::try_from(t.tv_nsec()).ok()? / 1000)
}

/// The watchdog interval systemd set for this process (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_is_read() {
        let a = monotonic_usec().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_usec().unwrap();
        assert!(b > a && b - a >= 2000 && b - a < 1_000_000, "{a} {b}");
    }
}
