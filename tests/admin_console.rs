//! The admin console through real clients: tokio-postgres (simple protocol) and psql.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::config::PoolMode;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::{Client, SimpleQueryMessage};

/// A console session as `user`.
async fn console(b: &pgbroker::app::Broker, user: &str, password: &str) -> Client {
    connect(b.local_addr(), user, password, "pgbroker").await.unwrap()
}

/// Column names of a SHOW's result.
async fn columns(c: &Client, cmd: &str) -> Vec<String> {
    let msgs = c.simple_query(cmd).await.unwrap();
    match msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::RowDescription(cols) => Some(cols.iter().map(|c| c.name().to_string()).collect()),
        _ => None,
    }) {
        Some(cols) => cols,
        None => panic!("no row description for {cmd}"),
    }
}

#[tokio::test]
async fn show_pools_counts_clients_and_servers_with_pgbouncer_columns() {
    let b = broker(mode_config(PoolMode::Transaction, 3)).await;
    let app_client = connect_bench(b.local_addr()).await;
    app_client.simple_query("BEGIN").await.unwrap();
    one(&app_client, "SELECT 1").await;
    let admin = console(&b, "postgres", "postgres").await;
    let cols = columns(&admin, "SHOW POOLS").await;
    for c in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ] {
        assert!(cols.contains(&c.to_string()), "{c} in {cols:?}");
    }
    let pools = rows(&admin, "SHOW POOLS").await;
    let bench = pools.iter().find(|r| r["database"] == "bench").unwrap();
    assert_eq!(bench["user"], "postgres");
    assert_eq!(bench["cl_active"], "1");
    assert_eq!(bench["sv_active"], "1");
    assert_eq!(bench["pool_mode"], "transaction");
    app_client.simple_query("COMMIT").await.unwrap();
    let pools = rows(&admin, "SHOW POOLS").await;
    let bench = pools.iter().find(|r| r["database"] == "bench").unwrap();
    assert_eq!((bench["sv_active"].as_str(), bench["sv_idle"].as_str()), ("0", "1"));
}

#[tokio::test]
async fn show_clients_and_servers_list_connections() {
    let b = broker(mode_config(PoolMode::Session, 3)).await;
    let conn = format!("{} application_name=billing", conninfo(b.local_addr(), "postgres", "postgres", "bench"));
    let (c, task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(task);
    let pid = one(&c, "SELECT pg_backend_pid()").await;
    let admin = console(&b, "postgres", "postgres").await;
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let billing = clients.iter().find(|r| r["application_name"] == "billing").unwrap();
    assert_eq!(
        (billing["user"].as_str(), billing["database"].as_str(), billing["state"].as_str()),
        ("postgres", "bench", "active")
    );
    assert_eq!(billing["addr"], "127.0.0.1");
    assert!(clients.iter().any(|r| r["database"] == "pgbroker"), "the console session itself is listed");
    let servers = rows(&admin, "SHOW SERVERS").await;
    let s = servers.iter().find(|r| r["remote_pid"] == pid).unwrap();
    assert_eq!((s["type"].as_str(), s["database"].as_str(), s["state"].as_str()), ("S", "bench", "active"));
}

#[tokio::test]
async fn show_stats_totals_move_with_traffic() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    let admin = console(&b, "postgres", "postgres").await;
    let before = rows(&admin, "SHOW STATS").await;
    let total = |rows: &[HashMap<String, String>], col: &str| -> u64 {
        rows.iter().find(|r| r["database"] == "bench").map(|r| r[col].parse().unwrap()).unwrap_or(0)
    };
    for _ in 0..10 {
        one(&c, "SELECT repeat('x', 1000)").await;
    }
    c.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    let after = rows(&admin, "SHOW STATS").await;
    assert!(total(&after, "total_query_count") >= total(&before, "total_query_count") + 11);
    assert!(total(&after, "total_xact_count") >= total(&before, "total_xact_count") + 11);
    assert!(total(&after, "total_sent") >= total(&before, "total_sent") + 10_000);
    assert!(total(&after, "total_received") > total(&before, "total_received"));
    assert!(total(&after, "total_query_time") > 0);
    let cols = columns(&admin, "SHOW STATS").await;
    for c in [
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ] {
        assert!(cols.contains(&c.to_string()), "{c}");
    }
}

