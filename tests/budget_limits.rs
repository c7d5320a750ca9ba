//! The connection budget, shared limits, server lifecycle and client limits, against the real
//! PostgreSQL. Every load loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::config::{Config, PoolMode, ServerMaxConnections};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A config whose budget is `budget` (max_connections budget + 5, reserved 5) with database
/// `name` (dbname `name`, created if missing) in transaction mode with the given pool size.
fn budget_config(budget: u32, name: &str, pool_size: Option<u32>) -> Config {
    let mut cfg = config();
    cfg.budget.server_max_connections = ServerMaxConnections::Fixed(budget + 5);
    cfg.budget.reserved_connections = 5;
    let mut db = cfg.databases["bench"].clone();
    db.dbname = name.to_string();
    db.pool_mode = PoolMode::Transaction;
    db.pool_size = pool_size;
    cfg.databases.insert(name.to_string(), db);
    cfg
}

fn create_db(name: &str) {
    let exists = pg().psql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")).unwrap();
    if exists == "0" {
        pg().psql("postgres", &format!("CREATE DATABASE {name}")).unwrap();
    }
}

/// Server connections PostgreSQL has to database `db` right now.
async fn server_conns(sampler: &tokio_postgres::Client, db: &str) -> i64 {
    sampler
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_share_a_budget_of_ten_with_correct_results() {
    create_db("budget_check");
    // Authentication is not under test here; trust keeps 1,000 logins cheap.
    let mut cfg = budget_config(10, "budget_check", None);
    cfg.auth.kind = pgbroker::config::AuthType::Trust;
    cfg.broker.client_login_timeout = Duration::from_secs(60);
    cfg.broker.query_wait_timeout = Duration::from_secs(60);
    let b = broker(cfg).await;
    let addr = b.local_addr();
    let setup = connect(addr, "postgres", "postgres", "budget_check").await.unwrap();
    setup.simple_query("DROP TABLE IF EXISTS results; CREATE TABLE results (client int, n int)").await.unwrap();

    // Sample the server side all along the run.
    let sampler = direct("postgres").await;
    let running = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampling = {
        let (running, peak) = (running.clone(), peak.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while running.load(Ordering::Relaxed) {
                let n = server_conns(&sampler, "budget_check").await as usize;
                peak.fetch_max(n, Ordering::Relaxed);
                samples += 1;
                // The sampling period.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };

    const CLIENTS: i32 = 1000;
    const TXNS: i32 = 3;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(async move {
                let c = connect(addr, "postgres", "postgres", "budget_check").await.unwrap();
                for k in 1..=TXNS {
                    // A transaction over several round trips: the server is held throughout.
                    c.simple_query("BEGIN").await.unwrap();
                    c.simple_query(&format!("INSERT INTO results VALUES ({id}, {k})")).await.unwrap();
                    let got =
                        one(&c, &format!("SELECT count(*) || ':' || sum(n) FROM results WHERE client = {id}")).await;
                    assert_eq!(got, format!("{k}:{}", k * (k + 1) / 2), "client {id} sees exactly its own rows");
                    c.simple_query("COMMIT").await.unwrap();
                }
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(120), futures_util::future::join_all(tasks)).await.unwrap();
    for r in all {
        r.unwrap();
    }
    running.store(false, Ordering::Relaxed);
    let samples = sampling.await.unwrap();
    let total = one(&setup, "SELECT count(*) FROM results").await;
    assert_eq!(total, (CLIENTS * TXNS).to_string());
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples >= 5, "sampled {samples} times in {:?}", started.elapsed());
    assert!(peak <= 10, "PostgreSQL saw {peak} connections from a broker with a budget of 10");
    assert!(peak >= 2, "the pool was actually used ({peak})");
}

#[tokio::test]
async fn idle_servers_of_another_pool_make_room_within_the_budget() {
    let mut cfg = budget_config(2, "bench", Some(2));
    cfg.databases.get_mut("appdb").unwrap().pool_mode = PoolMode::Transaction;
    cfg.databases.get_mut("appdb").unwrap().pool_size = Some(2);
    let b = broker(cfg).await;
    let addr = b.local_addr();
    // Pool bench/postgres fills the whole budget, then goes idle.
    let a1 = connect_bench(addr).await;
    let a2 = connect_bench(addr).await;
    a1.simple_query("BEGIN").await.unwrap();
    a2.simple_query("BEGIN").await.unwrap();
    a1.simple_query("COMMIT").await.unwrap();
    a2.simple_query("COMMIT").await.unwrap();
    let bench = b.app().registry().pools().all().into_iter().find(|p| p.key().database == "bench").unwrap();
    assert_eq!(bench.stats().open, 2);
    // A client of another pool is served by closing one of them.
    let other = connect(addr, "app", "apppw", "appdb").await.unwrap();
    let started = Instant::now();
    assert_eq!(one(&other, "SELECT current_user").await, "app");
    assert!(started.elapsed() < Duration::from_secs(3));
    let budgets = b.app().registry().budgets();
    let (_, budget) = budgets.values().next().unwrap();
    assert!(budget.used() <= 2);
    assert_eq!(bench.stats().open, 1);
}

#[tokio::test]
async fn reserve_pool_serves_a_client_that_waited_reserve_pool_timeout() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    let db = cfg.databases.get_mut("bench").unwrap();
    db.reserve_pool_size = 1;
    cfg.broker.reserve_pool_timeout = Duration::from_millis(200);
    let b = broker(cfg).await;
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = connect_bench(b.local_addr()).await;
    let started = Instant::now();
    assert_eq!(one(&waiter, "SELECT 1").await, "1");
    assert!(started.elapsed() >= Duration::from_millis(180), "waited for the reserve timeout");
    assert_eq!(b.app().registry().pools().all()[0].stats().open, 2);
}

#[tokio::test]
async fn min_pool_size_is_kept_warm() {
    let mut cfg = mode_config(PoolMode::Transaction, 4);
    cfg.databases.get_mut("bench").unwrap().min_pool_size = 3;
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    let pool = b.app().registry().pools().all()[0].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().idle < 3 {
        assert!(Instant::now() < deadline, "min_pool_size not reached: {:?}", pool.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pool.stats().open, 3, "no more than min_pool_size");
}

#[tokio::test]
async fn server_max_uses_retires_a_server() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.broker.server_max_uses = 2;
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    let mut pids = Vec::new();
    for _ in 0..6 {
        pids.push(one(&c, "SELECT pg_backend_pid()").await);
    }
    // Each server serves at most two checkouts (login may have used one), so no pid repeats
    // three times in a row and the six queries need at least three servers.
    assert!(pids.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])), "{pids:?}");
    let distinct: std::collections::HashSet<_> = pids.iter().collect();
    assert!(distinct.len() >= 3, "{pids:?}");
}

