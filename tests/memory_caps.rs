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
    let hub = b.app().bridge().hub(&b.app().config(), "bench").unwrap();
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
    eprintln!("broker RSS grew {grown} KiB");
    // The queue bound (8 MiB) and little else: the hub hands on what its listener connection
    // reads, even while it waits for the UNLISTEN that follows the cut-off (it once held the
    // whole backlog a busy server sent before that reply: 30-45 MiB with the cores busy).
    // Without the cap every notification (63 MB, over 70 MiB of RSS) was held.
    assert!(grown < 16 * MIB, "broker RSS grew {} MiB for a listener that does not read", grown / MIB);
    // Reading now, the client gets what was queued, then 53400, then the close.
    let tail = closed_within(&mut s, Duration::from_secs(20)).await.expect("the broker closes the listener");
    assert_eq!(error_code(&tail).as_deref(), Some("53400"), "{} bytes, no 53400", tail.len());
    bystander_answers(&bystander, 100).await;
    // A new listener works as before, and gets nothing sent before it subscribed.
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
    assert!(!got.windows(100).any(|w| w == [b'x'; 100]), "the new listener got the flood sent before it subscribed");
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
    let filler = "x".repeat(1_000_000 - 20);
    // The allocator's first 1 MB blocks (this process's and the broker's) before the
    // baseline: a client that prepares and closes a few large statements, then leaves.
    let mut warm = logged_in(b.local_addr()).await;
    for i in 0..3 {
        let mut req = parse("w", &format!("SELECT '{i}{filler}'"));
        req.extend_from_slice(SYNC);
        warm.write_all(&req).await.unwrap();
        read_to_ready(&mut warm).await;
        let mut close = message(b'C', b"Sw\0");
        close.extend_from_slice(SYNC);
        warm.write_all(&close).await.unwrap();
        read_to_ready(&mut warm).await;
    }
    drop(warm);
    let mut s = logged_in(b.local_addr()).await;
    let before = rss_kib();
    // 200 named Parses of about 1 MB each, each with its Sync (answered without a server
    // while under the caps); 8 fit in 8 MiB.
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
    eprintln!("broker RSS grew {grown} KiB");
    // The byte cap (8 MiB) plus the allocator's slack, which ranges from 1 to 6 MiB (the 1 MB
    // messages pass through per-thread arenas that keep what they had); without the cap it was
    // 200 MB.
    assert!(grown < 24 * MIB, "broker RSS grew {} MiB for 200 MB of refused statements", grown / MIB);
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

