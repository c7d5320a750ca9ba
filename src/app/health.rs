//! Health: one assessment (`/health`), readiness (`/health/ready`), and the monitor task that
//! raises alerts with hysteresis, reports status changes and publishes metric snapshots.

use crate::app::App;
use crate::events::Hysteresis;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Overall status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All thresholds clear.
    Healthy,
    /// Budget use or error rate past its threshold; still serving.
    Degraded,
    /// Clients wait past the threshold.
    Overloaded,
    /// Shutting down, or no database reachable.
    Unavailable,
}

impl Status {
    /// The HTTP status of `/health`: 200 while serving well enough, 503 otherwise.
    pub fn http_code(self) -> u16 {
        match self {
            Status::Healthy | Status::Degraded => 200,
            Status::Overloaded | Status::Unavailable => 503,
        }
    }
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Overall status.
    pub status: Status,
    /// Highest budget use across servers, 0..1.
    pub utilization_ratio: f64,
    /// Server connections in use (counted against budgets).
    pub active_connections: usize,
    /// Sum of the budgets.
    pub max_connections: usize,
    /// Clients waiting for a server.
    pub waiting_clients: usize,
    /// Client connections refused since start.
    pub rejected_connections: u64,
    /// Mean request time over the last stats period, milliseconds.
    pub average_response_time: f64,
    /// Share of requests that ended in a server error since start.
    pub error_rate: f64,
    /// Fleet mode: this instance's standing in its fleet, per server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fleet: Vec<FleetHealth>,
    /// Why the status is what it is.
    pub message: String,
}

/// This instance in its fleet, for one server.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetHealth {
    /// The server.
    pub server: String,
    /// Live instances of the fleet.
    pub instances: u32,
    /// This instance's share (its cap now).
    pub share: usize,
    /// The fair share of each instance.
    pub fair_share: u32,
    /// Connections the fleet holds on the server.
    pub fleet_total: u32,
    /// fair, growing, floor, waiting, no_room, unreachable or starting.
    pub standing: &'static str,
}

fn fleet_health(app: &App) -> Vec<FleetHealth> {
    app.registry()
        .budgets()
        .iter()
        .filter_map(|(server, (_, limit))| {
            let st = app.fleet().member(server)?.status();
            let d = st.decision;
            Some(FleetHealth {
                server: server.clone(),
                instances: d.map_or(0, |d| d.instances),
                share: limit.cap(),
                fair_share: d.map_or(0, |d| d.fair),
                fleet_total: d.map_or(0, |d| d.fleet_total),
                standing: st.standing.as_str(),
            })
        })
        .collect()
}

/// Assesses the broker now, against `[health]`.
pub fn assess(app: &App) -> Health {
    let cfg = app.config();
    let h = &cfg.health;
    let (mut used, mut max, mut utilization) = (0usize, 0usize, 0.0f64);
    for (_, limit) in app.registry().budgets().values() {
        used += limit.used();
        max += limit.cap();
        utilization = utilization.max(limit.used() as f64 / limit.cap().max(1) as f64);
    }
    let pools = app.registry().pools().all();
    let waiting: usize = pools.iter().map(|p| p.stats().waiting).sum();
    let max_wait = pools.iter().map(|p| p.max_wait()).max().unwrap_or_default();
    let (mut queries, mut errors) = (0u64, 0u64);
    for p in &pools {
        queries += p.counters.query_count.load(Relaxed);
        errors += p.counters.errors().iter().map(|(_, n)| n).sum::<u64>();
    }
    let error_rate = if queries > 0 { errors as f64 / queries as f64 } else { 0.0 };
    let (mut qtime, mut qrate) = (0.0, 0.0);
    for (_, _, avg) in app.registry().database_stats() {
        qtime += avg.query_time * avg.query_count;
        qrate += avg.query_count;
    }
    let average_response_time = if qrate > 0.0 { qtime / qrate / 1000.0 } else { 0.0 };
    let failing = !pools.is_empty() && pools.iter().all(|p| p.is_failing());
    let fleet = fleet_health(app);
    let starved = fleet.iter().find(|f| f.share == 0);
    let (status, message) = if app.shutdown().is_draining() {
        (Status::Unavailable, "shutting down".to_string())
    } else if failing {
        (Status::Unavailable, "no database reachable: every pool's last server login failed".to_string())
    } else if max_wait >= h.overloaded_wait || waiting >= h.overloaded_waiting_clients {
        (
            Status::Overloaded,
            format!(
                "{waiting} clients waiting, oldest for {:.0} ms (thresholds: {} clients, {:?})",
                max_wait.as_secs_f64() * 1000.0,
                h.overloaded_waiting_clients,
                h.overloaded_wait
            ),
        )
    } else if let Some(f) = starved {
        (
            Status::Degraded,
            format!(
                "fleet: no connections of {} for this instance yet ({}; {} instances, fair share {}, fleet holds {})",
                f.server, f.standing, f.instances, f.fair_share, f.fleet_total
            ),
        )
    } else if utilization >= h.degraded_utilization {
        (
            Status::Degraded,
            format!("budget {:.0}% used (threshold {:.0}%)", utilization * 100.0, h.degraded_utilization * 100.0),
        )
    } else if error_rate >= h.degraded_error_rate && queries >= 100 {
        (
            Status::Degraded,
            format!("{:.1}% of requests failed (threshold {:.1}%)", error_rate * 100.0, h.degraded_error_rate * 100.0),
        )
    } else {
        (Status::Healthy, "ok".to_string())
    };
    Health {
        status,
        utilization_ratio: utilization,
        active_connections: used,
        max_connections: max,
        waiting_clients: waiting,
        rejected_connections: app.admission().refusals().total(),
        average_response_time,
        error_rate,
        fleet,
        message,
    }
}

