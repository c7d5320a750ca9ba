//! Named prepared statements through transaction mode, with fewer servers than clients so
//! that every client keeps landing on servers it has not used before.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::config::PoolMode;
use std::collections::HashSet;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_prepare_and_execute_across_rotating_servers() {
    // A budget of 3 servers for 24 clients.
    let mut cfg = mode_config(PoolMode::Transaction, 3);
    cfg.budget.server_max_connections = pgbroker::config::ServerMaxConnections::Fixed(8);
    cfg.budget.reserved_connections = 5;
    let b = broker(cfg).await;
    let addr = b.local_addr();
    let tasks: Vec<_> = (0..24)
        .map(|id: i32| {
            tokio::spawn(async move {
                let c = connect_bench(addr).await;
                // The same text in every client, and one of its own.
                let shared = c.prepare("SELECT $1::int + 1000").await.unwrap();
                let own = c.prepare(&format!("SELECT $1::int * {}", id + 1)).await.unwrap();
                let mut pids = HashSet::new();
                for i in 0..60 {
                    let a: i32 = c.query_one(&shared, &[&i]).await.unwrap().get(0);
                    let m: i32 = c.query_one(&own, &[&i]).await.unwrap().get(0);
                    assert_eq!((a, m), (i + 1000, i * (id + 1)), "client {id} iteration {i}");
                    if i % 10 == 0 {
                        // A fresh, short-lived statement: tokio-postgres closes it on drop.
                        let tmp = c.prepare("SELECT pg_backend_pid()").await.unwrap();
                        pids.insert(c.query_one(&tmp, &[]).await.unwrap().get::<_, i32>(0));
                    }
                }
                pids.len()
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(120), futures_util::future::join_all(tasks)).await.unwrap();
    let moved = results.into_iter().map(|r| r.unwrap()).filter(|n| *n > 1).count();
    assert!(moved > 0, "clients ran on several servers");
}

#[tokio::test]
async fn pipelined_prepared_queries_complete_in_order() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    let futs = (0..50).map(|i| {
        let (c, stmt) = (&c, &stmt);
        async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..50).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn prepared_statement_survives_a_transaction_on_another_server() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let addr = b.local_addr();
    let c = connect_bench(addr).await;
    let other = connect_bench(addr).await;
    let stmt = c.prepare("SELECT pg_backend_pid()").await.unwrap();
    let first: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
    // Hold the server `c` used, so its next transaction must run elsewhere.
    other.simple_query("BEGIN").await.unwrap();
    let held: i32 = other.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let second: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
    if held == first {
        assert_ne!(second, first, "ran on the other server");
    }
    other.simple_query("COMMIT").await.unwrap();
}

#[tokio::test]
async fn errors_of_a_dropped_table_reach_the_client_and_the_connection_recovers() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query(
        "DROP TABLE IF EXISTS ps_dropped; CREATE TABLE ps_dropped (id int); INSERT INTO ps_dropped VALUES (7)",
    )
    .await
    .unwrap();
    let stmt = c.prepare("SELECT id FROM ps_dropped").await.unwrap();
    assert_eq!(c.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 7);
    c.simple_query("DROP TABLE ps_dropped").await.unwrap();
    let e = c.query(&stmt, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    c.simple_query("CREATE TABLE ps_dropped (id int); INSERT INTO ps_dropped VALUES (8)").await.unwrap();
    assert_eq!(c.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 8, "recreated table, same statement");
    assert_eq!(one(&c, "SELECT 1").await, "1");
}

#[tokio::test]
async fn statement_errors_inside_a_transaction_keep_the_connection_usable() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    let div = c.prepare("SELECT 1 / $1::int").await.unwrap();
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(sqlstate(&c.query(&div, &[&0i32]).await.unwrap_err()), "22012");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(c.query_one(&div, &[&1i32]).await.unwrap().get::<_, i32>(0), 1);
}

/// A transaction-mode broker with a pool of `size` and trust auth, for raw sessions.
async fn trust_broker(size: u32) -> pgbroker::app::Broker {
    let mut cfg = mode_config(PoolMode::Transaction, size);
    cfg.auth.kind = pgbroker::config::AuthType::Trust;
    broker(cfg).await
}

/// A raw logged-in connection (trust auth) to a transaction-mode broker.
async fn raw_session(b: &pgbroker::app::Broker) -> tokio::net::TcpStream {
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    read_until_idle(&mut s).await;
    s
}

async fn read_until_idle(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = format!("{name}\0{sql}\0").into_bytes();
    body.extend_from_slice(&[0, 0]);
    msg(b'P', &body)
}

fn bind_execute(stmt: &str) -> Vec<u8> {
    let mut bind = format!("\0{stmt}\0").into_bytes();
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    [msg(b'B', &bind), msg(b'E', &[0, 0, 0, 0, 0])].concat()
}

/// Message tags in a reply, in order.
fn tags(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        out.push(rest[0] as char);
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = &rest[1 + len..];
    }
    out
}

#[tokio::test]
async fn close_then_parse_of_the_same_name_with_new_text() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    send(&mut s, &[parse("st", "SELECT 'one'"), bind_execute("st"), msg(b'S', b"")].concat()).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "12DCZ");
    assert!(String::from_utf8_lossy(&r).contains("one"));
    let mut close = vec![b'S'];
    close.extend_from_slice(b"st\0");
    send(&mut s, &[msg(b'C', &close), parse("st", "SELECT 'two'"), bind_execute("st"), msg(b'S', b"")].concat()).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "312DCZ", "CloseComplete, ParseComplete, then the new statement's result");
    assert!(String::from_utf8_lossy(&r).contains("two"));
}

