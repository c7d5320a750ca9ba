//! The broker-named prepared statements one server holds, least recently used first out.

use std::collections::HashMap;
use std::sync::Arc;

/// Prepared statements on one server, by server-side name, with a use clock for LRU eviction.
#[derive(Debug, Default)]
pub struct Statements {
    map: HashMap<Arc<str>, u64>,
    clock: u64,
}

impl Statements {
    /// True if the server has `name`; marks it used.
    #[inline]
    pub fn touch(&mut self, name: &str) -> bool {
        self.clock += 1;
        match self.map.get_mut(name) {
            Some(used) => {
                *used = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `name` as prepared. If that makes more than `max`, returns the least recently
    /// used other name, removed here, for the caller to close on the server.
    pub fn insert(&mut self, name: Arc<str>, max: usize) -> Option<Arc<str>> {
        self.clock += 1;
        self.map.insert(name.clone(), self.clock);
        if self.map.len() <= max {
            return None;
        }
        let victim = self.map.iter().filter(|(n, _)| **n != name).min_by_key(|(_, used)| **used)?.0.clone();
        self.map.remove(&victim);
        Some(victim)
    }

    /// Forgets `name` (its Parse failed, or it was closed).
    pub fn remove(&mut self, name: &str) {
        self.map.remove(name);
    }

    /// Records `name` as still prepared (a Close that was never run).
    pub fn restore(&mut self, name: Arc<str>) {
        self.map.entry(name).or_insert(0);
    }

    /// Forgets everything (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Statements held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_statement_is_evicted_past_the_limit() {
        let mut s = Statements::default();
        assert_eq!(s.insert("a".into(), 2), None);
        assert_eq!(s.insert("b".into(), 2), None);
        assert!(s.touch("a"));
        assert_eq!(s.insert("c".into(), 2).as_deref(), Some("b"));
        assert!(s.touch("a") && s.touch("c") && !s.touch("b"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn restore_and_clear_keep_the_books_straight() {
        let mut s = Statements::default();
        s.insert("a".into(), 5);
        s.remove("a");
        assert!(!s.touch("a"));
        s.restore("a".into());
        assert!(s.touch("a"));
        s.clear();
        assert!(s.is_empty());
    }
}
