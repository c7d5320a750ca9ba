//! Transaction and statement pooling against the real PostgreSQL.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::config::PoolMode;
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn transaction_mode_runs_simple_queries() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    assert_eq!(one(&c, "SELECT 1 + 1").await, "2");
    assert_eq!(col(&c, "SELECT 1; SELECT 2").await, ["1", "2"]);
}

#[tokio::test]
async fn server_is_held_for_the_whole_transaction_and_released_after() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("BEGIN").await.unwrap();
    let p1 = one(&c, "SELECT pg_backend_pid()").await;
    let p2 = one(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(p1, p2, "one server for the whole transaction");
    let pool = &b.app().registry().pools().all()[0];
    assert_eq!(pool.stats().idle, 0, "held while in the transaction");
    c.simple_query("COMMIT").await.unwrap();
    eventually("released at ReadyForQuery 'I'", Duration::from_secs(5), || async {
        let stats = pool.stats();
        if stats.idle == stats.open { Ok(()) } else { Err(stats) }
    })
    .await;
}

#[tokio::test]
async fn pipelined_extended_queries_with_several_syncs_complete_in_order() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    let futs = (0..40).map(|i| {
        let c = &c;
        async move {
            let rows = c.query_typed("SELECT $1::int * 3", &[(&i, tokio_postgres::types::Type::INT4)]).await.unwrap();
            rows[0].get::<_, i32>(0)
        }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..40).map(|i| i * 3).collect::<Vec<_>>());
}

#[tokio::test]
async fn raw_pipeline_of_two_syncs_in_one_write_gets_both_replies() {
    use tokio::io::AsyncReadExt;
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    cfg.auth.kind = pgbroker::config::AuthType::Trust;
    let b = broker(cfg).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let idle = [b'Z', 0, 0, 0, 5, b'I'];
    while !got.ends_with(&idle) {
        let n = s.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    // Parse/Bind/Execute/Sync twice, unnamed, in one write.
    let mut out = Vec::new();
    for v in ["11", "22"] {
        let sql = format!("SELECT {v}");
        let mut parse = vec![0u8];
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        out.extend(msg(b'P', &parse));
        out.extend(msg(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        out.extend(msg(b'E', &[0, 0, 0, 0, 0]));
        out.extend(msg(b'S', &[]));
    }
    send(&mut s, &out).await;
    let mut reply = Vec::new();
    while reply.windows(6).filter(|w| *w == idle).count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    let (a, b2) = (text.find("11").unwrap(), text.find("22").unwrap());
    assert!(a < b2, "replies in order");
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[tokio::test]
async fn error_inside_transaction_keeps_the_server_until_rollback() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(sqlstate(&c.simple_query("SELECT 1/0").await.unwrap_err()), "22012");
    let pool = &b.app().registry().pools().all()[0];
    assert_eq!(pool.stats().idle, 0, "the failed transaction keeps its server");
    assert_eq!(sqlstate(&c.simple_query("SELECT 1").await.unwrap_err()), "25P02");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(one(&c, "SELECT 5").await, "5");
}

#[tokio::test]
async fn client_killed_mid_transaction_leaves_no_trace_for_the_next_client() {
    let b = broker(mode_config(PoolMode::Transaction, 1)).await;
    let setup = connect_bench(b.local_addr()).await;
    setup.simple_query("CREATE TABLE IF NOT EXISTS txn_leak (i int)").await.unwrap();
    let victim = connect_bench(b.local_addr()).await;
    victim.simple_query("BEGIN").await.unwrap();
    let pid = one(&victim, "SELECT pg_backend_pid()").await;
    victim.simple_query("INSERT INTO txn_leak VALUES (1); SET LOCAL work_mem = '9MB'").await.unwrap();
    drop(victim);
    let next = connect_bench(b.local_addr()).await;
    let row = col(
        &next,
        "SELECT pg_backend_pid() || ' ' || (SELECT count(*) FROM txn_leak) || ' ' || \
         (pg_current_xact_id_if_assigned() IS NULL) || ' ' || current_setting('work_mem')",
    )
    .await;
    assert_eq!(row[0], format!("{pid} 0 true 4MB"), "same server, rolled back, not in the old transaction");
}

#[tokio::test]
async fn copy_in_and_out_work_in_transaction_mode() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("CREATE TABLE IF NOT EXISTS txn_copy (id int, v text); TRUNCATE txn_copy").await.unwrap();
    let addr = b.local_addr();
    let url = format!("postgres://postgres@{}:{}/bench", addr.ip(), addr.port());
    let data: String = (0..3000).map(|i| format!("{i}\trow-{i}\n")).collect();
    let mut child = tokio::process::Command::new("psql")
        .args([&url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "COPY txn_copy FROM STDIN"])
        .env("PGPASSWORD", "postgres")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(data.as_bytes()).await.unwrap();
    drop(stdin);
    assert!(child.wait().await.unwrap().success());
    let out = tokio::process::Command::new("psql")
        .args([&url, "-X", "-q", "-c", "COPY (SELECT * FROM txn_copy ORDER BY id) TO STDOUT"])
        .env("PGPASSWORD", "postgres")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), data);
}

