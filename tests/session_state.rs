//! Transaction pooling that keeps session semantics (issue 18): settings follow the client,
//! state that cannot move pins it to its server until it is gone, and nothing leaks to
//! another client. Transaction mode, a pool of 3, and 10 other clients running transactions
//! the whole time, so that each statement may land on any server.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::app::Broker;
use pgbroker::config::PoolMode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::Client;

/// A transaction-mode broker with a pool of 3.
async fn pooled_broker() -> Broker {
    let mut cfg = config();
    let db = cfg.databases.get_mut("bench").unwrap();
    db.pool_mode = PoolMode::Transaction;
    db.pool_size = Some(3);
    broker(cfg).await
}

/// Ten clients running short transactions until dropped (at most 2 minutes).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(b: &Broker) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..10 {
            let c = connect_bench(b.local_addr()).await;
            let (stop, done) = (stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let until = tokio::time::Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
                    let sql = if i % 2 == 0 { "SELECT 1" } else { "BEGIN; SELECT 1; COMMIT" };
                    c.batch_execute(sql).await.expect("a bystander's transaction fails");
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        let load = Load { stop, done, tasks };
        load.running().await;
        load
    }

    /// Waits until the bystanders have run more transactions.
    async fn running(&self) {
        let from = self.done.load(Ordering::Relaxed);
        eventually("the bystanders to run transactions", Duration::from_secs(20), || async {
            self.done.load(Ordering::Relaxed) >= from + 20
        })
        .await;
    }

    /// Stops the bystanders; panics if one failed.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Advisory locks with `key` held on the server, by any session.
async fn advisory_locks(key: i64) -> i64 {
    let d = direct("bench").await;
    let sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint::oid";
    d.query_one(sql, &[&key]).await.unwrap().get(0)
}

/// The `pinned` column SHOW CLIENTS gives the client that logged in as `application_name`.
async fn pinned_as(b: &Broker, application_name: &str) -> String {
    let admin = connect(b.local_addr(), "postgres", "postgres", "pgbroker").await.unwrap();
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let me = clients.iter().find(|r| r.get("application_name").map(String::as_str) == Some(application_name));
    me.and_then(|r| r.get("pinned").cloned()).unwrap_or_else(|| panic!("no client {application_name}: {clients:?}"))
}

/// Waits until SHOW CLIENTS gives `expected` as the client's `pinned` column: the broker
/// reads the session state after the client has its reply.
async fn wait_pinned(b: &Broker, application_name: &str, expected: &str) {
    let what = format!("{application_name} pinned for \"{expected}\"");
    eventually(&what, Duration::from_secs(20), || async {
        let seen = pinned_as(b, application_name).await;
        if seen == expected { Ok(()) } else { Err(seen) }
    })
    .await;
}

