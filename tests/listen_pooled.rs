//! LISTEN/NOTIFY for SQL clients behind transaction pooling, served by the broker's listener.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use futures_util::StreamExt;
use pgbroker::config::PoolMode;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// A client whose notifications arrive on a channel, as psycopg's `conn.notifies()` does.
async fn listening_client(addr: std::net::SocketAddr) -> (Client, mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) =
        tokio_postgres::connect(&conninfo(addr, "postgres", "postgres", "bench"), NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a notification in time").unwrap()
}

#[tokio::test]
async fn listen_in_transaction_mode_receives_notify_from_another_client() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let (listener, mut notes) = listening_client(b.local_addr()).await;
    listener.simple_query("LISTEN jobs").await.unwrap();
    // LISTEN holds no server: both pooled servers are free for others.
    let pool = b.app().registry().pools().all().into_iter().find(|p| p.key().database == "bench").unwrap();
    assert_eq!(pool.stats().idle, pool.stats().open);
    let other = connect_bench(b.local_addr()).await;
    other.simple_query("NOTIFY jobs, 'first'").await.unwrap();
    other.simple_query("SELECT pg_notify('jobs', 'second')").await.unwrap();
    assert_eq!(next(&mut notes).await, ("jobs".to_string(), "first".to_string()));
    assert_eq!(next(&mut notes).await, ("jobs".to_string(), "second".to_string()));
    // The listening client keeps running ordinary transactions.
    assert_eq!(one(&listener, "SELECT 41 + 1").await, "42");
}

#[tokio::test]
async fn notifications_wait_until_the_clients_transaction_ends() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let (listener, mut notes) = listening_client(b.local_addr()).await;
    listener.simple_query("LISTEN \"Mixed\"").await.unwrap();
    listener.simple_query("BEGIN").await.unwrap();
    let other = connect_bench(b.local_addr()).await;
    other.simple_query("NOTIFY \"Mixed\", 'during'").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), notes.recv()).await.is_err(),
        "not delivered inside the transaction"
    );
    listener.simple_query("COMMIT").await.unwrap();
    assert_eq!(next(&mut notes).await, ("Mixed".to_string(), "during".to_string()));
}

#[tokio::test]
async fn unlisten_stops_delivery() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let (listener, mut notes) = listening_client(b.local_addr()).await;
    listener.simple_query("LISTEN a_ch").await.unwrap();
    listener.simple_query("LISTEN b_ch").await.unwrap();
    listener.simple_query("UNLISTEN a_ch").await.unwrap();
    let other = connect_bench(b.local_addr()).await;
    other.simple_query("NOTIFY a_ch, 'dropped'; NOTIFY b_ch, 'kept'").await.unwrap();
    assert_eq!(next(&mut notes).await, ("b_ch".to_string(), "kept".to_string()));
    listener.simple_query("UNLISTEN *").await.unwrap();
    other.simple_query("NOTIFY b_ch, 'after unlisten'").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), notes.recv()).await.is_err());
}

#[tokio::test]
async fn a_client_listening_past_max_channels_per_client_gets_54000_and_keeps_its_channels() {
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    cfg.websocket.max_channels_per_client = 20;
    let b = broker(cfg).await;
    let (listener, mut notes) = listening_client(b.local_addr()).await;
    // 20 fit, the 21st is refused.
    for i in 0..20 {
        listener.simple_query(&format!("LISTEN ch_{i}")).await.unwrap();
    }
    listener.simple_query("LISTEN ch_3").await.expect("a channel it has is not a new one");
    let e = listener.simple_query("LISTEN one_too_many").await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e}");
    assert!(e.as_db_error().unwrap().message().contains("max_channels_per_client"), "{e}");
    // Only that LISTEN failed: the client and its channels go on, as does everyone else.
    let other = connect_bench(b.local_addr()).await;
    other.simple_query("NOTIFY ch_19, 'still here'").await.unwrap();
    assert_eq!(next(&mut notes).await, ("ch_19".to_string(), "still here".to_string()));
    assert_eq!(one(&listener, "SELECT 1").await, "1");
    listener.simple_query("UNLISTEN ch_0").await.unwrap();
    listener.simple_query("LISTEN one_too_many").await.expect("room again after an UNLISTEN");
}
