//! The configuration new work sees, swapped whole on reload.

use super::Config;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// A handle on the running configuration; clones share it.
#[derive(Clone)]
pub struct Live(Arc<ArcSwap<Config>>);

impl Live {
    /// A handle starting with `config`.
    pub fn new(config: Config) -> Live {
        Live(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// The current configuration snapshot. Take it once per unit of work and keep the `Arc`.
    pub fn config(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// The current configuration if it is not `current` any more (a reload happened): one
    /// atomic load, no reference count traffic, when it is unchanged.
    pub fn config_if_changed(&self, current: &Arc<Config>) -> Option<Arc<Config>> {
        let live = self.0.load();
        (!Arc::ptr_eq(&live, current)).then(|| Arc::clone(&live))
    }

    /// Makes `config` the one new work sees.
    pub fn store(&self, config: Config) {
        self.0.store(Arc::new(config));
    }
}
