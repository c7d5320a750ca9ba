//! The pool's checkout queue on its own (no sessions), against the real PostgreSQL.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::metrics::PoolMetrics;
use pgbroker::pool::{Limit, Pool, PoolKey, PoolSettings, Release};
use pgbroker::server::{Credential, Target};
use pgbroker::tls::ServerTls;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

fn pool_of_one() -> Arc<Pool> {
    pool_of_one_under(Limit::new("budget", 1))
}

/// A pool of one server counted against `limit`.
fn pool_of_one_under(limit: Arc<Limit>) -> Arc<Pool> {
    let settings = PoolSettings {
        size: 1,
        min_size: 0,
        reserve_size: 0,
        reserve_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(15),
        reset_query: String::new(),
        reset_timeout: Duration::from_secs(10),
        lifetime: Duration::ZERO,
        idle_timeout: Duration::ZERO,
        max_uses: 0,
        login_retry: Duration::from_secs(15),
        check_query: String::new(),
        check_delay: Duration::from_secs(3600),
        track_extra: Vec::new(),
        max_pinned: 1,
        refuse_pins: false,
        metrics: PoolMetrics::default(),
        events: None,
    };
    let target = Target {
        host: "127.0.0.1".into(),
        port: pg().port(),
        dbname: "postgres".into(),
        user: pg().superuser().into(),
        credential: Some(Credential::Password(pg().password().into())),
        keepalive: true,
        tls: ServerTls::disabled(),
        application_name: None,
    };
    let key = PoolKey { database: "postgres".into(), user: pg().superuser().into() };
    Pool::new(key, target, settings, vec![limit])
}

#[tokio::test]
async fn a_waiting_checkout_dropped_after_its_grant_gives_the_server_back() {
    let pool = pool_of_one();
    let mut held = pool.checkout(Duration::from_secs(10)).await.unwrap();
    held.release = Release::Reuse;
    // A second checkout queues behind the held server...
    let mut waiting = Box::pin(pool.checkout(Duration::from_secs(10)));
    let noop = std::task::Waker::noop();
    assert!(waiting.as_mut().poll(&mut Context::from_waker(noop)).is_pending());
    // ...is handed the server when it comes back, and is dropped before it looks.
    drop(held);
    drop(waiting);
    let stats = pool.stats();
    assert_eq!((stats.open, stats.idle), (1, 1), "the granted server is back in the pool, not lost");
    let again = tokio::time::timeout(Duration::from_secs(5), pool.checkout(Duration::from_secs(3))).await;
    assert!(matches!(again, Ok(Ok(_))), "the pool's only slot is usable again");
}

#[tokio::test]
async fn a_frozen_limit_does_not_pass_a_closed_servers_slot_to_a_waiter() {
    let limit = Limit::new("budget", 1);
    let pool = pool_of_one_under(limit.clone());
    let mut held = pool.checkout(Duration::from_secs(10)).await.unwrap();
    held.release = Release::Close;
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.checkout(Duration::from_millis(800)).await.is_ok() }
    });
    eventually("the checkout to queue", Duration::from_secs(5), || async {
        let stats = pool.stats();
        if stats.waiting == 1 { Ok(()) } else { Err(stats) }
    })
    .await;
    // The fleet lost its lease (say the server restarted): what closes is not reopened.
    limit.freeze();
    drop(held);
    assert!(!waiting.await.unwrap(), "the waiter got no server while frozen");
    assert_eq!((limit.cap(), limit.used(), pool.stats().open), (0, 0, 0));
    limit.thaw();
    limit.set_cap(1);
    assert!(pool.checkout(Duration::from_secs(5)).await.is_ok(), "served again once thawed");
}
