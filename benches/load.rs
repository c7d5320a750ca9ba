//! Load benchmark: pgbench against direct PostgreSQL, pgbroker and PgBouncer in one run, with
//! the targets interleaved (A B C A B C ...) so machine noise hits them alike.
//!
//! `cargo bench --bench load -- [--out DIR] [--runs 3] [--duration 10]
//!  [--clients 10,50,200,1000] [--modes simple,extended,prepared] [--tpcb-clients 50]
//!  [--tpcb-modes simple] [--select-only | --tpcb] [--targets direct,pgbroker,pgbouncer]
//!  [--pool 20] [--scale 10] [--jobs N] [--broker-workers 2] [--no-install]`
//!
//! `--broker-workers N` runs the in-process pgbroker on a tokio multi-thread runtime with N
//! workers (default 2, as `pgbroker run` on 2 cores), or with 0 on a current-thread runtime.
//!
//! The default matrix is the one of issue 9: `pgbench -S` at 10, 50, 200 and 1,000 clients
//! with `-M simple`, `-M extended` and `-M prepared`, plus the default TPC-B-like script at
//! 50 clients, every cell run `--runs` times per target. It reports the median tps of the runs
//! per cell, p50/p99 latency from pgbench's per-transaction log (of the median run), and the
//! ratios pgbroker/PgBouncer and pgbroker/direct; PgBouncer versions without prepared-statement
//! support in transaction mode (before 1.21) are shown as "n/a (no prepared support)" for
//! `-M prepared`, and pgbroker's `-M prepared` is also compared with PgBouncer's `-M extended`.
//!
//! With `--out DIR` it writes `results.md` (machine, versions, table, targets of issue 9),
//! `results.csv` (every run), `tps.svg` (bar chart of median tps per cell and target) and
//! `pgbench.log` (every pgbench output).
//!
//! PgBouncer comes from the distribution's `pgbouncer` package; if it is missing and the
//! harness runs as root with apt-get, it is installed (unless `--no-install`).
//!
//! The full default run is 35 pgbench runs per round (PgBouncer without prepared support
//! skips 4), 105 with `--runs 3`: about 22 minutes at `--duration 10` on 2 cores. A thousand
//! direct clients take about 3 s to connect, which pgbench counts in `-T` but not in its tps.
//! The CPU column charges the pooler's process CPU time during a run to its transactions
//! (pgbroker runs in this process, whose main thread only waits for pgbench meanwhile).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/poolers.rs"]
mod poolers;

use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use poolers::pgbench_bin;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TARGET_LABELS: [(&str, &str); 3] = [("direct", "direct"), ("pgbouncer", "PgBouncer"), ("pgbroker", "pgbroker")];
const NO_PREPARED: &str = "n/a (no prepared support)";

struct Opts {
    clients: Vec<u32>,
    modes: Vec<String>,
    tpcb_clients: Vec<u32>,
    tpcb_modes: Vec<String>,
    targets: Vec<String>,
    runs: usize,
    duration: u32,
    pool: u32,
    scale: u32,
    jobs: u32,
    out: Option<PathBuf>,
    install: bool,
    /// pgbroker's runtime: tokio worker threads, or 0 for a current-thread runtime.
    broker_workers: usize,
}

