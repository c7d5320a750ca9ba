//! One client must never cost the others (issue 17): each peer-growable buffer is capped, the
//! offender gets a clear error or is closed, and a bystander keeps getting answers.
//!
//! The broker runs in-process, so RSS is this process's: the tests take `GATE` to run one at
//! a time, or one attack would show in another's measurement.
#![allow(clippy::unwrap_used)]

mod common;
use common::http::{closed_within, rss_kib};
use common::*;
use pgbroker::config::{Config, PoolMode};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static GATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1024;

/// Trust auth, `bench` in transaction mode.
fn trust_txn_config() -> Config {
    let mut cfg = config_with("trust", "");
    let db = cfg.databases.get_mut("bench").unwrap();
    db.pool_mode = PoolMode::Transaction;
    db.pool_size = Some(2);
    cfg
}

/// A logged-in raw connection (trust auth) whose welcome has been read.
async fn logged_in(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    read_to_ready(&mut s).await;
    s
}

/// Reads up to and including a ReadyForQuery(Idle); returns what was read.
async fn read_to_ready(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed; got {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// A simple Query message.
fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((4 + sql.len() + 1) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// A bystander's query must get its correct answer, promptly.
async fn bystander_answers(c: &tokio_postgres::Client, n: i32) {
    let row = tokio::time::timeout(Duration::from_secs(10), c.query_one("SELECT $1::int4 + 1", &[&n]))
        .await
        .expect("bystander answered in time")
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_stops_reading_is_cut_off_with_53400_and_costs_only_its_queue() {
    let _gate = GATE.lock().await;
    // The default ws_send_queue, 1024 notifications of ~7.9 KB: 8 MiB may wait in the hub.
    let b = broker(trust_txn_config()).await;
    let bystander = connect_bench(b.local_addr()).await;
    let mut s = logged_in(b.local_addr()).await;
    s.write_all(&query("LISTEN big")).await.unwrap();
    let reply = read_to_ready(&mut s).await;
    assert!(reply.starts_with(b"C"), "LISTEN answered: {reply:?}");
    // From here on the listener reads nothing.
    let hub = b.app().hub(&b.app().config(), "bench").unwrap();
    let notifier = direct("bench").await;
    let before = rss_kib();
    // 8,000 notifications of 7.9 KB (63 MB), distinct so PostgreSQL does not fold them, in
    // batches smaller than the queue: a client that reads would keep up.
    for batch in 0..20 {
        let sql = format!(
            "SELECT pg_notify('big', repeat('x', 7900) || g) FROM generate_series({}, {}) g",
            batch * 400,
            batch * 400 + 399
        );
        notifier.simple_query(&sql).await.unwrap();
        bystander_answers(&bystander, batch).await;
    }
    eventually("the hub cuts the listener off", Duration::from_secs(20), || async {
        hub.stats.dropped_slow.load(Ordering::Relaxed) >= 1
    })
    .await;
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 20 * MIB, "broker RSS grew {} MiB for a listener that does not read", grown / MIB);
    // Reading now, the client gets what was queued, then 53400, then the close.
    let tail = closed_within(&mut s, Duration::from_secs(20)).await.expect("the broker closes the listener");
    assert_eq!(error_code(&tail).as_deref(), Some("53400"), "{} bytes, no 53400", tail.len());
    bystander_answers(&bystander, 100).await;
    // A new listener works as before.
    let mut again = logged_in(b.local_addr()).await;
    again.write_all(&query("LISTEN big")).await.unwrap();
    read_to_ready(&mut again).await;
    notifier.simple_query("NOTIFY big, 'hello'").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(5).any(|w| w == b"hello") {
        let n = tokio::time::timeout(Duration::from_secs(10), again.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
}

/// A frontend message: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((4 + body.len()) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Parse of a named statement without parameter types.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + sql.len() + 4);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    message(b'P', &body)
}

const SYNC: &[u8] = &[b'S', 0, 0, 0, 4];

/// The tags of the backend messages in `bytes`.
fn tags(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        out.push(rest[0]);
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = &rest[(1 + len).min(rest.len())..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_preparing_without_end_gets_54000_past_its_caps_and_holds_no_more() {
    let _gate = GATE.lock().await;
    let mut cfg = trust_txn_config();
    cfg.broker.max_client_prepared_bytes = 8 << 20;
    cfg.broker.max_client_prepared_statements = 100;
    let b = broker(cfg).await;
    let bystander = connect_bench(b.local_addr()).await;
    let mut s = logged_in(b.local_addr()).await;
    let before = rss_kib();
    // 200 named Parses of about 1 MB each, each with its Sync (answered without a server
    // while under the caps); 8 fit in 8 MiB.
    let filler = "x".repeat(1_000_000 - 20);
    let (mut prepared, mut refused) = (0, 0);
    for i in 0..200 {
        let mut req = parse(&format!("s{i}"), &format!("SELECT '{i:05}{filler}'"));
        req.extend_from_slice(SYNC);
        s.write_all(&req).await.unwrap();
        let reply = read_to_ready(&mut s).await;
        match error_code(&reply).as_deref() {
            None => {
                assert_eq!(tags(&reply), b"1Z", "Parse {i}");
                prepared += 1;
            }
            Some("54000") => {
                assert_eq!(tags(&reply), b"EZ", "Parse {i}");
                refused += 1;
            }
            Some(other) => panic!("Parse {i}: unexpected {other}"),
        }
        if i % 25 == 0 {
            bystander_answers(&bystander, i).await;
        }
    }
    assert_eq!((prepared, refused), (8, 192));
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 20 * MIB, "broker RSS grew {} MiB for 200 MB of refused statements", grown / MIB);
    // Refused like any failed Parse: the rest up to Sync is skipped.
    let mut req = parse("over", &format!("SELECT '{filler}'"));
    req.extend_from_slice(&parse("small", "SELECT 42"));
    req.extend_from_slice(SYNC);
    s.write_all(&req).await.unwrap();
    let reply = read_to_ready(&mut s).await;
    assert_eq!(tags(&reply), b"EZ");
    assert_eq!(error_code(&reply).as_deref(), Some("54000"));
    // Closing one makes room: the client prepares and runs a statement again.
    let mut close = vec![b'S'];
    close.extend_from_slice(b"s0\0");
    let mut req = message(b'C', &close);
    req.extend_from_slice(SYNC);
    s.write_all(&req).await.unwrap();
    assert_eq!(tags(&read_to_ready(&mut s).await), b"3Z");
    let mut req = parse("small", "SELECT 41 + 1");
    req.extend_from_slice(&message(b'B', b"\0small\0\0\0\0\0\0\0"));
    req.extend_from_slice(&message(b'E', b"\0\0\0\0\0"));
    req.extend_from_slice(SYNC);
    s.write_all(&req).await.unwrap();
    let reply = read_to_ready(&mut s).await;
    assert_eq!(tags(&reply), b"12DCZ", "{reply:?}");
    assert!(reply.windows(2).any(|w| w == b"42"));
    bystander_answers(&bystander, 1000).await;
}