/// A client that logs in with `application_name`, which SHOW CLIENTS lists it by.
async fn named(b: &Broker, name: &str) -> Client {
    let info = format!("{} application_name={name}", conninfo(b.local_addr(), "postgres", "postgres", "bench"));
    let (c, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

async fn bool_of(c: &Client, sql: &str) -> bool {
    one(c, sql).await == "t"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_advisory_lock_pins_its_client_until_unlocked_in_a_later_statement() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let runner = named(&b, "migrations-1").await;
    assert!(bool_of(&runner, "SELECT pg_advisory_lock(18001) IS NOT NULL").await);
    wait_pinned(&b, "migrations-1", "advisory_lock").await;
    let (_, metrics) = http_get(b.http_addr(), "/metrics").await;
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("pgbroker_pinned_clients{") && l.contains("reason=\"advisory_lock\""))
        .unwrap_or_else(|| panic!("no pinned gauge: {metrics}"));
    assert!(gauge.ends_with(" 1") && gauge.contains("database=\"bench\""), "{gauge}");
    for _ in 0..5 {
        one(&runner, "SELECT 1").await;
        load.running().await;
    }
    assert!(bool_of(&runner, "SELECT pg_advisory_unlock(18001)").await, "the unlock found the lock");
    assert_eq!(advisory_locks(18001).await, 0);
    wait_pinned(&b, "migrations-1", "").await;
    // A second runner takes the lock at once.
    let second = connect_bench(b.local_addr()).await;
    assert!(bool_of(&second, "SELECT pg_try_advisory_lock(18001)").await);
    assert!(bool_of(&second, "SELECT pg_advisory_unlock(18001)").await);
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_lock_over_the_extended_protocol_pins_and_unpins_the_same_way() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let runner = named(&b, "migrations-2").await;
    let key = 18002i64;
    let got: bool = runner.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.unwrap().get(0);
    assert!(got);
    for _ in 0..5 {
        runner.query_one("SELECT $1::int", &[&1i32]).await.unwrap();
        load.running().await;
    }
    let released: bool = runner.query_one("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap().get(0);
    assert!(released);
    assert_eq!(advisory_locks(key).await, 0);
    wait_pinned(&b, "migrations-2", "").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_inside_a_transaction_block_outlives_it_and_pins() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let runner = named(&b, "migrations-3").await;
    runner.batch_execute("BEGIN; SELECT pg_advisory_lock(18003); COMMIT").await.unwrap();
    load.running().await;
    one(&runner, "SELECT 2").await;
    assert!(bool_of(&runner, "SELECT pg_advisory_unlock(18003)").await);
    assert_eq!(advisory_locks(18003).await, 0);
    let second = connect_bench(b.local_addr()).await;
    assert!(bool_of(&second, "SELECT pg_try_advisory_lock(18003)").await, "taken at once");
    one(&second, "SELECT pg_advisory_unlock_all()::text").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_with_hold_cursor_is_fetched_to_the_end_across_statements_and_close_unpins() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let c = named(&b, "cursor-reader").await;
    c.batch_execute("DECLARE big CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 1000) g").await.unwrap();
    wait_pinned(&b, "cursor-reader", "cursor").await;
    let mut seen = Vec::new();
    for _ in 0..10 {
        for r in rows(&c, "FETCH 100 FROM big").await {
            seen.push(r["g"].parse::<i32>().unwrap());
        }
        load.running().await;
    }
    assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
    c.batch_execute("CLOSE big").await.unwrap();
    wait_pinned(&b, "cursor-reader", "").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_table_is_readable_in_the_next_statement_and_discard_all_unpins() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let c = named(&b, "temp-user").await;
    c.batch_execute("CREATE TEMP TABLE scratch AS SELECT 42 AS answer").await.unwrap();
    load.running().await;
    assert_eq!(one(&c, "SELECT answer::text FROM scratch").await, "42");
    wait_pinned(&b, "temp-user", "temp_table").await;
    c.batch_execute("DISCARD ALL").await.unwrap();
    wait_pinned(&b, "temp-user", "").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_setting_follows_its_client_and_never_reaches_another() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let a = connect_bench(b.local_addr()).await;
    let other = connect_bench(b.local_addr()).await;
    a.batch_execute("SET statement_timeout = '1ms'").await.unwrap();
    for _ in 0..10 {
        // Whichever server it lands on, the other client runs without A's timeout.
        other.batch_execute("SELECT pg_sleep(0.05)").await.expect("another client's setting applied");
        // And A's next transactions time out on whichever server they land on.
        let e = a.batch_execute("SELECT pg_sleep(0.05)").await.unwrap_err();
        assert_eq!(sqlstate(&e), "57014");
        load.running().await;
    }
    a.batch_execute("RESET ALL").await.unwrap();
    for _ in 0..5 {
        a.batch_execute("SELECT pg_sleep(0.01)").await.expect("RESET ALL cleared the timeout");
    }
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_shorter_than_the_brokers_own_queries_costs_no_client_its_connection() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let a = connect_bench(b.local_addr()).await;
    // Each SET makes the broker look at the session under the client's 1ms timeout, and each
    // bystander landing on a server A left resets it under that timeout: the broker's own
    // statements may be stopped by it, no client's connection (the bystanders' included).
    for i in 0..100 {
        for sql in ["SET statement_timeout = '1ms'", &format!("SET work_mem = '{}kB'", 4096 + i)] {
            if let Err(e) = a.batch_execute(sql).await {
                assert_eq!(sqlstate(&e), "57014", "{sql}: {e}");
            }
        }
    }
    load.running().await;
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(one(&a, "SHOW statement_timeout").await, "0");
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_discard_all_return_a_setting_to_the_value_the_client_logged_in_with() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    // A search path given at login (as drivers' "Search Path" options do), and the DISCARD ALL an
    // app-side pool runs when a connection goes back to it.
    let info = format!(
        "{} application_name=startup-app options='-c search_path=startup_schema,public -c work_mem=5MB'",
        conninfo(b.local_addr(), "postgres", "postgres", "bench")
    );
    let (a, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let settings = "SELECT current_setting('search_path') || ' ' || current_setting('work_mem') || ' ' || current_setting('application_name')";
    let logged_in = "startup_schema,public 5MB startup-app";
    assert_eq!(one(&a, settings).await, logged_in);
    for reset in [
        "RESET search_path; RESET work_mem; RESET application_name",
        "RESET ALL",
        "DISCARD ALL",
        "SET search_path TO DEFAULT; SET work_mem TO DEFAULT; SET application_name TO DEFAULT",
    ] {
        a.batch_execute("SET search_path = other; SET work_mem = '7MB'; SET application_name = 'changed'")
            .await
            .unwrap();
        assert_eq!(one(&a, settings).await, "other 7MB changed");
        load.running().await;
        a.batch_execute(reset).await.unwrap();
        for _ in 0..3 {
            assert_eq!(one(&a, settings).await, logged_in, "after {reset}");
            load.running().await;
        }
    }
    load.finish().await;
}

/// The `application_name` values a raw client is told (ParameterStatus) up to its next
/// ReadyForQuery; what follows that stays in `buf`.
async fn application_names_until_ready(s: &mut tokio::net::TcpStream, buf: &mut bytes::BytesMut) -> Vec<String> {
    use postgres_protocol::message::backend::Message;
    use tokio::io::AsyncReadExt;
    let mut names = Vec::new();
    loop {
        while let Some(m) = Message::parse(buf).unwrap() {
            match m {
                Message::ParameterStatus(p) if p.name().unwrap() == "application_name" => {
                    names.push(p.value().unwrap().to_string())
                }
                Message::ErrorResponse(_) => panic!("an error after {names:?}"),
                Message::ReadyForQuery(_) => return names,
                _ => {}
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf)).await;
        let n = read.unwrap_or_else(|_| panic!("no ReadyForQuery within 10 s after {names:?}")).unwrap();
        assert!(n > 0, "closed after {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_reported_setting_is_reported_back_at_the_clients_login_value() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.auth.kind = pgbroker::config::AuthType::Trust;
    let b = broker(cfg).await;
    let (mut s, mut buf) = (raw(b.local_addr()).await, bytes::BytesMut::new());
    let login = [("user", "postgres"), ("database", "bench"), ("application_name", "startup-app")];
    send(&mut s, &startup_packet(&login)).await;
    assert_eq!(application_names_until_ready(&mut s, &mut buf).await.last().map(String::as_str), Some("startup-app"));
    let query = |sql: &str| {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    };
    send(&mut s, &query("SET application_name = 'changed'")).await;
    assert_eq!(application_names_until_ready(&mut s, &mut buf).await, ["changed"]);
    // The server reports its own login value, then the broker the client's.
    send(&mut s, &query("RESET application_name")).await;
    let mut told = application_names_until_ready(&mut s, &mut buf).await;
    send(&mut s, &query("SELECT 1")).await;
    told.extend(application_names_until_ready(&mut s, &mut buf).await);
    assert_eq!(told.last().map(String::as_str), Some("startup-app"), "{told:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_and_a_set_rolled_back_do_not_persist() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let a = connect_bench(b.local_addr()).await;
    a.batch_execute("BEGIN; SET LOCAL work_mem = '3MB'; COMMIT").await.unwrap();
    a.batch_execute("BEGIN; SET work_mem = '5MB'; ROLLBACK").await.unwrap();
    for _ in 0..5 {
        assert_eq!(one(&a, "SHOW work_mem").await, "4MB");
        load.running().await;
    }
    a.batch_execute("SET work_mem = '6MB'").await.unwrap();
    for _ in 0..5 {
        assert_eq!(one(&a, "SHOW work_mem").await, "6MB");
        load.running().await;
    }
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_outside_a_transaction_follows_the_client() {
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let a = connect_bench(b.local_addr()).await;
    let v: String = a.query_one("SELECT set_config('app.tenant', $1, false)", &[&"acme"]).await.unwrap().get(0);
    assert_eq!(v, "acme");
    let other = connect_bench(b.local_addr()).await;
    for _ in 0..5 {
        assert_eq!(one(&a, "SELECT current_setting('app.tenant', true)").await, "acme");
        let theirs = other.query_one("SELECT current_setting('app.tenant', true)", &[]).await.unwrap();
        assert!(theirs.get::<_, Option<String>>(0).unwrap_or_default().is_empty(), "leaked to another client");
        load.running().await;
    }
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lastval_after_an_insert_is_the_clients_own_id_or_an_error_never_anothers() {
    let b = pooled_broker().await;
    direct("bench")
        .await
        .batch_execute(
            "DROP TABLE IF EXISTS lastval_check; CREATE TABLE lastval_check (id serial PRIMARY KEY, who int)",
        )
        .await
        .unwrap();
    let load = Load::start(&b).await;
    let runs = (0..20).map(|who: i32| {
        let addr = b.local_addr();
        async move {
            let c = connect_bench(addr).await;
            let (mut own, mut refused) = (0, 0);
            for _ in 0..50 {
                // As PHP PDO's lastInsertId(): the INSERT, then lastval() on its own.
                let got = if who % 2 == 0 {
                    c.execute("INSERT INTO lastval_check (who) VALUES ($1)", &[&who]).await.unwrap();
                    c.query_one("SELECT lastval()", &[]).await.map(|r| r.get::<_, i64>(0))
                } else {
                    c.batch_execute(&format!("INSERT INTO lastval_check (who) VALUES ({who})")).await.unwrap();
                    c.query_one("SELECT lastval()", &[]).await.map(|r| r.get::<_, i64>(0))
                };
                match got {
                    Ok(id) => {
                        let whose: i32 = c
                            .query_one("SELECT who FROM lastval_check WHERE id = $1", &[&(id as i32)])
                            .await
                            .unwrap()
                            .get(0);
                        assert_eq!(whose, who, "lastval() gave row {id}, another client's");
                        own += 1;
                    }
                    Err(e) => {
                        assert_eq!(sqlstate(&e), "55000", "{e}");
                        refused += 1;
                    }
                }
            }
            (own, refused)
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let own: i32 = results.iter().map(|r| r.0).sum();
    eprintln!("lastval: {own} own ids, {} refused", results.iter().map(|r| r.1).sum::<i32>());
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_pinned_clients_a_statement_that_would_pin_is_refused_and_others_are_served() {
    // A pool of 3 lets one client be pinned (half the pool, rounded down).
    let b = pooled_broker().await;
    let load = Load::start(&b).await;
    let first = named(&b, "pinned-first").await;
    assert!(bool_of(&first, "SELECT pg_advisory_lock(18010) IS NOT NULL").await);
    let second = connect_bench(b.local_addr()).await;
    let e = second.batch_execute("SELECT pg_advisory_lock(18011)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e}");
    assert!(e.as_db_error().unwrap().message().contains("max_pinned_clients = 1"), "{e}");
    assert_eq!(advisory_locks(18011).await, 0, "the refused statement never ran");
    // The refused client and everyone else go on.
    assert_eq!(one(&second, "SELECT 'still here'").await, "still here");
    load.running().await;
    assert!(bool_of(&first, "SELECT pg_advisory_unlock(18010)").await);
    wait_pinned(&b, "pinned-first", "").await;
    assert!(bool_of(&second, "SELECT pg_try_advisory_lock(18011)").await, "room again once the first let go");
    assert!(bool_of(&second, "SELECT pg_advisory_unlock(18011)").await);
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_that_disconnects_frees_its_place_under_max_pinned_clients() {
    let b = pooled_broker().await;
    let first = named(&b, "pinned-leaver").await;
    assert!(bool_of(&first, "SELECT pg_advisory_lock(18012) IS NOT NULL").await);
    wait_pinned(&b, "pinned-leaver", "advisory_lock").await;
    drop(first);
    // Its server closes with it, and with it the lock.
    eventually("the leaver's lock to go", Duration::from_secs(20), || async { advisory_locks(18012).await == 0 }).await;
    let second = connect_bench(b.local_addr()).await;
    eventually("room for another pinned client", Duration::from_secs(20), || async {
        second.simple_query("SELECT pg_advisory_lock(18013)").await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    assert!(bool_of(&second, "SELECT pg_advisory_unlock(18013)").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_session_state_error_a_statement_that_would_pin_is_refused() {
    let mut cfg = config();
    let db = cfg.databases.get_mut("bench").unwrap();
    db.pool_mode = PoolMode::Transaction;
    db.pool_size = Some(3);
    db.session_state = pgbroker::config::SessionState::Error;
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    let e = c.batch_execute("CREATE TEMP TABLE refused (i int)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e}");
    assert!(e.as_db_error().unwrap().message().contains("session_state = \"error\""), "{e}");
    // A column named temp is no temporary table.
    one(&c, "SELECT 1 AS temp").await;
}