impl Opts {
    fn parse() -> Opts {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        let mut o = Opts {
            clients: vec![10, 50, 200, 1000],
            modes: vec!["simple".into(), "extended".into(), "prepared".into()],
            tpcb_clients: vec![50],
            tpcb_modes: vec!["simple".into()],
            targets: vec!["direct".into(), "pgbroker".into(), "pgbouncer".into()],
            runs: 3,
            duration: 10,
            pool: 20,
            scale: 10,
            jobs: cores,
            out: None,
            install: true,
            broker_workers: 2,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut it = args.iter();
        let list = |v: Option<&String>| {
            v.map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let nums = |v: Vec<String>| v.iter().filter_map(|c| c.parse().ok()).filter(|&c| c > 0).collect::<Vec<u32>>();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--clients" => o.clients = nums(list(it.next())),
                "--modes" => o.modes = list(it.next()),
                "--tpcb-clients" => o.tpcb_clients = nums(list(it.next())),
                "--tpcb-modes" => o.tpcb_modes = list(it.next()),
                "--targets" => o.targets = list(it.next()),
                "--runs" => o.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.runs).max(1),
                "--duration" => o.duration = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.duration).max(1),
                "--pool" => o.pool = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.pool),
                "--scale" => o.scale = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.scale),
                "--jobs" => o.jobs = it.next().and_then(|v| v.parse().ok()).unwrap_or(o.jobs).max(1),
                "--out" => o.out = it.next().map(PathBuf::from),
                "--no-install" => o.install = false,
                "--broker-workers" => o.broker_workers = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
                // Only the -S matrix / only the TPC-B-like cells.
                "--select-only" => o.tpcb_clients.clear(),
                "--tpcb" => o.clients.clear(),
                _ => {} // cargo passes --bench
            }
        }
        o
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Script {
    /// `pgbench -S`: one primary-key SELECT per transaction.
    Select,
    /// pgbench's default TPC-B-like script: 3 UPDATEs, a SELECT and an INSERT in a transaction.
    TpcB,
}

impl Script {
    fn label(self) -> &'static str {
        match self {
            Script::Select => "-S",
            Script::TpcB => "TPC-B",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    script: Script,
    mode: String,
    clients: u32,
}

impl Cell {
    fn label(&self) -> String {
        format!("{} {} c={}", self.script.label(), self.mode, self.clients)
    }
}

/// One pgbench run's outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    ok: bool,
    /// The pooler's CPU time (user + system) per transaction, in µs, over the whole run
    /// (connection setup included); none for direct runs.
    cpu_us: Option<f64>,
}

/// The latest installed PostgreSQL's pgbench (the version the cluster runs), else PATH's.
/// User + system CPU seconds used by process `pid` (all threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| command_line("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0))
}

/// Runs pgbench against `port`; `pooler` is the pid whose CPU time is charged to the run.
fn run_pgbench(port: u16, pooler: Option<u32>, o: &Opts, cell: &Cell, logdir: &Path, raw: &mut String) -> Sample {
    let _ = std::fs::remove_dir_all(logdir);
    std::fs::create_dir_all(logdir).unwrap();
    let jobs = o.jobs.min(cell.clients);
    let mut cmd = Command::new(pgbench_bin());
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n"])
        .args(["-c", &cell.clients.to_string(), "-j", &jobs.to_string(), "-T", &o.duration.to_string()])
        .args(["-M", &cell.mode])
        .args(["-l", "--log-prefix", &logdir.join("tx").display().to_string()])
        .env("PGPASSWORD", "postgres");
    if cell.script == Script::Select {
        cmd.arg("-S");
    }
    let cpu0 = pooler.map(cpu_secs);
    let out = cmd.arg("bench").output().expect("run pgbench");
    let cpu = pooler.zip(cpu0).map(|(pid, c0)| cpu_secs(pid) - c0);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    raw.push_str(&text);
    // pgbench prints a line per client error; keep the log readable.
    for l in err.lines().take(20) {
        raw.push_str(l);
        raw.push('\n');
    }
    if !out.status.success() {
        let first: Vec<&str> = err.lines().take(5).collect();
        eprintln!("pgbench failed on port {port} ({}): {}", cell.label(), first.join(" | "));
        return Sample { tps: 0.0, p50_ms: 0.0, p99_ms: 0.0, failed: 0, ok: false, cpu_us: None };
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let processed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|r| r.split(['/', ' ']).next()?.parse().ok())
        .unwrap_or(0.0);
    let cpu_us = cpu.filter(|_| processed > 0.0).map(|c| c * 1e6 / processed);
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
    let (p50_ms, p99_ms) = (pct(0.50) as f64 / 1000.0, pct(0.99) as f64 / 1000.0);
    Sample { tps, p50_ms, p99_ms, failed, ok: tps > 0.0, cpu_us }
}

/// The run with the median tps (failed runs count as 0 tps).
fn median(v: &[Sample]) -> Sample {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.tps.total_cmp(&b.tps));
    v[v.len() / 2]
}

