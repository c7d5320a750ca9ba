//! /metrics, /health and the event stream, scraped and read like an operator's tools would.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use pgbroker::config::PoolMode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The value of a metric line matching `name` and all `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let matches = (series == name || series.starts_with(&format!("{name}{{")))
            && labels.iter().all(|lab| series.contains(lab));
        matches.then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn metrics_are_scraped_and_counters_move_under_load() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    let (code, first) = http_get(b.http_addr(), "/metrics").await;
    assert_eq!(code, 200);
    let bench = ["database=\"bench\"", "user=\"postgres\""];
    let q0 = metric(&first, "pgbroker_queries_total", &bench).unwrap();
    for _ in 0..25 {
        one(&c, "SELECT repeat('y', 500)").await;
    }
    let (_, second) = http_get(b.http_addr(), "/metrics").await;
    assert!(metric(&second, "pgbroker_queries_total", &bench).unwrap() >= q0 + 25.0);
    assert!(metric(&second, "pgbroker_transactions_total", &bench).unwrap() >= 25.0);
    assert!(metric(&second, "pgbroker_sent_bytes_total", &bench).unwrap() > 12_500.0);
    assert!(metric(&second, "pgbroker_query_seconds_count", &bench).unwrap() >= 26.0, "histogram recorded");
    assert!(second.contains("pgbroker_query_seconds_bucket{"), "rendered as a Prometheus histogram");
    assert!(metric(&second, "pgbroker_budget_connections", &[]).unwrap() >= 1.0);
    assert!(metric(&second, "pgbroker_servers", &["state=\"idle\""]).is_some());
    assert!(metric(&second, "pgbroker_clients", &["state=\"idle\""]).unwrap() >= 1.0);
    assert!(second.contains("# HELP pgbroker_wait_seconds"));
    assert!(second.contains("# TYPE pgbroker_queries_total counter"));
    // Errors by SQLSTATE class and refusals by reason.
    let _ = c.simple_query("SELECT 1/0").await;
    let _ = connect(b.local_addr(), "postgres", "wrong", "bench").await;
    let (_, third) = http_get(b.http_addr(), "/metrics").await;
    assert_eq!(metric(&third, "pgbroker_server_errors_total", &["class=\"22\""]), Some(1.0));
    assert!(metric(&third, "pgbroker_refused_connections_total", &["reason=\"auth\""]).unwrap() >= 1.0);
}

#[tokio::test]
async fn health_turns_overloaded_while_clients_wait_and_recovers() {
    let mut cfg = mode_config(PoolMode::Transaction, 1);
    cfg.health.overloaded_wait = Duration::from_millis(200);
    cfg.broker.query_wait_timeout = Duration::from_secs(20);
    let b = broker(cfg).await;
    let (code, body) = http_get(b.http_addr(), "/health").await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, h["status"].as_str()), (200, Some("healthy")), "{body}");
    for key in [
        "utilizationRatio",
        "activeConnections",
        "maxConnections",
        "waitingClients",
        "rejectedConnections",
        "averageResponseTime",
        "errorRate",
        "message",
    ] {
        assert!(h.get(key).is_some(), "{key} in {body}");
    }
    let holder = connect_bench(b.local_addr()).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = connect_bench(b.local_addr()).await;
    let waiting = tokio::spawn(async move { one(&waiter, "SELECT 'served'").await });
    let deadline = Instant::now() + Duration::from_secs(10);
    let overloaded = loop {
        let (code, body) = http_get(b.http_addr(), "/health").await;
        let h: Value = serde_json::from_str(&body).unwrap();
        if h["status"] == "overloaded" {
            assert_eq!(code, 503);
            assert_eq!(h["waitingClients"], 1);
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(overloaded, "status never became overloaded");
    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), "served");
    let (code, body) = http_get(b.http_addr(), "/health").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "healthy");
}

#[tokio::test]
async fn liveness_and_readiness() {
    let b = broker(config()).await;
    assert_eq!(http_get(b.http_addr(), "/health/live").await.0, 200);
    let (code, body) = http_get(b.http_addr(), "/health/ready").await;
    assert_eq!(code, 200, "{body}");
    // A database nobody listens on makes the broker not ready.
    let mut cfg = config();
    let mut dead = cfg.databases["bench"].clone();
    dead.port = free_port();
    cfg.databases.insert("dead".into(), dead);
    cfg.budget.server_max_connections = pgbroker::config::ServerMaxConnections::Fixed(50);
    let b = broker(cfg).await;
    let (code, body) = http_get(b.http_addr(), "/health/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not ready"));
}

#[tokio::test]
async fn events_and_metric_snapshots_stream_on_the_bridge() {
    let b = broker(mode_config(PoolMode::Transaction, 1)).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?database=bench", b.http_addr())).await.unwrap();
    ws.next().await.unwrap().unwrap(); // ack
    let sub = json!({"type": "subscribe", "channels": ["$pgbroker.events", "$pgbroker.metrics"]}).to_string();
    ws.send(Message::Text(sub.into())).await.unwrap();
    let mut seen_events = std::collections::HashSet::new();
    let mut metrics_snapshot = None;
    // Load: the first query opens a server; a second client must wait for the only one.
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("BEGIN").await.unwrap();
    let other = connect_bench(b.local_addr()).await;
    let blocked = tokio::spawn(async move { one(&other, "SELECT 1").await });
    let pool = b.app().registry().pools().all().into_iter().find(|p| p.key().database == "bench").unwrap();
    eventually("the second client to wait for the server", Duration::from_secs(10), || async {
        let stats = pool.stats();
        if stats.waiting == 1 { Ok(()) } else { Err(stats) }
    })
    .await;
    c.simple_query("COMMIT").await.unwrap();
    blocked.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && (metrics_snapshot.is_none() || seen_events.len() < 2) {
        let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("event") => {
                assert_eq!(v["channel"], "$pgbroker.events");
                seen_events.insert(v["event"].as_str().unwrap().to_string());
            }
            Some("metrics") => metrics_snapshot = Some(v),
            _ => {}
        }
    }
    assert!(seen_events.contains("connection_added"), "{seen_events:?}");
    assert!(seen_events.contains("pool_limit_reached"), "{seen_events:?}");
    let m = metrics_snapshot.expect("a metrics snapshot");
    assert!(m["health"]["status"].is_string());
    assert!(m["pools"].as_array().unwrap().iter().any(|p| p["database"] == "bench"));
}

#[tokio::test]
async fn a_token_without_the_events_channel_cannot_watch_it() {
    let mut cfg = config();
    cfg.websocket.tokens = vec![pgbroker::config::Token { token: "app".into(), channels: vec!["orders".into()] }];
    let b = broker(cfg).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?database=bench&token=app", b.http_addr())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["$pgbroker.events"]}).to_string().into()))
        .await
        .unwrap();
    let Some(Ok(Message::Text(t))) = ws.next().await else { panic!("no reply") };
    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["code"], "forbidden_channel");
}
