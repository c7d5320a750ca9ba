//! The bridge as a drop-in for an app's hand-written realtime service: typed messages,
//! subscription on connect, resume after a reconnect, and a listener proven alive. Against
//! the real PostgreSQL, with real WebSocket clients.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use pgbroker::config::Config;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The seed service's three channels, each with its own message type.
const SEED: &str = r#"
[websocket]
envelope = "typed"

[websocket.channels.employee_changes]
type = "employee_update"

[websocket.channels.department_changes]
type = "department_update"

[websocket.channels.workstation_changes]
type = "workstation_update"
"#;

fn url(addr: std::net::SocketAddr, database: &str, query: &str) -> String {
    format!("ws://{addr}/ws?database={database}{query}")
}

async fn open(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// The next JSON text message, skipping pings.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("a message in time");
        match msg.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Opens a connection and reads its ack and the reply to its subscription on connect.
async fn open_subscribed(url: &str) -> (Ws, Value) {
    let mut ws = open(url).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    let subscribed = next_json(&mut ws).await;
    (ws, subscribed)
}

/// The hub of `database`, once it exists.
async fn hub(b: &pgbroker::app::Broker, database: &str) -> Arc<pgbroker::notify::Hub> {
    eventually("the hub", Duration::from_secs(10), || async {
        b.app().bridge().hubs().all().into_iter().find(|h| h.database() == database)
    })
    .await
}

/// Waits until the hub has received `n` notifications in all.
async fn received(hub: &pgbroker::notify::Hub, n: u64) {
    eventually(&format!("{n} notifications received"), Duration::from_secs(10), || async {
        let got = hub.stats.received.load(Ordering::Relaxed);
        if got >= n { Ok(()) } else { Err(got) }
    })
    .await;
}

#[tokio::test]
async fn a_seed_style_client_gets_typed_row_changes_of_three_channels_subscribed_by_query() {
    let b = broker(config_with("scram-sha-256", SEED)).await;
    let db = direct("bench").await;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS employees (id int PRIMARY KEY, name text);
         CREATE TABLE IF NOT EXISTS departments (id int PRIMARY KEY, name text);
         CREATE TABLE IF NOT EXISTS workstations (id int PRIMARY KEY, name text);
         CREATE OR REPLACE FUNCTION notify_change() RETURNS trigger AS $$
         BEGIN
           PERFORM pg_notify(TG_ARGV[0], row_to_json(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END)::text);
           RETURN NULL;
         END $$ LANGUAGE plpgsql;
         CREATE OR REPLACE TRIGGER employees_notify AFTER INSERT OR UPDATE OR DELETE ON employees
           FOR EACH ROW EXECUTE FUNCTION notify_change('employee_changes');
         CREATE OR REPLACE TRIGGER departments_notify AFTER INSERT OR UPDATE OR DELETE ON departments
           FOR EACH ROW EXECUTE FUNCTION notify_change('department_changes');
         CREATE OR REPLACE TRIGGER workstations_notify AFTER INSERT OR UPDATE OR DELETE ON workstations
           FOR EACH ROW EXECUTE FUNCTION notify_change('workstation_changes');",
    )
    .await
    .unwrap();
    let (mut ws, subscribed) = open_subscribed(&url(
        b.http_addr(),
        "bench",
        "&channels=employee_changes,department_changes,workstation_changes",
    ))
    .await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "channels": ["department_changes", "employee_changes", "workstation_changes"]})
    );
    let app = connect_bench(b.local_addr()).await;
    // One transaction each, as the app's requests would be (PostgreSQL folds identical
    // notifications of one transaction into one: the UPDATE and the DELETE send the same row).
    for sql in [
        "INSERT INTO employees VALUES (1001, 'Ada')",
        "UPDATE employees SET name = 'Ada L.' WHERE id = 1001",
        "INSERT INTO departments VALUES (1001, 'R&D')",
        "INSERT INTO workstations VALUES (1001, 'ws-1')",
        "DELETE FROM employees WHERE id = 1001",
    ] {
        app.batch_execute(sql).await.unwrap();
    }
    let mut last_id = 0;
    for (kind, channel, name) in [
        ("employee_update", "employee_changes", "Ada"),
        ("employee_update", "employee_changes", "Ada L."),
        ("department_update", "department_changes", "R&D"),
        ("workstation_update", "workstation_changes", "ws-1"),
        ("employee_update", "employee_changes", "Ada L."),
    ] {
        let m = next_json(&mut ws).await;
        assert_eq!(m["type"], kind, "{m}");
        assert_eq!(m["channel"], channel);
        assert_eq!(m["data"], json!({"id": 1001, "name": name}));
        assert!(m["timestamp"].as_str().unwrap().ends_with('Z'));
        let id = m["messageId"].as_u64().expect("a numeric messageId");
        assert!(id > last_id, "increasing ids");
        last_id = id;
    }
    db.batch_execute("DROP TABLE employees, departments, workstations").await.unwrap();
}