fn broker_config(pg: &Cluster, pool: u32, dir: &Path) -> Config {
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"transaction\"\nmax_client_conn = 20000\nserver_tls_sslmode = \"disable\"\n\
         [budget]\nserver_max_connections = {max}\nreserved_connections = 5\n\
         [auth]\ntype = \"trust\"\nfile = \"users.txt\"\n\
         [databases.bench]\nport = {port}\nuser = \"postgres\"\npassword = \"postgres\"\npool_size = {pool}\n",
        max = pool + 50,
        port = pg.port(),
    );
    Config::parse(&text, Some(&dir.join("pgbroker.toml")), &|_| None).unwrap()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn pgbouncer_bin(install: bool) -> Option<&'static str> {
    let find = || ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| Path::new(p).exists());
    if let Some(b) = find() {
        return Some(b);
    }
    if install && is_root() && Path::new("/usr/bin/apt-get").exists() {
        eprintln!("pgbouncer not installed: apt-get install -y pgbouncer");
        let apt = |args: &[&str]| {
            Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()).status()
        };
        let _ = apt(&["update", "-q"]);
        let _ = apt(&["install", "-y", "-q", "--no-install-recommends", "pgbouncer"]);
    }
    find()
}

/// `(major, minor)` from `PgBouncer 1.18.0`.
fn version_of(line: &str) -> Option<(u32, u32)> {
    let v = line.split_whitespace().nth(1)?;
    let mut p = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    Some((p.next()?, p.next()?))
}

struct Bouncer {
    child: Child,
    port: u16,
    version: String,
    prepared: bool,
    dir: PathBuf,
}