#[tokio::test]
async fn server_idle_timeout_closes_idle_servers() {
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    cfg.broker.server_idle_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    let pool = b.app().registry().pools().all()[0].clone();
    assert_eq!(pool.stats().open, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats().open > 0 {
        assert!(Instant::now() < deadline, "idle server not closed: {:?}", pool.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(one(&c, "SELECT 2").await, "2", "a new server is opened on demand");
}

#[tokio::test]
async fn killed_idle_server_is_never_handed_out() {
    let b = broker(mode_config(PoolMode::Transaction, 1)).await;
    let c = connect_bench(b.local_addr()).await;
    let pid = one(&c, "SELECT pg_backend_pid()").await;
    let admin = direct("postgres").await;
    admin.simple_query(&format!("SELECT pg_terminate_backend({pid})")).await.unwrap();
    // pg_terminate_backend only signals: wait until the backend is gone.
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    eventually("the backend to exit", Duration::from_secs(10), || async { one(&admin, &gone).await == "0" }).await;
    let pid2 = one(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(pid, pid2);
}

#[tokio::test]
async fn failed_server_login_is_not_retried_until_backoff_passes() {
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    // A fixed budget: "auto" would need the (now wrong) login at start.
    cfg.budget.server_max_connections = ServerMaxConnections::Fixed(100);
    cfg.databases.get_mut("bench").unwrap().password = Some("wrong".into());
    cfg.broker.server_login_retry = Duration::from_secs(5);
    let b = broker(cfg).await;
    // The pool's first client needs a server at login (to learn its settings).
    let e = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    let started = Instant::now();
    let e = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01", "the last failure's code");
    let m = e.as_db_error().unwrap().message().to_string();
    assert!(m.contains("retrying in"), "{m}");
    assert!(started.elapsed() < Duration::from_millis(500), "failed fast");
}

#[tokio::test]
async fn max_db_connections_caps_a_database_across_users() {
    let mut cfg = mode_config(PoolMode::Transaction, 5);
    cfg.databases.get_mut("bench").unwrap().max_db_connections = 1;
    cfg.broker.query_wait_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("BEGIN").await.unwrap();
    let other = connect_bench(b.local_addr()).await;
    let e = other.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(one(&other, "SELECT 1").await, "1");
}

#[tokio::test]
async fn client_idle_timeout_disconnects_idle_clients_with_57p05() {
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    cfg.broker.client_idle_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    eventually("the broker to end the idle client", Duration::from_secs(5), || async { c.is_closed() }).await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(e.is_closed() || sqlstate(&e) == "57P05", "{e:?}");
}

#[tokio::test]
async fn idle_transaction_timeout_ends_the_client_and_rolls_back() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.broker.idle_transaction_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("BEGIN").await.unwrap();
    eventually("the broker to end the client", Duration::from_secs(5), || async { c.is_closed() }).await;
    assert!(c.simple_query("SELECT 1").await.is_err());
    let next = connect_bench(b.local_addr()).await;
    assert_eq!(one(&next, "SELECT pg_current_xact_id_if_assigned() IS NULL").await, "t");
}

#[tokio::test]
async fn transaction_timeout_ends_a_long_transaction() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.broker.transaction_timeout = Duration::from_millis(400);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    let started = Instant::now();
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(e.is_closed() || sqlstate(&e) == "25P04", "{e:?}");
    let next = connect_bench(b.local_addr()).await;
    assert_eq!(one(&next, "SELECT 1").await, "1", "the pool recovers its slot");
}

#[tokio::test]
async fn max_client_conn_per_ip_refuses_with_53300_naming_the_limit() {
    let mut cfg = config();
    cfg.broker.max_client_conn_per_ip = 2;
    let b = broker(cfg).await;
    let _a = connect_bench(b.local_addr()).await;
    let _b = connect_bench(b.local_addr()).await;
    let e = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    assert!(e.as_db_error().unwrap().message().contains("max_client_conn_per_ip = 2"));
}

/// Runs pgbench through the broker; returns (processed, failed) transactions.
async fn pgbench(addr: std::net::SocketAddr, db: &str, mode: &str) -> (u64, u64, String) {
    let out = tokio::process::Command::new("pgbench")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "postgres", "-n"])
        .args(["-c", "200", "-j", "2", "-t", "10", "-M", mode, db])
        .env("PGPASSWORD", "postgres")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out).await.expect("pgbench finished in time").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "pgbench -M {mode} failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let num = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    (num("number of transactions actually processed:"), num("number of failed transactions:"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_and_extended_with_200_clients_on_a_budget_of_20() {
    create_db("pgbench_db");
    let pg = pg();
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", "postgres", "pgbench_db"])
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut cfg = budget_config(20, "pgbench_db", Some(20));
    cfg.broker.query_wait_timeout = Duration::from_secs(30);
    let b = broker(cfg).await;
    for mode in ["simple", "extended"] {
        let (done, failed, text) = pgbench(b.local_addr(), "pgbench_db", mode).await;
        assert_eq!(failed, 0, "-M {mode}: {text}");
        assert!(
            done == 2000,
            "-M {mode}: {text}\n{:?}",
            b.app().registry().pools().all().iter().map(|p| p.stats()).collect::<Vec<_>>()
        );
    }
    let budgets = b.app().registry().budgets();
    let (_, budget) = budgets.values().next().unwrap();
    assert!(budget.used() <= 20);
}

