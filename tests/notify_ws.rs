//! The LISTEN/NOTIFY WebSocket bridge against the real PostgreSQL, with real WebSocket clients.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use pgbroker::config::{Config, Token};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The default test config; the bridge needs `?database=` since several are configured.
fn ws_config() -> Config {
    config()
}

fn url(b: &pgbroker::app::Broker, query: &str) -> String {
    format!("ws://{}/ws?database=bench{query}", b.http_addr())
}

async fn open(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// The HTTP status a refused upgrade got.
async fn refused_status(req: impl IntoClientRequest + Unpin) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
    }
}

/// The next JSON text message, skipping pings.
async fn next_json<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message in time");
        match msg.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until the hub's listener has run one of `statements` (`LISTEN "chan"`, ...) on
/// the server: a backend shows it as its last statement, finished.
///
/// For what the bridge says of the server's own state (an UNLISTEN after the last
/// subscriber leaves, a LISTEN again after a reconnect), which no reply announces.
async fn server_ran(statements: &[&str]) {
    let admin = direct("bench").await;
    let list: Vec<String> = statements.iter().map(|s| format!("'{}'", s.replace('\'', "''"))).collect();
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE query IN ({}) AND state = 'idle'", list.join(", "));
    let what = format!("the listener to run one of {statements:?}");
    eventually(&what, Duration::from_secs(10), || async {
        if one(&admin, &sql).await != "0" {
            return Ok(());
        }
        // What the backends ran last, for the failure message.
        Err(col(&admin, "SELECT state || ': ' || query FROM pg_stat_activity WHERE query ILIKE '%LISTEN%'").await)
    })
    .await;
}

async fn subscribe<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    channels: &[&str],
) -> Value {
    ws.send(Message::Text(json!({"type": "subscribe", "channels": channels}).to_string().into())).await.unwrap();
    next_json(ws).await
}