impl Bouncer {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pgbouncer.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // The child is runuser (or pgbouncer itself); pgbouncer's own pid is in its pidfile.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts PgBouncer (transaction mode, same pool size) if installed.
fn start_pgbouncer(pg: &Cluster, pool: u32, dir: &Path, install: bool) -> Option<Bouncer> {
    let bin = pgbouncer_bin(install)?;
    let version = Command::new(bin).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("PgBouncer").to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    // Protocol-level prepared statements in transaction mode exist from 1.21 on.
    let prepared = version_of(&version).is_some_and(|v| v >= (1, 21));
    let ini = format!(
        "[databases]\nbench = host=127.0.0.1 port={pgport} dbname=bench\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
         listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
         default_pool_size = {pool}\nmax_client_conn = 20000\nlogfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n{prep}",
        pgport = pg.port(),
        dir = dir.display(),
        prep = if prepared { "max_prepared_statements = 200\n" } else { "" },
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let _ = Command::new("chown").args(["-R", "postgres", &dir.display().to_string()]).status();
    // PgBouncer refuses to run as root. Its fd limit must cover max_client_conn: raised in a
    // shell after runuser, which resets the soft limit to 1024.
    let ini = dir.join("pgbouncer.ini").display().to_string();
    let script = "ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"";
    let mut cmd = if is_root() { Command::new("runuser") } else { Command::new("sh") };
    if is_root() {
        cmd.args(["-u", "postgres", "--", "sh"]);
    }
    cmd.args(["-c", script, "sh"]);
    let child = cmd.args([bin, &ini]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    let mut b = Bouncer { child, port, version, prepared, dir: dir.to_path_buf() };
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if !b.prepared {
                b.version = format!("{} (no prepared-statement support in transaction mode)", b.version);
            }
            return Some(b);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Soft RLIMIT_NOFILE of this process (from /proc/self/limits).
fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    let mut f = line.split_whitespace().skip(3).map(|v| v.parse().unwrap_or(u64::MAX));
    (f.next().unwrap_or(1024), f.next().unwrap_or(1024))
}

/// Re-runs this process under a raised fd limit if the soft one is below `need` (pgbench and
/// the in-process broker inherit it). No `unsafe` here, so `ulimit` in a shell does it.
fn ensure_nofile(need: u64) {
    let (soft, hard) = nofile();
    if soft >= need || std::env::var_os("PGBROKER_BENCH_REEXEC").is_some() {
        if soft < need {
            eprintln!("warning: open-files limit {soft} < {need}; the largest cells may fail");
        }
        return;
    }
    let target = hard.min(need.max(20_000));
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("sh")
        .args(["-c", "ulimit -n \"$1\" || exit 111; shift; exec \"$@\"", "sh", &target.to_string()])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("PGBROKER_BENCH_REEXEC", "1")
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

/// Machine and versions, one `- key: value` line each.
fn machine(pg: &Cluster, bouncer: Option<&Bouncer>, broker_workers: usize) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|r| r.trim().to_string()))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_default();
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = command_line("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    vec![
        ("date (UTC)".into(), command_line("date", &["-u", "+%Y-%m-%d %H:%M"])),
        ("CPU".into(), format!("{cpu}, {cores} cores (shared by pgbench, PostgreSQL and the pooler)")),
        ("memory".into(), mem),
        ("OS".into(), format!("{os}, Linux {kernel}")),
        ("PostgreSQL".into(), pg.psql("postgres", "SHOW server_version").unwrap_or_default()),
        ("pgbench".into(), command_line(&pgbench_bin().display().to_string(), &["--version"])),
        ("PgBouncer".into(), bouncer.map_or("not installed".into(), |b| b.version.clone())),
        (
            "pgbroker".into(),
            format!(
                "{} ({}{}), in-process, {}",
                env!("CARGO_PKG_VERSION"),
                rev,
                if dirty { ", uncommitted changes in src" } else { "" },
                match broker_workers {
                    0 => "tokio current-thread runtime".to_string(),
                    n => format!("tokio multi-thread runtime, {n} workers"),
                }
            ),
        ),
    ]
}

/// pgbroker in this process, on a multi-thread runtime (as `pgbroker run` uses, one worker
/// per core) or, with 0 workers, on a current-thread runtime driven by a thread of its own.
struct InProcess {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(config: Config, workers: usize) -> InProcess {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match workers {
                0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
                n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
            };
            rt.unwrap().block_on(async move {
                let broker = Broker::start(config).await.expect("start pgbroker");
                addr_tx.send(broker.local_addr()).unwrap();
                let _ = stopped.await;
                drop(broker);
            });
        });
        let addr = addr_rx.recv().expect("pgbroker started");
        InProcess { addr, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Results = BTreeMap<(Cell, String), Vec<Sample>>;

fn cell_median(r: &Results, cell: &Cell, target: &str) -> Option<Sample> {
    r.get(&(cell.clone(), target.to_string())).map(|v| median(v))
}

fn ratio(a: Option<Sample>, b: Option<Sample>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (a.ok && b.ok && b.tps > 0.0).then(|| a.tps / b.tps)
}

fn fmt_tps(s: Option<Sample>, na: bool) -> String {
    match s {
        _ if na => NO_PREPARED.into(),
        Some(s) if s.ok => format!("{:.0}", s.tps),
        Some(_) => "failed".into(),
        None => String::new(),
    }
}

fn fmt_lat(s: Option<Sample>) -> String {
    match s {
        Some(s) if s.ok => format!("{:.2} / {:.2}", s.p50_ms, s.p99_ms),
        _ => String::new(),
    }
}

/// The poolers' CPU per transaction (of their median runs).
fn fmt_cpu(b: Option<Sample>, p: Option<Sample>) -> String {
    let f = |s: Option<Sample>| s.and_then(|s| s.cpu_us).map_or("–".to_string(), |c| format!("{c:.1}"));
    format!("{} / {}", f(b), f(p))
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_default()
}

/// The markdown table: one row per cell.
fn table(cells: &[Cell], r: &Results, bouncer_prepared: bool) -> String {
    let mut t = String::from(
        "| script | mode | clients | direct tps | PgBouncer tps | pgbroker tps | pgbroker/PgBouncer | pgbroker/direct \
         | direct p50 / p99 ms | PgBouncer p50 / p99 ms | pgbroker p50 / p99 ms | CPU µs/tx PgBouncer / pgbroker |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        let (d, b, p) = (cell_median(r, c, "direct"), cell_median(r, c, "pgbouncer"), cell_median(r, c, "pgbroker"));
        let na = c.mode == "prepared" && !bouncer_prepared && r.keys().any(|(_, t)| t == "pgbouncer");
        let vs_bouncer = if na {
            // Issue 9 compares pgbroker's -M prepared with PgBouncer's -M extended.
            let ext = Cell { mode: "extended".into(), ..c.clone() };
            match ratio(p, cell_median(r, &ext, "pgbouncer")) {
                Some(x) => format!("n/a ({x:.2} vs its extended)"),
                None => "n/a".into(),
            }
        } else {
            fmt_ratio(ratio(p, b))
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.script.label(),
            c.mode,
            c.clients,
            fmt_tps(d, false),
            fmt_tps(b, na),
            fmt_tps(p, false),
            vs_bouncer,
            fmt_ratio(ratio(p, d)),
            fmt_lat(d),
            if na { String::new() } else { fmt_lat(b) },
            fmt_lat(p),
            fmt_cpu(if na { None } else { b }, p),
        );
    }
    t
}

/// Issue 9's throughput targets, checked against this run.
fn targets(cells: &[Cell], r: &Results, bouncer_prepared: bool) -> String {
    let mut t = String::from("| target | cell | measured | met |\n|---|---|---|---|\n");
    let mut check = |name: &str, cell: &Cell, other: &Cell, want: f64| {
        if let Some(x) = ratio(cell_median(r, cell, "pgbroker"), cell_median(r, other, "pgbouncer")) {
            let mark = if x >= want { "yes" } else { "no" };
            let _ = writeln!(t, "| {name} | {} | {x:.2} | {mark} |", cell.label());
        }
    };
    for c in cells.iter().filter(|c| c.script == Script::Select) {
        match c.mode.as_str() {
            "simple" | "extended" => {
                let want = if c.clients >= 200 { 1.2 } else { 1.0 };
                check(&format!("pgbroker ≥ {want:.1}× PgBouncer"), c, c, want);
            }
            "prepared" if c.clients == 50 || c.clients == 200 => {
                let ext = Cell { mode: "extended".into(), ..c.clone() };
                check("pgbroker -M prepared ≥ 1.3× PgBouncer -M extended", c, &ext, 1.3);
                if bouncer_prepared {
                    check("pgbroker ≥ 1.0× PgBouncer (both -M prepared)", c, c, 1.0);
                }
            }
            _ => {}
        }
    }
    t
}

fn csv(cells: &[Cell], r: &Results) -> String {
    let mut t =
        String::from("script,mode,clients,target,run,tps,p50_ms,p99_ms,failed_tx,ok,pooler_cpu_us_per_tx,median_tps\n");
    for c in cells {
        for (target, _) in TARGET_LABELS {
            let Some(v) = r.get(&(c.clone(), target.to_string())) else { continue };
            let m = median(v);
            for (i, s) in v.iter().enumerate() {
                let _ = writeln!(
                    t,
                    "{},{},{},{target},{},{:.1},{:.3},{:.3},{},{},{},{:.1}",
                    c.script.label(),
                    c.mode,
                    c.clients,
                    i + 1,
                    s.tps,
                    s.p50_ms,
                    s.p99_ms,
                    s.failed,
                    s.ok,
                    s.cpu_us.map(|c| format!("{c:.2}")).unwrap_or_default(),
                    m.tps
                );
            }
        }
    }
    t
}

/// A rounded step for about 6 grid lines up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 6.0).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A grouped bar chart of median tps: one group per cell, one bar per target, the
/// pgbroker/PgBouncer ratio above each group.
fn svg(cells: &[Cell], r: &Results, title: &str) -> String {
    const COLORS: [&str; 3] = ["#9e9e9e", "#e08a2c", "#2b6cb0"];
    let (left, top, bottom, right) = (70.0, 60.0, 95.0, 20.0);
    let (bar, gap) = (18.0, 22.0);
    let group = bar * 3.0 + gap;
    let plot_h = 340.0;
    let width = (left + right + group * cells.len().max(1) as f64).max(720.0);
    let height = top + plot_h + bottom;
    let max = r.values().map(|v| median(v).tps).fold(0.0, f64::max);
    let step = nice_step(max);
    let ymax = ((max / step).ceil() * step).max(step);
    let y = |v: f64| top + plot_h - v / ymax * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(s, "<text x=\"{left}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>", xml(title));
    // Legend.
    let mut lx = left;
    for (i, (_, label)) in TARGET_LABELS.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"42\">{label}</text>",
            COLORS[i],
            lx + 16.0
        );
        lx += 100.0;
    }
    let _ = writeln!(s, "<text x=\"{lx}\" y=\"42\" fill=\"#444\">number above a group: pgbroker/PgBouncer</text>");
    // Grid and y axis.
    let mut v = 0.0;
    while v <= ymax + 0.5 {
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            width - right,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">tps (median)</text>",
        top + plot_h / 2.0
    );
    for (gi, c) in cells.iter().enumerate() {
        let gx = left + gap / 2.0 + gi as f64 * group;
        for (i, (target, _)) in TARGET_LABELS.iter().enumerate() {
            let x = gx + i as f64 * bar;
            match cell_median(r, c, target) {
                Some(m) if m.ok => {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                         <title>{} {}: {:.0} tps</title></rect>",
                        y(m.tps),
                        bar - 2.0,
                        top + plot_h - y(m.tps),
                        COLORS[i],
                        xml(&c.label()),
                        target,
                        m.tps
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "<text transform=\"translate({:.1} {:.1}) rotate(-90)\" font-size=\"9\" fill=\"#888\">n/a</text>",
                        x + bar / 2.0 + 3.0,
                        top + plot_h - 4.0
                    );
                }
            }
        }
        if let Some(x) = ratio(cell_median(r, c, "pgbroker"), cell_median(r, c, "pgbouncer")) {
            let peak =
                TARGET_LABELS.iter().filter_map(|(t, _)| cell_median(r, c, t)).map(|m| m.tps).fold(0.0, f64::max);
            let color = if x >= 1.0 { "#2f855a" } else { "#c53030" };
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\" fill=\"{color}\">{x:.2}</text>",
                gx + bar * 1.5,
                y(peak) - 5.0
            );
        }
        let _ = writeln!(
            s,
            "<text transform=\"translate({:.1} {:.1}) rotate(-40)\" text-anchor=\"end\">{}</text>",
            gx + bar * 1.5 + 4.0,
            top + plot_h + 14.0,
            xml(&c.label())
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        top + plot_h,
        width - right,
        top + plot_h
    );
    s.push_str("</svg>\n");
    s
}

