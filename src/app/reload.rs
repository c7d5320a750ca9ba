//! Live reload: a new config file is validated whole (budget included) and then swapped in.
//! Pools take their new sizes and timeouts in place (a smaller pool closes idle servers now
//! and busy ones when they come back), budgets change their caps, databases removed from the
//! file have their clients finish their transaction and leave. Listen addresses need a
//! restart and are left alone.

use super::App;
use crate::budget;
use crate::config::Config;
use crate::pool::Limit;
use crate::registry::Budgets;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Why a reload was rejected; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The broker was started from a config built in memory (tests, the demo).
    #[error("this broker was not started from a config file")]
    NoFile,
    /// The file (or the auth file it names) is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The budget cannot be derived (a server unreachable for `auto`, or below 1).
    #[error(transparent)]
    Budget(#[from] crate::budget::BudgetError),
    /// Reading the file did not finish.
    #[error("reading the config file failed: {0}")]
    Read(#[from] tokio::task::JoinError),
}

impl ReloadError {
    /// The SQLSTATE the admin console answers with.
    pub fn sqlstate(&self) -> crate::error::SqlState {
        crate::error::SqlState::CONFIG_FILE_ERROR
    }
}

impl App {
    /// Re-reads the config file (and the auth file it names) and applies it. An invalid file
    /// or one whose budget comes out below 1 is rejected as a whole (logged and counted) and
    /// the running config stays.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ReloadError> {
        match self.try_reload().await {
            Ok(()) => {
                self.reloads.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                tracing::error!(error = %crate::error::chain(&e), "config reload rejected; the running config stays");
                Err(e)
            }
        }
    }

    async fn try_reload(self: &Arc<Self>) -> Result<(), ReloadError> {
        let old = self.config();
        let Some(path) = old.path.clone() else {
            return Err(ReloadError::NoFile);
        };
        let load_path = path.clone();
        let mut new = tokio::task::spawn_blocking(move || Config::load(&load_path)).await??;
        new.warn_insecure_files();
        for key in new.keep_restart_only(&old) {
            tracing::warn!(key, "setting changed in the file; needs restart, left alone");
        }
        let derivations = budget::derive_all(&new).await?;

        // Budgets: same limits with new caps, new ones for new servers.
        let current = self.registry.budgets();
        let mut budgets = Budgets::new();
        for (server, d) in derivations {
            let limit = match current.get(&server) {
                Some((_, l)) => l.clone(),
                None => Limit::new(format!("budget {server}"), if d.fleet { 0 } else { d.budget as usize }),
            };
            if !d.fleet && limit.cap() != d.budget as usize {
                tracing::info!("{d}");
            }
            budgets.insert(server, (d, limit));
        }
        self.registry.store_budgets(budgets);
        self.store_config(new);
        let cfg = self.config();
        for (_, (d, limit)) in self.registry.budgets().iter().filter(|(_, (d, _))| !d.fleet) {
            limit.set_cap(d.budget as usize);
            limit.shrink_to_cap();
        }
        self.registry.reconfigure(&cfg, &self.clients);
        // Servers new to a fleet-mode config join the fleet (their cap starts at 0).
        self.fleet.join(cfg.broker.server_connect_timeout).await;
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }
}
