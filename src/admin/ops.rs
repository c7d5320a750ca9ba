//! What the console's commands do to the running broker: reload, pause/resume, kill, and
//! the per-database statistics it shows.

use crate::app::App;
use crate::stats::{Averages, Snapshot};
use std::sync::Arc;
use std::time::Duration;

/// How long PAUSE waits for active servers before giving up (pools stay paused).
const PAUSE_WAIT: Duration = Duration::from_secs(60);

/// Why PAUSE did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// No pool serves that database (yet).
    #[error("no pool for database {0:?}")]
    NoPool(String),
    /// Servers were still in use when the wait ended; the pools stay paused.
    #[error("servers still active after {}s; the pools stay paused", PAUSE_WAIT.as_secs())]
    StillActive,
}

impl App {
    /// Stops handing out servers for `database` (all if `None`) and waits until none is in use.
    pub async fn pause(&self, database: Option<&str>) -> Result<(), PauseError> {
        let pools: Vec<_> =
            self.pools.all().into_iter().filter(|p| database.is_none_or(|d| p.key().database == d)).collect();
        if pools.is_empty() {
            return Err(PauseError::NoPool(database.unwrap_or("*").to_string()));
        }
        for p in &pools {
            p.pause();
        }
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        while pools.iter().any(|p| p.servers().iter().any(|s| s.state == crate::pool::ServerState::Active)) {
            if tokio::time::Instant::now() >= deadline {
                return Err(PauseError::StillActive);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(database = database.unwrap_or("*"), "paused");
        Ok(())
    }

    /// Hands out servers again for `database` (all if `None`).
    pub fn resume(&self, database: Option<&str>) {
        for p in self.pools.all().into_iter().filter(|p| database.is_none_or(|d| p.key().database == d)) {
            p.resume();
        }
        tracing::info!(database = database.unwrap_or("*"), "resumed");
    }

    /// Disconnects every client of `database` and closes its idle servers (busy ones close
    /// as their clients go). Returns the number of clients.
    pub fn kill(&self, database: &str) -> usize {
        let n = self.clients.kill_database(database);
        for p in self.pools.all().into_iter().filter(|p| p.key().database == database) {
            p.close_idle();
        }
        n
    }

    /// Per configured database: totals since start and the averages of the last period.
    pub fn database_stats(&self) -> Vec<(String, Snapshot, Averages)> {
        let cfg = self.config();
        let averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        cfg.databases
            .keys()
            .map(|db| {
                let total = self.database_totals(db);
                let avg = averages.get(db).map(|(_, a)| *a).unwrap_or_default();
                (db.clone(), total, avg)
            })
            .collect()
    }

    fn database_totals(&self, db: &str) -> Snapshot {
        let mut total = Snapshot::default();
        for p in self.pools.all().into_iter().filter(|p| p.key().database == db) {
            total.add(&p.counters.snapshot());
        }
        total
    }

    /// Recomputes the averages over the period since the last call.
    pub fn roll_stats(&self, period: Duration) {
        let cfg = self.config();
        let mut averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        for db in cfg.databases.keys() {
            let now = self.database_totals(db);
            let before = averages.get(db).map(|(s, _)| *s).unwrap_or_default();
            averages.insert(db.clone(), (now, Averages::between(&before, &now, period)));
        }
    }
}

/// Rolls the statistics period forever (until the broker stops).
pub async fn stats_task(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {
                app.roll_stats(period);
                app.metrics.upkeep();
            }
        }
    }
}
