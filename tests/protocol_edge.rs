//! Hostile and broken input: each ends only the offending client, with a clear error.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// After each abuse, an ordinary client must still get its query answered.
async fn other_client_still_works(addr: std::net::SocketAddr) {
    let c = connect_bench(addr).await;
    let row = c.query_one("SELECT 'still here'::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "still here");
}

/// A logged-in raw connection (trust auth) whose welcome has been read.
async fn logged_in(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let mut s = raw(addr).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test]
async fn garbage_startup_packet_gets_08p01_and_others_carry_on() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn oversized_startup_length_is_refused_without_buffering() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    let mut pkt = 0x7fff_ffffi32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&(3i32 << 16).to_be_bytes());
    send(&mut s, &pkt).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn truncated_startup_packet_then_close_affects_no_one_else() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    let pkt = startup_packet(&[("user", "postgres"), ("database", "bench")]);
    send(&mut s, &pkt[..pkt.len() / 2]).await;
    s.shutdown().await.unwrap();
    drop(s);
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn silent_client_is_dropped_after_client_login_timeout() {
    let mut cfg = config_with("trust", "");
    cfg.broker.client_login_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &[0, 0, 0]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    assert!(String::from_utf8_lossy(&reply).contains("client_login_timeout"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn message_length_below_four_after_login_gets_08p01() {
    let b = broker(config_with("trust", "")).await;
    let mut s = logged_in(b.local_addr()).await;
    send(&mut s, &[b'Q', 0, 0, 0, 2]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn message_over_max_packet_size_gets_08p01() {
    let mut cfg = config_with("trust", "");
    cfg.broker.max_packet_size = 64 * 1024;
    let b = broker(cfg).await;
    let mut s = logged_in(b.local_addr()).await;
    send(&mut s, &[b'Q', 0x10, 0, 0, 0]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    assert!(String::from_utf8_lossy(&reply).contains("max_packet_size"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn truncated_message_then_disconnect_closes_the_dirty_server() {
    let mut cfg = config_with("trust", "");
    cfg.databases.get_mut("bench").unwrap().pool_size = Some(1);
    let b = broker(cfg).await;
    let mut s = logged_in(b.local_addr()).await;
    // Half a Query: the server never saw a whole message, but the broker must not trust it.
    send(&mut s, &[b'Q', 0, 0, 0, 100, b'S', b'E']).await;
    drop(s);
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn random_bytes_from_many_clients_never_take_the_broker_down() {
    let b = broker(config_with("trust", "")).await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..40 {
        let mut s = raw(b.local_addr()).await;
        let mut junk = vec![0u8; 16 + round * 7];
        for byte in &mut junk {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        if round % 2 == 0 {
            // A valid startup first, then junk as protocol messages.
            let pkt = startup_packet(&[("user", "postgres"), ("database", "bench")]);
            let _ = s.write_all(&pkt).await;
        }
        let _ = s.write_all(&junk).await;
        let _ = read_until_close(&mut s, Duration::from_millis(200)).await;
    }
    other_client_still_works(b.local_addr()).await;
}

/// A broker with database `bench` in `mode`, a pool of `size` and trust auth.
async fn trust_broker(mode: pgbroker::config::PoolMode, size: u32) -> pgbroker::app::Broker {
    let mut cfg = mode_config(mode, size);
    cfg.auth.kind = pgbroker::config::AuthType::Trust;
    broker(cfg).await
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal.
fn parse_bind_execute(sql: &str) -> Vec<u8> {
    let mut parse = format!("\0{sql}\0").into_bytes();
    parse.extend_from_slice(&[0, 0]);
    let bind = [0, 0, 0, 0, 0, 0, 0, 0];
    [msg(b'P', &parse), msg(b'B', &bind), msg(b'E', &[0, 0, 0, 0, 0])].concat()
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

/// Reads until a ReadyForQuery arrives; returns everything read.
async fn read_until_ready(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !tags(&got).ends_with('Z') {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Message tags of the whole messages in `bytes`, in order.
fn tags(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < 1 + len {
            break;
        }
        out.push(rest[0] as char);
        rest = &rest[1 + len..];
    }
    out
}

/// Another client gets the only server within 5 s: nobody is holding it.
async fn the_only_server_is_free(b: &pgbroker::app::Broker) {
    let other = connect_bench(b.local_addr()).await;
    let served = tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1")).await;
    assert!(matches!(served, Ok(Ok(_))), "the server stayed pinned to the first client");
}

#[tokio::test]
async fn a_query_pipelined_behind_an_extended_protocol_error_leaves_the_server_free() {
    let b = trust_broker(pgbroker::config::PoolMode::Transaction, 1).await;
    let mut s = logged_in(b.local_addr()).await;
    // PostgreSQL skips the Query (no reply at all) up to the Sync.
    let batch = [parse_bind_execute("SELECT * FROM no_such_table"), query("SELECT 1"), msg(b'S', b"")].concat();
    send(&mut s, &batch).await;
    let r = read_until_ready(&mut s).await;
    assert_eq!(tags(&r), "EZ");
    assert_eq!(error_code(&r).as_deref(), Some("42P01"));
    the_only_server_is_free(&b).await;
}

#[tokio::test]
async fn a_function_call_pipelined_behind_an_extended_protocol_error_leaves_the_server_free() {
    let b = trust_broker(pgbroker::config::PoolMode::Transaction, 1).await;
    let mut s = logged_in(b.local_addr()).await;
    // FunctionCall of pg_backend_pid (oid 2026): no argument formats, no arguments, text result.
    let call = msg(b'F', &[0, 0, 0x07, 0xea, 0, 0, 0, 0, 0, 0]);
    send(&mut s, &[parse_bind_execute("SELECT * FROM no_such_table"), call, msg(b'S', b"")].concat()).await;
    let r = read_until_ready(&mut s).await;
    assert_eq!(tags(&r), "EZ");
    the_only_server_is_free(&b).await;
}

#[tokio::test]
async fn a_query_sent_after_an_extended_protocol_error_arrived_leaves_the_server_free() {
    let b = trust_broker(pgbroker::config::PoolMode::Transaction, 1).await;
    let mut s = logged_in(b.local_addr()).await;
    // Flush: the error comes back while the server still skips to Sync.
    send(&mut s, &[parse_bind_execute("SELECT * FROM no_such_table"), msg(b'H', b"")].concat()).await;
    let mut got = Vec::new();
    while !tags(&got).contains('E') {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    send(&mut s, &[query("SELECT 1"), msg(b'S', b"")].concat()).await;
    assert_eq!(tags(&read_until_ready(&mut s).await), "Z", "the skipped Query gets nothing");
    the_only_server_is_free(&b).await;
}

/// Polls a direct connection until `sql` returns `want`, for up to 10 s.
async fn eventually(sql: &str, want: &str) {
    let c = direct("bench").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = one(&c, sql).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql}: {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A query sent in one write with Terminate, by a client that closes at once.
async fn query_then_terminate_runs(mode: pgbroker::config::PoolMode, table: &str) {
    let admin = direct("bench").await;
    admin.simple_query(&format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int)")).await.unwrap();
    let b = trust_broker(mode, 1).await;
    let mut s = logged_in(b.local_addr()).await;
    send(&mut s, &[query(&format!("INSERT INTO {table} VALUES (1)")), msg(b'X', b"")].concat()).await;
    drop(s);
    eventually(&format!("SELECT count(*) FROM {table}"), "1").await;
    the_only_server_is_free(&b).await;
}

#[tokio::test]
async fn a_query_sent_with_terminate_in_one_write_is_run_in_transaction_mode() {
    query_then_terminate_runs(pgbroker::config::PoolMode::Transaction, "edge_terminate_txn").await;
}

#[tokio::test]
async fn a_query_sent_with_terminate_in_one_write_is_run_in_session_mode() {
    query_then_terminate_runs(pgbroker::config::PoolMode::Session, "edge_terminate_session").await;
}
