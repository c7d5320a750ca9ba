//! Fleet mode: broker processes of one fleet share a PostgreSQL with `max_connections = 60`
//! while each carries transaction-mode load; 1 → 6 → 2 instances, sampling
//! `pg_stat_activity` every 100 ms. Then the same load through two static-budget brokers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::BrokerProcess;
use pgbroker::cluster::{Cluster, ClusterOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// max_connections 60 - superuser_reserved_connections 3 - reserved_connections 5.
const USABLE: u32 = 52;
const INTERVAL: Duration = Duration::from_secs(2);
const FLOOR: u32 = 2;
/// Connections that are not the fleet's: the sampler's.
const OTHERS: u32 = 1;
/// Clients per broker, each running short transactions back to back.
const CLIENTS: usize = 12;

/// A broker process with its load's stop flag, count of transactions served, and count of
/// load clients still running.
struct Broker {
    process: BrokerProcess,
    port: u16,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    clients: Arc<AtomicU64>,
}

impl Drop for Broker {
    /// Stops its load; the process is killed right after.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A broker config for `pg` in transaction mode, trust auth, `[budget]` as given.
fn config_text(pg: &Cluster, listen: &str, budget: &str) -> String {
    format!(
        r#"
[broker]
listen = "{listen}"
http_listen = "127.0.0.1:0"
pool_mode = "transaction"
query_wait_timeout = "60s"

[auth]
type = "trust"
admin_users = ["postgres"]

[budget]
{budget}

[databases.db]
host = "127.0.0.1"
port = {pg}
dbname = "postgres"
user = "postgres"
password = "postgres"
"#,
        pg = pg.port()
    )
}

/// Starts a broker process (not waiting for it to listen).
fn start_broker(pg: &Cluster, budget: &str) -> Broker {
    let process = BrokerProcess::spawn_new(|p| config_text(pg, &format!("127.0.0.1:{}", p.port), budget), &[]);
    Broker { port: process.ports.port, process, stop: Arc::default(), done: Arc::default(), clients: Arc::default() }
}

fn fleet_budget() -> String {
    format!(
        "mode = \"fleet\"\nfleet = \"t\"\nfleet_interval = \"{}ms\"\nfleet_min_budget = {FLOOR}",
        INTERVAL.as_millis()
    )
}

async fn wait_listening(b: &Broker) {
    b.process.wait_listening().await;
}

/// Counts a load client as running until dropped.
struct Running(Arc<AtomicU64>);

impl Running {
    fn new(count: &Arc<AtomicU64>) -> Running {
        count.fetch_add(1, Ordering::Relaxed);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets the stop flag of `brokers`' load and waits until its clients have all returned, so
/// that every error they saw is recorded and none of them is mid-query.
async fn stop_load(brokers: &[&Broker]) {
    for b in brokers {
        b.stop.store(true, Ordering::Relaxed);
    }
    common::eventually("the load clients to stop", Duration::from_secs(10), || async {
        let running: Vec<u64> = brokers.iter().map(|b| b.clients.load(Ordering::Relaxed)).collect();
        if running.iter().all(|&n| n == 0) { Ok(()) } else { Err(running) }
    })
    .await;
}

/// Starts `CLIENTS` clients looping short transactions through `b` until its stop flag.
fn load(b: &Broker, errors: &Arc<Mutex<Vec<String>>>) {
    for _ in 0..CLIENTS {
        let (port, stop, done, errors) = (b.port, b.stop.clone(), b.done.clone(), errors.clone());
        let running = Running::new(&b.clients);
        tokio::spawn(async move {
            let _running = running;
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let c = match common::connect(addr, "postgres", "x", "db").await {
                Ok(c) => c,
                Err(e) => return errors.lock().await.push(format!("connect: {e:?}")),
            };
            // Bounded: at most 10 minutes of work whatever happens to the stop flag.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match c.simple_query("SELECT pg_sleep(0.02)").await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if stop.load(Ordering::Relaxed) => {
                        let _ = e;
                        return;
                    }
                    Err(e) => return errors.lock().await.push(format!("query on {port}: {e:?}")),
                }
            }
        });
    }
}

/// This broker's row of SHOW BUDGET.
async fn budget_row(b: &Broker) -> std::collections::HashMap<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], b.port));
    let c = common::connect(addr, "postgres", "x", "pgbroker").await.unwrap();
    common::rows(&c, "SHOW BUDGET").await.into_iter().next().expect("one server")
}