#[tokio::test]
async fn pipeline_of_parse_bind_execute_times_n_then_one_sync() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.extend(parse(&format!("p{i}"), &format!("SELECT {i} AS n")));
        batch.extend(bind_execute(&format!("p{i}")));
    }
    batch.extend(msg(b'S', b""));
    send(&mut s, &batch).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), format!("{}Z", "12DC".repeat(20)));
    // Again on a connection whose server may differ: the names still work, with no new Parse.
    let mut again = Vec::new();
    for i in 0..20 {
        again.extend(bind_execute(&format!("p{i}")));
    }
    again.extend(msg(b'S', b""));
    send(&mut s, &again).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), format!("{}Z", "2DC".repeat(20)));
}

#[tokio::test]
async fn deallocate_sql_acts_on_the_clients_own_statements() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    send(&mut s, &[parse("mystmt", "SELECT 1"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "1Z");
    send(&mut s, &msg(b'Q', b"DEALLOCATE mystmt\0")).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "CZ");
    assert!(String::from_utf8_lossy(&r).contains("DEALLOCATE"));
    // Gone from the client's map: the server's own answer comes back for the unknown name.
    send(&mut s, &[bind_execute("mystmt"), msg(b'S', b"")].concat()).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "EZ");
    assert!(String::from_utf8_lossy(&r).contains("26000"));
    send(&mut s, &[parse("again", "SELECT 2"), msg(b'S', b""), msg(b'Q', b"DEALLOCATE ALL\0")].concat()).await;
    let r = read_until_idle(&mut s).await;
    assert!(tags(&r).starts_with("1Z"), "{}", tags(&r));
    let r = if tags(&r).ends_with("CZ") { r } else { read_until_idle(&mut s).await };
    assert!(String::from_utf8_lossy(&r).contains("DEALLOCATE ALL"));
    send(&mut s, &[bind_execute("again"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "EZ", "DEALLOCATE ALL dropped the client's statements");
}

#[tokio::test]
async fn prepared_statements_off_passes_names_through() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.broker.max_prepared_statements = 0;
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    let _s0 = c.prepare("SELECT 1").await.unwrap();
    let names = col(&c, "SELECT name FROM pg_prepared_statements").await;
    // tokio-postgres's own name (s<N>), not a broker name: the statement was passed through.
    assert!(names.len() == 1 && names[0].starts_with('s') && !names[0].starts_with("pgb_"), "{names:?}");
}

#[tokio::test]
async fn pgbench_prepared_with_100_clients_has_no_failures() {
    let pg = pg();
    let exists = pg.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'ps_bench'").unwrap();
    if exists == "0" {
        pg.psql("postgres", "CREATE DATABASE ps_bench").unwrap();
    }
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", "postgres", "ps_bench"])
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut cfg = mode_config(PoolMode::Transaction, 10);
    let mut db = cfg.databases["bench"].clone();
    db.dbname = "ps_bench".into();
    cfg.databases.insert("ps_bench".into(), db);
    let b = broker(cfg).await;
    let addr = b.local_addr();
    let out = tokio::process::Command::new("pgbench")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "postgres", "-n"])
        .args(["-c", "100", "-j", "2", "-t", "20", "-M", "prepared", "ps_bench"])
        .env("PGPASSWORD", "postgres")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of transactions actually processed: 2000/2000"), "{text}");
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
}