#[tokio::test]
async fn default_channels_are_subscribed_on_every_connection() {
    let cfg = config_with("scram-sha-256", "[websocket]\ndefault_channels = [\"everyone_news\"]");
    let b = broker(cfg).await;
    let (mut ws, subscribed) = open_subscribed(&url(b.http_addr(), "bench", "&channels=mine")).await;
    assert_eq!(subscribed, json!({"type": "subscribed", "channels": ["everyone_news", "mine"]}));
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT pg_notify('everyone_news', 'hello')").await.unwrap();
    let m = next_json(&mut ws).await;
    assert_eq!((m["type"].as_str(), m["payload"].as_str()), (Some("notification"), Some("hello")));
}

/// Sends `n` notifications on `channel` with payloads `0..n`, from outside the broker.
async fn notify_many(channel: &str, n: usize) {
    let c = direct("bench").await;
    for i in 0..n {
        c.simple_query(&format!("SELECT pg_notify('{channel}', '{i}')")).await.unwrap();
    }
}

/// Connects to `channel`, reads one notification and leaves: the id a client would keep.
async fn last_seen_id(b: &pgbroker::app::Broker, channel: &str) -> u64 {
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "bench", &format!("&channels={channel}"))).await;
    notify_many(channel, 1).await;
    let m = next_json(&mut ws).await;
    ws.close(None).await.unwrap();
    m["messageId"].as_u64().unwrap()
}

/// A client saw one notification on `channel` and left; `n` more were sent (payloads `0..n`)
/// and reached the broker while it was away. Returns the id it kept.
async fn missed(b: &pgbroker::app::Broker, channel: &str, n: usize) -> u64 {
    let last = last_seen_id(b, channel).await;
    let hub = hub(b, "bench").await;
    let before = hub.stats.received.load(Ordering::Relaxed);
    notify_many(channel, n).await;
    received(&hub, before + n as u64).await;
    last
}

#[tokio::test]
async fn a_client_that_reconnects_with_its_last_id_gets_the_100_it_missed_in_order_then_live_ones() {
    let b = broker(config()).await;
    let last = missed(&b, "resume_me", 100).await;
    let query = format!("&channels=resume_me&lastMessageId={last}");
    let (mut ws, subscribed) = open_subscribed(&url(b.http_addr(), "bench", &query)).await;
    assert_eq!(subscribed["type"], "subscribed");
    for i in 0..100 {
        let m = next_json(&mut ws).await;
        assert_eq!(m["payload"], i, "missed notification {i} in order: {m}");
        assert_eq!(m["messageId"].as_u64().unwrap(), last + 1 + i);
    }
    notify_many("resume_me", 1).await;
    let live = next_json(&mut ws).await;
    assert_eq!((live["payload"].as_u64(), live["messageId"].as_u64()), (Some(0), Some(last + 101)), "then live");
}

