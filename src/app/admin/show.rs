//! SHOW commands. Column names follow PgBouncer's wherever the concept is the same, so
//! existing scripts and dashboards keep working.

use super::Table;
use crate::app::App;
use crate::budget::Source;
use crate::proto::build::ColumnType::{Int8, Text};
use std::sync::Arc;
use std::time::SystemTime;

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn time(t: SystemTime) -> Option<String> {
    Some(crate::events::rfc3339(t))
}

/// The table for `SHOW <what>`, or `None` for an unknown name.
pub fn table(app: &Arc<App>, what: &str) -> Option<Table> {
    Some(match what {
        "help" => help(),
        "pools" => pools(app),
        "clients" => clients(app),
        "servers" => servers(app),
        "stats" => stats(app),
        "databases" => databases(app),
        "config" => config(app),
        "lists" => lists(app),
        "version" => {
            let mut t = Table::new(&[("version", Text)]);
            t.row(vec![s(format!("pgbroker {}", env!("CARGO_PKG_VERSION")))]);
            t
        }
        "budget" => budget(app),
        _ => return None,
    })
}

fn help() -> Table {
    let mut t = Table::new(&[("command", Text), ("description", Text)]);
    for (c, d) in [
        ("SHOW POOLS", "clients and servers per pool"),
        ("SHOW CLIENTS", "connected clients"),
        ("SHOW SERVERS", "open server connections"),
        ("SHOW STATS", "traffic per database: totals and averages over the last period"),
        ("SHOW DATABASES", "configured databases"),
        ("SHOW CONFIG", "effective settings"),
        ("SHOW LISTS", "counts of databases, users, pools, clients, servers"),
        ("SHOW VERSION", "pgbroker version"),
        ("SHOW BUDGET", "server connection budget, how it was derived, in use"),
        ("RELOAD", "re-read the config file and auth file"),
        ("PAUSE [db]", "stop handing out servers, wait for active ones"),
        ("RESUME [db]", "hand out servers again"),
        ("KILL db", "disconnect the database's clients and close its servers"),
        ("UPGRADE", "start the binary on disk with the listening sockets; once it is ready, drain this process"),
        ("SHUTDOWN", "stop pgbroker"),
    ] {
        t.row(vec![s(c), s(d)]);
    }
    t
}

fn pools(app: &Arc<App>) -> Table {
    let cfg = app.config();
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int8),
        ("cl_waiting", Int8),
        ("cl_active_cancel_req", Int8),
        ("cl_waiting_cancel_req", Int8),
        ("sv_active", Int8),
        ("sv_active_cancel", Int8),
        ("sv_being_canceled", Int8),
        ("sv_idle", Int8),
        ("sv_used", Int8),
        ("sv_tested", Int8),
        ("sv_login", Int8),
        ("maxwait", Int8),
        ("maxwait_us", Int8),
        ("pool_mode", Text),
    ]);
    let clients = app.clients().all();
    for p in app.registry().pools().all() {
        let key = p.key();
        let st = p.stats();
        let active_servers = p.servers().iter().filter(|s| s.state == crate::pool::ServerState::Active).count();
        let mine = clients.iter().filter(|c| c.pool.as_ref() == Some(key));
        let (mut cl_active, mut cl_waiting) = (0, 0);
        for c in mine {
            match c.state() {
                crate::clients::State::Waiting => cl_waiting += 1,
                _ => cl_active += 1,
            }
        }
        let wait = p.max_wait();
        let mode =
            cfg.databases.get(crate::registry::configured_database(key)).map_or("session", |d| d.pool_mode.as_str());
        t.row(vec![
            s(&key.database),
            s(&key.user),
            s(cl_active),
            s(cl_waiting),
            s(0),
            s(0),
            s(active_servers),
            s(0),
            s(0),
            s(st.idle),
            s(0),
            s(0),
            s(st.open.saturating_sub(st.idle + active_servers)),
            s(wait.as_secs()),
            s(wait.subsec_micros()),
            s(mode),
        ]);
    }
    t
}