#[tokio::test]
async fn parse_and_sync_alone_is_answered_without_a_server_and_errors_come_at_first_use() {
    let b = trust_broker(1).await;
    // The only server is held by another client's open transaction...
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("BEGIN").await.unwrap();
    // ...yet a PQprepare-style Parse + Sync is answered at once.
    let mut s = raw_session(&b).await;
    send(&mut s, &[parse("bad", "SELEC oops"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "1Z");
    holder.simple_query("COMMIT").await.unwrap();
    // The syntax error surfaces at the first execution, and the connection carries on.
    send(&mut s, &[bind_execute("bad"), msg(b'S', b"")].concat()).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "EZ");
    assert!(String::from_utf8_lossy(&r).contains("42601"));
    send(&mut s, &[parse("good", "SELECT 5"), bind_execute("good"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "12DCZ");
}

#[tokio::test]
async fn added_column_under_select_star_is_handled_invisibly_outside_a_transaction() {
    let b = trust_broker(2).await;
    let admin = direct("bench").await;
    admin
        .simple_query("DROP TABLE IF EXISTS ps_alter; CREATE TABLE ps_alter (id int); INSERT INTO ps_alter VALUES (1)")
        .await
        .unwrap();
    let mut s = raw_session(&b).await;
    let describe_portal = msg(b'D', b"P\0");
    let run = |stmt: &str| {
        let mut bind = format!("\0{stmt}\0").into_bytes();
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        [msg(b'B', &bind), describe_portal.clone(), msg(b'E', &[0, 0, 0, 0, 0]), msg(b'S', b"")].concat()
    };
    send(&mut s, &[parse("star", "SELECT * FROM ps_alter"), run("star")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "12TDCZ");
    admin.simple_query("ALTER TABLE ps_alter ADD COLUMN note text DEFAULT 'new'").await.unwrap();
    // The server now answers the cached statement with 0A000; the client never sees it.
    send(&mut s, &run("star")).await;
    let r = read_until_idle(&mut s).await;
    assert_eq!(tags(&r), "2TDCZ", "{:?}", String::from_utf8_lossy(&r));
    assert!(String::from_utf8_lossy(&r).contains("note"), "the new column is described");
    // Other clients on other servers get the fresh statement too.
    let c = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap();
    let stmt = c.prepare("SELECT * FROM ps_alter").await.unwrap();
    assert_eq!(stmt.columns().len(), 2);
    assert_eq!(c.query_one(&stmt, &[]).await.unwrap().get::<_, String>(1), "new");
}

#[tokio::test]
async fn stale_plan_inside_a_transaction_reaches_the_client_and_is_fixed_afterwards() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let admin = direct("bench").await;
    admin
        .simple_query(
            "DROP TABLE IF EXISTS ps_alter_tx; CREATE TABLE ps_alter_tx (id int); INSERT INTO ps_alter_tx VALUES (1)",
        )
        .await
        .unwrap();
    let c = connect_bench(b.local_addr()).await;
    let stmt = c.prepare("SELECT * FROM ps_alter_tx").await.unwrap();
    c.query(&stmt, &[]).await.unwrap();
    admin.simple_query("ALTER TABLE ps_alter_tx ADD COLUMN extra int DEFAULT 2").await.unwrap();
    c.simple_query("BEGIN").await.unwrap();
    let e = c.query(&stmt, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    c.simple_query("ROLLBACK").await.unwrap();
    // No server keeps using the stale statement: preparing the same text again, from this
    // client or another, gets the new shape wherever it runs.
    for client in [&c, &connect_bench(b.local_addr()).await] {
        let fresh = client.prepare("SELECT * FROM ps_alter_tx").await.unwrap();
        assert_eq!(fresh.columns().len(), 2);
        let row = client.query_one(&fresh, &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), 2);
    }
    drop(stmt);
}

/// Another client gets the only server within 5 s: nobody is holding it.
async fn the_only_server_is_free(b: &pgbroker::app::Broker) {
    let other = connect_bench(b.local_addr()).await;
    let served = tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1")).await;
    assert!(matches!(served, Ok(Ok(_))), "the server stayed pinned to the first client");
}

#[tokio::test]
async fn a_deallocate_answered_by_the_broker_leaves_the_server_free() {
    let b = trust_broker(1).await;
    let mut s = raw_session(&b).await;
    send(&mut s, &[parse("mystmt", "SELECT 1"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "1Z");
    send(&mut s, &msg(b'Q', b"DEALLOCATE mystmt\0")).await;
    assert_eq!(tags(&read_until_idle(&mut s).await), "CZ");
    the_only_server_is_free(&b).await;
}

#[tokio::test]
async fn an_extended_protocol_copy_from_stdin_leaves_the_server_free() {
    use futures_util::SinkExt;
    let b = trust_broker(1).await;
    let c = connect_bench(b.local_addr()).await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS copy_target (n int)").await.unwrap();
    let sink = c.copy_in("COPY copy_target (n) FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n")).await.unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 2);
    assert_eq!(one(&c, "SELECT 'after the copy'").await, "after the copy");
    the_only_server_is_free(&b).await;
}

/// The SQLSTATE and message of the first ErrorResponse in `bytes`.
fn error_fields(bytes: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(bytes);
    let field = |k: char| {
        text.split('\0').find_map(|f| f.strip_prefix(k).filter(|_| f.len() > 1)).unwrap_or_default().to_string()
    };
    (error_code(bytes).unwrap_or_default(), field('M'))
}

#[tokio::test]
async fn statement_names_differing_only_in_case_are_two_statements() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    let batch = [
        parse("S1", "SELECT 'upper'"),
        parse("s1", "SELECT 'lower'"),
        bind_execute("S1"),
        bind_execute("s1"),
        msg(b'S', b""),
    ];
    let r = read_after(&mut s, &batch.concat()).await;
    assert_eq!(tags(&r), "112DC2DCZ", "{:?}", String::from_utf8_lossy(&r));
    let text = String::from_utf8_lossy(&r);
    assert!(text.find("upper").unwrap() < text.find("lower").unwrap(), "{text}");
    // Again, each name on its own.
    let r = read_after(&mut s, &[bind_execute("s1"), msg(b'S', b"")].concat()).await;
    assert!(String::from_utf8_lossy(&r).contains("lower"));
    let r = read_after(&mut s, &[bind_execute("S1"), msg(b'S', b"")].concat()).await;
    assert!(String::from_utf8_lossy(&r).contains("upper"));
}

/// Reads until a ReadyForQuery with `status`.
async fn read_until_ready(s: &mut tokio::net::TcpStream, status: u8) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, status]) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

