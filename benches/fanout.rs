//! Fan-out benchmark of the LISTEN/NOTIFY WebSocket bridge: N WebSocket subscribers on one
//! channel, notifications at a fixed rate; reports delivered/s and the latency from
//! `pg_notify` to receipt (p50/p99).
//!
//! `cargo bench --bench fanout -- [--subscribers 1000] [--rate 50] [--seconds 10]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn main() {
    let subscribers = arg("--subscribers", 1000) as usize;
    let rate = arg("--rate", 50);
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
        let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<u64>();
        let mut ready = Vec::new();
        let running = Arc::new(AtomicBool::new(true));
        for _ in 0..subscribers {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
            ws.next().await; // ack
            let sub = r#"{"type":"subscribe","channels":["fanout"]}"#;
            ws.send(Message::Text(sub.into())).await.unwrap();
            ws.next().await; // subscribed
            let tx = lat_tx.clone();
            let running = running.clone();
            ready.push(tokio::spawn(async move {
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        // The payload is the sender's clock in microseconds: `"payload":123,`.
                        if let Some(sent) = t.split("\"payload\":").nth(1).and_then(|r| r.split([',', '}']).next())
                            && let Ok(sent) = sent.parse::<u64>()
                        {
                            let _ = tx.send(now_us().saturating_sub(sent));
                        }
                    }
                    if !running.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }));
        }
        drop(lat_tx);
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres password=postgres dbname=postgres", pg.port()),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let total = rate * seconds;
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let started = std::time::Instant::now();
        for _ in 0..total {
            tick.tick().await;
            client.simple_query(&format!("SELECT pg_notify('fanout', '{}')", now_us())).await.unwrap();
        }
        // Collect until everything expected arrived or a quiet second passes.
        let expected = total as usize * subscribers;
        let mut lat = Vec::with_capacity(expected);
        while lat.len() < expected {
            match tokio::time::timeout(Duration::from_secs(2), lat_rx.recv()).await {
                Ok(Some(l)) => lat.push(l),
                _ => break,
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        running.store(false, Ordering::Relaxed);
        lat.sort_unstable();
        let pct =
            |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
        println!(
            "# fan-out: {subscribers} WebSocket subscribers on one channel, {rate} notifications/s for {seconds}s"
        );
        println!("| subscribers | notifications/s | delivered | expected | delivered/s | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {subscribers} | {rate} | {} | {expected} | {:.0} | {:.2} | {:.2} | {:.2} |",
            lat.len(),
            lat.len() as f64 / elapsed,
            pct(0.50) as f64 / 1000.0,
            pct(0.99) as f64 / 1000.0,
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        );
        drop(broker);
    });
}
