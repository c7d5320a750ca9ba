//! What the client has asked of its server that is not settled yet: requests still owed a
//! ReadyForQuery, and extended-protocol messages not yet closed by a Sync.

use super::pipe::Action;
use crate::proto::tag;

/// Client requests the server still owes a ReadyForQuery for, and extended-protocol messages
/// not yet closed by a Sync. A server goes back to the pool only when both are zero.
#[derive(Debug, Default)]
pub struct Pending {
    /// Requests (Query, Sync, FunctionCall) the server still owes a ReadyForQuery for.
    pub sync_points: u32,
    /// Extended-protocol messages were sent after the last Sync.
    pub unsynced: bool,
}

impl Pending {
    /// Accounts for a client message and says what to do with it (Terminate stops the relay).
    #[inline]
    pub fn observe_client(&mut self, t: u8) -> Action {
        match t {
            tag::TERMINATE => Action::Stop,
            tag::QUERY | tag::SYNC | tag::FUNCTION_CALL => {
                self.sync_points += 1;
                self.unsynced = false;
                Action::Forward
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                self.unsynced = true;
                Action::Forward
            }
            _ => Action::Forward,
        }
    }
}

impl Pending {
    /// True when the server owes nothing and no extended-protocol batch is open.
    pub fn is_settled(&self) -> bool {
        self.sync_points == 0 && !self.unsynced
    }
}