fn main() {
    let o = Opts::parse();
    let mut cells: Vec<Cell> = Vec::new();
    for mode in &o.modes {
        for &clients in &o.clients {
            cells.push(Cell { script: Script::Select, mode: mode.clone(), clients });
        }
    }
    for mode in &o.tpcb_modes {
        for &clients in &o.tpcb_clients {
            cells.push(Cell { script: Script::TpcB, mode: mode.clone(), clients });
        }
    }
    let max_clients = cells.iter().map(|c| c.clients).max().unwrap_or(10);
    // pgbench's sockets plus the broker's two per client, in this process tree.
    ensure_nofile(u64::from(max_clients) * 3 + 1000);
    if let Some(out) = &o.out {
        std::fs::create_dir_all(out).expect("create --out dir");
    }
    let started = Instant::now();
    let pg = Cluster::start(ClusterOptions {
        // Every direct pgbench client is a backend; the two poolers hold their pools besides.
        max_connections: max_clients + 2 * o.pool + 60,
        extra_conf: vec![("shared_buffers".into(), "256MB".into())],
        // Logins over TCP without SCRAM: a thousand direct pgbench clients would otherwise
        // spend seconds of the run's -T in PBKDF2 before the first transaction.
        hba: vec!["host all all 127.0.0.1/32 trust".into()],
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
    let broker = InProcess::start(broker_config(&pg, o.pool, work.path()), o.broker_workers);
    let bouncer_dir = tempfile::tempdir().unwrap();
    let bouncer = if o.targets.iter().any(|t| t == "pgbouncer") {
        start_pgbouncer(&pg, o.pool, bouncer_dir.path(), o.install)
    } else {
        None
    };
    // (target, port, pid whose CPU is the pooler's): the broker runs in this process, whose
    // main thread only waits for pgbench meanwhile.
    let mut ports: Vec<(String, u16, Option<u32>)> = Vec::new();
    for t in &o.targets {
        match t.as_str() {
            "direct" => ports.push((t.clone(), pg.port(), None)),
            "pgbroker" => ports.push((t.clone(), broker.addr.port(), Some(std::process::id()))),
            "pgbouncer" => match &bouncer {
                Some(b) => ports.push((t.clone(), b.port, b.pid())),
                None => eprintln!("pgbouncer not available: skipped (apt-get install pgbouncer)"),
            },
            other => eprintln!("unknown target {other}"),
        }
    }
    let bouncer_prepared = bouncer.as_ref().is_some_and(|b| b.prepared);
    let skip = |name: &str, cell: &Cell| name == "pgbouncer" && cell.mode == "prepared" && !bouncer_prepared;
    let total_runs: usize =
        cells.iter().map(|c| ports.iter().filter(|(n, ..)| !skip(n, c)).count()).sum::<usize>() * o.runs;
    let header = format!(
        "pgbench, transaction pooling, pool {}, scale {}, {} runs x {} s per cell and target, interleaved, median",
        o.pool, o.scale, o.runs, o.duration
    );
    println!("# {header}");
    let info = machine(&pg, bouncer.as_ref(), o.broker_workers);
    for (k, v) in &info {
        println!("# {k}: {v}");
    }
    eprintln!(
        "{} cells, {total_runs} pgbench runs of {} s: about {} min",
        cells.len(),
        o.duration,
        (total_runs as u64 * (u64::from(o.duration) + 2)).div_ceil(60)
    );

    let mut raw = String::new();
    let mut results: Results = BTreeMap::new();
    for cell in &cells {
        for run in 0..o.runs {
            for (name, port, pid) in &ports {
                if skip(name, cell) {
                    continue;
                }
                let _ = writeln!(raw, "\n=== {} / {name} / run {} ===", cell.label(), run + 1);
                let s = run_pgbench(*port, *pid, &o, cell, &work.path().join("log"), &mut raw);
                results.entry((cell.clone(), name.clone())).or_default().push(s);
            }
        }
        for (name, ..) in &ports {
            if let Some(m) = cell_median(&results, cell, name) {
                eprintln!(
                    "{:<22} {name:<9} tps {:>9.0}  p50 {:>8.2} ms  p99 {:>8.2} ms  {}{}",
                    cell.label(),
                    m.tps,
                    m.p50_ms,
                    m.p99_ms,
                    m.cpu_us.map(|c| format!("pooler CPU {c:.1} µs/tx")).unwrap_or_default(),
                    if m.ok { "" } else { "  FAILED" }
                );
            }
        }
    }
    let table = table(&cells, &results, bouncer_prepared);
    let checks = targets(&cells, &results, bouncer_prepared);
    println!("\n{table}\n{checks}");
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(out) = &o.out {
        let mut md = format!("{header}.\n\n");
        for (k, v) in &info {
            let _ = writeln!(md, "- {k}: {v}");
        }
        let _ = write!(
            md,
            "\n{table}\nCPU µs/tx: the pooler process's user + system CPU time during the median run \
             (connection setup included) divided by its transactions.\n\n\
             Targets of issue 9 (ratios of medians from this run):\n\n{checks}"
        );
        std::fs::write(out.join("results.md"), md).unwrap();
        std::fs::write(out.join("results.csv"), csv(&cells, &results)).unwrap();
        let title = format!("pgbench tps, transaction pooling, pool {}, median of {} runs", o.pool, o.runs);
        std::fs::write(out.join("tps.svg"), svg(&cells, &results, &title)).unwrap();
        std::fs::write(out.join("pgbench.log"), raw).unwrap();
        eprintln!("wrote {0}/results.md, {0}/results.csv, {0}/tps.svg, {0}/pgbench.log", out.display());
    }
    drop(bouncer);
    drop(broker);
}