async fn read_after(s: &mut tokio::net::TcpStream, bytes: &[u8]) -> Vec<u8> {
    send(s, bytes).await;
    read_until_idle(s).await
}

#[tokio::test]
async fn deallocate_folds_unquoted_names_to_lower_case_and_keeps_quoted_ones() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    let both = [parse("S1", "SELECT 'upper'"), parse("s1", "SELECT 'lower'"), msg(b'S', b"")].concat();
    assert_eq!(tags(&read_after(&mut s, &both).await), "11Z");
    // Unquoted: folded, so it names "s1".
    assert_eq!(tags(&read_after(&mut s, &msg(b'Q', b"DEALLOCATE S1\0")).await), "CZ");
    let r = read_after(&mut s, &[bind_execute("s1"), msg(b'S', b"")].concat()).await;
    assert_eq!(error_code(&r).as_deref(), Some("26000"));
    let r = read_after(&mut s, &[bind_execute("S1"), msg(b'S', b"")].concat()).await;
    assert!(String::from_utf8_lossy(&r).contains("upper"), "\"S1\" is still there");
    // Quoted: exact.
    assert_eq!(tags(&read_after(&mut s, &msg(b'Q', b"DEALLOCATE \"S1\"\0")).await), "CZ");
    let r = read_after(&mut s, &[bind_execute("S1"), msg(b'S', b"")].concat()).await;
    assert_eq!(error_code(&r).as_deref(), Some("26000"));
}

#[tokio::test]
async fn deallocate_folds_only_ascii_letters_as_postgresql_does_in_utf8() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    assert_eq!(tags(&read_after(&mut s, &[parse("ÉTAT", "SELECT 1"), msg(b'S', b"")].concat()).await), "1Z");
    // PostgreSQL folds `ÉTAT` to "État": the statement is not that one.
    let r = read_after(&mut s, &msg(b'Q', "DEALLOCATE ÉTAT\0".as_bytes())).await;
    assert_eq!(error_code(&r).as_deref(), Some("26000"), "{:?}", String::from_utf8_lossy(&r));
    assert_eq!(tags(&read_after(&mut s, &[parse("Étau", "SELECT 1"), msg(b'S', b"")].concat()).await), "1Z");
    // ...and `ÉTAU` names "Étau".
    assert_eq!(tags(&read_after(&mut s, &msg(b'Q', "DEALLOCATE ÉTAU\0".as_bytes())).await), "CZ");
}

