//! Statement definitions shared by all clients, and a client's handle on one.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Content identity of a statement: SHA-256 of its query text and parameter types, truncated.
type StmtId = [u8; 16];

/// A statement definition, shared by every client that prepares the same text and types.
#[derive(Debug)]
pub(super) struct StmtDef {
    id: StmtId,
    /// Bumped when a server reports the cached plan stale; part of the server-side name, so
    /// every server prepares the statement afresh.
    pub(super) version: AtomicU32,

    /// The Parse body after the statement name: query text, parameter count and types.
    pub(super) body: Box<[u8]>,
}

impl StmtDef {
    fn server_name(&self, version: u32) -> Arc<str> {
        let mut name = String::with_capacity(48);
        name.push_str("pgb_");
        for b in self.id {
            let _ = write!(name, "{b:02x}");
        }
        let _ = write!(name, "_{version}");
        name.into()
    }
}

/// Interns statement definitions so that clients share their version counter.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Interned>,
}

/// Fewest entries before dead ones are swept.
const SWEEP_MIN: usize = 1024;

#[derive(Debug, Default)]
struct Interned {
    /// Definitions by content; entries whose last client let go stay until a sweep.
    map: HashMap<StmtId, Weak<StmtDef>>,
    /// Size at which the next sweep runs: twice what was live after the last one. A sweep
    /// then comes only after at least half as many inserts as it visits, so a Parse costs
    /// the same whether 100 or 100,000 statements are live.
    sweep_at: usize,
    /// Entries visited by sweeps (for tests: the work is counted, not timed).
    visited: u64,
}

fn stmt_id(body: &[u8]) -> StmtId {
    let digest = Sha256::digest(body);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

impl Registry {
    pub(super) fn intern(&self, body: &[u8]) -> Arc<StmtDef> {
        let id = stmt_id(body);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(def) = inner.map.get(&id).and_then(Weak::upgrade) {
            return def;
        }
        if inner.map.len() >= inner.sweep_at.max(SWEEP_MIN) {
            inner.visited += inner.map.len() as u64;
            inner.map.retain(|_, w| w.strong_count() > 0);
            inner.sweep_at = 2 * inner.map.len();
        }
        let def = Arc::new(StmtDef { id, version: AtomicU32::new(0), body: body.into() });
        inner.map.insert(id, Arc::downgrade(&def));
        def
    }

    /// Entries held (live or awaiting a sweep), and entries visited by sweeps so far.
    #[cfg(test)]
    fn counts(&self) -> (usize, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.map.len(), inner.visited)
    }
}

/// A client's statement: its definition and the server-side name of the version it knows.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) def: Arc<StmtDef>,
    pub(super) version: u32,
    pub(super) name: Arc<str>,
}

impl Entry {
    pub(super) fn new(def: Arc<StmtDef>) -> Entry {
        let version = def.version.load(Ordering::Relaxed);
        let name = def.server_name(version);
        Entry { def, version, name }
    }

    #[inline]
    pub(super) fn current(&mut self) -> &Arc<str> {
        let v = self.def.version.load(Ordering::Relaxed);
        if v != self.version {
            self.version = v;
            self.name = self.def.server_name(v);
        }
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sweep work per Parse of a new statement, with `live` statements held, over `parses`
    /// Parses whose statements are let go at once (clients preparing and closing).
    fn sweep_work_per_parse(live: usize, parses: usize) -> f64 {
        let registry = Registry::default();
        let held: Vec<_> = (0..live).map(|i| registry.intern(format!("SELECT {i}").as_bytes())).collect();
        let (_, before) = registry.counts();
        for i in 0..parses {
            drop(registry.intern(format!("SELECT 'churn {i}'").as_bytes()));
        }
        let (len, after) = registry.counts();
        assert!(len <= (2 * live).max(SWEEP_MIN) + 1, "dead entries are swept: {len} held for {live} live");
        drop(held);
        (after - before) as f64 / parses as f64
    }

    #[test]
    fn a_parse_costs_the_same_sweep_work_with_100_or_10000_statements_live() {
        let few = sweep_work_per_parse(100, 20_000);
        let many = sweep_work_per_parse(10_000, 20_000);
        // A sweep of every entry on each Parse would be 10,000 per Parse here.
        assert!(few <= 2.0 && many <= 2.0, "entries visited per Parse: {few} with 100 live, {many} with 10,000");
    }

    #[test]
    fn the_same_text_is_one_definition_while_someone_holds_it() {
        let registry = Registry::default();
        let a = registry.intern(b"SELECT 1\0\0\0");
        let b = registry.intern(b"SELECT 1\0\0\0");
        assert!(Arc::ptr_eq(&a, &b));
    }
}
