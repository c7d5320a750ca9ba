//! Fleet mode at scale: N brokers of one fleet (in this process) against one throwaway
//! PostgreSQL, each with one client running `SELECT 1` twice a second through it; the same N
//! in static mode (`max_instances = N`) beside them for the database's own cost.
//!
//! `cargo bench --bench fleet -- [--members 50,100,200,400] [--seconds 30] [--interval 2]`
//!
//! Per N it reports: seconds from the first start until every member has a share; the
//! database's CPU seconds per minute in fleet mode and in static mode (all PostgreSQL
//! processes, reaped backends included) and their difference, the coordination's cost, per
//! member too; the most connections the fleet held against `usable`, and how many of them
//! were bookkeeping connections (the fleet's connections on the server that no pool holds:
//! knocks); the spread of the shares at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::time::{Duration, Instant};

fn list(name: &str, default: &[u64]) -> Vec<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Connections per member in `usable`.
const PER_MEMBER: u64 = 5;
const FLEET: &str = "bench";

fn config(pg: &Cluster, mode: &str, n: u64, interval: u64, dir: &std::path::Path) -> Config {
    let budget = match mode {
        "fleet" => {
            format!("mode = \"fleet\"\nfleet = \"{FLEET}\"\nfleet_interval = \"{interval}s\"\nfleet_min_budget = 1")
        }
        _ => format!("max_instances = {n}"),
    };
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"transaction\"\n\
         [auth]\ntype = \"trust\"\n\
         [budget]\nserver_max_connections = {usable}\nreserved_connections = 0\n{budget}\n\
         [databases.db]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\nuser = \"postgres\"\npassword = \"postgres\"\npool_size = 4\n",
        usable = n * PER_MEMBER,
        port = pg.port(),
    );
    Config::parse(&text, Some(&dir.join("pgbroker.toml")), &|_| None).unwrap()
}

/// CPU seconds of the cluster's processes so far: the postmaster, its live children, and
/// its exited children (their time is in the postmaster's children's time once reaped).
fn pg_cpu_seconds(postmaster: u64) -> f64 {
    let tick = 100.0; // USER_HZ
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        // From the state (field 3): ppid is field 4, utime..cstime fields 14 to 17.
        let f: Vec<u64> = rest.split(' ').map(|v| v.parse().unwrap_or(0)).collect();
        if pid == postmaster || f.get(1) == Some(&postmaster) {
            total += f.get(11..15).map(|t| t.iter().sum()).unwrap_or(0);
        }
    }
    total as f64 / tick
}

/// The cluster's postmaster, from its pid file.
fn postmaster(pg: &Cluster) -> u64 {
    let text = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap()
}

struct Outcome {
    to_share: Option<f64>,
    cpu_per_min: f64,
    held_max: u64,
    bookkeeping_max: u64,
    knocks_max: u64,
    share_min: usize,
    share_max: usize,
    /// The most connections that are not the fleet's any member saw.
    others: u32,
}

async fn count(admin: &tokio_postgres::Client, sql: &str) -> u64 {
    admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) as u64
}

