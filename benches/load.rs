//! Load benchmark: pgbench against direct PostgreSQL, pgbroker and PgBouncer in one run, with
//! the targets interleaved (A B C A B C ...) so machine noise hits them alike.
//!
//! `cargo bench --bench load -- [--clients 10,50,200] [--modes simple,extended,prepared]
//!  [--targets direct,pgbroker,pgbouncer] [--runs 3] [--duration 5] [--select-only | --tpcb]
//!  [--pool 20] [--scale 10]`
//!
//! Reports the median tps of the runs per cell, p50/p99 latency from pgbench's
//! per-transaction log, and the ratios pgbroker/PgBouncer and pgbroker/direct. PgBouncer is
//! used when the `pgbouncer` binary is installed (`apt-get install pgbouncer`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Opts {
    clients: Vec<u32>,
    modes: Vec<String>,
    targets: Vec<String>,
    runs: usize,
    duration: u32,
    select_only: bool,
    pool: u32,
    scale: u32,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            clients: vec![10, 50, 200],
            modes: vec!["simple".into(), "extended".into(), "prepared".into()],
            targets: vec!["direct".into(), "pgbroker".into(), "pgbouncer".into()],
            runs: 3,
            duration: 5,
            select_only: true,
            pool: 20,
            scale: 10,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut it = args.iter();
        let list =
            |v: Option<&String>| v.map(|s| s.split(',').map(str::to_string).collect::<Vec<_>>()).unwrap_or_default();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--clients" => o.clients = list(it.next()).iter().filter_map(|c| c.parse().ok()).collect(),
                "--modes" => o.modes = list(it.next()),
                "--targets" => o.targets = list(it.next()),
                "--runs" => o.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.runs),
                "--duration" => o.duration = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.duration),
                "--pool" => o.pool = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.pool),
                "--scale" => o.scale = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.scale),
                "--tpcb" => o.select_only = false,
                "--select-only" => o.select_only = true,
                _ => {} // cargo passes --bench
            }
        }
        o
    }
}

/// One pgbench run's outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

fn pgbench_bin() -> PathBuf {
    for dir in ["/usr/lib/postgresql/15/bin", "/usr/bin"] {
        let p = Path::new(dir).join("pgbench");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("pgbench")
}

fn run_pgbench(port: u16, o: &Opts, mode: &str, clients: u32, logdir: &Path) -> Sample {
    let _ = std::fs::remove_dir_all(logdir);
    std::fs::create_dir_all(logdir).unwrap();
    let mut cmd = Command::new(pgbench_bin());
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n"])
        .args(["-c", &clients.to_string(), "-j", "2", "-T", &o.duration.to_string(), "-M", mode])
        .args(["-l", "--log-prefix", &logdir.join("tx").display().to_string()])
        .env("PGPASSWORD", "postgres");
    if o.select_only {
        cmd.arg("-S");
    }
    let out = cmd.arg("bench").output().expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!("pgbench failed on port {port}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        return Sample { tps: 0.0, p50_ms: 0.0, p99_ms: 0.0, failed: u64::MAX };
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // Per-transaction log: client_id transaction_no latency_us script_no epoch epoch_us
    let mut lat: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(logdir).unwrap().flatten() {
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        lat.extend(body.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()));
    }
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    Sample { tps, p50_ms: pct(0.50) as f64 / 1000.0, p99_ms: pct(0.99) as f64 / 1000.0, failed }
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.tps.total_cmp(&b.tps));
    v[v.len() / 2]
}

fn broker_config(pg: &Cluster, pool: u32, dir: &Path) -> Config {
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"transaction\"\nmax_client_conn = 20000\n\
         [budget]\nserver_max_connections = {max}\nreserved_connections = 5\n\
         [auth]\ntype = \"trust\"\nfile = \"users.txt\"\n\
         [databases.bench]\nport = {port}\nuser = \"postgres\"\npassword = \"postgres\"\npool_size = {pool}\n",
        max = pool + 50,
        port = pg.port(),
    );
    Config::parse(&text, Some(&dir.join("pgbroker.toml")), &|_| None).unwrap()
}

