//! Issue 17, "one client or one local process must never hurt everyone", on `http_listen`:
//! slow and oversized request heads, the HTTP connection cap, WebSocket frames announcing
//! more than the message limit, and WebSocket clients that stop reading. Each test runs the
//! attack and checks that legitimate clients keep getting answers meanwhile.
#![allow(clippy::unwrap_used)]

mod common;
use common::http::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The tests measure the process's RSS and open hundreds of sockets: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WS_PATH: &str = "/ws?database=bench";

/// A SQL query through the broker still gets its answer.
async fn sql_answers(b: &pgbroker::app::Broker) {
    let c = tokio::time::timeout(Duration::from_secs(10), connect_bench(b.local_addr())).await.unwrap();
    assert_eq!(one(&c, "SELECT 41 + 1").await, "42");
}

/// A WebSocket client subscribes and gets its `subscribed` reply.
async fn ws_subscribe_answers(b: &pgbroker::app::Broker) {
    let url = format!("ws://{}{WS_PATH}", b.http_addr());
    let (mut ws, _) =
        tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    ws.send(Message::Text(r#"{"type":"subscribe","channels":["limits_legit"]}"#.into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] != "connection_ack" {
                        break v;
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["channels"], serde_json::json!(["limits_legit"]));
    let _ = ws.close(None).await;
}

/// Row 4a: a slow or silent request head is closed at `http_header_timeout`, whether it
/// stalls or trickles a byte at a time; /health answers meanwhile.
#[tokio::test]
async fn slow_request_head_closed_at_header_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.broker.http_header_timeout = Duration::from_secs(1);
    let b = broker(cfg).await;
    let addr = b.http_addr();
    let start = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..40 {
        let mut s = raw(addr).await;
        if i % 2 == 0 {
            s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
        }
        stalled.push(s);
    }
    // Slowloris proper: a byte every 100 ms, forever, until the broker closes it.
    let trickle = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        for b in b"GET /health HTTP/1.1\r\nHost: localhost\r\n".iter().cycle().take(200) {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.elapsed()
    });
    assert!(health_ok(addr).await, "/health must answer while slow heads are open");
    for s in &mut stalled {
        let left = Duration::from_secs(6).saturating_sub(start.elapsed());
        assert!(closed_within(s, left).await.is_some(), "a stalled head outlived http_header_timeout");
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "closed before the timeout: {took:?}");
    let trickled = tokio::time::timeout(Duration::from_secs(10), trickle).await.unwrap().unwrap();
    assert!(trickled < Duration::from_secs(4), "a trickling head was served for {trickled:?}");
    assert!(health_ok(addr).await);
    sql_answers(&b).await;
}

/// Row 4b: past `max_http_connections`, a connection is closed at once without an answer;
/// SQL clients are unaffected, and /health answers again once the holders go.
#[tokio::test]
async fn http_connections_past_the_cap_are_closed_unserved() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.broker.max_http_connections = 8;
    cfg.broker.http_header_timeout = Duration::from_secs(60);
    let b = broker(cfg).await;
    let addr = b.http_addr();
    assert!(health_ok(addr).await);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(raw(addr).await);
    }
    // Once the holders are accepted, a full request on another connection gets no answer.
    let refused = || async move {
        let mut s = raw(addr).await;
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        matches!(closed_within(&mut s, Duration::from_secs(2)).await, Some(bytes) if bytes.is_empty())
    };
    assert!(poll(Duration::from_secs(10), refused).await.is_ok(), "the cap never applied");
    let start = Instant::now();
    for _ in 0..100 {
        let mut s = raw(addr).await;
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        let got = closed_within(&mut s, Duration::from_secs(2)).await;
        assert_eq!(got, Some(Vec::new()), "a connection over the cap was served or left open");
    }
    assert!(start.elapsed() < Duration::from_secs(10), "closing over the cap is not prompt");
    sql_answers(&b).await;
    drop(held);
    assert!(poll(Duration::from_secs(10), || health_ok(addr)).await.is_ok(), "/health did not come back");
}

/// Row 4c: a 380 KB request head is refused (431 or a close) after at most `MAX_HTTP_HEAD`
/// read; 50 of them at once leave the broker's memory as it was.
#[tokio::test]
async fn oversized_request_head_refused_not_buffered() {
    let _serial = SERIAL.lock().await;
    let b = broker(config()).await;
    let addr = b.http_addr();
    let mut head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..6 {
        head.extend_from_slice(format!("X-Pad-{i}: ").as_bytes());
        head.extend(std::iter::repeat_n(b'a', 63_000));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    assert!(head.len() > 375_000);
    let head = Arc::new(head);
    assert!(health_ok(addr).await);
    let before = rss_kib();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let head = head.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The broker stops reading and closes: the write may fail, which is the point.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&head)).await;
            closed_within(&mut s, Duration::from_secs(5)).await
        }));
    }
    for t in tasks {
        let got = t.await.unwrap().expect("an oversized head was held open");
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 431"), "unexpected answer: {text:.80}");
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 10 * 1024, "RSS grew by {grown} KiB for 50 oversized heads");
    assert!(health_ok(addr).await);
    sql_answers(&b).await;
}

