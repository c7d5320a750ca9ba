//! Session pooling against the real PostgreSQL: queries, protocols, COPY, errors, pool limits.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt, pin_mut};
use std::time::{Duration, Instant};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test]
async fn simple_protocol_multi_statement_query_returns_every_result() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let msgs = c.simple_query("SELECT 1; SELECT 'two'; SELECT 3").await.unwrap();
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "two", "3"]);
}

#[tokio::test]
async fn extended_protocol_with_parameters_and_reused_prepared_statement() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let stmt = c.prepare("SELECT $1::int * 2, $2::text").await.unwrap();
    for i in 0..20 {
        let row = c.query_one(&stmt, &[&i, &"x"]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
}

#[tokio::test]
async fn error_inside_transaction_then_rollback_then_recovery() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "transaction stays aborted");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

#[tokio::test]
async fn extended_protocol_error_then_next_query_succeeds() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let e = c.query("SELECT * FROM no_such_table", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    assert_eq!(c.query_one("SELECT 1::int", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn pipelined_extended_queries_complete_in_order() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let futs = (0..50).map(|i| {
        let c = &c;
        async move { c.query_one("SELECT $1::int", &[&i]).await.unwrap().get::<_, i32>(0) }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn copy_in_and_copy_out_roundtrip() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    c.batch_execute("CREATE TEMP TABLE t (id int, v text)").await.unwrap();
    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tvalue-{i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let stream = c.copy_out("COPY t TO STDOUT").await.unwrap();
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);
}

#[tokio::test]
async fn large_results_and_large_values_stream_through() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let rows = c.query("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 100_000);
    // One value far over the streaming threshold, in both directions.
    let big = "y".repeat(3_000_000);
    let row = c.query_one("SELECT length($1::text), $1::text", &[&big]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3_000_000);
    assert_eq!(row.get::<_, String>(1), big);
}

#[tokio::test]
async fn startup_parameters_apply_to_the_server_session() {
    let b = broker(config()).await;
    let conn = format!(
        "{} application_name=orders-api options='-c search_path=pg_catalog,public -c statement_timeout=4321'",
        conninfo(b.local_addr(), "postgres", "postgres", "bench")
    );
    let (c, task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(task);
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "orders-api");
    assert_eq!(row.get::<_, String>(2), "4321ms");
    // Exactly what PostgreSQL itself makes of the same startup packet.
    let pg = pg();
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres password=postgres dbname=bench options='-c search_path=pg_catalog,public'",
        pg.port()
    );
    let (d, task) = tokio_postgres::connect(&direct, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(task);
    let direct_path: String = d.query_one("SELECT current_setting('search_path')", &[]).await.unwrap().get(0);
    assert_eq!(row.get::<_, String>(1), direct_path);
}

#[tokio::test]
async fn reset_and_discard_all_return_to_the_login_values_as_on_a_direct_connection() {
    let b = broker(config()).await;
    // A search path given at login (as drivers' "Search Path" options do), and the DISCARD ALL an
    // app-side pool runs when a connection goes back to it.
    let login = "application_name=orders-api options='-c search_path=pg_catalog,public -c work_mem=5MB'";
    let through = format!("{} {login}", conninfo(b.local_addr(), "postgres", "postgres", "bench"));
    let direct = format!("host=127.0.0.1 port={} user=postgres password=postgres dbname=bench {login}", pg().port());
    let settings = "SELECT current_setting('search_path') || ' ' || current_setting('work_mem') || ' ' || current_setting('application_name')";
    let mut seen = Vec::new();
    for info in [through, direct] {
        let (c, task) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(task);
        let mut values = vec![one(&c, settings).await];
        for reset in ["RESET search_path; RESET work_mem; RESET application_name", "RESET ALL", "DISCARD ALL"] {
            c.batch_execute("SET search_path = public; SET work_mem = '7MB'; SET application_name = 'changed'")
                .await
                .unwrap();
            c.batch_execute(reset).await.unwrap();
            values.push(one(&c, settings).await);
        }
        seen.push(values);
    }
    assert_eq!(seen[0], seen[1], "through the broker, then direct");
    assert_eq!(seen[0][0], "pg_catalog,public 5MB orders-api");
}

#[tokio::test]
async fn invalid_startup_setting_is_refused_when_the_server_is_linked() {
    let b = broker(config()).await;
    let conn =
        format!("{} options='-c statement_timeout=banana'", conninfo(b.local_addr(), "postgres", "postgres", "bench"));
    // The login is answered from the pool's defaults, as PgBouncer does; the setting meets a
    // server at the first query, which fails as PostgreSQL fails such a login.
    let (client, task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(task);
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    // The server it used is reset and reused, not leaked.
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn client_sees_the_servers_parameter_status() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench"), ("application_name", "ps-test")]))
        .await;
    let reply = read_until_idle(&mut s).await;
    let params = parameter_statuses(&reply);
    let version = pg().psql("postgres", "SHOW server_version").unwrap();
    assert!(params.contains(&("server_version".into(), version)), "{params:?}");
    assert!(params.contains(&("application_name".into(), "ps-test".into())), "{params:?}");
    assert!(params.iter().any(|(k, _)| k == "client_encoding"));
    assert!(reply.windows(5).any(|w| w == [b'K', 0, 0, 0, 12]), "BackendKeyData");
    assert!(reply.ends_with(&[b'Z', 0, 0, 0, 5, b'I']));
}

async fn read_until_idle(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early");
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn parameter_statuses(bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest[0] == b'S' {
            let mut parts = rest[5..1 + len].split(|&b| b == 0);
            let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            out.push((k, v));
        }
        rest = &rest[1 + len..];
    }
    out
}

fn single_server_config() -> pgbroker::config::Config {
    let mut cfg = config();
    cfg.databases.get_mut("bench").unwrap().pool_size = Some(1);
    cfg
}

#[tokio::test]
async fn session_state_is_reset_before_the_next_client() {
    let b = broker(single_server_config()).await;
    let c1 = connect_bench(b.local_addr()).await;
    let pid1: i32 = c1.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    c1.batch_execute("SET work_mem = '7MB'; PREPARE p AS SELECT 1; CREATE TEMP TABLE leftover (i int)").await.unwrap();
    drop(c1);
    let c2 = connect_bench(b.local_addr()).await;
    let row = c2
        .query_one(
            "SELECT pg_backend_pid(), current_setting('work_mem'), (SELECT count(*) FROM pg_prepared_statements WHERE name = 'p')::int, to_regclass('leftover') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid1, "the same server is reused");
    assert_eq!(row.get::<_, String>(1), "4MB");
    assert_eq!(row.get::<_, i32>(2), 0);
    assert!(row.get::<_, bool>(3));
}

#[tokio::test]
async fn client_leaving_mid_transaction_does_not_leak_it() {
    let b = broker(single_server_config()).await;
    let c1 = connect_bench(b.local_addr()).await;
    c1.batch_execute("CREATE TABLE IF NOT EXISTS leak_check (i int)").await.unwrap();
    c1.batch_execute("BEGIN; INSERT INTO leak_check VALUES (1)").await.unwrap();
    drop(c1);
    let c2 = connect_bench(b.local_addr()).await;
    let row = c2
        .query_one("SELECT count(*)::int, pg_current_xact_id_if_assigned() IS NULL FROM leak_check", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0, "the abandoned transaction was rolled back");
    assert!(row.get::<_, bool>(1), "the new client is not inside the old transaction");
}

#[tokio::test]
async fn waiting_client_gets_the_server_when_it_frees_up() {
    let b = broker(single_server_config()).await;
    let addr = b.local_addr();
    let c1 = connect_bench(addr).await;
    // The server is linked at the first message and kept until the client leaves.
    c1.simple_query("SELECT 1").await.unwrap();
    let waiter = tokio::spawn(async move {
        let c2 = connect_bench(addr).await;
        c2.simple_query("SELECT 1").await.unwrap();
        Instant::now()
    });
    let pool = b.app().registry().pools().all().into_iter().find(|p| p.key().database == "bench").unwrap();
    eventually("the second client to queue for the server", Duration::from_secs(10), || async {
        let stats = pool.stats();
        if stats.waiting == 1 { Ok(()) } else { Err(stats) }
    })
    .await;
    assert!(!waiter.is_finished(), "second client waits while the only server is held");
    let released = Instant::now();
    drop(c1);
    let served = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    assert!(served >= released, "served only once the server was released");
}

#[tokio::test]
async fn pool_wait_timeout_gives_53300_naming_the_pool() {
    let mut cfg = single_server_config();
    cfg.broker.query_wait_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("SELECT 1").await.unwrap();
    // Logging in needs no server; the first query waits for one.
    let c = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    let msg = e.as_db_error().unwrap().message();
    assert!(msg.contains("bench/postgres"), "{msg}");
}

#[tokio::test]
async fn cancel_request_reaches_the_running_query() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(20) /* to cancel */").await });
    // A cancel that arrives before the query runs has nothing to cancel.
    let server = direct("bench").await;
    eventually("the query to run on the server", Duration::from_secs(10), || async {
        let running = "SELECT count(*) FROM pg_stat_activity \
                       WHERE query = 'SELECT pg_sleep(20) /* to cancel */' AND state = 'active'";
        one(&server, running).await == "1"
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), query).await.unwrap().unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn psql_connects_end_to_end_with_sslmode_prefer() {
    let b = broker(config()).await;
    let addr = b.local_addr();
    let out = tokio::process::Command::new("psql")
        .arg(format!("postgres://postgres@{}:{}/bench?sslmode=prefer", addr.ip(), addr.port()))
        .args(["-X", "-A", "-t", "-c", "SELECT 'via ' || 'pgbroker'"])
        .env("PGPASSWORD", "postgres")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via pgbroker");
}

#[tokio::test]
async fn idle_transaction_timeout_applies_in_session_mode_too() {
    let mut cfg = single_server_config();
    cfg.broker.idle_transaction_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT 1").await.unwrap();
    // Idle past the timeout outside a transaction: nothing is supposed to happen, so there
    // is nothing to wait for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.simple_query("SELECT 1").await.expect("idle outside a transaction is fine");
    c.simple_query("BEGIN").await.unwrap();
    eventually("the broker to end the client", Duration::from_secs(5), || async { c.is_closed() }).await;
    assert!(c.simple_query("SELECT 1").await.is_err(), "idle inside a transaction ends the client");
    let next = connect_bench(b.local_addr()).await;
    let row = next.query_one("SELECT pg_current_xact_id_if_assigned() IS NULL", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the server was rolled back");
}

/// A CancelRequest packet for key (`pid`, `secret`).
fn cancel_packet(pid: i32, secret: i32) -> Vec<u8> {
    [16i32, 80_877_102, pid, secret].iter().flat_map(|v| v.to_be_bytes()).collect()
}

#[tokio::test]
async fn cancel_requests_past_the_hosts_rate_are_dropped_and_a_real_one_lands_after() {
    let b = broker(config()).await;
    let addr = b.local_addr();
    let started = Instant::now();
    // 500 guessed keys at once from one host, each from its own loopback address.
    let guesses = (0..500).map(|i: i32| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from(([127, 0, 1, (i % 250) as u8 + 1], 0))).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        send(&mut s, &cancel_packet(i, i)).await;
        read_until_close(&mut s, Duration::from_secs(10)).await
    });
    futures_util::future::join_all(guesses).await;
    let elapsed = started.elapsed();
    let cancels = b.app().cancels();
    let looked_up = cancels.unknown.load(std::sync::atomic::Ordering::Relaxed)
        + cancels.forwarded.load(std::sync::atomic::Ordering::Relaxed);
    let limited = cancels.rate_limited.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(looked_up + limited, 500, "every request was answered by a close");
    let allowed = u64::from(pgbroker::cancel::CANCELS_PER_SECOND) * (elapsed.as_secs() + 1);
    assert!(looked_up <= allowed, "{looked_up} keys looked up in {elapsed:?}");
    // A client's own cancel still lands once the host's second has passed.
    let c = connect_bench(addr).await;
    let token = c.cancel_token();
    let query = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(20) /* rate */").await });
    let server = direct("bench").await;
    eventually("the query to run on the server", Duration::from_secs(10), || async {
        let running =
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20) /* rate */' AND state = 'active'";
        one(&server, running).await == "1"
    })
    .await;
    eventually("a cancel to land", Duration::from_secs(10), || async {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        // Until it ends, or the next cancel if this one was still over the rate.
        poll(Duration::from_millis(500), || async { query.is_finished() }).await.is_ok()
    })
    .await;
    let e = query.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_connect_at_once_to_a_pool_of_twenty_and_all_are_served() {
    // Trust: 500 SCRAM exchanges of a debug build, 30 at a time from one host (the login
    // throttle), are not what this tests.
    let mut cfg = config_with("trust", "");
    cfg.databases.get_mut("bench").unwrap().pool_size = Some(20);
    cfg.broker.query_wait_timeout = Duration::from_secs(60);
    cfg.broker.client_login_timeout = Duration::from_secs(60);
    let b = broker(cfg).await;
    let addr = b.local_addr();
    // Every client logs in while none holds a server: logins cost none.
    let clients: Vec<_> = futures_util::future::join_all((0..500).map(|_| connect_bench(addr))).await;
    let pool = b.app().registry().pools().all().into_iter().find(|p| p.key().database == "bench").unwrap();
    let stats = pool.stats();
    assert_eq!(stats.idle, stats.open, "no logged-in client holds a server: {stats:?}");
    // Then each runs a query and leaves, handing its server to one still waiting.
    let answers = clients.into_iter().enumerate().map(|(i, c)| async move {
        let i = i as i32;
        let got: i32 = c.query_one("SELECT $1::int4 * 2", &[&i]).await.unwrap().get(0);
        assert_eq!(got, i * 2);
    });
    futures_util::future::join_all(answers).await;
}