/// Starts PgBouncer (transaction mode, same pool size) if installed; returns it and its port.
fn start_pgbouncer(pg: &Cluster, pool: u32, dir: &Path) -> Option<(Child, u16, String, bool)> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| Path::new(p).exists())?;
    let version = Command::new(bin).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("PgBouncer").to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    // Protocol-level prepared statements in transaction mode exist from 1.21 on.
    let supports_prepared = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| {
            let mut p = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
            Some((p.next()?, p.next()?))
        })
        .is_some_and(|(maj, min)| (maj, min) >= (1, 21));
    let ini = format!(
        "[databases]\nbench = host=127.0.0.1 port={pgport} dbname=bench\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
         listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
         default_pool_size = {pool}\nmax_client_conn = 20000\nlogfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n{prep}",
        pgport = pg.port(),
        dir = dir.display(),
        prep = if supports_prepared { "max_prepared_statements = 200\n" } else { "" },
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let _ = Command::new("chown").args(["-R", "postgres", &dir.display().to_string()]).status();
    let mut cmd = if is_root() { Command::new("runuser") } else { Command::new(bin) };
    if is_root() {
        cmd.args(["-u", "postgres", "--", bin]);
    }
    let child = cmd.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let note = if supports_prepared { version } else { format!("{version} (no prepared-statement support)") };
            return Some((child, port, note, supports_prepared));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn main() {
    let o = Opts::parse();
    let max_clients = o.clients.iter().copied().max().unwrap_or(10);
    let pg = Cluster::start(ClusterOptions {
        max_connections: max_clients + 100,
        extra_conf: vec![("shared_buffers".into(), "256MB".into())],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    pg.psql("postgres", "CREATE DATABASE bench").unwrap();
    let init = Command::new(pgbench_bin())
        .args(["-i", "-q", "-s", &o.scale.to_string(), "-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", "postgres", "bench"])
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let broker = rt.block_on(Broker::start(broker_config(&pg, o.pool, work.path()))).unwrap();
    let bouncer_dir = tempfile::tempdir().unwrap();
    let mut bouncer = if o.targets.iter().any(|t| t == "pgbouncer") {
        start_pgbouncer(&pg, o.pool, bouncer_dir.path())
    } else {
        None
    };
    let mut ports: Vec<(String, u16)> = Vec::new();
    for t in &o.targets {
        match t.as_str() {
            "direct" => ports.push((t.clone(), pg.port())),
            "pgbroker" => ports.push((t.clone(), broker.local_addr().port())),
            "pgbouncer" => match &bouncer {
                Some((_, port, ..)) => ports.push((t.clone(), *port)),
                None => eprintln!("pgbouncer not installed: skipped (apt-get install pgbouncer)"),
            },
            other => eprintln!("unknown target {other}"),
        }
    }
    let script = if o.select_only { "pgbench -S" } else { "pgbench TPC-B-like" };
    println!(
        "# {script}, transaction pooling, pool {}, {} runs x {}s per cell, median; PostgreSQL on port {}",
        o.pool,
        o.runs,
        o.duration,
        pg.port()
    );
    if let Some((_, _, v, _)) = &bouncer {
        println!("# PgBouncer: {v}");
    }
    let bouncer_prepared = bouncer.as_ref().is_some_and(|b| b.3);
    let mut results: BTreeMap<(String, u32, String), Sample> = BTreeMap::new();
    for mode in &o.modes {
        for &clients in &o.clients {
            let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
            for _ in 0..o.runs {
                for (name, port) in &ports {
                    if name == "pgbouncer" && mode == "prepared" && !bouncer_prepared {
                        continue;
                    }
                    let s = run_pgbench(*port, &o, mode, clients, &work.path().join("log"));
                    samples.entry(name.clone()).or_default().push(s);
                }
            }
            for (name, v) in samples {
                let m = median(v);
                eprintln!(
                    "{mode:>8} c={clients:<5} {name:<9} tps {:>9.0}  p50 {:>7.2} ms  p99 {:>7.2} ms",
                    m.tps, m.p50_ms, m.p99_ms
                );
                results.insert((mode.clone(), clients, name), m);
            }
        }
    }
    println!("\n| mode | clients | target | tps | p50 ms | p99 ms | failed | pgbroker/PgBouncer | pgbroker/direct |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for ((mode, clients, name), s) in &results {
        let ratio = |other: &str| {
            let o = results.get(&(mode.clone(), *clients, other.to_string()))?;
            (name == "pgbroker" && o.tps > 0.0).then(|| format!("{:.2}", s.tps / o.tps))
        };
        println!(
            "| {mode} | {clients} | {name} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            s.tps,
            s.p50_ms,
            s.p99_ms,
            s.failed,
            ratio("pgbouncer").unwrap_or_default(),
            ratio("direct").unwrap_or_default()
        );
    }
    if let Some((child, ..)) = bouncer.as_mut() {
        let _ = child.kill();
    }
    drop(broker);
}