/// A broker config file for database `db` of the shared cluster: transaction mode, trust
/// auth, `pool_size` servers, a budget of `budget`.
fn shrink_config_text(db: &str, Caps { pool_size, budget, max_db_connections }: Caps) -> String {
    format!(
        r#"
[broker]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
pool_mode = "transaction"
query_wait_timeout = "60s"

[auth]
type = "trust"

[budget]
server_max_connections = {max}
reserved_connections = 5

[databases.{db}]
host = "127.0.0.1"
port = {port}
user = "postgres"
password = "postgres"
pool_size = {pool_size}
max_db_connections = {max_db_connections}
"#,
        port = pg().port(),
        max = budget + 5,
    )
}

/// The pids of the pool's servers on the server.
async fn server_pids(sampler: &tokio_postgres::Client, db: &str) -> std::collections::BTreeSet<i32> {
    let rows = sampler
        .query("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'", &[&db])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// What caps a pool's servers in `shrink_under_load` (`max_db_connections` 0: none).
#[derive(Clone, Copy)]
struct Caps {
    pool_size: u32,
    budget: u32,
    max_db_connections: u32,
}

impl Caps {
    const WIDE: Caps = Caps { pool_size: 20, budget: 95, max_db_connections: 0 };

    /// The servers these caps allow.
    fn cap(self) -> usize {
        let db = if self.max_db_connections == 0 { u32::MAX } else { self.max_db_connections };
        self.pool_size.min(self.budget).min(db) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lowers_pool_size_closes_servers_as_transactions_end_and_opens_none() {
    shrink_under_load("shrink_pool_db", Caps::WIDE, Caps { pool_size: 4, ..Caps::WIDE }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lowers_the_budget_closes_servers_as_transactions_end_and_opens_none() {
    shrink_under_load("shrink_budget_db", Caps::WIDE, Caps { budget: 4, ..Caps::WIDE }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_sets_max_db_connections_caps_the_servers_already_open() {
    shrink_under_load("shrink_maxdb_db", Caps::WIDE, Caps { max_db_connections: 4, ..Caps::WIDE }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lifts_max_db_connections_serves_the_clients_waiting_on_it() {
    let db = "lift_maxdb_db";
    create_db(db);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgbroker.toml");
    std::fs::write(&path, shrink_config_text(db, Caps { max_db_connections: 1, ..Caps::WIDE })).unwrap();
    let b = broker(Config::load(&path).unwrap()).await;
    let holder = connect(b.local_addr(), "postgres", "postgres", db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let other = connect(b.local_addr(), "postgres", "postgres", db).await.unwrap();
    let waiting = tokio::spawn(async move { other.batch_execute("SELECT 1").await });
    let pool = b.app().registry().pools().all().into_iter().find(|p| p.key().database == db).unwrap();
    eventually("the second client to wait on the limit", Duration::from_secs(10), || async {
        pool.stats().waiting == 1
    })
    .await;

    std::fs::write(&path, shrink_config_text(db, Caps::WIDE)).unwrap();
    b.app().reload().await.unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    served.expect("served once the limit was lifted").unwrap().unwrap();
    assert_eq!(pool.stats().open, 2, "a second server beside the held one");
    holder.batch_execute("COMMIT").await.unwrap();
}

/// 50 pgbench clients (TPC-B) on database `db` with caps `before`; a reload to `after`
/// while they run; the pool's servers sampled on the server every 100 ms.
async fn shrink_under_load(db: &str, before: Caps, after: Caps) {
    let cap = after.cap();
    let full = before.cap();
    create_db(db);
    let pg = pg();
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", "postgres", db])
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgbroker.toml");
    std::fs::write(&path, shrink_config_text(db, before)).unwrap();
    let b = broker(Config::load(&path).unwrap()).await;
    let addr = b.local_addr();

    // TPC-B with 50 clients for a bounded time; checked for failures at the end.
    let bench = tokio::process::Command::new("pgbench")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "postgres", "-n"])
        .args(["-c", "50", "-j", "2", "-T", "8", db])
        .kill_on_drop(true)
        .output();
    let bench = tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(60), bench).await });
    let sampler = direct("postgres").await;
    let pool = eventually("a pool for the load", Duration::from_secs(20), || async {
        b.app().registry().pools().all().into_iter().find(|p| p.key().database == db)
    })
    .await;
    // Full, and every server logged in (the pool counts a server from the moment it connects).
    let mut seen = eventually("the pool to fill under load", Duration::from_secs(20), || async {
        let pids = server_pids(&sampler, db).await;
        if pool.stats().open >= full && pids.len() >= full { Ok(pids) } else { Err((pool.stats(), pids.len())) }
    })
    .await;

    std::fs::write(&path, shrink_config_text(db, after)).unwrap();
    b.app().reload().await.unwrap();

    // Every 100 ms until pgbench is done: the count never rises, and no server logs in while
    // the pool holds the new cap or more.
    let mut counts = vec![seen.len()];
    while !bench.is_finished() {
        let now = server_pids(&sampler, db).await;
        let new: Vec<_> = now.difference(&seen).collect();
        assert!(
            new.is_empty() || counts.iter().any(|&c| c < cap),
            "servers {new:?} opened at or above the cap of {cap}; counts {counts:?} then {}",
            now.len()
        );
        assert!(now.len() <= counts[counts.len() - 1], "the server count rose: {counts:?} then {}", now.len());
        counts.push(now.len());
        seen.extend(now);
        // The sampling interval, not a wait for something to happen.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = bench.await.unwrap().expect("pgbench finished in time").unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(counts.contains(&cap), "never came down to {cap}: {counts:?}");
    assert_eq!(pool.stats().open, cap, "holds the new cap under load");
}