/// Row 7: a frame header announcing 16 MiB is refused from its header (the 64 KiB message
/// limit also bounds frames): the connection closes at once and nothing is buffered.
#[tokio::test]
async fn websocket_frame_over_limit_closed_from_its_header() {
    let _serial = SERIAL.lock().await;
    let b = broker(config()).await;
    let addr = b.http_addr();
    let chunk = Arc::new(vec![b'x'; 1 << 20]);
    ws_subscribe_answers(&b).await;
    let before = rss_kib();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = ws_raw(addr, WS_PATH).await;
            s.write_all(&ws_frame_header(0x2, 16 << 20)).await.unwrap();
            // Up to 4 MiB of the 16: the broker should have stopped reading long before.
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                for _ in 0..4 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            })
            .await;
            closed_within(&mut s, Duration::from_secs(3)).await
        }));
    }
    for t in tasks {
        let got = t.await.unwrap().expect("a 16 MiB frame was being read");
        // Whatever came before the close: the ack, and perhaps a close frame (1009).
        if let Some(i) = got.windows(2).position(|w| w[0] == 0x88) {
            let code = got.get(i + 2..i + 4).map(|c| u16::from_be_bytes([c[0], c[1]]));
            assert!(code.is_none() || code == Some(1009), "close code {code:?}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(8), "closing took {:?}", start.elapsed());
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB for 10 announced 16 MiB frames");
    assert!(poll(Duration::from_secs(5), || async { b.app().bridge().ws().total() == 0 }).await.is_ok());
    ws_subscribe_answers(&b).await;
    assert!(health_ok(addr).await);
}

/// Row 9: a client that sends 400 commands and never reads its replies is closed about
/// `pong_timeout` after its replies back up, instead of holding its session (and a drain).
#[tokio::test]
async fn websocket_client_that_never_reads_is_closed() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.websocket.ping_interval = Duration::from_millis(500);
    cfg.websocket.pong_timeout = Duration::from_secs(1);
    let b = broker(cfg).await;
    let addr = b.http_addr();
    let mut s = ws_raw(addr, WS_PATH).await;
    assert!(poll(Duration::from_secs(5), || async { b.app().bridge().ws().total() == 1 }).await.is_ok());
    // Every `subscribed` reply lists all the channels so far: ~18 MB of replies in all,
    // more than the socket buffers between the broker and this client hold.
    let pad = "p".repeat(44);
    let mut commands = Vec::new();
    for i in 0..400 {
        let chans: Vec<String> = (0..4).map(|j| format!("slow_{i:03}_{j}_{pad}")).collect();
        let cmd = serde_json::json!({"type": "subscribe", "channels": chans}).to_string();
        commands.extend(ws_text(&cmd));
    }
    tokio::time::timeout(Duration::from_secs(10), s.write_all(&commands)).await.unwrap().unwrap();
    let sent = Instant::now();
    // Meanwhile the others are served.
    assert!(health_ok(addr).await);
    ws_subscribe_answers(&b).await;
    let limit = Duration::from_secs(1 + 5);
    let left = limit.saturating_sub(sent.elapsed());
    assert!(
        poll(left, || async { b.app().bridge().ws().total() == 0 }).await.is_ok(),
        "a client that stopped reading was still connected {:?} after its commands",
        sent.elapsed()
    );
    // The broker closed the TCP connection too: after the replies it got, EOF.
    assert!(closed_within(&mut s, Duration::from_secs(10)).await.is_some());
    sql_answers(&b).await;
}

/// Row 9, the drain: a client that stopped reading, its replies backed up, does not hold a
/// graceful stop for `shutdown_timeout` (a send in progress gives way to the drain, and the
/// close frame waits at most 1 s, not `pong_timeout`). A guard: the old code passed it too
/// when its session was between sends at the drain.
#[tokio::test]
async fn websocket_client_that_never_reads_does_not_hold_a_drain() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    // No pong deadline or send bound ends the session within the test: only the drain may.
    cfg.websocket.ping_interval = Duration::from_millis(200);
    cfg.websocket.pong_timeout = Duration::from_secs(60);
    let b = broker(cfg).await;
    let mut s = ws_raw(b.http_addr(), WS_PATH).await;
    assert!(poll(Duration::from_secs(5), || async { b.app().bridge().ws().total() == 1 }).await.is_ok());
    let pad = "p".repeat(44);
    let mut commands = Vec::new();
    for i in 0..400 {
        let chans: Vec<String> = (0..4).map(|j| format!("drain_{i:03}_{j}_{pad}")).collect();
        commands.extend(ws_text(&serde_json::json!({"type": "subscribe", "channels": chans}).to_string()));
    }
    tokio::time::timeout(Duration::from_secs(10), s.write_all(&commands)).await.unwrap().unwrap();
    // Wait until the replies back up: the broker's side of the connection holds unsent bytes
    // (its session is then blocked in a send).
    let (client, server) = (s.local_addr().unwrap(), b.http_addr());
    let backed_up = || async move { tcp_queues(server, client).is_some_and(|(tx, _)| tx >= 64 * 1024) };
    assert!(poll(Duration::from_secs(10), backed_up).await.is_ok(), "the replies never backed up");
    ws_subscribe_answers(&b).await;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), b.drain(Duration::from_secs(30))).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(5), "the drain took {:?}", start.elapsed());
    assert_eq!(b.app().bridge().ws().total(), 0);
}

#[tokio::test]
async fn a_max_http_connections_below_max_ws_connections_is_warned_about_at_start() {
    let config = |p: common::process::Ports| {
        format!(
            "[broker]\nlisten = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:0\"\nmax_http_connections = 10\n\
             [websocket]\nmax_ws_connections = 100\n[auth]\ntype = \"trust\"\n\
             [databases.bench]\nport = {}\nuser = \"postgres\"\npassword = \"postgres\"\n",
            p.port,
            pg().port()
        )
    };
    let broker = common::process::BrokerProcess::start(config).await;
    let line =
        broker.log_line("max_http_connections is below websocket.max_ws_connections", Duration::from_secs(10)).await;
    assert!(line.contains("WARN"), "{line}");
}
