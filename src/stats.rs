//! Traffic counters per pool (PgBouncer's SHOW STATS columns), kept as atomics so the relay
//! never takes a lock to count, plus the per-period averages computed from them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Totals since start for one pool.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transactions completed (autocommit statements count as one each).
    pub xact_count: AtomicU64,
    /// Requests completed (simple queries and Syncs).
    pub query_count: AtomicU64,
    /// Bytes from clients to servers.
    pub bytes_received: AtomicU64,
    /// Bytes from servers to clients.
    pub bytes_sent: AtomicU64,
    /// Microseconds spent in transactions.
    pub xact_time_us: AtomicU64,
    /// Microseconds spent in requests.
    pub query_time_us: AtomicU64,
    /// Microseconds clients waited for a server.
    pub wait_time_us: AtomicU64,
    /// Checkouts that waited or not (to average wait time).
    pub wait_count: AtomicU64,
    /// Server errors by SQLSTATE class (first two characters).
    errors: Mutex<HashMap<[u8; 2], u64>>,
}

impl Counters {
    /// Adds to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Records a server ErrorResponse's SQLSTATE class.
    pub fn error(&self, code: &[u8]) {
        if let Some(class) = code.get(..2).and_then(|c| <[u8; 2]>::try_from(c).ok()) {
            *self.errors.lock().unwrap_or_else(|e| e.into_inner()).entry(class).or_insert(0) += 1;
        }
    }

    /// Server errors by SQLSTATE class.
    pub fn errors(&self) -> Vec<(String, u64)> {
        let map = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, u64)> =
            map.iter().map(|(k, n)| (String::from_utf8_lossy(k).into_owned(), *n)).collect();
        v.sort();
        v
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            xact_time_us: self.xact_time_us.load(Relaxed),
            query_time_us: self.query_time_us.load(Relaxed),
            wait_time_us: self.wait_time_us.load(Relaxed),
            wait_count: self.wait_count.load(Relaxed),
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`Counters`].
    pub xact_count: u64,
    /// See [`Counters`].
    pub query_count: u64,
    /// See [`Counters`].
    pub bytes_received: u64,
    /// See [`Counters`].
    pub bytes_sent: u64,
    /// See [`Counters`].
    pub xact_time_us: u64,
    /// See [`Counters`].
    pub query_time_us: u64,
    /// See [`Counters`].
    pub wait_time_us: u64,
    /// See [`Counters`].
    pub wait_count: u64,
}

impl Snapshot {
    /// Adds another snapshot (to total pools of one database).
    pub fn add(&mut self, o: &Snapshot) {
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.xact_time_us += o.xact_time_us;
        self.query_time_us += o.query_time_us;
        self.wait_time_us += o.wait_time_us;
        self.wait_count += o.wait_count;
    }
}

/// Per-second rates and per-event averages between two snapshots (SHOW STATS `avg_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Averages {
    /// Transactions per second.
    pub xact_count: f64,
    /// Requests per second.
    pub query_count: f64,
    /// Bytes received per second.
    pub recv: f64,
    /// Bytes sent per second.
    pub sent: f64,
    /// Mean transaction time, microseconds.
    pub xact_time: f64,
    /// Mean request time, microseconds.
    pub query_time: f64,
    /// Mean wait per checkout, microseconds.
    pub wait_time: f64,
}

impl Averages {
    /// Averages over `period` between `before` and `after`.
    pub fn between(before: &Snapshot, after: &Snapshot, period: Duration) -> Averages {
        let secs = period.as_secs_f64().max(0.001);
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let per = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let xacts = d(after.xact_count, before.xact_count);
        let queries = d(after.query_count, before.query_count);
        Averages {
            xact_count: xacts / secs,
            query_count: queries / secs,
            recv: d(after.bytes_received, before.bytes_received) / secs,
            sent: d(after.bytes_sent, before.bytes_sent) / secs,
            xact_time: per(d(after.xact_time_us, before.xact_time_us), xacts),
            query_time: per(d(after.query_time_us, before.query_time_us), queries),
            wait_time: per(d(after.wait_time_us, before.wait_time_us), d(after.wait_count, before.wait_count)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_means_over_the_period() {
        let before = Snapshot { xact_count: 10, query_count: 20, xact_time_us: 1000, ..Snapshot::default() };
        let after =
            Snapshot { xact_count: 30, query_count: 60, xact_time_us: 5000, bytes_sent: 400, ..Snapshot::default() };
        let a = Averages::between(&before, &after, Duration::from_secs(2));
        assert_eq!(a.xact_count, 10.0);
        assert_eq!(a.query_count, 20.0);
        assert_eq!(a.sent, 200.0);
        assert_eq!(a.xact_time, 200.0);
        assert_eq!(a.wait_time, 0.0);
    }

    #[test]
    fn error_classes_are_counted() {
        let c = Counters::default();
        c.error(b"23505");
        c.error(b"23503");
        c.error(b"42P01");
        assert_eq!(c.errors(), vec![("23".to_string(), 2), ("42".to_string(), 1)]);
    }
}

/// Client connections refused, by reason.
#[derive(Debug, Default)]
pub struct Refusals {
    /// `max_client_conn` reached.
    pub max_client_conn: AtomicU64,
    /// `max_client_conn_per_ip` reached.
    pub max_client_conn_per_ip: AtomicU64,
    /// Wrong password, unknown user, not allowed.
    pub auth: AtomicU64,
    /// Unknown database.
    pub unknown_database: AtomicU64,
    /// Login not finished within `client_login_timeout`.
    pub login_timeout: AtomicU64,
    /// Malformed startup or messages during login.
    pub protocol: AtomicU64,
    /// Refused after too many failed logins from the address (`auth.max_failures_per_ip`).
    pub auth_throttled: AtomicU64,
    /// Refused because TLS is required (`client_tls_sslmode = require`).
    pub tls_required: AtomicU64,
}

impl Refusals {
    /// Every reason with its count.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("max_client_conn", self.max_client_conn.load(Relaxed)),
            ("max_client_conn_per_ip", self.max_client_conn_per_ip.load(Relaxed)),
            ("auth", self.auth.load(Relaxed)),
            ("unknown_database", self.unknown_database.load(Relaxed)),
            ("login_timeout", self.login_timeout.load(Relaxed)),
            ("protocol", self.protocol.load(Relaxed)),
            ("auth_throttled", self.auth_throttled.load(Relaxed)),
            ("tls_required", self.tls_required.load(Relaxed)),
        ]
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.all().iter().map(|(_, n)| n).sum()
    }
}
