//! A client's statement names, with the count and bytes they hold: a client may keep only
//! so many (`broker.max_client_prepared_statements`, `max_client_prepared_bytes`), as each
//! holds its statement text in the broker for the client's whole life.

use super::Entry;
use std::collections::HashMap;

/// The caps on one client's named statements.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most named statements.
    pub statements: usize,
    /// Most bytes of names and statement text (Parse bodies) together.
    pub bytes: usize,
}

impl Limits {
    /// No caps (unit tests).
    pub const NONE: Limits = Limits { statements: usize::MAX, bytes: usize::MAX };
}

/// Names to entries, and the bytes they account for.
#[derive(Debug, Default)]
pub(super) struct Names {
    map: HashMap<Box<[u8]>, Entry>,
    bytes: usize,
}

/// What one name costs: its own bytes and its statement's Parse body. A body shared with
/// other clients is counted for each, so the cap holds whatever the others do.
pub(super) fn cost(name: &[u8], body_len: usize) -> usize {
    name.len().saturating_add(body_len)
}

impl Names {
    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.map.contains_key(name)
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut Entry> {
        self.map.get_mut(name)
    }

    pub fn insert(&mut self, name: Box<[u8]>, entry: Entry) {
        self.remove(&name);
        self.bytes = self.bytes.saturating_add(cost(&name, entry.def.body.len()));
        self.map.insert(name, entry);
    }

    pub fn remove_entry(&mut self, name: &[u8]) -> Option<(Box<[u8]>, Entry)> {
        let (k, e) = self.map.remove_entry(name)?;
        self.bytes = self.bytes.saturating_sub(cost(&k, e.def.body.len()));
        Some((k, e))
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.remove_entry(name);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the client holds no names.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    #[cfg(test)]
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.map.get(name)
    }

    /// Bytes of names and statement text held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