#[tokio::test]
async fn subscriber_receives_notifications_with_parsed_json_payload() {
    let b = broker(ws_config()).await;
    let mut ws = open(&url(&b, "")).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack");
    assert!(ack["connectionId"].is_u64());
    let sub = subscribe(&mut ws, &["employee_changes"]).await;
    assert_eq!(sub, json!({"type": "subscribed", "channels": ["employee_changes"]}));
    // NOTIFY goes through the broker like any query.
    let c = connect_bench(b.local_addr()).await;
    let hub = b.app().bridge().hubs().all().into_iter().next().unwrap();
    wait_for(|| hub.subscribers("employee_changes") == 1).await;
    server_ran(&["LISTEN \"employee_changes\""]).await;
    c.simple_query(r#"SELECT pg_notify('employee_changes', '{"id": 7, "name": "Ada"}')"#).await.unwrap();
    c.simple_query("SELECT pg_notify('employee_changes', 'plain text')").await.unwrap();
    let n1 = next_json(&mut ws).await;
    assert_eq!(n1["type"], "notification");
    assert_eq!(n1["channel"], "employee_changes");
    assert_eq!(n1["payload"], json!({"id": 7, "name": "Ada"}));
    assert!(n1["pid"].as_i64().unwrap() > 0);
    assert!(n1["timestamp"].as_str().unwrap().ends_with('Z'));
    let n2 = next_json(&mut ws).await;
    assert_eq!(n2["payload"], "plain text");
    assert_eq!(n2["messageId"].as_u64().unwrap(), n1["messageId"].as_u64().unwrap() + 1, "monotonic ids");
}

#[tokio::test]
async fn a_subscribe_answered_while_the_listener_logs_in_misses_no_notification() {
    // The first subscriber of a fresh broker: its subscribe comes while the hub's listener
    // is still logging in. Once it reads `subscribed`, the LISTEN is in place.
    let b = broker(ws_config()).await;
    let c = direct("bench").await;
    let mut ws = open(&url(&b, "")).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    let sub = subscribe(&mut ws, &["first_login"]).await;
    assert_eq!(sub, json!({"type": "subscribed", "channels": ["first_login"]}));
    c.simple_query("SELECT pg_notify('first_login', 'right after')").await.unwrap();
    let n = next_json(&mut ws).await;
    assert_eq!((n["channel"].as_str(), n["payload"].as_str()), (Some("first_login"), Some("right after")));
}

#[tokio::test]
async fn a_subscribe_past_max_channels_per_client_is_refused_whole_and_the_connection_goes_on() {
    let mut cfg = ws_config();
    cfg.websocket.max_channels_per_client = 50;
    let b = broker(cfg).await;
    let mut ws = open(&url(&b, "")).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    let forty: Vec<String> = (0..40).map(|i| format!("cap_{i}")).collect();
    let names: Vec<&str> = forty.iter().map(String::as_str).collect();
    assert_eq!(subscribe(&mut ws, &names).await["channels"].as_array().unwrap().len(), 40);
    // 2,000 in one command (as many as fit in a 64 KiB message), or 11 more, would pass 50:
    // refused as a whole.
    let many: Vec<String> = (0..2_000).map(|i| format!("flood_{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for attempt in [&many[..], &many[..11]] {
        let reply = subscribe(&mut ws, attempt).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "too_many_channels", "{reply}");
    }
    let hub = b.app().bridge().hubs().all().into_iter().next().unwrap();
    assert_eq!(hub.subscribers("flood_0"), 0, "nothing of a refused subscribe was taken");
    assert_eq!(subscribe(&mut ws, &many[..10]).await["channels"].as_array().unwrap().len(), 50, "up to the cap");
    // A bystander is served meanwhile.
    let mut other = open(&url(&b, "")).await;
    assert_eq!(next_json(&mut other).await["type"], "connection_ack");
    assert_eq!(subscribe(&mut other, &["bystander"]).await["type"], "subscribed");
}

async fn wait_for(cond: impl Fn() -> bool) {
    eventually("the hub's counts", Duration::from_secs(5), || async { cond() }).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_unlistens() {
    let b = broker(ws_config()).await;
    let mut ws = open(&url(&b, "")).await;
    next_json(&mut ws).await;
    // `subscribed` comes once the listener LISTENs on the channels.
    subscribe(&mut ws, &["a_chan", "b_chan"]).await;
    // The listener is connected and LISTENs (so the UNLISTEN below is run, not folded into
    // its login).
    server_ran(&["LISTEN \"a_chan\"", "LISTEN \"b_chan\""]).await;
    ws.send(Message::Text(json!({"type": "unsubscribe", "channels": ["a_chan"]}).to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"type": "unsubscribed", "channels": ["b_chan"]}));
    // The UNLISTEN is sent after the reply.
    server_ran(&["UNLISTEN \"a_chan\""]).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT pg_notify('a_chan', 'not for you'), pg_notify('b_chan', 'for you')").await.unwrap();
    let n = next_json(&mut ws).await;
    assert_eq!((n["channel"].as_str(), n["payload"].as_str()), (Some("b_chan"), Some("for you")));
    // The listener no longer listens on a_chan.
    let admin = direct("bench").await;
    let listening = col(&admin, "SELECT query FROM pg_stat_activity WHERE query ILIKE '%LISTEN%'").await;
    assert!(
        listening.iter().any(|q| q.starts_with("UNLISTEN") && q.contains("a_chan")),
        "the last subscriber leaving ran UNLISTEN: {listening:?}"
    );
}

#[tokio::test]
async fn per_ip_and_total_limits_refuse_with_http_status() {
    let mut cfg = ws_config();
    cfg.websocket.max_ws_connections_per_ip = 2;
    let b = broker(cfg).await;
    let _a = open(&url(&b, "")).await;
    let _b = open(&url(&b, "")).await;
    assert_eq!(refused_status(url(&b, "")).await, 429);
    let mut cfg = ws_config();
    cfg.websocket.max_ws_connections = 1;
    let b = broker(cfg).await;
    let _a = open(&url(&b, "")).await;
    assert_eq!(refused_status(url(&b, "")).await, 503);
}

fn token_config() -> Config {
    let mut cfg = ws_config();
    cfg.websocket.tokens = vec![Token { token: "s3cret".into(), channels: vec!["orders.*".into()] }];
    cfg
}

#[tokio::test]
async fn a_missing_or_bad_token_is_refused() {
    let b = broker(token_config()).await;
    assert_eq!(refused_status(url(&b, "")).await, 401);
    assert_eq!(refused_status(url(&b, "&token=wrong")).await, 401);
    let mut req = url(&b, "").into_client_request().unwrap();
    req.headers_mut().insert("Authorization", "Bearer s3cret".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
}

#[tokio::test]
async fn a_channel_the_token_does_not_allow_is_refused() {
    let b = broker(token_config()).await;
    let mut ws = open(&url(&b, "&token=s3cret")).await;
    next_json(&mut ws).await;
    let err = subscribe(&mut ws, &["payroll"]).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "forbidden_channel");
    let ok = subscribe(&mut ws, &["orders.created"]).await;
    assert_eq!(ok["channels"], json!(["orders.created"]));
}

#[tokio::test]
async fn a_disallowed_origin_is_refused() {
    let mut cfg = ws_config();
    cfg.websocket.allowed_origins = vec!["https://app.example".into()];
    let b = broker(cfg).await;
    let mut req = url(&b, "").into_client_request().unwrap();
    req.headers_mut().insert("Origin", "https://evil.example".parse().unwrap());
    assert_eq!(refused_status(req).await, 403);
    let mut req = url(&b, "").into_client_request().unwrap();
    req.headers_mut().insert("Origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}

#[tokio::test]
async fn without_tokens_or_allowed_origins_only_same_origin_pages_and_non_browsers_connect() {
    let b = broker(ws_config()).await;
    let with_origin = |origin: &str| {
        let mut req = url(&b, "").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    // Any page the operator's browser opens could otherwise read $pgbroker.events.
    assert_eq!(refused_status(with_origin("https://evil.example")).await, 403);
    assert_eq!(refused_status(with_origin("null")).await, 403);
    // The broker's own status page, and clients that send no Origin (not browsers).
    let own = format!("http://{}", b.http_addr());
    assert!(tokio_tungstenite::connect_async(with_origin(&own)).await.is_ok());
    assert!(tokio_tungstenite::connect_async(url(&b, "")).await.is_ok());
}

#[tokio::test]
async fn with_tokens_a_page_of_another_origin_may_connect_with_its_token() {
    let mut cfg = ws_config();
    cfg.websocket.tokens = vec![Token { token: "tok-x".into(), channels: vec!["*".into()] }];
    let b = broker(cfg).await;
    let mut req = url(&b, "&token=tok-x").into_client_request().unwrap();
    req.headers_mut().insert("Origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_a_fast_one_gets_everything() {
    let mut cfg = ws_config();
    // Room for bursts (each pg_notify batch below arrives at once), not for a client that
    // stops reading for good.
    // (2,048: a fast client on a machine loaded by other tests may lag a few hundred behind.)
    cfg.websocket.ws_send_queue = 2048;
    let b = broker(cfg).await;
    // The slow client subscribes and then never reads; a tiny receive buffer makes its
    // socket back up quickly.
    let slow_sock = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&b.http_addr().into()).unwrap();
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s.into()).unwrap()
    };
    let (mut slow, _) = tokio_tungstenite::client_async(url(&b, ""), slow_sock).await.unwrap();
    next_json(&mut slow).await;
    subscribe(&mut slow, &["firehose"]).await;
    let mut fast = open(&url(&b, "")).await;
    next_json(&mut fast).await;
    subscribe(&mut fast, &["firehose"]).await;
    server_ran(&["LISTEN \"firehose\""]).await;

    // 6,000 x 4 KiB: far more than the slow client's queue and socket buffers can hold.
    const N: usize = 6000;
    let c = connect_bench(b.local_addr()).await;
    let big = "x".repeat(4000);
    // The fast client's count: the sender never runs more than 1,000 ahead of it, so a fast
    // client on a machine whose cores are busy elsewhere is never the one that overflows.
    let received = Arc::new(AtomicUsize::new(0));
    let sender = {
        let received = received.clone();
        tokio::spawn(async move {
            for chunk in 0..(N / 50) {
                let until = tokio::time::Instant::now() + Duration::from_secs(30);
                while received.load(Ordering::Relaxed) + 1000 < chunk * 50 && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let sql: Vec<String> =
                    (0..50).map(|i| format!("SELECT pg_notify('firehose', '{}-{big}')", chunk * 50 + i)).collect();
                c.simple_query(&sql.join(";")).await.unwrap();
            }
        })
    };
    let mut got = 0;
    while got < N {
        match tokio::time::timeout(Duration::from_secs(10), fast.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => {
                assert!(t.starts_with("{\"type\":\"notification\"") || t.contains("\"notification\""), "{t}");
                got += 1;
                received.store(got, Ordering::Relaxed);
            }
            Message::Close(f) => panic!("the fast client was closed: {f:?}"),
            _ => {}
        }
    }
    sender.await.unwrap();
    assert_eq!(got, N, "the fast client received every notification");
    let hub = b.app().bridge().hubs().all().into_iter().next().unwrap();
    wait_for(|| hub.stats.dropped_slow.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
    assert_eq!(hub.subscribers("firehose"), 1, "only the fast client is left");
    // The slow client, reading at last, gets what was in flight and then the end: a 1013
    // close frame when it still fitted in the socket, else the connection closing.
    let mut seen = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(15), slow.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => seen += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the slow client was not disconnected"),
        }
    };
    assert!(seen < N, "the slow client did not get everything ({seen})");
    assert!(end.is_none() || end == Some(1013), "close code {end:?}");
}

#[tokio::test]
async fn listener_killed_gives_resync_then_delivery_resumes() {
    let b = broker(ws_config()).await;
    let mut ws = open(&url(&b, "")).await;
    next_json(&mut ws).await;
    subscribe(&mut ws, &["resilient"]).await;
    server_ran(&["LISTEN \"resilient\""]).await;
    let admin = direct("bench").await;
    let killed =
        col(&admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%resilient%'")
            .await;
    assert_eq!(killed, ["t"], "the listener connection was found and killed");
    let resync = next_json(&mut ws).await;
    assert_eq!(resync["type"], "resync");
    assert!(resync["reason"].as_str().unwrap().contains("missed"));
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT pg_notify('resilient', 'after')").await.unwrap();
    let n = next_json(&mut ws).await;
    assert_eq!(n["payload"], "after");
}

#[tokio::test]
async fn bad_requests_get_error_messages_and_the_connection_stays() {
    let b = broker(ws_config()).await;
    let mut ws = open(&url(&b, "")).await;
    next_json(&mut ws).await;
    ws.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    let long = "c".repeat(64);
    assert_eq!(subscribe(&mut ws, &[&long]).await["code"], "bad_channel");
    assert_eq!(subscribe(&mut ws, &["fine"]).await["type"], "subscribed");
    assert_eq!(refused_status(format!("ws://{}/ws?database=nope", b.http_addr())).await, 404);
    assert_eq!(refused_status(format!("ws://{}/ws", b.http_addr())).await, 400);
}

#[tokio::test]
async fn a_connection_without_subscriptions_is_closed_after_idle_timeout() {
    let mut cfg = ws_config();
    cfg.websocket.idle_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let mut ws = open(&url(&b, "")).await;
    next_json(&mut ws).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(1001));
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed() {
    let mut cfg = ws_config();
    cfg.websocket.ping_interval = Duration::from_millis(200);
    cfg.websocket.pong_timeout = Duration::from_millis(200);
    let b = broker(cfg).await;
    let ws = open(&url(&b, "")).await;
    // Never read, so never answer a ping: the broker gives up and closes the TCP connection.
    eventually("the connection to be dropped", Duration::from_secs(5), || async { b.app().bridge().ws().total() == 0 })
        .await;
    drop(ws);
}

#[tokio::test]
async fn a_subscribe_refused_as_unavailable_takes_on_none_of_its_channels() {
    // `appdb` has no configured user: the bridge has no listener for it.
    let b = broker(ws_config()).await;
    let mut ws = open(&format!("ws://{}/ws?database=appdb", b.http_addr())).await;
    next_json(&mut ws).await;
    let refused = subscribe(&mut ws, &["$pgbroker.events", "orders"]).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("unavailable")), "{refused}");
    ws.send(Message::Text(json!({"type": "unsubscribe", "channels": ["nothing"]}).to_string().into())).await.unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "unsubscribed", "channels": []}),
        "not even the broker channel"
    );
}
