//! Times and counts a client's requests and transactions into its pool's counters. Clock
//! reads happen only at request and transaction boundaries.

use crate::metrics::PoolMetrics;
use crate::stats::Counters;
use std::sync::atomic::AtomicU64;
use tokio::time::Instant;

/// Where the current request and transaction started.
#[derive(Debug, Default)]
pub(super) struct Accounting {
    query_start: Option<Instant>,
    xact_start: Option<Instant>,
}

fn add_us(counter: &AtomicU64, since: Instant, now: Instant) {
    Counters::add(counter, now.duration_since(since).as_micros() as u64);
}

impl Accounting {
    /// Requests were sent; `pending` is how many the server owes now.
    #[inline]
    pub fn sent(&mut self, pending: u32) {
        if pending > 0 && self.query_start.is_none() {
            let now = Instant::now();
            self.query_start = Some(now);
            self.xact_start.get_or_insert(now);
        }
    }

    /// `done` requests were answered (ReadyForQuery); `pending` are still owed;
    /// `transaction_over` when the server is idle with nothing owed.
    #[inline]
    pub fn answered(&mut self, counters: &Counters, m: &PoolMetrics, done: u32, pending: u32, transaction_over: bool) {
        if done == 0 {
            return;
        }
        let now = Instant::now();
        Counters::add(&counters.query_count, u64::from(done));
        if let Some(start) = self.query_start.take() {
            add_us(&counters.query_time_us, start, now);
            m.query.record(now.duration_since(start));
        }
        if pending > 0 {
            self.query_start = Some(now);
        }
        if transaction_over && let Some(start) = self.xact_start.take() {
            Counters::add(&counters.xact_count, 1);
            add_us(&counters.xact_time_us, start, now);
            m.transaction.record(now.duration_since(start));
        }
    }

    /// A checkout that started at `since` finished (`None`: at once, a server was idle).
    pub fn waited(counters: &Counters, m: &PoolMetrics, since: Option<Instant>) {
        let waited = since.map(|s| s.elapsed()).unwrap_or_default();
        Counters::add(&counters.wait_count, 1);
        Counters::add(&counters.wait_time_us, waited.as_micros() as u64);
        m.wait.record(waited);
    }
}

/// The SQLSTATE of an ErrorResponse message, if present.
pub(super) fn error_code(msg: &[u8]) -> Option<&[u8]> {
    crate::proto::error_field(msg, crate::proto::field::CODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn requests_and_transactions_are_counted() {
        let c = Counters::default();
        let mut a = Accounting::default();
        let m = PoolMetrics::default();
        a.sent(2);
        a.answered(&c, &m, 1, 1, false);
        a.answered(&c, &m, 1, 0, true);
        assert_eq!(c.query_count.load(Relaxed), 2);
        assert_eq!(c.xact_count.load(Relaxed), 1);
    }

    #[test]
    fn error_codes_are_found_among_fields() {
        let mut msg = vec![b'E', 0, 0, 0, 0];
        msg.extend_from_slice(b"SERROR\0VERROR\0C23505\0Mduplicate\0\0");
        assert_eq!(error_code(&msg), Some(&b"23505"[..]));
        assert_eq!(error_code(&[b'E', 0, 0, 0, 4, 0]), None);
    }
}