#[tokio::test]
async fn show_databases_config_lists_version_and_budget() {
    let b = broker(config()).await;
    let admin = console(&b, "postgres", "postgres").await;
    let dbs = rows(&admin, "SHOW DATABASES").await;
    let bench = dbs.iter().find(|r| r["name"] == "bench").unwrap();
    assert_eq!(
        (bench["database"].as_str(), bench["force_user"].as_str(), bench["pool_size"].as_str()),
        ("bench", "postgres", "4")
    );
    let cfg = rows(&admin, "SHOW CONFIG").await;
    let get = |k: &str| cfg.iter().find(|r| r["key"] == k).map(|r| r["value"].clone());
    assert_eq!(get("broker.pool_mode").as_deref(), Some("session"));
    assert_eq!(cfg.iter().find(|r| r["key"] == "broker.listen").unwrap()["changeable"], "no");
    assert!(!cfg.iter().any(|r| r["value"].contains("postgres\"") && r["key"].ends_with("password")));
    let lists = rows(&admin, "SHOW LISTS").await;
    assert!(lists.iter().any(|r| r["list"] == "databases" && r["items"] == "3"));
    let v = rows(&admin, "SHOW VERSION").await;
    assert!(v[0]["version"].starts_with("pgbroker "));
    let budget = rows(&admin, "SHOW BUDGET").await;
    let tcp = budget.iter().find(|r| r["server"].starts_with("127.0.0.1:")).unwrap();
    assert_eq!(tcp["source"], "server");
    assert!(tcp["derivation"].contains("floor("));
    assert!(tcp["budget"].parse::<u32>().unwrap() >= 1);
}

#[tokio::test]
async fn non_admin_users_cannot_open_the_console_and_stats_users_cannot_change_anything() {
    let b = broker(config()).await;
    let e = connect(b.local_addr(), "scramuser", "scramsecret", "pgbroker").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28000");
    let stats = console(&b, "app", "apppw").await;
    assert!(!rows(&stats, "SHOW POOLS").await.is_empty() || rows(&stats, "SHOW VERSION").await.len() == 1);
    assert_eq!(sqlstate(&stats.simple_query("PAUSE").await.unwrap_err()), "42501");
    assert_eq!(sqlstate(&stats.simple_query("SHUTDOWN").await.unwrap_err()), "42501");
}

#[tokio::test]
async fn rights_taken_away_by_a_reload_apply_to_the_next_command_of_an_open_session() {
    let b = broker(config()).await;
    let admin = console(&b, "postgres", "postgres").await;
    let stats = console(&b, "app", "apppw").await;
    admin.simple_query("KILL viasocket").await.unwrap();
    // As a RELOAD of a file with postgres moved to stats_users and app removed would.
    let mut cfg = (*b.app().config()).clone();
    cfg.auth.admin_users.clear();
    cfg.auth.stats_users = vec!["postgres".into()];
    b.app().store_config(cfg);
    let e = admin.simple_query("KILL viasocket").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "now a stats user: {e}");
    assert!(!rows(&admin, "SHOW POOLS").await.is_empty() || rows(&admin, "SHOW VERSION").await.len() == 1);
    let e = stats.simple_query("SHOW POOLS").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28000", "no longer allowed at all: {e}");
    assert!(stats.is_closed() || stats.simple_query("SHOW VERSION").await.is_err(), "and the session ends");
}

