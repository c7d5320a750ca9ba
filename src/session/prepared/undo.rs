//! Taking back what a message did to the client's statement names when the server fails or
//! skips it: PostgreSQL then keeps its statements as they were.

use super::{Entry, Expect, Prepared};
use crate::server::statements::Statements;

/// A change to the client's names, taken back if the server fails or skips the message that
/// made it: PostgreSQL then keeps its statements as they were.
#[derive(Debug)]
pub(super) enum Undo {
    Nothing,
    /// The message created this name.
    Forget(Box<[u8]>),
    /// The message removed this name.
    Restore(Box<[u8]>, Entry),
}

impl Prepared {
    /// A message the server skipped (or that failed): undo what sending it assumed.
    pub(super) fn forget_unrun(&mut self, e: Expect, server: &mut Statements) {
        let undo = match e {
            Expect::Parse { name, undo, .. } => {
                if let Some(n) = name {
                    server.remove(&n);
                }
                undo
            }
            Expect::Close { evicted: Some(n) } => {
                server.restore(n);
                Undo::Nothing
            }
            Expect::Mine(_, undo) => undo,
            _ => Undo::Nothing,
        };
        match undo {
            Undo::Nothing => {}
            Undo::Forget(name) => {
                self.client.remove(&name);
            }
            Undo::Restore(name, entry) => {
                self.client.insert(name, entry);
            }
        }
    }
}