#[tokio::test]
async fn a_resume_by_subscribe_message_with_a_string_id_works_too() {
    let b = broker(config()).await;
    let last = missed(&b, "resume_by_message", 3).await;
    let mut ws = open(&url(b.http_addr(), "bench", "")).await;
    next_json(&mut ws).await;
    let sub = json!({"type": "subscribe", "channels": ["resume_by_message"], "lastMessageId": last.to_string()});
    ws.send(Message::Text(sub.to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    for i in 0..3 {
        assert_eq!(next_json(&mut ws).await["payload"], i);
    }
    let (_, metrics) = http_get(b.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"pgbroker_notification_resumes_total{database="bench",result="replayed"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_id_older_than_the_replay_buffer_gets_resync() {
    let b = broker(config_with("scram-sha-256", "[websocket]\nreplay_buffer = 10")).await;
    let last = missed(&b, "too_old", 20).await;
    let (mut ws, _) =
        open_subscribed(&url(b.http_addr(), "bench", &format!("&channels=too_old&lastMessageId={last}"))).await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["type"], "resync", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("not in the replay buffer"));
    notify_many("too_old", 1).await;
    assert_eq!(next_json(&mut ws).await["payload"], 0, "then live");
}

#[tokio::test]
async fn after_a_broker_restart_an_old_id_gets_resync_never_a_replay() {
    let first = broker(config()).await;
    let last = last_seen_id(&first, "restarted").await;
    drop(first);
    let b = broker(config()).await;
    // The new run's first notifications: none of them may pass for what followed `last`.
    let (mut warm, _) = open_subscribed(&url(b.http_addr(), "bench", "&channels=restarted")).await;
    notify_many("restarted", 3).await;
    for _ in 0..3 {
        assert!(next_json(&mut warm).await["messageId"].as_u64().unwrap() > last, "ids go on past the old run's");
    }
    let (mut ws, _) =
        open_subscribed(&url(b.http_addr(), "bench", &format!("&channels=restarted&lastMessageId={last}"))).await;
    assert_eq!(next_json(&mut ws).await["type"], "resync");
}

/// A role of its own, so this test's listener backend is the only one logged in with it.
async fn listener_role(name: &str) {
    let c = direct("bench").await;
    let sql = format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
             CREATE ROLE {name} LOGIN PASSWORD 'listenerpw';
           END IF;
         END $$"
    );
    c.batch_execute(&sql).await.unwrap();
}

/// Resumes a stopped backend however the test ends.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// Interval (1 s) + timeout (1 s) of `checked_config`, and the reconnect's login, with room
/// for a busy machine.
const DETECTED_WITHIN: Duration = Duration::from_secs(6);

/// A config whose database `checked` reaches the server at `port` with the listener role
/// `role`, checking the listener every second with a one-second timeout.
fn checked_config(port: u16, role: &str) -> Config {
    config_with(
        "scram-sha-256",
        &format!(
            r#"
[databases.checked]
host = "127.0.0.1"
port = {port}
dbname = "bench"
user = "{role}"
password = "listenerpw"
pool_size = 2

[websocket]
listener_check_interval = "1s"
listener_check_timeout = "1s"
"#
        ),
    )
}

#[tokio::test]
async fn a_stopped_listener_backend_is_found_out_and_replaced_with_resync() {
    listener_role("stall_listener").await;
    let b = broker(checked_config(pg().port(), "stall_listener")).await;
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "checked", "&channels=stall_watch")).await;
    let admin = direct("bench").await;
    let pid: u32 = eventually("the listener backend", Duration::from_secs(10), || async {
        one(&admin, "SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE usename = 'stall_listener'")
            .await
            .parse::<u32>()
            .ok()
            .filter(|&p| p > 0)
    })
    .await;
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    let _resume = Stopped(pid);
    let stopped = std::time::Instant::now();
    let m = next_json(&mut ws).await;
    assert_eq!(m["type"], "resync", "{m}");
    assert!(stopped.elapsed() < DETECTED_WITHIN, "found out within interval + timeout: {:?}", stopped.elapsed());
    let hub = hub(&b, "checked").await;
    assert!(hub.stats.check_failures.load(Ordering::Relaxed) >= 1);
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("SELECT pg_notify('stall_watch', 'after')").await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "after", "the new listener delivers");
}

