//! Instructions per transaction under callgrind, pgbroker against PgBouncer: a count that
//! machine noise does not move, for changes too small for the load bench to see.
//!
//! `cargo bench --bench instructions -- [--clients 20] [--transactions 500] [--warmup 50]
//!  [--modes simple,extended,connect] [--targets pgbroker,pgbouncer] [--pool 20]
//!  [--pool-mode transaction|session] [--out DIR]`
//!
//! Each pooler runs as its own process under `valgrind --tool=callgrind` (pgbroker: this
//! package's release binary, or `PGBROKER_BIN`; PgBouncer: the distribution's package), in
//! transaction mode (or `--pool-mode session`) with md5 logins. Per cell it is started once,
//! warmed with `pgbench -S -t warmup`, then counted (callgrind_control zeroes and dumps the
//! counters) over a run of `-t warmup` and one of `-t warmup+transactions`, each with its own
//! logins: the difference of the two counts, divided by `clients x transactions`, is the cost
//! of a transaction with start-up, logins and shutdown subtracted. Mode `connect` is `-M
//! simple -C`: a new connection per transaction, so its figure is a login, a query and a close.
//! With `--out DIR` the callgrind files are kept there, for `callgrind_annotate`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/poolers.rs"]
mod poolers;

use pgbroker::cluster::{Cluster, ClusterOptions};
use poolers::{DB, PASSWORD, Pooler, Setup, USER, pgbench_bin, start_pgbouncer, start_pgbroker};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Opts {
    clients: u32,
    transactions: u32,
    warmup: u32,
    modes: Vec<String>,
    targets: Vec<String>,
    pool: u32,
    pool_mode: String,
    auth: String,
    out: Option<PathBuf>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            clients: 20,
            transactions: 500,
            warmup: 50,
            modes: vec!["simple".into(), "extended".into(), "connect".into()],
            targets: vec!["pgbroker".into(), "pgbouncer".into()],
            pool: 20,
            pool_mode: "transaction".into(),
            auth: "md5".into(),
            out: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut it = args.iter();
        let list = |v: Option<&String>| v.map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--clients" => o.clients = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.clients).max(1),
                "--transactions" => {
                    o.transactions = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.transactions).max(1)
                }
                "--warmup" => o.warmup = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.warmup).max(1),
                "--modes" => o.modes = list(it.next()),
                "--targets" => o.targets = list(it.next()),
                "--pool" => o.pool = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.pool),
                "--auth" => o.auth = it.next().cloned().unwrap_or(o.auth),
                "--pool-mode" => o.pool_mode = it.next().cloned().unwrap_or(o.pool_mode),
                "--out" => o.out = it.next().map(PathBuf::from),
                _ => {} // cargo passes --bench
            }
        }
        o
    }
}

/// The `totals:` (or `summary:`) line of a callgrind output file: instructions executed.
fn total_instructions(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("totals: ").or_else(|| l.strip_prefix("summary: ")))?
        .trim()
        .parse()
        .ok()
}

/// Runs pgbench against `pooler`: `transactions` per client.
fn pgbench(o: &Opts, port: u16, mode: &str, transactions: u32) -> bool {
    let mut cmd = Command::new(pgbench_bin());
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, "-n", "-S"])
        .args(["-c", &o.clients.to_string(), "-j", "2", "-t", &transactions.to_string()])
        .env("PGPASSWORD", PASSWORD);
    match mode {
        "connect" => cmd.args(["-M", "simple", "-C"]),
        m => cmd.args(["-M", m]),
    };
    let result = cmd.arg(DB).output().expect("run pgbench");
    if !result.status.success() {
        eprintln!(
            "pgbench {mode} -t {transactions} on port {port}: {}",
            String::from_utf8_lossy(&result.stderr).lines().take(3).collect::<Vec<_>>().join(" | ")
        );
    }
    result.status.success()
}

/// Starts `target` under callgrind, runs `transactions` per client through it (after a
/// warm-up run that opens the pool) and returns the instructions it executed in all.
fn total(pg: &Cluster, o: &Opts, target: &str, mode: &str, transactions: u32) -> Option<u64> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("callgrind.out");
    let setup = Setup {
        pool: o.pool,
        pool_mode: o.pool_mode.clone(),
        auth: o.auth.clone(),
        wrap: vec!["valgrind".into(), "--tool=callgrind".into(), format!("--callgrind-out-file={}", out.display())],
        start_timeout: Duration::from_secs(120),
    };
    let pooler: Pooler = match target {
        "pgbroker" => start_pgbroker(pg, &setup, dir.path()),
        "pgbouncer" => start_pgbouncer(pg, &setup, dir.path())?,
        _ => return None,
    };
    let ran = pgbench(o, pooler.port, mode, o.warmup) && pgbench(o, pooler.port, mode, transactions);
    let name = pooler.name;
    if !pooler.stop_within(Duration::from_secs(120)) || !ran {
        eprintln!("{name} {mode} -t {transactions}: failed (pgbench ran: {ran})");
        return None;
    }
    let total = total_instructions(&out);
    if let Some(keep) = &o.out {
        // For callgrind_annotate: where the instructions went.
        std::fs::create_dir_all(keep).unwrap();
        let _ = std::fs::copy(&out, keep.join(format!("callgrind.{target}.{mode}.{transactions}")));
    }
    total
}

/// Instructions per transaction: the total of a run of `warmup + transactions` per client
/// minus that of a run of `warmup`, over the difference.
fn per_transaction(pg: &Cluster, o: &Opts, target: &str, mode: &str) -> Option<f64> {
    let short = total(pg, o, target, mode, o.warmup);
    let long = total(pg, o, target, mode, o.warmup + o.transactions);
    let n = f64::from(o.clients) * f64::from(o.transactions);
    let v = short.zip(long).map(|(a, b)| (b as f64 - a as f64) / n);
    eprintln!("{target} {mode}: {short:?} -> {long:?}: {v:?} per transaction");
    v
}

fn main() {
    let o = Opts::parse();
    let pg = Cluster::start(ClusterOptions {
        max_connections: 4 * o.pool + 40,
        // Server logins without SCRAM: its PBKDF2 costs millions of instructions per server
        // opened, which would swamp a transaction's few thousand.
        hba: vec!["host all all 127.0.0.1/32 trust".into()],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    pg.psql("postgres", &format!("CREATE DATABASE {DB}")).unwrap();
    let init = Command::new(pgbench_bin())
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", USER, DB])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut table = String::from(
        "| pgbench -S | clients | pgbroker instructions/tx | PgBouncer instructions/tx | pgbroker / PgBouncer |\n|---|---|---|---|---|\n",
    );
    for mode in &o.modes {
        let mut per_tx = Vec::new();
        for target in ["pgbroker", "pgbouncer"] {
            if !o.targets.iter().any(|t| t == target) {
                per_tx.push(None);
                continue;
            }
            per_tx.push(per_transaction(&pg, &o, target, mode));
        }
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
        let ratio = per_tx[0].zip(per_tx[1]).map_or("–".to_string(), |(a, b)| format!("{:.2}", a / b));
        let label = if mode == "connect" { "simple -C (login + query + close)" } else { mode };
        writeln!(table, "| {label} | {} | {} | {} | {ratio} |", o.clients, f(per_tx[0]), f(per_tx[1])).unwrap();
    }
    println!("{table}");
    if let Some(out) = &o.out {
        std::fs::create_dir_all(out).unwrap();
        std::fs::write(out.join("instructions.md"), &table).unwrap();
    }
}
