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
    map: Mutex<HashMap<StmtId, Weak<StmtDef>>>,
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
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(def) = map.get(&id).and_then(Weak::upgrade) {
            return def;
        }
        if map.len() > 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let def = Arc::new(StmtDef { id, version: AtomicU32::new(0), body: body.into() });
        map.insert(id, Arc::downgrade(&def));
        def
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
