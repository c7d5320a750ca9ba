//! The settings a fresh server of a pool starts with, learnt from the first one opened.

use super::Pool;
use crate::server::{ServerConn, ServerError};
use std::sync::Arc;

/// The settings a fresh server starts with: what it reports, and the tracked settings it does
/// not report (read once).
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// ParameterStatus values after login.
    pub reported: Vec<(String, String)>,
    /// `track_extra_parameters` values (lowercase names).
    pub unreported: Vec<(String, String)>,
    /// Both lists in one, made once: every client of the pool reads it.
    all: Vec<(String, String)>,
}

impl Defaults {
    /// Defaults from what a fresh server reported and the tracked settings it did not.
    pub fn new(reported: Vec<(String, String)>, unreported: Vec<(String, String)>) -> Defaults {
        let all = reported.iter().chain(&unreported).cloned().collect();
        Defaults { reported, unreported, all }
    }

    /// Both lists in one.
    pub fn all(&self) -> &[(String, String)] {
        &self.all
    }
}

impl Pool {
    /// The settings a fresh server of this pool starts with, once one has been opened.
    pub fn defaults(&self) -> Option<Arc<Defaults>> {
        self.defaults.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a fresh server's settings as the pool's defaults, once.
    pub(super) async fn learn_defaults(&self, conn: &mut ServerConn) -> Result<(), ServerError> {
        if self.defaults().is_some() {
            return Ok(());
        }
        let mut unreported = Vec::new();
        let settings = self.settings();
        if !settings.track_extra.is_empty() {
            let cols: Vec<String> = settings
                .track_extra
                .iter()
                .map(|e| format!("pg_catalog.current_setting({}, true)", postgres_protocol::escape::escape_literal(e)))
                .collect();
            let row = conn.query_row(&format!("SELECT {}", cols.join(", "))).await?.unwrap_or_default();
            for (name, value) in settings.track_extra.iter().zip(row) {
                if let Some(v) = value {
                    unreported.push((name.to_lowercase(), v));
                }
            }
        }
        let d = Defaults::new(conn.params.clone(), unreported);
        self.defaults.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| Arc::new(d));
        Ok(())
    }
}