fn clients(app: &Arc<App>) -> Table {
    let mut t = Table::new(&[
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", Int8),
        ("connect_time", Text),
        ("request_time", Text),
        ("wait", Int8),
        ("wait_us", Int8),
        ("application_name", Text),
        ("id", Int8),
        ("pinned", Text),
    ]);
    for c in app.clients().all() {
        let in_state = c.in_state_us();
        let waiting = c.state() == crate::clients::State::Waiting;
        let since = SystemTime::now() - std::time::Duration::from_micros(in_state);
        t.row(vec![
            s("C"),
            s(&c.user),
            s(&c.database),
            s(c.state().as_str()),
            s(c.addr.ip()),
            s(c.addr.port()),
            time(c.connect_time),
            time(since),
            s(if waiting { in_state / 1_000_000 } else { 0 }),
            s(if waiting { in_state % 1_000_000 } else { 0 }),
            s(&c.application_name),
            s(c.id),
            s(c.pins().names()),
        ]);
    }
    t
}

fn servers(app: &Arc<App>) -> Table {
    let mut t = Table::new(&[
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", Int8),
        ("connect_time", Text),
        ("request_time", Text),
        ("remote_pid", Int8),
        ("id", Int8),
    ]);
    let cfg = app.config();
    for p in app.registry().pools().all() {
        let key = p.key();
        let db = cfg.databases.get(crate::registry::configured_database(key));
        for sv in p.servers() {
            t.row(vec![
                s("S"),
                s(&key.user),
                s(&key.database),
                s(sv.state.as_str()),
                db.map(|d| d.host.clone()),
                db.map(|d| d.port.to_string()),
                time(sv.connected_at),
                time(SystemTime::now() - sv.in_state),
                s(sv.pid),
                s(sv.id),
            ]);
        }
    }
    t
}

fn stats(app: &Arc<App>) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("total_xact_count", Int8),
        ("total_query_count", Int8),
        ("total_received", Int8),
        ("total_sent", Int8),
        ("total_xact_time", Int8),
        ("total_query_time", Int8),
        ("total_wait_time", Int8),
        ("avg_xact_count", Int8),
        ("avg_query_count", Int8),
        ("avg_recv", Int8),
        ("avg_sent", Int8),
        ("avg_xact_time", Int8),
        ("avg_query_time", Int8),
        ("avg_wait_time", Int8),
    ]);
    for (db, total, avg) in app.registry().database_stats() {
        let r = |v: f64| s(v.round() as u64);
        t.row(vec![
            s(db),
            s(total.xact_count),
            s(total.query_count),
            s(total.bytes_received),
            s(total.bytes_sent),
            s(total.xact_time_us),
            s(total.query_time_us),
            s(total.wait_time_us),
            r(avg.xact_count),
            r(avg.query_count),
            r(avg.recv),
            r(avg.sent),
            r(avg.xact_time),
            r(avg.query_time),
            r(avg.wait_time),
        ]);
    }
    t
}

fn databases(app: &Arc<App>) -> Table {
    let cfg = app.config();
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int8),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int8),
        ("min_pool_size", Int8),
        ("reserve_pool", Int8),
        ("pool_mode", Text),
        ("max_connections", Int8),
        ("current_connections", Int8),
        ("paused", Int8),
        ("disabled", Int8),
    ]);
    let pools = app.registry().pools().all();
    for (name, d) in &cfg.databases {
        let mine: Vec<_> = pools.iter().filter(|p| p.key().database == *name).collect();
        let current: usize = mine.iter().map(|p| p.stats().open).sum();
        let size = mine.first().map(|p| p.settings().size.to_string()).or(d.pool_size.map(|n| n.to_string()));
        let paused = mine.iter().any(|p| p.is_paused());
        t.row(vec![
            s(name),
            s(&d.host),
            s(d.port),
            s(&d.dbname),
            d.user.clone(),
            size,
            s(d.min_pool_size),
            s(d.reserve_pool_size),
            s(d.pool_mode.as_str()),
            s(d.max_db_connections),
            s(current),
            s(u8::from(paused)),
            s(0),
        ]);
    }
    t
}