#[tokio::test]
async fn unknown_commands_get_a_clear_error() {
    let b = broker(config()).await;
    let admin = console(&b, "postgres", "postgres").await;
    let e = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    assert!(e.as_db_error().unwrap().message().contains("SHOW HELP"));
    let e = admin.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    assert!(rows(&admin, "SHOW HELP").await.len() > 10, "the console stays usable");
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    let admin = console(&b, "postgres", "postgres").await;
    admin.simple_query("PAUSE bench").await.unwrap();
    assert_eq!(rows(&admin, "SHOW DATABASES").await.iter().find(|r| r["name"] == "bench").unwrap()["paused"], "1");
    let waiting = tokio::spawn(async move { one(&c, "SELECT 'after resume'").await });
    eventually("the query to wait", Duration::from_secs(10), || async {
        let row = rows(&admin, "SHOW POOLS").await.into_iter().find(|r| r["database"] == "bench");
        match row {
            Some(r) if r["cl_waiting"] == "1" => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(!waiting.is_finished(), "held while paused");
    admin.simple_query("RESUME bench").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(got, "after resume");
}

#[tokio::test]
async fn kill_disconnects_the_databases_clients() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let victim = connect_bench(b.local_addr()).await;
    one(&victim, "SELECT 1").await;
    let other_db = connect(b.local_addr(), "postgres", "postgres", "viasocket").await.unwrap();
    let admin = console(&b, "postgres", "postgres").await;
    admin.simple_query("KILL bench").await.unwrap();
    eventually("the client to be disconnected", Duration::from_secs(5), || async { victim.is_closed() }).await;
    assert!(victim.simple_query("SELECT 1").await.is_err(), "killed");
    assert!(other_db.simple_query("SELECT 1").await.is_ok(), "other databases untouched");
    let again = connect_bench(b.local_addr()).await;
    assert_eq!(one(&again, "SELECT 2").await, "2", "new clients are served");
}

#[tokio::test]
async fn reload_applies_a_valid_file_and_rejects_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), userlist()).unwrap();
    let path = dir.path().join("pgbroker.toml");
    let file = |timeout: &str| {
        format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nquery_wait_timeout = \"{timeout}\"\n\
             [auth]\nfile = \"userlist.txt\"\nadmin_users = [\"postgres\"]\n\
             [databases.bench]\nport = {}\nuser = \"postgres\"\npassword = \"postgres\"\n",
            pg().port()
        )
    };
    std::fs::write(&path, file("7s")).unwrap();
    let b = broker(pgbroker::config::Config::load(&path).unwrap()).await;
    let admin = console(&b, "postgres", "postgres").await;
    std::fs::write(&path, file("9s")).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    let cfg = rows(&admin, "SHOW CONFIG").await;
    assert_eq!(cfg.iter().find(|r| r["key"] == "broker.query_wait_timeout").unwrap()["value"], "9000ms");
    std::fs::write(&path, "[broker]\nno_such_key = 1\n").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&e), "F0000");
    assert!(e.as_db_error().unwrap().message().contains("no_such_key"));
    let cfg = rows(&admin, "SHOW CONFIG").await;
    assert_eq!(
        cfg.iter().find(|r| r["key"] == "broker.query_wait_timeout").unwrap()["value"],
        "9000ms",
        "old config kept"
    );
    assert_eq!(b.app().reload_failures(), 1);
}

#[tokio::test]
async fn shutdown_stops_the_broker() {
    let b = broker(config()).await;
    let admin = console(&b, "postgres", "postgres").await;
    admin.simple_query("SHUTDOWN").await.unwrap();
    assert!(b.app().shutdown().is_draining(), "a graceful stop began");
}

#[tokio::test]
async fn psql_reads_the_console() {
    let b = broker(config()).await;
    let addr = b.local_addr();
    let out = tokio::process::Command::new("psql")
        .arg(format!("postgres://postgres@{}:{}/pgbroker", addr.ip(), addr.port()))
        .args(["-X", "-A", "-F", "|", "-c", "SHOW POOLS", "-c", "SHOW VERSION"])
        .env("PGPASSWORD", "postgres")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("database|user|cl_active|cl_waiting"), "{text}");
    assert!(text.contains("pgbroker 0."), "{text}");
}

#[tokio::test]
async fn connections_that_never_log_in_cannot_keep_the_console_or_clients_out() {
    let mut cfg = config();
    cfg.broker.max_client_conn = 5;
    cfg.broker.client_login_timeout = Duration::from_secs(60);
    let b = broker(cfg).await;
    // Every slot, the console's reserve included, taken by connections that say nothing.
    let mut silent = Vec::new();
    for _ in 0..5 + pgbroker::app::ADMIN_RESERVE {
        silent.push(raw(b.local_addr()).await);
    }
    eventually("the broker to count them", Duration::from_secs(5), || async {
        b.app().admission().logging_in().len() == 5 + pgbroker::app::ADMIN_RESERVE
    })
    .await;
    // Once they have been logging in for over a second, newcomers get their places.
    let admin = eventually("the console to let an admin in", Duration::from_secs(10), || async {
        connect(b.local_addr(), "postgres", "postgres", "pgbroker").await.ok()
    })
    .await;
    assert!(!rows(&admin, "SHOW CLIENTS").await.is_empty());
    let client = eventually("a client to get in", Duration::from_secs(10), || async {
        connect(b.local_addr(), "postgres", "postgres", "bench").await.map_err(|e| format!("{e:?}"))
    })
    .await;
    assert_eq!(one(&client, "SELECT 1").await, "1");
    // The oldest silent connections were told why they had to go.
    let told = read_until_close(&mut silent[0], Duration::from_secs(5)).await;
    assert_eq!(error_code(&told).as_deref(), Some("53300"));
}
