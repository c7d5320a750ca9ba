//! Prometheus metrics through the `metrics` facade and metrics-exporter-prometheus. Each
//! broker has its own recorder (no global state). Every value but the histograms is read
//! from the broker's own counters when `/metrics` is scraped, so the relay never touches the
//! recorder; the histograms are recorded as events happen into the broker's own lock-free
//! buckets (see `histogram`), one set per pool, and rendered beside the recorder's text.

use crate::histogram::{Histogram, escape_label};
use metrics::{Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

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
    (
        "pgbroker_hibernating_clients",
        'g',
        None,
        "Idle clients quiet for a second or more, holding only their session's small state",
    ),
    ("pgbroker_wait_seconds", 'h', Some(Unit::Seconds), "Time clients waited for a server"),
    ("pgbroker_transaction_seconds", 'h', Some(Unit::Seconds), "Transaction duration"),
    ("pgbroker_query_seconds", 'h', Some(Unit::Seconds), "Request (query or Sync) duration"),
    ("pgbroker_transactions_total", 'c', None, "Transactions completed"),
    ("pgbroker_queries_total", 'c', None, "Requests completed"),
    ("pgbroker_received_bytes_total", 'c', Some(Unit::Bytes), "Bytes from clients to servers"),
    ("pgbroker_sent_bytes_total", 'c', Some(Unit::Bytes), "Bytes from servers to clients"),
    ("pgbroker_refused_connections_total", 'c', None, "Client connections refused, by reason"),
    (
        "pgbroker_cancel_requests_total",
        'c',
        None,
        "CancelRequests from clients: forwarded, for an unknown or idle key, or dropped past the per-host rate",
    ),
    (
        "pgbroker_logins_slowed_total",
        'c',
        None,
        "Login exchanges made to wait because failed logins from all addresses passed auth.max_failures_global",
    ),
    ("pgbroker_server_errors_total", 'c', None, "Server errors by SQLSTATE class"),
    ("pgbroker_config_reloads_total", 'c', None, "Config reloads applied"),
    ("pgbroker_config_reload_failures_total", 'c', None, "Config reloads rejected"),
    (
        "pgbroker_pinned_clients",
        'g',
        None,
        "Transaction-mode clients keeping their server for session state, by reason",
    ),
    ("pgbroker_websocket_clients", 'g', None, "WebSocket bridge connections"),
    ("pgbroker_notifications_received_total", 'c', None, "Notifications received from the database"),
    ("pgbroker_notifications_forwarded_total", 'c', None, "Notifications queued to subscribers"),
    ("pgbroker_notification_subscribers_dropped_total", 'c', None, "Subscribers closed for being too slow"),
    ("pgbroker_notification_listener_reconnects_total", 'c', None, "Times the listener connection was re-established"),
    (
        "pgbroker_notification_listener_check_failures_total",
        'c',
        None,
        "Listener checks that failed (the listener was replaced)",
    ),
    (
        "pgbroker_notification_resumes_total",
        'c',
        None,
        "WebSocket resumes by lastMessageId, by result (replayed or resync)",
    ),
];

/// The histogram families' names.
const HISTOGRAMS: [&str; 3] = ["pgbroker_wait_seconds", "pgbroker_transaction_seconds", "pgbroker_query_seconds"];

/// A broker's recorder and its renderer.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Each pool's histograms by (database, user), kept across reloads like the recorder's.
    histograms: Mutex<BTreeMap<(String, String), PoolMetrics>>,
}

/// Histograms of one pool, recorded as events happen (see `histogram`).
#[derive(Debug, Clone, Default)]
pub struct PoolMetrics {
    /// Checkout waits.
    pub wait: Arc<Histogram>,
    /// Transactions.
    pub transaction: Arc<Histogram>,
    /// Requests.
    pub query: Arc<Histogram>,
}

impl PoolMetrics {
    /// The histograms, in the order of `HISTOGRAMS`.
    fn all(&self) -> [&Histogram; 3] {
        [&self.wait, &self.transaction, &self.query]
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
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        for (name, kind, unit, help) in DESCRIPTIONS {
            let help = SharedString::const_str(help);
            match kind {
                'c' => recorder.describe_counter((*name).into(), *unit, help),
                'g' => recorder.describe_gauge((*name).into(), *unit, help),
                // Histograms are the broker's own (see `histogram`), rendered by `render`.
                _ => {}
            }
        }
        Metrics { recorder, handle, histograms: Mutex::default() }
    }

    /// Histogram handles for a pool.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let mut all = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        all.entry((database.to_string(), user.to_string())).or_default().clone()
    }

    /// The histograms in the text format, each with its HELP and TYPE lines.
    fn render_histograms(&self, out: &mut String) {
        let all = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        for (family, name) in HISTOGRAMS.into_iter().enumerate() {
            let help = DESCRIPTIONS.iter().find(|d| d.0 == name).map_or("", |d| d.3);
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for ((database, user), m) in all.iter() {
                let labels = format!("database=\"{}\",user=\"{}\"", escape_label(database), escape_label(user));
                if let Some(h) = m.all().get(family) {
                    h.render(out, name, &labels);
                }
            }
            out.push('\n');
        }
    }

    /// Sets gauge `name{labels}` to `v`.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)], v: f64) {
        self.recorder.register_gauge(&key(name, labels), &META).set(v);
    }

    /// Sets counter `name{labels}` to `v`.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)], v: u64) {
        self.recorder.register_counter(&key(name, labels), &META).absolute(v);
    }

    /// Drains histogram samples into buckets; keeps memory bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Renders the recorder's text format and the histograms, after the caller has read
    /// the broker's state into gauges and counters.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        self.render_histograms(&mut out);
        out
    }
}