#[tokio::test]
async fn parse_of_a_live_statement_name_fails_with_42p05_and_skips_to_sync() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    assert_eq!(tags(&read_after(&mut s, &[parse("dup", "SELECT 'first'"), msg(b'S', b"")].concat()).await), "1Z");
    let batch = [
        parse("other", "SELECT 'other'"),
        bind_execute("other"),
        parse("dup", "SELECT 'second'"),
        bind_execute("dup"),
        msg(b'S', b""),
    ];
    let r = read_after(&mut s, &batch.concat()).await;
    // What came before runs; the Parse fails; its Bind and Execute are skipped.
    assert_eq!(tags(&r), "12DCEZ", "{:?}", String::from_utf8_lossy(&r));
    let (code, message) = error_fields(&r);
    assert_eq!((code.as_str(), message.as_str()), ("42P05", "prepared statement \"dup\" already exists"));
    // The live statement is the first one still.
    let r = read_after(&mut s, &[bind_execute("dup"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&r), "2DCZ");
    assert!(String::from_utf8_lossy(&r).contains("first"));
}

#[tokio::test]
async fn parse_and_sync_of_a_live_statement_name_fails_with_42p05() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    assert_eq!(tags(&read_after(&mut s, &[parse("dup", "SELECT 1"), msg(b'S', b"")].concat()).await), "1Z");
    let r = read_after(&mut s, &[parse("dup", "SELECT 2"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&r), "EZ");
    assert_eq!(error_code(&r).as_deref(), Some("42P05"));
}

#[tokio::test]
async fn a_duplicate_parse_aborts_the_transaction_as_postgresql_does() {
    let b = trust_broker(2).await;
    let admin = direct("bench").await;
    admin.simple_query("DROP TABLE IF EXISTS ps_dup_tx; CREATE TABLE ps_dup_tx (n int)").await.unwrap();
    let mut s = raw_session(&b).await;
    assert_eq!(tags(&read_after(&mut s, &[parse("dup", "SELECT 1"), msg(b'S', b"")].concat()).await), "1Z");
    send(&mut s, &msg(b'Q', b"BEGIN; INSERT INTO ps_dup_tx VALUES (1)\0")).await;
    read_until_ready(&mut s, b'T').await;
    send(&mut s, &[parse("dup", "SELECT 2"), msg(b'S', b"")].concat()).await;
    let r = read_until_ready(&mut s, b'E').await;
    assert_eq!(error_code(&r).as_deref(), Some("42P05"));
    let r = read_after(&mut s, &msg(b'Q', b"COMMIT\0")).await;
    assert!(String::from_utf8_lossy(&r).contains("ROLLBACK"), "{:?}", String::from_utf8_lossy(&r));
    assert_eq!(one(&admin, "SELECT count(*) FROM ps_dup_tx").await, "0");
}

#[tokio::test]
async fn a_parse_of_the_same_name_by_another_client_is_not_a_duplicate() {
    let b = trust_broker(1).await;
    let mut first = raw_session(&b).await;
    let mut second = raw_session(&b).await;
    let batch = |text: &str| [parse("same", text), bind_execute("same"), msg(b'S', b"")].concat();
    let r = read_after(&mut first, &batch("SELECT 'one'")).await;
    assert_eq!(tags(&r), "12DCZ");
    let r = read_after(&mut second, &batch("SELECT 'two'")).await;
    assert_eq!(tags(&r), "12DCZ");
    assert!(String::from_utf8_lossy(&r).contains("two"));
}

#[tokio::test]
async fn the_unnamed_statement_is_replaced_silently() {
    let b = trust_broker(2).await;
    let mut s = raw_session(&b).await;
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let batch = [
        parse("", "SELECT 'a'"),
        parse("", "SELECT 'b'"),
        msg(b'B', &bind),
        msg(b'E', &[0, 0, 0, 0, 0]),
        msg(b'S', b""),
    ];
    let r = read_after(&mut s, &batch.concat()).await;
    assert_eq!(tags(&r), "112DCZ");
    assert!(String::from_utf8_lossy(&r).contains('b'));
}
