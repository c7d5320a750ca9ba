//! Prometheus metrics through the `metrics` facade and metrics-exporter-prometheus. Each
//! broker has its own recorder (no global state). Histograms are recorded as events happen
//! through handles registered once per pool; every other value is read from the broker's own
//! counters when `/metrics` is scraped, so the relay never touches the recorder.

use crate::app::App;
use metrics::{Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::sync::atomic::Ordering::Relaxed;

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Histogram buckets for durations, in seconds.
const SECONDS_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Every metric name, with its kind, unit and help text.
const DESCRIPTIONS: &[(&str, char, Option<Unit>, &str)] = &[
    ("pgbroker_clients", 'g', None, "Client connections by state (active, waiting, idle)"),
    ("pgbroker_servers", 'g', None, "Server connections by pool and state (active, idle, login)"),
    ("pgbroker_budget_connections", 'g', None, "Server connection budget per PostgreSQL server"),
    ("pgbroker_budget_used_connections", 'g', None, "Server connections counted against the budget"),
    ("pgbroker_fleet_instances", 'g', None, "Live instances of this broker's fleet, per server (fleet mode)"),
    ("pgbroker_fleet_share_connections", 'g', None, "This instance's share of the server's connections (fleet mode)"),
    ("pgbroker_fleet_fair_share_connections", 'g', None, "Fair share of each fleet instance (fleet mode)"),
    ("pgbroker_fleet_total_connections", 'g', None, "Connections the whole fleet holds on the server (fleet mode)"),
    (
        "pgbroker_fleet_other_connections",
        'g',
        None,
        "Client connections on the server that are not the fleet's (fleet mode)",
    ),
    ("pgbroker_waiting_clients", 'g', None, "Clients waiting for a server, per pool"),
    ("pgbroker_wait_seconds", 'h', Some(Unit::Seconds), "Time clients waited for a server"),
    ("pgbroker_transaction_seconds", 'h', Some(Unit::Seconds), "Transaction duration"),
    ("pgbroker_query_seconds", 'h', Some(Unit::Seconds), "Request (query or Sync) duration"),
    ("pgbroker_transactions_total", 'c', None, "Transactions completed"),
    ("pgbroker_queries_total", 'c', None, "Requests completed"),
    ("pgbroker_received_bytes_total", 'c', Some(Unit::Bytes), "Bytes from clients to servers"),
    ("pgbroker_sent_bytes_total", 'c', Some(Unit::Bytes), "Bytes from servers to clients"),
    ("pgbroker_refused_connections_total", 'c', None, "Client connections refused, by reason"),
    ("pgbroker_server_errors_total", 'c', None, "Server errors by SQLSTATE class"),
    ("pgbroker_config_reloads_total", 'c', None, "Config reloads applied"),
    ("pgbroker_config_reload_failures_total", 'c', None, "Config reloads rejected"),
    ("pgbroker_websocket_clients", 'g', None, "WebSocket bridge connections"),
    ("pgbroker_notifications_received_total", 'c', None, "Notifications received from the database"),
    ("pgbroker_notifications_forwarded_total", 'c', None, "Notifications queued to subscribers"),
    ("pgbroker_notification_subscribers_dropped_total", 'c', None, "Subscribers closed for being too slow"),
];

/// A broker's recorder and its renderer.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

/// Histograms of one pool, recorded as events happen.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    /// Checkout waits.
    pub wait: Histogram,
    /// Transactions.
    pub transaction: Histogram,
    /// Requests.
    pub query: Histogram,
}

impl Default for PoolMetrics {
    fn default() -> PoolMetrics {
        PoolMetrics { wait: Histogram::noop(), transaction: Histogram::noop(), query: Histogram::noop() }
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect::<Vec<_>>())
}

