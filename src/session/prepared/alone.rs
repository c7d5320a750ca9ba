//! Parses and Closes answered without a server (what `PQprepare` sends).

use super::{Entry, Expect, Mine, Prepared, Undo};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{split_cstr, tag};
use std::collections::HashMap;

impl Prepared {
    /// True if a client without a server can be answered by the broker alone: the messages
    /// are named Parses and Closes, ending with a Sync, which is what `PQprepare` sends.
    /// Answering them here needs no server, so a client that prepares synchronously while
    /// its other connections hold every server cannot deadlock the pool. The statement is
    /// checked by the server at its first Bind or Describe, which reports any error. A Parse
    /// of a name in use, or past the client's caps, is left to the server path, which fails
    /// it as PostgreSQL does.
    pub fn can_answer_alone<'m>(&self, messages: impl Iterator<Item = (u8, &'m [u8])>) -> bool {
        let mut synced = false;
        // Names this batch created (true) or closed (false).
        let mut batch: HashMap<&[u8], bool> = HashMap::new();
        // New names and their bytes (Closes not subtracted: over-counting only sends the
        // batch to the server path, which checks each Parse exactly).
        let (mut more, mut bytes) = (0usize, 0usize);
        for (t, msg) in messages {
            if synced {
                return false;
            }
            let body = msg.get(HEADER_LEN..).unwrap_or_default();
            let ok = match t {
                tag::PARSE => match split_cstr(body) {
                    Some((name, rest)) if !name.is_empty() => {
                        let live = batch.get(name).copied().unwrap_or_else(|| self.client.contains_key(name));
                        batch.insert(name, true);
                        more += 1;
                        bytes = bytes.saturating_add(super::names::cost(name, rest.len()));
                        !live && self.over_limits(more, bytes).is_none()
                    }
                    _ => false,
                },
                tag::CLOSE => match body.get(1..).and_then(split_cstr) {
                    Some((name, _)) if body.first() == Some(&crate::proto::target::STATEMENT) && !name.is_empty() => {
                        batch.insert(name, false);
                        true
                    }
                    _ => false,
                },
                tag::SYNC => {
                    synced = true;
                    true
                }
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        synced
    }

    /// Answers one message of a batch `can_answer_alone` accepted.
    pub fn answer_alone(&mut self, t: u8, msg: &[u8]) {
        let body = msg.get(HEADER_LEN..).unwrap_or_default();
        match t {
            tag::PARSE => {
                if let Some((name, rest)) = split_cstr(body) {
                    self.client.insert(name.into(), Entry::new(self.registry.intern(rest)));
                }
                self.expect.push_back(Expect::Mine(Mine::ParseComplete, Undo::Nothing));
            }
            tag::CLOSE => {
                self.close(body);
            }
            tag::SYNC => self.expect.push_back(Expect::Mine(Mine::Ready, Undo::Nothing)),
            _ => {}
        }
    }
}
