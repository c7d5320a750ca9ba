//! Idle clients hibernate: quiet for a second with nothing in flight, they leave the relay
//! loop (its state is freed) and wait for their socket; whatever wakes them is served as if
//! they had never left.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::app::Broker;
use pgbroker::config::PoolMode;
use std::time::{Duration, Instant};

/// Longer than the hibernation delay (1 s), with room for a loaded machine.
const PAST_HIBERNATION: Duration = Duration::from_millis(1600);

/// Waits (at most 10 s) until `n` clients of `b` hibernate.
async fn until_hibernating(b: &Broker, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.app().hibernating_clients() != n {
        assert!(Instant::now() < deadline, "{} hibernating, expected {n}", b.app().hibernating_clients());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most `limit`) until the broker closes `c`'s connection without `c` speaking.
async fn until_closed(c: &tokio_postgres::Client, limit: Duration, what: &str) {
    tokio::time::timeout(limit, async {
        while !c.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not closed: {what}"));
}

#[tokio::test]
async fn quiet_clients_hibernate_and_are_served_when_they_speak_again() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let a = connect_bench(b.local_addr()).await;
    let c = connect_bench(b.local_addr()).await;
    one(&a, "SELECT 1").await;
    one(&c, "SELECT 1").await;
    until_hibernating(&b, 2).await;
    assert_eq!(one(&a, "SELECT 'awake'").await, "awake");
    assert_eq!(b.app().hibernating_clients(), 1, "the other still sleeps");
    assert_eq!(col(&c, "SELECT 1; SELECT 2").await, ["1", "2"]);
    let (_, metrics) = http_get(b.http_addr(), "/metrics").await;
    assert!(metrics.contains("pgbroker_hibernating_clients"), "{metrics}");
}

#[tokio::test]
async fn a_busy_client_does_not_hibernate_between_its_transactions() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    let until = Instant::now() + PAST_HIBERNATION;
    while Instant::now() < until {
        one(&c, "SELECT 1").await;
        // The client's pace: busy, but never quiet for the hibernation delay.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(b.app().hibernating_clients(), 0);
    }
}

#[tokio::test]
async fn a_client_inside_a_transaction_does_not_hibernate() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    c.simple_query("BEGIN").await.unwrap();
    // Nothing is supposed to happen (no hibernation), so there is no event to wait for.
    tokio::time::sleep(PAST_HIBERNATION).await;
    assert_eq!(b.app().hibernating_clients(), 0, "it holds a server");
    assert_eq!(one(&c, "SELECT 'still in it'").await, "still in it");
    c.simple_query("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_hibernating_client_is_killed_at_once() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let victim = connect_bench(b.local_addr()).await;
    one(&victim, "SELECT 1").await;
    until_hibernating(&b, 1).await;
    let admin = connect(b.local_addr(), "postgres", "postgres", "pgbroker").await.unwrap();
    admin.simple_query("KILL bench").await.unwrap();
    until_closed(&victim, Duration::from_secs(2), "killed while hibernating").await;
    assert_eq!(b.app().hibernating_clients(), 0);
}

#[tokio::test]
async fn client_idle_timeout_still_ends_a_hibernating_client() {
    let mut cfg = mode_config(PoolMode::Transaction, 2);
    cfg.broker.client_idle_timeout = Duration::from_millis(2500);
    let b = broker(cfg).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    until_hibernating(&b, 1).await;
    until_closed(&c, Duration::from_secs(5), "client_idle_timeout while hibernating").await;
}

#[tokio::test]
async fn a_drain_closes_hibernating_clients() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    until_hibernating(&b, 1).await;
    tokio::time::timeout(Duration::from_secs(5), b.drain(Duration::from_secs(5))).await.expect("drained");
    assert!(c.is_closed());
}

#[tokio::test]
async fn a_client_that_leaves_while_hibernating_is_forgotten() {
    let b = broker(mode_config(PoolMode::Transaction, 2)).await;
    let c = connect_bench(b.local_addr()).await;
    one(&c, "SELECT 1").await;
    until_hibernating(&b, 1).await;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.app().client_count() > 0 {
        assert!(Instant::now() < deadline, "client still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.app().hibernating_clients(), 0);
}
