//! Micro-benchmarks of the pool: checkout + checkin of an idle server, uncontended and
//! contended. The servers are real (a throwaway PostgreSQL started here) and all open before
//! timing, so what is measured is the pool (lock, idle list, liveness probe, active-server
//! tracking, FIFO handoff to waiters), not connects.
//!
//! Run: `cargo bench --bench pool` (add `-- --warm-up-time 1 --measurement-time 3` for a
//! quick pass).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::metrics::PoolMetrics;
use pgbroker::pool::{Limit, Pool, PoolKey, PoolSettings, Release};
use pgbroker::server::{Credential, Target};
use pgbroker::tls::ServerTls;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOL: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn settings() -> PoolSettings {
    PoolSettings {
        size: POOL,
        min_size: POOL,
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
        // Servers are never idle this long during a run: no liveness query on checkout.
        check_delay: Duration::from_secs(3600),
        track_extra: Vec::new(),
        max_pinned: 1,
        refuse_pins: false,
        metrics: PoolMetrics::default(),
        events: None,
    }
}

/// A pool of `POOL` servers, all open and idle.
async fn warm_pool(pg: &Cluster) -> Arc<Pool> {
    let target = Target {
        host: "127.0.0.1".into(),
        port: pg.port(),
        dbname: "postgres".into(),
        user: pg.superuser().into(),
        credential: Some(Credential::Password(pg.password().into())),
        keepalive: true,
        tls: ServerTls::disabled(),
        application_name: None,
    };
    let key = PoolKey { database: "postgres".into(), user: pg.superuser().into() };
    // The app always counts pools against a budget limit; so does this one.
    let budget = Limit::new("budget bench", POOL + 10);
    let pool = Pool::new(key, target, settings(), vec![budget]);
    let mut held = Vec::new();
    for _ in 0..POOL {
        held.push(pool.checkout(WAIT).await.expect("open a server"));
    }
    for p in &mut held {
        p.release = Release::Reuse;
    }
    drop(held);
    let stats = pool.stats();
    assert_eq!((stats.open, stats.idle), (POOL, POOL), "all servers open and idle");
    pool
}

async fn cycle(pool: &Arc<Pool>) {
    let mut p = pool.checkout(WAIT).await.expect("checkout");
    p.release = Release::Reuse;
}

fn pool_benches(c: &mut Criterion) {
    let pg = Cluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let pool = rt.block_on(warm_pool(&pg));

    let mut g = c.benchmark_group("pool_checkout_checkin");
    g.throughput(Throughput::Elements(1));
    // One task, an idle server always there.
    g.bench_function("uncontended", |b| {
        b.iter_custom(|iters| {
            let pool = pool.clone();
            rt.block_on(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    cycle(&pool).await;
                }
                start.elapsed()
            })
        });
    });
    // `tasks` tasks on the two worker threads, each holding its server across a yield (a
    // stand-in for a transaction): up to the pool size they contend for the lock only; beyond
    // it they queue as waiters and servers are handed over directly on checkin.
    for tasks in [2usize, POOL, 5 * POOL, 50 * POOL] {
        g.bench_with_input(BenchmarkId::new("contended_tasks", tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(tasks as u64);
                let pool = pool.clone();
                rt.block_on(async move {
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let pool = pool.clone();
                            tokio::spawn(async move {
                                for _ in 0..per {
                                    let mut p = pool.checkout(WAIT).await.expect("checkout");
                                    tokio::task::yield_now().await;
                                    p.release = Release::Reuse;
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.unwrap();
                    }
                    // Per requested iteration, so criterion's figures are per checkout.
                    start.elapsed().mul_f64(iters as f64 / (per * tasks as u64) as f64)
                })
            });
        });
    }
    // The same task layout without the pool: what the spawn and yield alone cost.
    g.bench_function("yield_only_reference_tasks/1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async move {
                let tasks = 50 * POOL as u64;
                let per = iters.div_ceil(tasks);
                let start = Instant::now();
                let handles: Vec<_> = (0..tasks)
                    .map(|_| {
                        tokio::spawn(async move {
                            for _ in 0..per {
                                tokio::task::yield_now().await;
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.unwrap();
                }
                start.elapsed().mul_f64(iters as f64 / (per * tasks) as f64)
            })
        });
    });
    g.finish();
    let stats = pool.stats();
    assert_eq!(stats.open, POOL, "no server was closed or opened during the runs");
    drop(pool);
    drop(rt);
    drop(pg);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = pool_benches
}
criterion_main!(benches);