/// Why the broker is not ready for traffic.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// A drain began.
    #[error("shutting down")]
    Draining,
    /// A configured server refuses connections.
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    /// A configured server does not answer.
    #[error("no answer from {0} within 2s")]
    Silent(String),
}

/// Readiness: listeners are bound (we are answering), not draining, and every configured
/// server accepts a TCP connection (or has its Unix socket).
pub async fn ready(app: &App) -> Result<(), NotReady> {
    if app.shutdown().is_draining() {
        return Err(NotReady::Draining);
    }
    for db in app.config().databases.values() {
        let target = crate::server::Target {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone(),
            user: String::new(),
            credential: None,
            keepalive: false,
            tls: crate::tls::ServerTls::disabled(),
            application_name: None,
        };
        match tokio::time::timeout(Duration::from_secs(2), target.open()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(NotReady::Silent(target.addr())),
        }
    }
    Ok(())
}

/// A compact view of the broker for the `$pgbroker.metrics` channel and the status page.
pub fn snapshot(app: &App, health: &Health, tps: f64) -> Value {
    let pools: Vec<Value> = app
        .registry()
        .pools()
        .all()
        .iter()
        .map(|p| {
            let st = p.stats();
            let active = p.servers().iter().filter(|s| s.state == crate::pool::ServerState::Active).count();
            json!({
                "database": p.key().database,
                "user": p.key().user,
                "active": active,
                "idle": st.idle,
                "waiting": st.waiting,
                "maxWaitMs": p.max_wait().as_secs_f64() * 1000.0,
            })
        })
        .collect();
    let budgets: Vec<Value> = app
        .registry()
        .budgets()
        .iter()
        .map(|(server, (d, l))| json!({"server": server, "budget": d.budget, "used": l.used()}))
        .collect();
    json!({
        "type": "metrics",
        "channel": crate::events::METRICS_CHANNEL,
        "timestamp": crate::events::rfc3339(std::time::SystemTime::now()),
        "health": health,
        "transactionsPerSecond": tps,
        "clients": app.clients().all().len(),
        "websocketClients": app.bridge().ws().total(),
        "budgets": budgets,
        "pools": pools,
    })
}

/// Watches the broker every second: alerts (budget use, waiting clients), health status
/// changes, and a metrics snapshot every two seconds for whoever watches.
pub async fn monitor(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let cfg = app.config();
    let mut budget_alarm = Hysteresis::new(cfg.health.alert_utilization, cfg.health.alert_utilization - 0.1);
    let wait_on = cfg.health.alert_waiting_clients as f64;
    let mut waiting_alarm = Hysteresis::new(wait_on, wait_on / 2.0);
    let mut last_status = Status::Healthy;
    let mut last_xacts = total_xacts(&app);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = app.shutdown().stopped() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let health = assess(&app);
        if let Some(on) = budget_alarm.update(health.utilization_ratio) {
            let kind = if on { "budget_high" } else { "budget_ok" };
            app.events().emit(kind, json!({"utilizationRatio": health.utilization_ratio, "activeConnections": health.active_connections, "maxConnections": health.max_connections}));
        }
        if let Some(on) = waiting_alarm.update(health.waiting_clients as f64) {
            let kind = if on { "clients_waiting" } else { "clients_waiting_cleared" };
            app.events().emit(kind, json!({"waitingClients": health.waiting_clients}));
        }
        if health.status != last_status {
            app.events().emit(
                "health_status_changed",
                json!({"from": last_status, "to": health.status, "message": health.message}),
            );
            last_status = health.status;
        }
        if n.is_multiple_of(2) && app.events().metrics_watched() {
            let xacts = total_xacts(&app);
            let tps = xacts.saturating_sub(last_xacts) as f64 / 2.0;
            last_xacts = xacts;
            app.events().publish_metrics(|| snapshot(&app, &health, tps));
        } else if n.is_multiple_of(2) {
            last_xacts = total_xacts(&app);
        }
    }
}

fn total_xacts(app: &App) -> u64 {
    app.registry().pools().all().iter().map(|p| p.counters.xact_count.load(Relaxed)).sum()
}