#[tokio::test]
async fn statement_mode_refuses_transaction_blocks_and_stays_usable() {
    let b = broker(mode_config(PoolMode::Statement, 1)).await;
    let c = connect_bench(b.local_addr()).await;
    let e = c.simple_query("BEGIN").await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert!(e.as_db_error().unwrap().message().contains("statement pooling"));
    assert_eq!(one(&c, "SELECT pg_current_xact_id_if_assigned() IS NULL AND now() = statement_timestamp()").await, "t");
    assert_eq!(col(&c, "SELECT 1; SELECT 2").await, ["1", "2"], "a multi-statement query is one statement");
}

#[tokio::test]
async fn tracked_settings_follow_the_client_across_servers() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let addr = b.local_addr();
    let a = connect_bench(addr).await;
    let other = connect_bench(addr).await;
    let default_tz = one(&other, "SHOW TimeZone").await;
    a.simple_query("SET TimeZone = 'Asia/Tokyo'; SET search_path = pg_catalog, public; SET application_name = 'app-a'")
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for i in 0..12 {
        // The other client holds one server now and then, so `a` lands on both.
        if i % 2 == 0 {
            other.simple_query("BEGIN").await.unwrap();
            let _ = one(&other, "SELECT 1").await;
        }
        let row = one(
            &a,
            "SELECT pg_backend_pid() || '|' || current_setting('TimeZone') || '|' || current_setting('search_path') || '|' || current_setting('application_name')",
        )
        .await;
        let parts: Vec<&str> = row.split('|').collect();
        pids.insert(parts[0].to_string());
        assert_eq!(&parts[1..], ["Asia/Tokyo", "pg_catalog, public", "app-a"], "iteration {i}");
        if i % 2 == 0 {
            other.simple_query("COMMIT").await.unwrap();
        }
    }
    assert!(pids.len() >= 2, "the client moved between servers: {pids:?}");
    assert_eq!(one(&other, "SHOW TimeZone").await, default_tz, "the other client keeps its own setting");
    assert_ne!(one(&other, "SHOW application_name").await, "app-a");
}

#[tokio::test]
async fn startup_settings_apply_on_every_server_in_transaction_mode() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let conn = format!(
        "{} application_name=startup-app options='-c statement_timeout=1234'",
        conninfo(b.local_addr(), "postgres", "postgres", "bench")
    );
    let (c, task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(task);
    let plain = connect_bench(b.local_addr()).await;
    for _ in 0..6 {
        plain.simple_query("BEGIN").await.unwrap();
        let _ = one(&plain, "SELECT 1").await;
        assert_eq!(
            one(&c, "SELECT current_setting('application_name') || ' ' || current_setting('statement_timeout')").await,
            "startup-app 1234ms"
        );
        plain.simple_query("COMMIT").await.unwrap();
        assert_eq!(one(&plain, "SHOW statement_timeout").await, "0", "not leaked to other clients");
    }
}

#[tokio::test]
async fn query_wait_timeout_in_transaction_mode_gives_53300() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.broker.query_wait_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = connect_bench(b.local_addr()).await;
    let e = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    let m = e.as_db_error().unwrap().message().to_string();
    assert!(m.contains("query_wait_timeout") && m.contains("bench/postgres"), "{m}");
}