/// Sends `header` then `body_len` bytes of 'x' in 1 MiB writes, in the background; the
/// handle reports how many bytes went out before the connection failed (or all of them).
fn announce_and_send(
    mut s: TcpStream,
    header: Vec<u8>,
    body_len: usize,
) -> tokio::task::JoinHandle<(TcpStream, usize)> {
    tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        if s.write_all(&header).await.is_ok() {
            while sent < body_len {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
        }
        (s, sent)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_query_is_streamed_through_unheld_and_large_queries_still_work() {
    let _gate = GATE.lock().await;
    let mut cfg = trust_txn_config();
    cfg.databases.get_mut("bench").unwrap().pool_size = Some(4);
    let b = broker(cfg).await;
    let bystander = connect_bench(b.local_addr()).await;
    // Warm up (first server login, buffers) before the baseline.
    bystander_answers(&bystander, 0).await;
    let before = rss_kib();
    // Two clients announce a Query of 0x3FFFFFFF bytes and try to send 64 MiB of it each; a
    // third announces 256 MiB and sends 64 MiB of it, then stalls. Nothing of them is held:
    // the Queries go to their servers as they come. PostgreSQL takes messages up to
    // 0x3FFFFFFE bytes: it closes the first two connections without a word (its log says
    // "invalid message length"), and those clients get 08006 from the broker.
    let mut writers = Vec::new();
    for len in [0x3FFF_FFFFi32, 0x3FFF_FFFF, 256 << 20] {
        let s = logged_in(b.local_addr()).await;
        let mut header = vec![b'Q'];
        header.extend_from_slice(&len.to_be_bytes());
        writers.push(announce_and_send(s, header, 64 << 20));
    }
    let mut stalled = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let (mut s, sent) =
            tokio::time::timeout(Duration::from_secs(60), w).await.expect("writer ends in time").unwrap();
        if i < 2 {
            let tail = closed_within(&mut s, Duration::from_secs(10)).await.expect("the client is closed");
            assert_eq!(error_code(&tail).as_deref(), Some("08006"), "{}", String::from_utf8_lossy(&tail));
        } else {
            assert_eq!(sent, 64 << 20, "the broker passed the Query on as it came");
            stalled.push(s);
        }
    }
    let grown = rss_kib().saturating_sub(before);
    eprintln!("broker RSS grew {grown} KiB");
    assert!(grown < 12 * MIB, "broker RSS grew {} MiB for unfinished Queries of 64 MiB", grown / MIB);
    bystander_answers(&bystander, 1).await;
    drop(stalled);
    // A legitimate 5 MiB Query and a 5 MiB Bind parameter (under max_buffered_message).
    let five = "y".repeat(5 << 20);
    assert_eq!(one(&bystander, &format!("SELECT length('{five}')")).await, (5 << 20).to_string());
    let row = bystander.query_one("SELECT length($1::text)", &[&five]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 5 << 20);
    bystander_answers(&bystander, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_must_be_held_whole_is_refused_from_its_length_past_max_buffered_message() {
    let _gate = GATE.lock().await;
    let mut cfg = trust_txn_config();
    cfg.broker.max_buffered_message = 1 << 20;
    let b = broker(cfg).await;
    let bystander = connect_bench(b.local_addr()).await;
    bystander_answers(&bystander, 0).await;
    let before = rss_kib();
    // Two clients announce a named Parse of 0x3FFFFFFF bytes (the broker rewrites statement
    // names, so it would have to hold it) and try to send 64 MiB of it each.
    let mut writers = Vec::new();
    for _ in 0..2 {
        let s = logged_in(b.local_addr()).await;
        let mut header = vec![b'P'];
        header.extend_from_slice(&0x3FFF_FFFFi32.to_be_bytes());
        header.extend_from_slice(b"big\0SELECT '");
        writers.push(announce_and_send(s, header, 64 << 20));
    }
    for w in writers {
        let (mut s, sent) = tokio::time::timeout(Duration::from_secs(60), w).await.expect("writer ends").unwrap();
        assert!(sent < 64 << 20, "refused before the body was read ({sent} bytes taken)");
        let tail = closed_within(&mut s, Duration::from_secs(10)).await.expect("the broker closes the client");
        assert_eq!(error_code(&tail).as_deref(), Some("54000"), "{}", String::from_utf8_lossy(&tail));
        assert!(String::from_utf8_lossy(&tail).contains("max_buffered_message"));
    }
    let grown = rss_kib().saturating_sub(before);
    eprintln!("broker RSS grew {grown} KiB");
    assert!(grown < 6 * MIB, "broker RSS grew {} MiB", grown / MIB);
    bystander_answers(&bystander, 1).await;
    // Under the limit a Bind is held and rewritten as before.
    let half = "z".repeat(512 << 10);
    let row = bystander.query_one("SELECT length($1::text)", &[&half]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 512 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_fatal_gives_back_its_slot() {
    let mut cfg = trust_txn_config();
    cfg.broker.max_client_conn = 2;
    let b = broker(cfg).await;
    // A victim with a tiny receive buffer asks for 20 MB and reads none of it.
    let mut victim = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&b.local_addr().into()).unwrap();
        s.set_nonblocking(true).unwrap();
        TcpStream::from_std(s.into()).unwrap()
    };
    send(&mut victim, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    read_to_ready(&mut victim).await;
    victim.write_all(&query("SELECT repeat('x', 20000000) AS stalled")).await.unwrap();
    // Every buffer on the way is full once the server itself waits to write.
    let direct_client = direct("bench").await;
    eventually("the server to block writing to the broker", Duration::from_secs(20), || async {
        let q = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%AS stalled' AND wait_event = 'ClientWrite'";
        one(&direct_client, q).await == "1"
    })
    .await;
    let admin = connect(b.local_addr(), "postgres", "postgres", "pgbroker").await.unwrap();
    admin.simple_query("KILL bench").await.unwrap();
    // Its FATAL cannot be written; after a bounded wait the victim's slot is free again.
    eventually("two clients to fit in max_client_conn = 2", Duration::from_secs(20), || async {
        let (one, two) = tokio::join!(
            connect(b.local_addr(), "postgres", "postgres", "bench"),
            connect(b.local_addr(), "postgres", "postgres", "bench")
        );
        one.is_ok() && two.is_ok()
    })
    .await;
    drop(victim);
}
