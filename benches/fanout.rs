//! Fan-out benchmark of the LISTEN/NOTIFY WebSocket bridge: N WebSocket subscribers on one
//! channel, notifications at a fixed rate; reports delivered/s and the latency from
//! `pg_notify` to receipt (p50/p99). The subscribers run in a separate process (this binary
//! started again with `--subscriber-process URL`), so their cost is not the broker's.
//!
//! `cargo bench --bench fanout -- [--subscribers 1000] [--rate 100] [--seconds 10]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// The subscriber process: connects `--subscribers` clients to URL, says `ready`; each
/// client keeps its own latencies until it has `--per-client` messages (or 3 quiet seconds),
/// then the process prints `result <delivered> <p50 µs> <p99 µs> <max µs>`.
fn subscriber_process(url: &str) {
    let subscribers = arg("--subscribers", 1000) as usize;
    let per_client = arg("--per-client", 0) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let mut clients = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            // tungstenite zeroes its read buffer (128 KiB by default) before each read: the
            // subscribers would spend more on that than on the messages.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
            let (mut ws, _) =
                tokio_tungstenite::connect_async_with_config(url, Some(config), false).await.expect("connect");
            ws.next().await; // ack
            let sub = r#"{"type":"subscribe","channels":["fanout"]}"#;
            ws.send(Message::Text(sub.into())).await.unwrap();
            ws.next().await; // subscribed
            clients.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                while lat.len() < per_client {
                    let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await else {
                        break;
                    };
                    if let Message::Text(t) = msg
                        // The payload is the sender's clock in microseconds: `"payload":123,`.
                        && let Some(sent) = t.split("\"payload\":").nth(1).and_then(|r| r.split([',', '}']).next())
                        && let Ok(sent) = sent.parse::<u64>()
                    {
                        lat.push(now_us().saturating_sub(sent));
                    }
                }
                lat
            }));
        }
        println!("ready");
        std::io::stdout().flush().unwrap();
        let mut lat = Vec::with_capacity(per_client * subscribers);
        for c in clients {
            lat.extend(c.await.unwrap());
        }
        lat.sort_unstable();
        let pct =
            |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
        println!("result {} {} {} {}", lat.len(), pct(0.50), pct(0.99), lat.last().copied().unwrap_or(0));
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(url) = args.iter().position(|a| a == "--subscriber-process").and_then(|i| args.get(i + 1)) {
        return subscriber_process(url);
    }
    let subscribers = arg("--subscribers", 1000) as usize;
    let rate = arg("--rate", 100);
    let seconds = arg("--seconds", 10);
    let pg = Cluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[auth]\ntype = \"trust\"\nfile = \"users.txt\"\n\
         [websocket]\nmax_ws_connections = {n}\nmax_ws_connections_per_ip = {n}\n\
         [databases.postgres]\nport = {port}\nuser = \"postgres\"\npassword = \"postgres\"\n",
        n = subscribers + 10,
        port = pg.port()
    );
    let config = Config::parse(&text, Some(&dir.path().join("pgbroker.toml")), &|_| None).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let broker = Broker::start(config).await.unwrap();
        let url = format!("ws://{}/ws", broker.http_addr());
        let total = rate * seconds;
        let expected = total as usize * subscribers;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--subscriber-process", &url, "--subscribers", &subscribers.to_string()])
            .args(["--per-client", &total.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the subscriber process");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::task::block_in_place(|| lines.next());
        assert_eq!(ready.and_then(Result::ok).as_deref(), Some("ready"), "the subscribers connected");
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres password=postgres dbname=postgres", pg.port()),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let started = std::time::Instant::now();
        for _ in 0..total {
            tick.tick().await;
            client.simple_query(&format!("SELECT pg_notify('fanout', '{}')", now_us())).await.unwrap();
        }
        let result = tokio::task::block_in_place(|| lines.next()).and_then(Result::ok).unwrap_or_default();
        let _ = child.wait();
        let elapsed = started.elapsed().as_secs_f64();
        let f: Vec<u64> = result.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let [delivered, p50, p99, max] = f[..] else { panic!("no result from the subscriber process: {result:?}") };
        println!(
            "# fan-out: {subscribers} WebSocket subscribers (a separate process) on one channel, {rate} notifications/s for {seconds}s"
        );
        println!("| subscribers | notifications/s | delivered | expected | delivered/s | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {subscribers} | {rate} | {delivered} | {expected} | {:.0} | {:.2} | {:.2} | {:.2} |",
            delivered as f64 / elapsed,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            max as f64 / 1000.0,
        );
        drop(broker);
    });
}
