//! Client-side time limits: `client_idle_timeout`, `idle_transaction_timeout`,
//! `transaction_timeout`. Pure bookkeeping; the session owns the timer that fires them.

use crate::config::Broker;
use crate::error::SqlState;
use crate::proto::TxnStatus;
use std::time::Duration;
use tokio::time::Instant;

/// A limit that ran out, and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// SQLSTATE.
    pub code: SqlState,
    /// Message naming the limit and its value.
    pub message: String,
}

/// The limits and the moments they count from.
#[derive(Debug, Clone)]
pub struct Timers {
    client_idle: Duration,
    idle_transaction: Duration,
    transaction: Duration,
    last_activity: Instant,
    attached_at: Instant,
}

/// What the session holds: the server's transaction status and the requests it still owes
/// replies for, or `None` without a server.
pub type Held = Option<(TxnStatus, u32)>;

impl Timers {
    /// Limits from the broker settings; zero disables one.
    pub fn new(b: &Broker) -> Timers {
        let now = Instant::now();
        Timers {
            client_idle: b.client_idle_timeout,
            idle_transaction: b.idle_transaction_timeout,
            transaction: b.transaction_timeout,
            last_activity: now,
            attached_at: now,
        }
    }

    /// Takes reloaded limits.
    pub fn set_limits(&mut self, b: &Broker) {
        self.client_idle = b.client_idle_timeout;
        self.idle_transaction = b.idle_transaction_timeout;
        self.transaction = b.transaction_timeout;
    }

    fn enabled(&self) -> bool {
        !(self.client_idle.is_zero() && self.idle_transaction.is_zero() && self.transaction.is_zero())
    }

    /// Something moved on the connection.
    #[inline]
    pub fn activity(&mut self) {
        if self.enabled() {
            self.last_activity = Instant::now();
        }
    }

    /// A server was attached for a new transaction.
    pub fn attached(&mut self) {
        if self.enabled() {
            self.attached_at = Instant::now();
            self.last_activity = self.attached_at;
        }
    }

    fn limits(&self, held: Held) -> [(Duration, Instant, SqlState, &'static str); 3] {
        let far = Duration::ZERO;
        let idle_in_txn = matches!(held, Some((status, 0)) if status != TxnStatus::Idle);
        [
            (
                if held.is_none() { self.client_idle } else { far },
                self.last_activity,
                SqlState::IDLE_SESSION_TIMEOUT,
                "client_idle_timeout",
            ),
            (
                if idle_in_txn { self.idle_transaction } else { far },
                self.last_activity,
                SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                "idle_transaction_timeout",
            ),
            (
                if held.is_some() { self.transaction } else { far },
                self.attached_at,
                SqlState::TRANSACTION_TIMEOUT,
                "transaction_timeout",
            ),
        ]
    }

    /// When the next applicable limit runs out, if any applies.
    pub fn deadline(&self, held: Held) -> Option<Instant> {
        self.limits(held).iter().filter(|(d, ..)| !d.is_zero()).map(|(d, from, ..)| *from + *d).min()
    }

    /// The limit that has run out now, if any.
    pub fn expired(&self, held: Held) -> Option<Expired> {
        let now = Instant::now();
        self.limits(held).iter().find(|(d, from, ..)| !d.is_zero() && now >= *from + *d).map(|(d, _, code, name)| {
            Expired { code: *code, message: format!("{name} ({d:?}) expired: closing the client connection") }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn timers(idle: u64, idle_txn: u64, txn: u64) -> Timers {
        let now = Instant::now();
        Timers {
            client_idle: Duration::from_secs(idle),
            idle_transaction: Duration::from_secs(idle_txn),
            transaction: Duration::from_secs(txn),
            last_activity: now,
            attached_at: now,
        }
    }

    #[test]
    fn nothing_applies_when_all_limits_are_zero() {
        assert_eq!(timers(0, 0, 0).deadline(None), None);
        assert_eq!(timers(0, 0, 0).deadline(Some((TxnStatus::InTransaction, 0))), None);
    }

    #[test]
    fn client_idle_applies_only_without_a_server() {
        let t = timers(10, 0, 0);
        assert!(t.deadline(None).is_some());
        assert_eq!(t.deadline(Some((TxnStatus::Idle, 1))), None);
    }

    #[test]
    fn idle_transaction_applies_only_when_nothing_is_running() {
        let t = timers(0, 5, 0);
        assert!(t.deadline(Some((TxnStatus::InTransaction, 0))).is_some());
        assert!(t.deadline(Some((TxnStatus::Failed, 0))).is_some());
        assert_eq!(t.deadline(Some((TxnStatus::InTransaction, 1))), None, "a query is running");
        assert_eq!(t.deadline(Some((TxnStatus::Idle, 0))), None);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_names_the_limit_and_its_sqlstate() {
        let t = timers(0, 0, 3);
        let held = Some((TxnStatus::InTransaction, 1));
        assert_eq!(t.expired(held), None);
        tokio::time::advance(Duration::from_secs(4)).await;
        let e = t.expired(held).unwrap();
        assert_eq!(e.code, SqlState::TRANSACTION_TIMEOUT);
        assert!(e.message.contains("transaction_timeout (3s)"), "{}", e.message);
    }
}
