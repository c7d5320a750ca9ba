//! What the client has asked of its server that is not settled yet: requests still owed a
//! ReadyForQuery, and extended-protocol messages not yet closed by a Sync.

use super::pipe::Action;
use crate::proto::tag;

/// Client requests the server still owes a ReadyForQuery for, extended-protocol messages not
/// yet closed by a Sync, and whether the server is taking COPY data: the one home of the COPY
/// FROM STDIN state. A server goes back to the pool only when all are clear.
#[derive(Debug, Default)]
pub struct Pending {
    /// Requests (Query, Sync, FunctionCall) the server still owes a ReadyForQuery for.
    pub sync_points: u32,
    /// Extended-protocol messages were sent after the last Sync.
    pub unsynced: bool,
    /// Syncs sent since the last Execute (`None` once a Query or FunctionCall followed it):
    /// if that Execute starts a COPY FROM STDIN, the server ignores them.
    since_execute: Option<u32>,
    /// The server is in COPY FROM STDIN: it waits for the client's data, and ignores Syncs
    /// until CopyDone or CopyFail.
    copy_in: bool,
}

impl Pending {
    /// Accounts for a client message and says what to do with it (Terminate stops the relay).
    #[inline]
    pub fn observe_client(&mut self, t: u8) -> Action {
        match t {
            tag::TERMINATE => Action::Stop,
            tag::SYNC if self.copy_in => Action::Forward,
            tag::COPY_DONE | tag::COPY_FAIL => {
                self.copy_in = false;
                Action::Forward
            }
            tag::SYNC => {
                self.sync_points += 1;
                self.unsynced = false;
                if let Some(n) = self.since_execute.as_mut() {
                    *n += 1;
                }
                Action::Forward
            }
            tag::QUERY | tag::FUNCTION_CALL => {
                self.sync_points += 1;
                self.unsynced = false;
                self.since_execute = None;
                Action::Forward
            }
            tag::EXECUTE => {
                self.unsynced = true;
                self.since_execute = Some(0);
                Action::Forward
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE | tag::FLUSH => {
                self.unsynced = true;
                Action::Forward
            }
            _ => Action::Forward,
        }
    }

    /// A request counted by `observe_client` was answered by the broker, never sent.
    pub fn withdraw(&mut self) {
        self.sync_points = self.sync_points.saturating_sub(1);
    }

    /// The server sent CopyInResponse. Started by an Execute, the COPY makes the server skip
    /// the Syncs sent after that Execute (drivers send one with it and one after CopyDone).
    pub fn on_copy_in(&mut self) {
        self.copy_in = true;
        if let Some(n) = self.since_execute.take() {
            self.sync_points = self.sync_points.saturating_sub(n);
        }
    }
}

impl Pending {
    /// The server sent ReadyForQuery: one request is settled, and any COPY is over.
    pub fn on_ready(&mut self) {
        self.sync_points = self.sync_points.saturating_sub(1);
        self.copy_in = false;
    }

    /// True while the server takes COPY data: it waits for the client, not the other way.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// True when the server owes nothing and no extended-protocol batch is open.
    pub fn is_settled(&self) -> bool {
        self.sync_points == 0 && !self.unsynced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extended_copy_is_owed_one_ready_for_query_for_its_two_syncs() {
        let mut p = Pending::default();
        for t in [tag::BIND, tag::EXECUTE, tag::SYNC] {
            p.observe_client(t);
        }
        p.on_copy_in();
        p.observe_client(b'd');
        p.observe_client(tag::SYNC);
        p.observe_client(b'c');
        p.observe_client(tag::SYNC);
        assert_eq!(p.sync_points, 1, "the Sync after CopyDone");
    }

    #[test]
    fn a_simple_query_copy_keeps_its_one_ready_for_query() {
        let mut p = Pending::default();
        for t in [tag::BIND, tag::EXECUTE, tag::SYNC, tag::QUERY] {
            p.observe_client(t);
        }
        p.sync_points -= 1; // the extended batch's ReadyForQuery came
        p.on_copy_in();
        assert_eq!(p.sync_points, 1);
    }
}