fn config(app: &Arc<App>) -> Table {
    let mut t = Table::new(&[("key", Text), ("value", Text), ("changeable", Text)]);
    let mut section = String::new();
    for line in app.config().describe().lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once(" = ") {
            if line.starts_with('#') {
                continue;
            }
            let key = format!("{section}.{k}");
            let changeable = if crate::config::RESTART_ONLY.contains(&key.as_str()) { "no" } else { "yes" };
            t.row(vec![s(&key), s(v.trim_matches('"')), s(changeable)]);
        }
    }
    t
}

fn lists(app: &Arc<App>) -> Table {
    let cfg = app.config();
    let mut t = Table::new(&[("list", Text), ("items", Int8)]);
    let pools = app.registry().pools().all();
    let clients = app.clients().all();
    let servers: Vec<_> = pools.iter().flat_map(|p| p.servers()).collect();
    let users: std::collections::BTreeSet<&str> = pools.iter().map(|p| p.key().user.as_str()).collect();
    for (name, n) in [
        ("databases", cfg.databases.len()),
        ("users", users.len()),
        ("pools", pools.len()),
        ("used_clients", clients.len()),
        ("login_clients", app.client_count().saturating_sub(clients.len())),
        ("used_servers", servers.iter().filter(|s| s.state == crate::pool::ServerState::Active).count()),
        ("idle_servers", servers.iter().filter(|s| s.state == crate::pool::ServerState::Idle).count()),
        ("ws_clients", app.bridge().ws().total()),
    ] {
        t.row(vec![s(name), s(n)]);
    }
    t
}

fn budget(app: &Arc<App>) -> Table {
    let mode = app.config().budget.mode;
    let mut t = Table::new(&[
        ("server", Text),
        ("budget", Int8),
        ("in_use", Int8),
        ("max_connections", Int8),
        ("source", Text),
        ("superuser_reserved", Int8),
        ("server_reserved", Int8),
        ("reserved", Int8),
        ("instances", Int8),
        ("derivation", Text),
        ("mode", Text),
        ("fleet", Text),
        ("instance", Text),
        ("fair_share", Int8),
        ("claim", Int8),
        ("fleet_total", Int8),
        ("others", Int8),
        ("standing", Text),
    ]);
    for (server, (d, limit)) in app.registry().budgets().iter() {
        let source = match d.source {
            Source::Config => "config",
            Source::Env => "DB_MAX_CONNECTIONS",
            Source::Server => "server",
        };
        let member = app.fleet().member(server);
        let status = member.as_ref().map(|m| m.status());
        let decision = status.as_ref().and_then(|st| st.decision);
        // The cap is the live budget (the fleet share in fleet mode); instances are the live
        // peers in fleet mode.
        let instances = if member.is_some() { decision.map_or(0, |x| x.instances) } else { d.instances };
        t.row(vec![
            s(server),
            s(limit.cap()),
            s(limit.used()),
            s(d.max_connections),
            s(source),
            s(d.superuser_reserved),
            s(d.server_reserved),
            s(d.reserved),
            s(instances),
            s(d),
            s(mode.as_str()),
            member.as_ref().map(|_| app.config().budget.fleet.clone()),
            member.as_ref().map(|m| m.id().to_string()),
            decision.map(|x| x.fair.to_string()),
            status.as_ref().filter(|_| decision.is_some()).map(|st| st.claim.to_string()),
            decision.map(|x| x.fleet_total.to_string()),
            status.as_ref().filter(|_| decision.is_some()).map(|st| st.others.to_string()),
            status.as_ref().map(|st| st.standing.as_str().to_string()),
        ]);
    }
    t
}