async fn run(pg: &Cluster, admin: &tokio_postgres::Client, mode: &str, n: u64, interval: u64, seconds: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut brokers = Vec::new();
    for _ in 0..n {
        brokers.push(Broker::start(config(pg, mode, n, interval, dir.path())).await.unwrap());
    }
    let has_share = |b: &Broker| b.app().registry().budgets().values().all(|(_, limit)| limit.cap() >= 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !brokers.iter().all(has_share) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let to_share = brokers.iter().all(has_share).then(|| started.elapsed().as_secs_f64());
    // One client per member, twice a second, bounded by the measuring window.
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut load = Vec::new();
    for b in &brokers {
        let url = format!("host=127.0.0.1 port={} user=postgres dbname=db", b.local_addr().port());
        load.push(tokio::spawn(async move {
            let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else { return };
            tokio::spawn(conn);
            while Instant::now() < until {
                let _ = c.simple_query("SELECT 1").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    let cpu0 = pg_cpu_seconds(postmaster(pg));
    let (mut held_max, mut bookkeeping_max, mut knocks_max) = (0, 0, 0);
    let knocks = || {
        brokers
            .iter()
            .flat_map(|b| b.app().fleet().members().iter().map(|m| u64::from(m.status().knocking)).collect::<Vec<_>>())
            .sum::<u64>()
    };
    let tag = format!("pgbroker/{FLEET}/%");
    // Servers the brokers' pools count (opening, open or closing).
    let pooled = || {
        brokers
            .iter()
            .flat_map(|b| b.app().registry().budgets().values().map(|(_, l)| l.used() as u64).collect::<Vec<_>>())
            .sum::<u64>()
    };
    while Instant::now() < until {
        let before = pooled();
        let held =
            count(admin, &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{tag}'")).await;
        let after = pooled();
        held_max = held_max.max(held);
        // Tagged connections no pool counts, read between two counts of the pools.
        bookkeeping_max = bookkeeping_max.max(held.saturating_sub(before.max(after)));
        knocks_max = knocks_max.max(knocks());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu_per_min = (pg_cpu_seconds(postmaster(pg)) - cpu0) * 60.0 / seconds as f64;
    for l in load {
        let _ = l.await;
    }
    let others = brokers
        .iter()
        .flat_map(|b| b.app().fleet().members().iter().map(|m| m.status().others).collect::<Vec<_>>())
        .max()
        .unwrap_or(0);
    let shares: Vec<usize> = brokers
        .iter()
        .flat_map(|b| b.app().registry().budgets().values().map(|(_, l)| l.cap()).collect::<Vec<_>>())
        .collect();
    for b in &brokers {
        b.stop();
    }
    drop(brokers);
    // The next run starts on an empty server.
    let deadline = Instant::now() + Duration::from_secs(60);
    let remaining =
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
    while count(admin, remaining).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Outcome {
        to_share,
        cpu_per_min,
        held_max,
        bookkeeping_max,
        knocks_max,
        share_min: shares.iter().copied().min().unwrap_or(0),
        share_max: shares.iter().copied().max().unwrap_or(0),
        others,
    }
}

fn main() {
    let members = list("--members", &[50, 100, 200, 400]);
    let seconds = list("--seconds", &[30])[0];
    let interval = list("--interval", &[2])[0];
    let most = members.iter().copied().max().unwrap_or(50);
    let opts = ClusterOptions {
        max_connections: (most * (PER_MEMBER + 2) + 50) as u32,
        hba: vec!["host all all 127.0.0.1/32 trust".into()],
        ..ClusterOptions::default()
    };
    let pg = Cluster::start(opts).expect("start PostgreSQL");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (admin, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port()),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        println!(
            "# fleet: N members in one process, one client each (SELECT 1 twice a second), fleet_interval {interval}s, \
             usable = {PER_MEMBER} x N, {seconds} s measured per run"
        );
        println!(
            "| members | seconds to every share | DB CPU s/min, fleet | static | coordination s/min | per member ms/min | fleet connections held (max) / usable | bookkeeping connections (max) | of them knocks (max) | share min / max | others seen |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for &n in &members {
            let stat = run(&pg, &admin, "static", n, interval, seconds).await;
            let fleet = run(&pg, &admin, "fleet", n, interval, seconds).await;
            // The next size starts with an empty fleet table.
            let _ = admin.batch_execute("DELETE FROM pgbroker_fleet; DELETE FROM pgbroker_fleet_round").await;
            let coordination = fleet.cpu_per_min - stat.cpu_per_min;
            println!(
                "| {n} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} / {} | {} | {} | {} / {} | {} |",
                fleet.to_share.map_or("not within 60 s".into(), |s| format!("{s:.1}")),
                fleet.cpu_per_min,
                stat.cpu_per_min,
                coordination,
                coordination * 1000.0 / n as f64,
                fleet.held_max,
                n * PER_MEMBER,
                fleet.bookkeeping_max,
                fleet.knocks_max,
                fleet.share_min,
                fleet.share_max,
                fleet.others,
            );
        }
    });
}