/// A TCP proxy to the server whose connections can be made to drop everything silently,
/// as a dead network path does.
struct Proxy {
    port: u16,
    /// Connections numbered up to this forward nothing any more.
    dead_up_to: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dead_up_to = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (dead, count) = (dead_up_to.clone(), opened.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, n, dead.clone()));
                tokio::spawn(pipe(sr, cw, n, dead.clone()));
            }
        });
        Proxy { port, dead_up_to, opened }
    }

    /// Every connection open now stops forwarding, without closing.
    fn blackhole_open_connections(&self) {
        self.dead_up_to.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: u64,
    dead: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buf).await else { return };
        if read == 0 {
            return;
        }
        if n <= dead.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_listener_whose_path_drops_packets_is_found_out_and_replaced_with_resync() {
    listener_role("path_listener").await;
    let proxy = Proxy::start(pg().port()).await;
    let b = broker(checked_config(proxy.port, "path_listener")).await;
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "checked", "&channels=path_watch")).await;
    let (mut events, _) = open_subscribed(&url(b.http_addr(), "checked", "&channels=$pgbroker.events")).await;
    let hub = hub(&b, "checked").await;
    proxy.blackhole_open_connections();
    let cut = std::time::Instant::now();
    let m = next_json(&mut ws).await;
    assert_eq!(m["type"], "resync", "{m}");
    assert!(cut.elapsed() < DETECTED_WITHIN, "found out within interval + timeout: {:?}", cut.elapsed());
    assert!(hub.stats.check_failures.load(Ordering::Relaxed) >= 1);
    let event = loop {
        let e = next_json(&mut events).await;
        if e["event"] == "listener_replaced" {
            break e;
        }
    };
    assert_eq!(event["database"], "checked", "{event}");
    let (_, metrics) = http_get(b.http_addr(), "/metrics").await;
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"pgbroker_notification_listener_check_failures_total{database="checked"} "#))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(failures.is_some_and(|n| n >= 1), "the failure is counted in /metrics: {failures:?}");
    direct("bench").await.simple_query("SELECT pg_notify('path_watch', 'after')").await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "after", "the new listener delivers");
}

/// Installs the shipped `pgbroker_notify` function.
async fn install_notify_function() {
    let c = direct("bench").await;
    // Installed concurrently by several tests: CREATE OR REPLACE races on the catalog row,
    // so each waits for the others under one lock.
    let sql =
        format!("BEGIN; SELECT pg_advisory_xact_lock(4242); {} COMMIT;", include_str!("../conf/pgbroker-notify.sql"));
    c.batch_execute(&sql).await.unwrap();
}

#[tokio::test]
async fn a_200_kib_payload_sent_with_the_shipped_function_arrives_whole() {
    install_notify_function().await;
    let b = broker(config()).await;
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "bench", "&channels=big_rows")).await;
    let row = json!({"id": 1, "blob": "é".repeat(100 * 1024)}).to_string();
    let app = connect_bench(b.local_addr()).await;
    app.execute("SELECT pgbroker_notify('big_rows', $1)", &[&row]).await.unwrap();
    let m = next_json(&mut ws).await;
    assert_eq!(m["payload"]["blob"].as_str().map(str::len), Some(200 * 1024), "the whole row, as one message");
    assert_eq!(m["payload"]["id"], 1);
}

#[tokio::test]
async fn a_payload_over_max_payload_bytes_is_dropped_and_counted_and_the_next_ones_arrive() {
    install_notify_function().await;
    let b = broker(config_with("scram-sha-256", "[websocket]\nmax_payload_bytes = 100000")).await;
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "bench", "&channels=too_big")).await;
    let app = connect_bench(b.local_addr()).await;
    app.simple_query("SELECT pgbroker_notify('too_big', repeat('x', 200000))").await.unwrap();
    app.simple_query("SELECT pgbroker_notify('too_big', 'small')").await.unwrap();
    let m = next_json(&mut ws).await;
    assert_eq!(m["payload"], "small", "the oversized one was dropped");
    let hub = hub(&b, "bench").await;
    assert_eq!(hub.stats.payloads_dropped.load(Ordering::Relaxed), 1);
}

/// A table whose inserts notify `channel` through `pgbroker_notify`, and a config whose
/// channel snapshot lists the table's ids.
async fn snapshot_table(table: &str, channel: &str) -> Config {
    install_notify_function().await;
    let c = direct("bench").await;
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id serial PRIMARY KEY);
         CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger AS $$
         BEGIN PERFORM pgbroker_notify('{channel}', row_to_json(NEW)::text); RETURN NULL; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER {table}_notify AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_notify();"
    ))
    .await
    .unwrap();
    config_with(
        "scram-sha-256",
        &format!(
            "[websocket.channels.{channel}]\nsnapshot_query = \"SELECT coalesce(json_agg(id ORDER BY id), '[]') FROM {table}\""
        ),
    )
}

