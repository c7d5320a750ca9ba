//! What the console's commands do to the running broker: reload, pause/resume, kill, and
//! the per-database statistics it shows.

use crate::app::App;
use crate::config::Config;
use crate::stats::{Averages, Snapshot};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// How long PAUSE waits for active servers before giving up (pools stay paused).
const PAUSE_WAIT: Duration = Duration::from_secs(60);

impl App {
    /// Re-reads the config file (and the auth file it names). An invalid file is rejected as
    /// a whole and the running config stays. Listen addresses only change at restart.
    pub fn reload(&self) -> Result<(), String> {
        let old = self.config();
        let Some(path) = old.path.clone() else {
            return Err("this broker was not started from a config file".into());
        };
        let mut new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                let msg = crate::error::chain(&e);
                tracing::error!(error = %msg, "config reload rejected; the running config stays");
                return Err(msg);
            }
        };
        for (key, changed) in [
            ("broker.listen", new.broker.listen != old.broker.listen),
            ("broker.http_listen", new.broker.http_listen != old.broker.http_listen),
            ("websocket.path", new.websocket.path != old.websocket.path),
        ] {
            if changed {
                tracing::warn!(key, "setting changed in the file; needs restart, left alone");
            }
        }
        new.broker.listen = old.broker.listen;
        new.broker.http_listen = old.broker.http_listen;
        new.websocket.path = old.websocket.path.clone();
        self.store_config(new);
        self.reloads.fetch_add(1, Relaxed);
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Stops handing out servers for `database` (all if `None`) and waits until none is in use.
    pub async fn pause(&self, database: Option<&str>) -> Result<(), String> {
        let pools: Vec<_> =
            self.pools.all().into_iter().filter(|p| database.is_none_or(|d| p.key().database == d)).collect();
        if pools.is_empty() {
            return Err(format!("no pool for database {:?}", database.unwrap_or("*")));
        }
        for p in &pools {
            p.pause();
        }
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        while pools.iter().any(|p| p.servers().iter().any(|s| s.state == "active")) {
            if tokio::time::Instant::now() >= deadline {
                return Err("servers still active after 60s; the pools stay paused".into());
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