fn num(row: &std::collections::HashMap<String, String>, k: &str) -> u32 {
    row.get(k).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{k} in {row:?}"))
}

/// Samples pg_stat_activity every 100 ms: (fleet connections, every client connection).
struct Sampler {
    max_fleet: Arc<AtomicU64>,
    max_all: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

async fn sampler(pg: &Cluster) -> Sampler {
    let c = common::direct_to(pg, "postgres").await;
    let s = Sampler { max_fleet: Arc::default(), max_all: Arc::default(), stop: Arc::default() };
    let (max_fleet, max_all, stop) = (s.max_fleet.clone(), s.max_all.clone(), s.stop.clone());
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let row = common::rows(
                &c,
                "SELECT count(*) FILTER (WHERE left(application_name, 11) = 'pgbroker/t/') AS fleet, \
                 count(*) AS all FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .await;
            let fleet: u64 = row[0]["fleet"].parse().unwrap();
            let all: u64 = row[0]["all"].parse().unwrap();
            max_fleet.fetch_max(fleet, Ordering::Relaxed);
            max_all.fetch_max(all, Ordering::Relaxed);
            // The sampling period.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    s
}

/// Waits until every broker's share is within one of the fair share of `n` instances, at
/// most `limit`; returns the shares.
async fn converge(brokers: &[&Broker], n: u32, limit: Duration) -> Vec<u32> {
    // One floor is kept free for a joiner; the fleet has no connection of its own.
    let fair = (USABLE - OTHERS - FLOOR) / n;
    let what = format!("shares of {n} instances within one of fair {fair}");
    common::eventually(&what, limit, || async {
        let mut shares = Vec::new();
        let mut ok = true;
        for b in brokers {
            let row = budget_row(b).await;
            let share = num(&row, "budget");
            ok &= num(&row, "instances") == n && share.abs_diff(fair) <= 1;
            shares.push(share);
        }
        if ok { Ok(shares) } else { Err(shares) }
    })
    .await
}

/// Waits (at most 15 s) until `b` has served a round of its load.
async fn warmed_up(b: &Broker) {
    let what = format!("a round of load served through {}", b.port);
    common::eventually(&what, Duration::from_secs(15), || async { b.done.load(Ordering::Relaxed) >= CLIENTS as u64 })
        .await;
}

/// Transactions per second through each group of brokers, measured over the same window so
/// that whatever else the machine runs weighs on both alike.
async fn throughputs(a: &[&Broker], b: &[&Broker], over: Duration) -> (f64, f64) {
    let done = |g: &[&Broker]| -> u64 { g.iter().map(|b| b.done.load(Ordering::Relaxed)).sum() };
    let before = (done(a), done(b));
    // A measurement window, not a wait for something to happen.
    tokio::time::sleep(over).await;
    let tps = |after: u64, before: u64| (after - before) as f64 / over.as_secs_f64();
    (tps(done(a), before.0), tps(done(b), before.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_max_connections_as_instances_come_and_go() {
    let pg = Cluster::start(ClusterOptions { max_connections: 60, ..ClusterOptions::default() }).unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let samples = sampler(&pg).await;

    // One instance: it holds everything but room for a joiner.
    let first = start_broker(&pg, &fleet_budget());
    wait_listening(&first).await;
    load(&first, &errors);
    warmed_up(&first).await;
    let alone = converge(&[&first], 1, INTERVAL * 3).await;
    assert_eq!(alone, vec![USABLE - OTHERS - FLOOR]);

    // Five more at once.
    let joiners: Vec<Broker> = (1..6).map(|_| start_broker(&pg, &fleet_budget())).collect();
    for b in &joiners {
        wait_listening(b).await;
        load(b, &errors);
    }
    let all: Vec<&Broker> = std::iter::once(&first).chain(joiners.iter()).collect();
    let six = converge(&all, 6, INTERVAL * 3).await;
    assert!(six.iter().sum::<u32>() <= USABLE - OTHERS, "{six:?}");
    for b in &all {
        warmed_up(b).await;
    }

    // Four die at once (SIGKILL): their connections vanish, their shares go to the rest.
    let mut joiners = joiners;
    let survivor = joiners.remove(0);
    stop_load(&joiners.iter().collect::<Vec<_>>()).await;
    drop(joiners);
    // Their rows go once stale (1.5 intervals), at the next round (one more), and the
    // survivors read their new shares at their next heartbeat (one more, ±10%).
    let two = converge(&[&first, &survivor], 2, INTERVAL * 5).await;

    // The same load at the same time through two brokers with the static budget for two
    // instances, in front of a twin server.
    let twin = Cluster::start(ClusterOptions { max_connections: 60, ..ClusterOptions::default() }).unwrap();
    let fixed = "mode = \"static\"\nmax_instances = 2";
    let statics: Vec<Broker> = (0..2).map(|_| start_broker(&twin, fixed)).collect();
    for b in &statics {
        wait_listening(b).await;
        load(b, &errors);
    }
    for b in &statics {
        warmed_up(b).await;
    }
    let (fleet_tps, static_tps) =
        throughputs(&[&first, &survivor], &statics.iter().collect::<Vec<_>>(), Duration::from_secs(3)).await;
    stop_load(&[&first, &survivor].into_iter().chain(&statics).collect::<Vec<_>>()).await;
    drop((first, survivor));
    samples.stop.store(true, Ordering::Relaxed);

    let errors = errors.lock().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let max_fleet = samples.max_fleet.load(Ordering::Relaxed) as u32;
    let max_all = samples.max_all.load(Ordering::Relaxed) as u32;
    assert!(max_fleet <= USABLE, "the fleet held {max_fleet} > {USABLE}");
    assert!(max_all <= 57, "{max_all} client connections");
    let ratio = fleet_tps / static_tps;
    eprintln!(
        "shares alone {alone:?}, six {six:?}, two {two:?}; most fleet connections seen {max_fleet}; \
         tps with two: fleet {fleet_tps:.0}, static {static_tps:.0} ({ratio:.2})"
    );
    // Same demand (12 clients per broker, under both budgets): throughput must not drop;
    // the tolerance absorbs the scheduling noise of four brokers sharing a 2-core machine.
    assert!((0.85..=1.2).contains(&ratio), "fleet {fleet_tps:.0} tps vs static {static_tps:.0}");
}

/// An in-process broker of fleet `fleet` on `pg`, with `budget` lines added.
async fn fleet_broker(pg: &Cluster, fleet: &str, budget: &str) -> pgbroker::app::Broker {
    let dir = tempfile::tempdir().unwrap().keep();
    let budget = format!("mode = \"fleet\"\nfleet = \"{fleet}\"\nfleet_interval = \"1s\"\n{budget}");
    let text = config_text(pg, "127.0.0.1:0", &budget);
    let cfg = pgbroker::config::Config::parse(&text, Some(&dir.join("pgbroker.toml")), &|_| None).unwrap();
    pgbroker::app::Broker::start(cfg).await.unwrap()
}

async fn show_budget(b: &pgbroker::app::Broker) -> std::collections::HashMap<String, String> {
    let c = common::connect(b.local_addr(), "postgres", "x", "pgbroker").await.unwrap();
    common::rows(&c, "SHOW BUDGET").await.into_iter().next().expect("one server")
}

/// Polls until `f` holds for SHOW BUDGET of `b`, at most 10 s.
async fn until(b: &pgbroker::app::Broker, f: impl Fn(&std::collections::HashMap<String, String>) -> bool) {
    common::eventually("SHOW BUDGET to get there", Duration::from_secs(10), || async {
        let row = show_budget(b).await;
        if f(&row) { Ok(()) } else { Err(row) }
    })
    .await;
}

#[tokio::test]
async fn show_budget_metrics_and_health_show_the_fleet() {
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let a = fleet_broker(&pg, "v", "").await;
    let b = fleet_broker(&pg, "v", "").await;
    let settled = |r: &std::collections::HashMap<String, String>| r["instances"] == "2" && r["standing"] == "fair";
    until(&a, settled).await;
    until(&b, settled).await;

    let row = show_budget(&a).await;
    assert_eq!(row["mode"], "fleet");
    assert_eq!(row["fleet"], "v");
    assert_eq!(row["instance"], a.app().fleet().instance_id());
    // 40 - 3 superuser reserved - 5 reserved = 32 usable; one floor (2) kept free for a joiner.
    assert_eq!(row["fair_share"], ((32 - 2) / 2).to_string());
    assert_eq!(row["budget"], row["fair_share"]);
    assert!(row["derivation"].contains("shared live by the fleet"), "{row:?}");

    let (_, metrics) = common::http_get(a.http_addr(), "/metrics").await;
    assert!(metrics.lines().any(|l| l.starts_with("pgbroker_fleet_instances{") && l.ends_with(" 2")), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("pgbroker_fleet_share_connections{") && l.ends_with(" 15")));
    let (code, health) = common::http_get(a.http_addr(), "/health").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(code, 200);
    assert_eq!(health["fleet"][0]["instances"], 2);
    assert_eq!(health["fleet"][0]["standing"], "fair");
}

#[tokio::test]
async fn servers_carry_the_fleet_tag_instead_of_the_clients_application_name() {
    let pg = Cluster::start(ClusterOptions::default()).unwrap();
    let a = fleet_broker(&pg, "w", "").await;
    let conninfo = format!("{} application_name=myapp", common::conninfo(a.local_addr(), "postgres", "x", "db"));
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let on_server = common::one(&c, "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").await;
    assert_eq!(on_server, format!("pgbroker/w/{}", a.app().fleet().instance_id()));
    let named: Vec<String> =
        common::col(&c, "SELECT application_name FROM pg_stat_activity WHERE application_name = 'myapp'").await;
    assert!(named.is_empty(), "the client's name never reaches a server: {named:?}");
}

#[tokio::test]
async fn an_instance_that_does_not_fit_waits_and_says_so() {
    let pg = Cluster::start(ClusterOptions::default()).unwrap();
    // 9 - 5 reserved = 4 usable: room for two instances at the floor of 2, not three.
    let fixed = "server_max_connections = 9\nreserved_connections = 5";
    let a = fleet_broker(&pg, "x", fixed).await;
    let b = fleet_broker(&pg, "x", fixed).await;
    // The two settle at the floor first, each having said it holds no more (a took 2 alone).
    // A third knocking meanwhile could find room while they shrink: legitimate, but not the
    // case under test.
    let floor = |r: &std::collections::HashMap<String, String>| {
        r["instances"] == "2" && r["budget"] == "2" && r["claim"] == "2"
    };
    until(&a, floor).await;
    until(&b, floor).await;
    let c = fleet_broker(&pg, "x", fixed).await;
    until(&c, |r| r["budget"] == "0" && r["standing"] == "no_room").await;
    let (code, health) = common::http_get(c.http_addr(), "/health").await;
    assert_eq!(code, 200);
    assert!(health.contains("\"status\":\"degraded\"") && health.contains("fleet: no connections"), "{health}");
    let shares: u32 =
        [&a, &b].iter().map(|x| x.app().registry().budgets().values().map(|(_, l)| l.cap() as u32).sum::<u32>()).sum();
    assert!(shares <= 4, "shares {shares} fit in 4");
    let direct = common::direct_to(&pg, "postgres").await;
    let held: u32 =
        common::one(&direct, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgbroker/x/%'")
            .await
            .parse()
            .unwrap();
    // The third's knock may be there for the moment it takes to be told there is no room.
    assert!(held <= 4 + 1, "the fleet holds {held} connections of 4 usable");
    drop(c);
}

#[tokio::test]
async fn a_reload_keeps_the_fleet_share_and_mode() {
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgbroker.toml");
    let fleet = |mode: &str| format!("mode = \"{mode}\"\nfleet = \"r\"\nfleet_interval = \"1s\"\nmax_instances = 4");
    std::fs::write(&path, config_text(&pg, "127.0.0.1:0", &fleet("fleet"))).unwrap();
    let a = pgbroker::app::Broker::start(pgbroker::config::Config::load(&path).unwrap()).await.unwrap();
    until(&a, |r| r["standing"] == "fair").await;
    let before = show_budget(&a).await["budget"].clone();
    // Switching mode needs a restart: the reload keeps fleet mode and its live share.
    std::fs::write(&path, config_text(&pg, "127.0.0.1:0", &fleet("static"))).unwrap();
    a.app().reload().await.unwrap();
    let row = show_budget(&a).await;
    assert_eq!(row["mode"], "fleet");
    let (before, after): (u32, u32) = (before.parse().unwrap(), row["budget"].parse().unwrap());
    // The live share may move by one as connections log in; it is not the static 8.
    assert!(after.abs_diff(before) <= 1 && after > (40 - 3 - 5) / 4, "{before} -> {after}");
}

#[tokio::test]
async fn fleet_mode_without_a_login_to_count_with_does_not_start() {
    let pg = Cluster::start(ClusterOptions::default()).unwrap();
    let text = config_text(&pg, "127.0.0.1:0", "mode = \"fleet\"\nserver_max_connections = 100")
        .replace("user = \"postgres\"\npassword = \"postgres\"\n", "");
    let cfg = pgbroker::config::Config::parse(&text, None, &|_| None).unwrap();
    let err = pgbroker::app::Broker::start(cfg).await.err().expect("refused");
    let text = pgbroker::error::chain(&err);
    assert!(text.contains("needs a database") && text.contains("pg_stat_activity"), "{text}");
}

#[tokio::test]
async fn a_server_dropped_and_added_again_by_reloads_gets_a_share_again() {
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgbroker.toml");
    let budget = "mode = \"fleet\"\nfleet = \"d\"\nfleet_interval = \"1s\"\nserver_max_connections = 40";
    let original = config_text(&pg, "127.0.0.1:0", budget);
    std::fs::write(&path, &original).unwrap();
    let a = pgbroker::app::Broker::start(pgbroker::config::Config::load(&path).unwrap()).await.unwrap();
    until(&a, |r| r["standing"] == "fair").await;
    // The only database moves to another server, then back.
    let elsewhere = original
        .replace("[databases.db]", "[databases.db2]")
        .replace(&format!("port = {}", pg.port()), &format!("port = {}", common::free_port()));
    std::fs::write(&path, elsewhere).unwrap();
    a.app().reload().await.unwrap();
    std::fs::write(&path, &original).unwrap();
    a.app().reload().await.unwrap();
    until(&a, |r| r["standing"] == "fair" && r["budget"].parse::<u32>().unwrap() > 0).await;
    let c = common::connect(a.local_addr(), "postgres", "x", "db").await.unwrap();
    assert_eq!(common::one(&c, "SELECT 1").await, "1", "served under the new share");
}

/// Which of `brokers` ran the fleet's last round, by its instance id.
async fn last_round_by(direct: &tokio_postgres::Client) -> String {
    common::one(direct, "SELECT ran_by FROM pgbroker_fleet_round WHERE fleet = 't'").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_that_ran_the_last_round_is_killed_and_another_runs_the_next() {
    let pg = Cluster::start(ClusterOptions { max_connections: 60, ..ClusterOptions::default() }).unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let samples = sampler(&pg).await;
    let mut brokers: Vec<Broker> = (0..3).map(|_| start_broker(&pg, &fleet_budget())).collect();
    for b in &brokers {
        wait_listening(b).await;
        load(b, &errors);
    }
    converge(&brokers.iter().collect::<Vec<_>>(), 3, INTERVAL * 3).await;
    let direct = common::direct_to(&pg, "postgres").await;
    let runner = last_round_by(&direct).await;
    let mut ids = Vec::new();
    for b in &brokers {
        ids.push(budget_row(b).await["instance"].clone());
    }
    let k = ids.iter().position(|id| *id == runner).expect("the runner is one of the three");
    let victim = brokers.remove(k);
    stop_load(&[&victim]).await;
    let killed = Instant::now();
    drop(victim);

    // A round was due at most one interval after the last; the next heartbeat of either
    // survivor (one interval, ±10%) runs it.
    let next = common::eventually("a round run by another member", INTERVAL * 3, || async {
        let by = last_round_by(&direct).await;
        if by != runner { Ok(by) } else { Err(by) }
    })
    .await;
    assert!(ids.contains(&next), "{next} is a survivor");
    let took = killed.elapsed();
    let survivors: Vec<&Broker> = brokers.iter().collect();
    let two = converge(&survivors, 2, INTERVAL * 5).await;
    let gone: String =
        common::one(&direct, &format!("SELECT count(*) FROM pgbroker_fleet WHERE fleet = 't' AND id = '{runner}'"))
            .await;
    assert_eq!(gone, "0", "the killed member's row was deleted");
    stop_load(&survivors).await;
    samples.stop.store(true, Ordering::Relaxed);
    let errors = errors.lock().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let max_fleet = samples.max_fleet.load(Ordering::Relaxed) as u32;
    assert!(max_fleet <= USABLE, "the fleet held {max_fleet} > {USABLE}");
    eprintln!("next round by another member {took:?} after the kill; shares {two:?}; most held {max_fleet}");
}

#[tokio::test]
async fn a_member_whose_heartbeats_stop_freezes_at_what_it_holds_and_resumes() {
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let a = fleet_broker(&pg, "t", "").await;
    until(&a, |r| r["standing"] == "fair").await;
    let direct = common::direct_to(&pg, "postgres").await;
    // Its fleet pool keeps one server open: that is what it holds.
    common::eventually("one server held", Duration::from_secs(5), || async {
        let n =
            common::one(&direct, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgbroker/t/%'")
                .await;
        if n == "1" { Ok(()) } else { Err(n) }
    })
    .await;

    // Nothing reaches the fleet's table (as when the server is unreachable to this member).
    direct.batch_execute("BEGIN; LOCK TABLE pgbroker_fleet IN ACCESS EXCLUSIVE MODE").await.unwrap();
    until(&a, |r| r["standing"] == "unreachable").await;
    assert_eq!(show_budget(&a).await["budget"], "1", "frozen at what it holds");
    let (code, health) = common::http_get(a.http_addr(), "/health").await;
    assert_eq!(code, 200);
    assert!(health.contains("unreachable"), "{health}");

    // A client takes the one server; a second finds no other while frozen.
    let first = common::connect(a.local_addr(), "postgres", "x", "db").await.unwrap();
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let second = common::connect(a.local_addr(), "postgres", "x", "db").await.unwrap();
    let waiting = tokio::spawn(async move { common::one(&second, "SELECT 2").await });
    let held = || async {
        common::one(&direct, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgbroker/t/%'").await
    };
    // A frozen member opens nothing: the second client still waits a while later.
    let still = tokio::time::timeout(Duration::from_millis(1500), async {
        while !waiting.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(still.is_err(), "the second client was served by a new server while frozen");
    assert_eq!(held().await, "1", "nothing opened, not even a knock");

    // The table is back and the server free: the member heartbeats, finds its share again.
    direct.batch_execute("COMMIT").await.unwrap();
    first.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), "2");
    until(&a, |r| r["standing"] == "fair" && r["budget"].parse::<u32>().unwrap() > 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_joining_at_once_while_the_fleet_is_full_never_exceed_max_connections() {
    // 30 max_connections - 3 superuser reserved: 27 for ordinary logins. The fleet may use 20.
    let pg = Cluster::start(ClusterOptions { max_connections: 30, ..ClusterOptions::default() }).unwrap();
    let budget = format!("{}\nserver_max_connections = 20\nreserved_connections = 0", fleet_budget());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let samples = sampler(&pg).await;
    let incumbents: Vec<Broker> = (0..2).map(|_| start_broker(&pg, &budget)).collect();
    for b in &incumbents {
        wait_listening(b).await;
        load(b, &errors);
    }
    // Full: 12 clients each want more than their share of (20 - 1 sampler - 2 kept free) / 2.
    let full = |r: &std::collections::HashMap<String, String>| r["budget"] == "8" && r["claim"] == "8";
    for b in &incumbents {
        common::eventually("the incumbents at their shares", INTERVAL * 5, || async {
            let r = budget_row(b).await;
            if full(&r) { Ok(()) } else { Err(r) }
        })
        .await;
    }
    let joiners: Vec<Broker> = (0..3).map(|_| start_broker(&pg, &budget)).collect();
    for b in &joiners {
        wait_listening(b).await;
        load(b, &errors);
    }
    let all: Vec<&Broker> = incumbents.iter().chain(&joiners).collect();
    let five = common::eventually("five members with a share each", INTERVAL * 10, || async {
        let mut shares = Vec::new();
        for b in &all {
            let r = budget_row(b).await;
            shares.push((num(&r, "instances"), num(&r, "budget")));
        }
        if shares.iter().all(|&(n, s)| n == 5 && s >= 1) { Ok(shares) } else { Err(shares) }
    })
    .await;
    stop_load(&all).await;
    samples.stop.store(true, Ordering::Relaxed);
    let errors = errors.lock().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let (max_fleet, max_all) =
        (samples.max_fleet.load(Ordering::Relaxed) as u32, samples.max_all.load(Ordering::Relaxed) as u32);
    // Servers within the 20; the joiners' knocks may stand beside them for a moment.
    assert!(max_fleet <= 20 + 3, "the fleet held {max_fleet}");
    assert!(max_all <= 27, "{max_all} client connections: an ordinary login would have been refused");
    let shares: u32 = five.iter().map(|&(_, s)| s).sum();
    assert!(shares <= 20 - OTHERS, "{five:?}");
    eprintln!("five members {five:?}; most fleet connections {max_fleet}, all {max_all}");
}