/// The ids in a snapshot message.
fn snapshot_ids(m: &Value) -> Vec<u64> {
    assert_eq!(m["type"], "snapshot", "{m}");
    m["data"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[tokio::test]
async fn a_snapshot_taken_during_inserts_then_the_changes_give_every_row_exactly_once() {
    let cfg = snapshot_table("snap_rows", "snap_rows").await;
    let b = broker(cfg).await;
    // Rows go in before, during and after the subscription, each in its own transaction.
    const ROWS: u64 = 400;
    let writer = tokio::spawn(async move {
        let c = direct("bench").await;
        for _ in 0..ROWS {
            c.batch_execute("INSERT INTO snap_rows DEFAULT VALUES").await.unwrap();
        }
    });
    let db = direct("bench").await;
    eventually("some rows before the subscription", Duration::from_secs(10), || async {
        one(&db, "SELECT count(*) FROM snap_rows").await.parse::<u64>().unwrap() >= 50
    })
    .await;
    let (mut ws, subscribed) = open_subscribed(&url(b.http_addr(), "bench", "&channels=snap_rows")).await;
    assert_eq!(subscribed["type"], "subscribed");
    let mut seen = snapshot_ids(&next_json(&mut ws).await);
    assert!(seen.len() >= 50, "the snapshot has the rows inserted before it");
    writer.await.unwrap();
    let mut changes = Vec::new();
    while seen.len() + changes.len() < ROWS as usize {
        let m = next_json(&mut ws).await;
        changes.push(m["payload"]["id"].as_u64().expect("a row"));
    }
    assert!(!changes.is_empty(), "some rows came as changes after the snapshot");
    seen.extend(&changes);
    seen.sort_unstable();
    let all: Vec<u64> = (1..=ROWS).collect();
    assert_eq!(seen, all, "every row exactly once: in the snapshot or as a change ({} changes)", changes.len());
    direct("bench").await.simple_query("SELECT pg_notify('snap_rows', 'end')").await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "end", "nothing more after the last row");
}

#[tokio::test]
async fn after_a_resync_the_subscriber_gets_a_new_snapshot() {
    let cfg = snapshot_table("snap_again", "snap_again").await;
    let b = broker(cfg).await;
    direct("bench").await.batch_execute("INSERT INTO snap_again DEFAULT VALUES").await.unwrap();
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "bench", "&channels=snap_again")).await;
    assert_eq!(snapshot_ids(&next_json(&mut ws).await), [1]);
    let admin = direct("bench").await;
    admin.batch_execute("INSERT INTO snap_again DEFAULT VALUES").await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"]["id"], 2);
    // The listener is replaced: the bridge cannot vouch for what happened meanwhile.
    let killed = col(
        &admin,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%snap_again%' AND query LIKE 'LISTEN%'",
    )
    .await;
    assert_eq!(killed, ["t"]);
    assert_eq!(next_json(&mut ws).await["type"], "resync");
    assert_eq!(snapshot_ids(&next_json(&mut ws).await), [1, 2], "a fresh snapshot after the resync");
}

#[tokio::test]
async fn a_failing_snapshot_query_is_reported_and_the_changes_still_come() {
    let cfg = config_with(
        "scram-sha-256",
        "[websocket.channels.snap_broken]\nsnapshot_query = \"SELECT * FROM no_such_table\"",
    );
    let b = broker(cfg).await;
    let (mut ws, _) = open_subscribed(&url(b.http_addr(), "bench", "&channels=snap_broken")).await;
    let m = next_json(&mut ws).await;
    assert_eq!((m["type"].as_str(), m["code"].as_str()), (Some("error"), Some("snapshot_failed")), "{m}");
    assert!(m["message"].as_str().unwrap().contains("no_such_table"));
    direct("bench").await.simple_query("SELECT pg_notify('snap_broken', 'still')").await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "still");
}
