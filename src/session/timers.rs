//! Time limits of a session: `client_idle_timeout`, `idle_transaction_timeout`,
//! `transaction_timeout` on the client's side, and `query_timeout` on the server's. Pure
//! bookkeeping; the session owns the timer that fires them and does what they say.

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

/// How long a server that got a CancelRequest from `query_timeout` may stay silent before it
/// is closed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// What `query_timeout` asks of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryCheck {
    /// Nothing (the server answered, or the limit has not run out).
    Fine,
    /// The server has been silent for `query_timeout`: send it a CancelRequest.
    Cancel,
    /// Still silent `CANCEL_GRACE` after the cancel: close the server and tell the client.
    Close(Expired),
}

/// The limits and the moments they count from.
#[derive(Debug, Clone)]
pub struct Timers {
    client_idle: Duration,
    idle_transaction: Duration,
    transaction: Duration,
    query: Duration,
    last_activity: Instant,
    attached_at: Instant,
    /// Since when the server owes an answer and has said nothing (`query_timeout`).
    server_quiet_since: Instant,
    /// When `query_timeout` sent a CancelRequest that the server has not answered yet.
    cancel_sent: Option<Instant>,
    /// A server was held for the client at the last look (`track`).
    was_held: bool,
    /// The server owed an answer at the last look.
    was_owed: bool,
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
            query: b.query_timeout,
            last_activity: now,
            attached_at: now,
            server_quiet_since: now,
            cancel_sent: None,
            was_held: false,
            was_owed: false,
        }
    }

    /// Looks at the session once per turn: a server newly held starts the transaction's
    /// clocks, a server newly owing an answer starts `query_timeout`'s.
    #[inline]
    pub fn track(&mut self, held: bool, owed: bool) {
        if held && !self.was_held {
            self.attached();
        }
        if owed && !self.was_owed {
            self.awaiting_server();
        }
        (self.was_held, self.was_owed) = (held, owed);
    }

    /// Takes reloaded limits.
    pub fn set_limits(&mut self, b: &Broker) {
        self.client_idle = b.client_idle_timeout;
        self.idle_transaction = b.idle_transaction_timeout;
        self.transaction = b.transaction_timeout;
        self.query = b.query_timeout;
    }

    /// The server now owes an answer it did not owe before (a request was sent, or a COPY
    /// from the client ended): `query_timeout` counts from here.
    #[inline]
    pub fn awaiting_server(&mut self) {
        if !self.query.is_zero() {
            self.server_quiet_since = Instant::now();
            self.cancel_sent = None;
        }
    }

    /// The server sent something: it is alive, and `query_timeout` starts over.
    #[inline]
    pub fn server_spoke(&mut self) {
        if !self.query.is_zero() {
            self.server_quiet_since = Instant::now();
            self.cancel_sent = None;
        }
    }

    /// When `query_timeout` next needs a look, if the server owes an answer (`owed`).
    fn query_deadline(&self, owed: bool) -> Option<Instant> {
        if !owed || self.query.is_zero() {
            return None;
        }
        Some(match self.cancel_sent {
            None => self.server_quiet_since + self.query,
            Some(at) => at + CANCEL_GRACE,
        })
    }

    /// What `query_timeout` asks for now, given whether the server owes an answer. A `Cancel`
    /// is recorded as sent.
    pub fn check_query(&mut self, owed: bool) -> QueryCheck {
        let Some(due) = self.query_deadline(owed) else { return QueryCheck::Fine };
        let now = Instant::now();
        if now < due {
            return QueryCheck::Fine;
        }
        if self.cancel_sent.is_none() {
            self.cancel_sent = Some(now);
            return QueryCheck::Cancel;
        }
        QueryCheck::Close(Expired {
            code: SqlState::from_code("57014"),
            message: format!(
                "query_timeout ({:?}) expired: the server did not answer, nor a cancel request within {CANCEL_GRACE:?}; \
                 its connection was closed",
                self.query
            ),
        })
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

    /// When the next applicable limit runs out, if any applies; `owed` says whether the
    /// server owes an answer (for `query_timeout`).
    pub fn deadline(&self, held: Held, owed: bool) -> Option<Instant> {
        let client = self.limits(held).into_iter().filter(|(d, ..)| !d.is_zero()).map(|(d, from, ..)| from + d).min();
        match (client, self.query_deadline(owed)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
            query: Duration::ZERO,
            last_activity: now,
            attached_at: now,
            server_quiet_since: now,
            cancel_sent: None,
            was_held: false,
            was_owed: false,
        }
    }

    #[test]
    fn nothing_applies_when_all_limits_are_zero() {
        assert_eq!(timers(0, 0, 0).deadline(None, false), None);
        assert_eq!(timers(0, 0, 0).deadline(Some((TxnStatus::InTransaction, 1)), true), None);
    }

    #[test]
    fn client_idle_applies_only_without_a_server() {
        let t = timers(10, 0, 0);
        assert!(t.deadline(None, false).is_some());
        assert_eq!(t.deadline(Some((TxnStatus::Idle, 1)), true), None);
    }

    #[test]
    fn idle_transaction_applies_only_when_nothing_is_running() {
        let t = timers(0, 5, 0);
        assert!(t.deadline(Some((TxnStatus::InTransaction, 0)), false).is_some());
        assert!(t.deadline(Some((TxnStatus::Failed, 0)), false).is_some());
        assert_eq!(t.deadline(Some((TxnStatus::InTransaction, 1)), true), None, "a query is running");
        assert_eq!(t.deadline(Some((TxnStatus::Idle, 0)), false), None);
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

    #[tokio::test(start_paused = true)]
    async fn query_timeout_cancels_first_then_closes_a_silent_server() {
        let mut t = timers(0, 0, 0);
        t.query = Duration::from_secs(2);
        assert_eq!(t.deadline(Some((TxnStatus::Idle, 1)), false), None, "nothing owed");
        t.awaiting_server();
        let due = t.deadline(Some((TxnStatus::Idle, 1)), true).unwrap();
        assert_eq!(due - Instant::now(), Duration::from_secs(2));
        assert_eq!(t.check_query(true), QueryCheck::Fine);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.check_query(true), QueryCheck::Cancel);
        assert_eq!(t.check_query(true), QueryCheck::Fine, "the cancel gets its grace");
        tokio::time::advance(CANCEL_GRACE).await;
        let QueryCheck::Close(e) = t.check_query(true) else { panic!("expected Close") };
        assert_eq!(e.code.code(), "57014");
        assert!(e.message.contains("query_timeout (2s)"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_speaks_resets_query_timeout() {
        let mut t = timers(0, 0, 0);
        t.query = Duration::from_secs(2);
        t.awaiting_server();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.check_query(true), QueryCheck::Cancel);
        t.server_spoke();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(t.check_query(true), QueryCheck::Fine, "counting starts over, and no close");
        assert_eq!(t.check_query(false), QueryCheck::Fine);
    }
}
