//! The hubs of the broker, one per database, started on first use.

use super::Hub;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Hubs by database, created on first use.
#[derive(Default)]
pub struct Hubs {
    map: Mutex<HashMap<String, Weak<Hub>>>,
    keep: Mutex<Vec<Arc<Hub>>>,
}

impl Hubs {
    /// The hub for `database`, started with `make` if there is none.
    pub fn get_or_start(&self, database: &str, make: impl FnOnce() -> Arc<Hub>) -> Arc<Hub> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(database).and_then(Weak::upgrade) {
            return h;
        }
        let hub = make();
        map.insert(database.to_string(), Arc::downgrade(&hub));
        // Hubs live as long as the broker: their listener keeps fixed channels and clients
        // come and go.
        self.keep.lock().unwrap_or_else(|e| e.into_inner()).push(hub.clone());
        hub
    }

    /// Every hub.
    pub fn all(&self) -> Vec<Arc<Hub>> {
        self.keep.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