impl Metrics {
    /// A fresh recorder with every metric described.
    pub fn new() -> Metrics {
        // The bucket list is a non-empty constant, so this cannot fail; fall back to summaries.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        for (name, kind, unit, help) in DESCRIPTIONS {
            let help = SharedString::const_str(help);
            match kind {
                'c' => recorder.describe_counter((*name).into(), *unit, help),
                'g' => recorder.describe_gauge((*name).into(), *unit, help),
                _ => recorder.describe_histogram((*name).into(), *unit, help),
            }
        }
        Metrics { recorder, handle }
    }

    /// Histogram handles for a pool.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let labels = [("database", database.to_string()), ("user", user.to_string())];
        PoolMetrics {
            wait: self.recorder.register_histogram(&key("pgbroker_wait_seconds", &labels), &META),
            transaction: self.recorder.register_histogram(&key("pgbroker_transaction_seconds", &labels), &META),
            query: self.recorder.register_histogram(&key("pgbroker_query_seconds", &labels), &META),
        }
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, String)], v: f64) {
        self.recorder.register_gauge(&key(name, labels), &META).set(v);
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, String)], v: u64) {
        self.recorder.register_counter(&key(name, labels), &META).absolute(v);
    }

    /// Drains histogram samples into buckets; keeps memory bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Reads the broker's state into the recorder and renders the text format.
    pub fn render(&self, app: &App) -> String {
        let clients = app.clients.all();
        for state in [crate::clients::State::Active, crate::clients::State::Waiting, crate::clients::State::Idle] {
            let n = clients.iter().filter(|c| c.state() == state).count();
            self.gauge("pgbroker_clients", &[("state", state.as_str().into())], n as f64);
        }
        for p in app.pools.all() {
            let k = p.key();
            let labels = |extra: Option<(&'static str, String)>| {
                let mut l = vec![("database", k.database.clone()), ("user", k.user.clone())];
                l.extend(extra);
                l
            };
            let st = p.stats();
            let active = p.servers().iter().filter(|s| s.state == "active").count();
            for (state, n) in
                [("active", active), ("idle", st.idle), ("login", st.open.saturating_sub(st.idle + active))]
            {
                self.gauge("pgbroker_servers", &labels(Some(("state", state.into()))), n as f64);
            }
            self.gauge("pgbroker_waiting_clients", &labels(None), st.waiting as f64);
            let c = p.counters.snapshot();
            self.counter("pgbroker_transactions_total", &labels(None), c.xact_count);
            self.counter("pgbroker_queries_total", &labels(None), c.query_count);
            self.counter("pgbroker_received_bytes_total", &labels(None), c.bytes_received);
            self.counter("pgbroker_sent_bytes_total", &labels(None), c.bytes_sent);
            for (class, n) in p.counters.errors() {
                self.counter("pgbroker_server_errors_total", &labels(Some(("class", class))), n);
            }
        }
        for (server, (_, limit)) in app.budgets().iter() {
            let l = [("server", server.clone())];
            // The cap is the live budget: the derivation's, or the fleet share.
            self.gauge("pgbroker_budget_connections", &l, limit.cap() as f64);
            self.gauge("pgbroker_budget_used_connections", &l, limit.used() as f64);
            let Some(member) = app.fleet_member(server) else { continue };
            let status = member.status();
            self.gauge("pgbroker_fleet_share_connections", &l, limit.cap() as f64);
            if let Some(dec) = status.decision {
                self.gauge("pgbroker_fleet_instances", &l, f64::from(dec.instances));
                self.gauge("pgbroker_fleet_fair_share_connections", &l, f64::from(dec.fair));
                self.gauge("pgbroker_fleet_total_connections", &l, f64::from(dec.fleet_total));
                self.gauge("pgbroker_fleet_other_connections", &l, f64::from(status.others));
            }
        }
        for (reason, n) in app.refusals.all() {
            self.counter("pgbroker_refused_connections_total", &[("reason", reason.into())], n);
        }
        self.counter("pgbroker_config_reloads_total", &[], app.reloads.load(Relaxed));
        self.counter("pgbroker_config_reload_failures_total", &[], app.reload_failures.load(Relaxed));
        self.gauge("pgbroker_websocket_clients", &[], app.ws.total() as f64);
        for hub in app.hubs.all() {
            let l = [("database", hub.database().to_string())];
            self.counter("pgbroker_notifications_received_total", &l, hub.stats.received.load(Relaxed));
            self.counter("pgbroker_notifications_forwarded_total", &l, hub.stats.delivered.load(Relaxed));
            self.counter("pgbroker_notification_subscribers_dropped_total", &l, hub.stats.dropped_slow.load(Relaxed));
        }
        self.handle.render()
    }
}
