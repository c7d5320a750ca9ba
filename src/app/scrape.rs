//! `/metrics`: the broker's state read into the Prometheus recorder at each scrape, so the
//! relay never touches the recorder.

use super::App;
use std::sync::atomic::Ordering::Relaxed;

/// Reads the broker's state into its recorder and renders the text format.
pub(super) fn render(app: &App) -> String {
    let m = &app.metrics;
    let clients = app.clients().all();
    for state in [crate::clients::State::Active, crate::clients::State::Waiting, crate::clients::State::Idle] {
        let n = clients.iter().filter(|c| c.state() == state).count();
        m.gauge("pgbroker_clients", &[("state", state.as_str().into())], n as f64);
    }
    for p in app.registry().pools().all() {
        let k = p.key();
        let labels = |extra: Option<(&'static str, String)>| {
            let mut l = vec![("database", k.database.clone()), ("user", k.user.clone())];
            l.extend(extra);
            l
        };
        let st = p.stats();
        let active = p.servers().iter().filter(|s| s.state == crate::pool::ServerState::Active).count();
        for (state, n) in [("active", active), ("idle", st.idle), ("login", st.open.saturating_sub(st.idle + active))] {
            m.gauge("pgbroker_servers", &labels(Some(("state", state.into()))), n as f64);
        }
        m.gauge("pgbroker_waiting_clients", &labels(None), st.waiting as f64);
        let mine: Vec<crate::clients::Pins> =
            clients.iter().filter(|c| c.pool.as_ref() == Some(k)).map(|c| c.pins()).collect();
        for reason in crate::clients::PinReason::ALL {
            let n = mine.iter().filter(|p| p.has(reason)).count();
            m.gauge("pgbroker_pinned_clients", &labels(Some(("reason", reason.as_str().into()))), n as f64);
        }
        let c = p.counters.snapshot();
        m.counter("pgbroker_transactions_total", &labels(None), c.xact_count);
        m.counter("pgbroker_queries_total", &labels(None), c.query_count);
        m.counter("pgbroker_received_bytes_total", &labels(None), c.bytes_received);
        m.counter("pgbroker_sent_bytes_total", &labels(None), c.bytes_sent);
        for (class, n) in p.counters.errors() {
            m.counter("pgbroker_server_errors_total", &labels(Some(("class", class))), n);
        }
    }
    for (server, (_, limit)) in app.registry().budgets().iter() {
        let l = [("server", server.clone())];
        // The cap is the live budget: the derivation's, or the fleet share.
        m.gauge("pgbroker_budget_connections", &l, limit.cap() as f64);
        m.gauge("pgbroker_budget_used_connections", &l, limit.used() as f64);
        let Some(member) = app.fleet().member(server) else { continue };
        let status = member.status();
        m.gauge("pgbroker_fleet_share_connections", &l, limit.cap() as f64);
        if let Some(dec) = status.decision {
            m.gauge("pgbroker_fleet_instances", &l, f64::from(dec.instances));
            m.gauge("pgbroker_fleet_fair_share_connections", &l, f64::from(dec.fair));
            m.gauge("pgbroker_fleet_total_connections", &l, f64::from(dec.fleet_total));
            m.gauge("pgbroker_fleet_other_connections", &l, f64::from(status.others));
        }
    }
    for (reason, n) in app.admission().refusals().all() {
        m.counter("pgbroker_refused_connections_total", &[("reason", reason.into())], n);
    }
    for (result, n) in [
        ("forwarded", &app.cancels().forwarded),
        ("unknown", &app.cancels().unknown),
        ("rate_limited", &app.cancels().rate_limited),
    ] {
        m.counter("pgbroker_cancel_requests_total", &[("result", result.into())], n.load(Relaxed));
    }
    m.counter("pgbroker_logins_slowed_total", &[], app.admission().throttle().slowed.load(Relaxed));
    m.counter("pgbroker_config_reloads_total", &[], app.reloads());
    m.counter("pgbroker_config_reload_failures_total", &[], app.reload_failures());
    m.gauge("pgbroker_websocket_clients", &[], app.bridge().ws().total() as f64);
    m.gauge("pgbroker_hibernating_clients", &[], app.hibernating_clients() as f64);
    for hub in app.bridge().hubs().all() {
        let l = [("database", hub.database().to_string())];
        m.counter("pgbroker_notifications_received_total", &l, hub.stats.received.load(Relaxed));
        m.counter("pgbroker_notifications_forwarded_total", &l, hub.stats.delivered.load(Relaxed));
        m.counter("pgbroker_notification_subscribers_dropped_total", &l, hub.stats.dropped_slow.load(Relaxed));
        m.counter("pgbroker_notification_listener_reconnects_total", &l, hub.stats.reconnects.load(Relaxed));
        let failures = hub.stats.check_failures.load(Relaxed);
        m.counter("pgbroker_notification_listener_check_failures_total", &l, failures);
        let dropped = hub.stats.payloads_dropped.load(Relaxed);
        m.counter("pgbroker_notification_payloads_dropped_total", &l, dropped);
        for (result, n) in [("replayed", &hub.stats.resumed), ("resync", &hub.stats.resume_gaps)] {
            let l = [("database", hub.database().to_string()), ("result", result.to_string())];
            m.counter("pgbroker_notification_resumes_total", &l, n.load(Relaxed));
        }
    }
    m.render()
}
