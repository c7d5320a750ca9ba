//! Memory and connection handling, pgbroker against PgBouncer, each run as its own process
//! (pgbroker: this package's release binary; PgBouncer: the distribution's package) with the
//! same settings: transaction mode, pool 20, max_client_conn 20000, md5 (or trust) auth with
//! an auth file, connection logging off. The clients speak the wire protocol directly from
//! this process (tokio, two worker threads), so their own cost per connection is small.
//!
//! `cargo bench --bench conns -- [--clients 10000] [--concurrency 100] [--seconds 15]
//!  [--warmup 3] [--pool 20] [--auth md5|trust] [--targets pgbroker,pgbouncer] [--out DIR]`
//!
//! Per target, on a freshly started pooler:
//! 1. baseline RSS (VmRSS of the pooler) after one warm-up client ran `SELECT 1` and left;
//! 2. `--clients` connects, at most `--concurrency` in flight, each TCP connect + startup +
//!    auth + ReadyForQuery, kept open: connects/s and connect latency;
//! 3. RSS with them all idle (logged in, waiting): (RSS − baseline) / clients;
//! 4. every client runs `SELECT 1` in a loop through the pool for `--seconds` (after
//!    `--warmup`): queries/s, latency p50/p99 and their ratio, pooler CPU per query;
//! 5. RSS with them idle again after that (buffers grown by use and not released show here);
//! 6. they all leave (Terminate): RSS after − baseline;
//! 7. `--clients` more connects that each log in and leave at once (connect + close).
//!
//! Prints a table to stdout (and `conns.md` into `--out`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/poolers.rs"]
mod poolers;

use md5::{Digest, Md5};
use pgbroker::cluster::{Cluster, ClusterOptions};
use poolers::{DB, PASSWORD, Pooler, Setup, USER, start_pgbouncer, start_pgbroker};
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Opts {
    clients: usize,
    concurrency: usize,
    seconds: u64,
    warmup: u64,
    pool: u32,
    auth: String,
    targets: Vec<String>,
    out: Option<PathBuf>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            clients: 10_000,
            concurrency: 100,
            seconds: 15,
            warmup: 3,
            pool: 20,
            auth: "md5".into(),
            targets: vec!["pgbroker".into(), "pgbouncer".into()],
            out: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut num = |d: u64| it.next().and_then(|v| v.parse().ok()).unwrap_or(d);
            match a.as_str() {
                "--clients" => o.clients = num(o.clients as u64).max(1) as usize,
                "--concurrency" => o.concurrency = num(o.concurrency as u64).max(1) as usize,
                "--seconds" => o.seconds = num(o.seconds).max(1),
                "--warmup" => o.warmup = num(o.warmup),
                "--pool" => o.pool = num(u64::from(o.pool)) as u32,
                "--auth" => o.auth = it.next().cloned().unwrap_or(o.auth),
                "--targets" => {
                    o.targets = it.next().map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default()
                }
                "--out" => o.out = it.next().map(PathBuf::from),
                _ => {} // cargo passes --bench
            }
        }
        assert!(o.auth == "md5" || o.auth == "trust", "--auth md5|trust");
        o
    }
}

/// `Q` "SELECT 1".
const SELECT1: &[u8] = b"Q\0\0\0\x0dSELECT 1\0";
const TERMINATE: &[u8] = b"X\0\0\0\x04";

// ---------------------------------------------------------------------------------------------
// A minimal client: startup, trust/md5/cleartext auth, simple queries.

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Conn {
    async fn connect(port: u16) -> io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let mut c = Conn { s, buf: vec![0; 512], start: 0, end: 0 };
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", USER), ("database", DB), ("application_name", "conns")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        c.s.write_all(&msg).await?;
        loop {
            let (tag, range) = c.next().await?;
            let body = &c.buf[range];
            match tag {
                b'R' => {
                    let code = body.get(..4).map(|b| i32::from_be_bytes(b.try_into().unwrap_or_default()));
                    match code {
                        Some(0) => {}
                        Some(3) => {
                            let pw = password_msg(PASSWORD.as_bytes());
                            c.s.write_all(&pw).await?;
                        }
                        Some(5) => {
                            let salt = body.get(4..8).ok_or_else(|| bad("short md5 request"))?.to_vec();
                            let inner = hex(&Md5::new().chain_update(PASSWORD).chain_update(USER).finalize());
                            let outer = hex(&Md5::new().chain_update(inner).chain_update(&salt).finalize());
                            let pw = password_msg(format!("md5{outer}").as_bytes());
                            c.s.write_all(&pw).await?;
                        }
                        other => return Err(bad(format!("unsupported auth request {other:?}"))),
                    }
                }
                b'E' => return Err(bad(format!("login error: {}", String::from_utf8_lossy(body)))),
                b'Z' => return Ok(c),
                _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
            }
        }
    }

    /// The next message's tag and body range in `buf`.
    async fn next(&mut self) -> io::Result<(u8, std::ops::Range<usize>)> {
        loop {
            let avail = self.end - self.start;
            if avail >= 5 {
                let h = &self.buf[self.start..self.start + 5];
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len < 4 {
                    return Err(bad("bad message length"));
                }
                if avail > len {
                    let tag = h[0];
                    let body = self.start + 5..self.start + 1 + len;
                    self.start += 1 + len;
                    return Ok((tag, body));
                }
                if self.buf.len() < len + 1 {
                    self.buf.resize(len + 1, 0);
                }
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.start > 0 && self.buf.len() - self.start < 1024 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, avail);
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.s.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(bad("connection closed"));
            }
            self.end += n;
        }
    }

    /// Runs `SELECT 1`, reading up to ReadyForQuery.
    async fn select1(&mut self) -> io::Result<()> {
        self.s.write_all(SELECT1).await?;
        loop {
            let (tag, range) = self.next().await?;
            match tag {
                b'Z' => return Ok(()),
                b'E' => return Err(bad(format!("query error: {}", String::from_utf8_lossy(&self.buf[range])))),
                _ => {}
            }
        }
    }

    async fn terminate(mut self) {
        let _ = self.s.write_all(TERMINATE).await;
    }
}

fn password_msg(pw: &[u8]) -> Vec<u8> {
    let mut m = vec![b'p'];
    m.extend_from_slice(&((pw.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(pw);
    m.push(0);
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

// ---------------------------------------------------------------------------------------------
// The pooler processes.

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds `pid` has used (all threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Soft open-files limit of `pid`.
fn proc_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    let mut f = line.split_whitespace().skip(3).map(|v| v.parse().unwrap_or(u64::MAX));
    (f.next().unwrap_or(1024), f.next().unwrap_or(1024))
}

/// Re-runs this process under a raised fd limit if the soft one is below `need` (the lints
/// forbid `unsafe`, so no setrlimit: `ulimit` in a shell does it).
fn ensure_nofile(need: u64) {
    let (soft, hard) = nofile();
    if soft >= need || std::env::var_os("PGBROKER_BENCH_REEXEC").is_some() {
        if soft < need {
            eprintln!("warning: open-files limit {soft} < {need}; raise the hard limit (ulimit -Hn)");
        }
        return;
    }
    let target = hard.min(need.max(20_000));
    let status = Command::new("sh")
        .args(["-c", "ulimit -n \"$1\" || exit 111; shift; exec \"$@\"", "sh", &target.to_string()])
        .arg(std::env::current_exe().unwrap())
        .args(std::env::args().skip(1))
        .env("PGBROKER_BENCH_REEXEC", "1")
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}

// ---------------------------------------------------------------------------------------------
// The phases.

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64 / 1000.0
}

struct Connects {
    conns: Vec<Conn>,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    first_error: Option<String>,
    cpu_s: f64,
}

/// `n` logins, `k` at a time; keeps the connections unless `close`.
async fn connect_many(port: u16, n: usize, k: usize, close: bool, pid: u32) -> Connects {
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..k.min(n) {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let (mut kept, mut lat, mut errors, mut first) = (Vec::new(), Vec::new(), 0usize, None);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                match Conn::connect(port).await {
                    Ok(c) => {
                        lat.push(t.elapsed().as_micros() as u32);
                        if close {
                            c.terminate().await;
                        } else {
                            kept.push(c);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert(e.to_string());
                    }
                }
            }
            (kept, lat, errors, first)
        }));
    }
    let mut out = Connects {
        conns: Vec::with_capacity(n),
        per_sec: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        errors: 0,
        first_error: None,
        cpu_s: 0.0,
    };
    let mut lat = Vec::with_capacity(n);
    for w in workers {
        let (kept, l, errors, first) = w.await.unwrap();
        out.conns.extend(kept);
        lat.extend(l);
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    out.cpu_s = cpu_secs(pid) - cpu0;
    lat.sort_unstable();
    out.per_sec = lat.len() as f64 / elapsed;
    out.p50_ms = pct(&lat, 0.5);
    out.p99_ms = pct(&lat, 0.99);
    out
}

struct Load {
    conns: Vec<Conn>,
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    clients_served: usize,
    errors: usize,
    first_error: Option<String>,
    cpu_us_per_query: f64,
}

/// Every connection runs `SELECT 1` in a loop; latencies of queries started after `warmup`
/// and finished within `seconds` after it count.
async fn select_loop(conns: Vec<Conn>, warmup: Duration, seconds: Duration, pid: u32) -> Load {
    let t0 = Instant::now();
    let (from, until) = (t0 + warmup, t0 + warmup + seconds);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                loop {
                    let t = Instant::now();
                    if t >= until {
                        return (Some(c), lat, None);
                    }
                    if let Err(e) = c.select1().await {
                        return (None, lat, Some(e.to_string()));
                    }
                    if t >= from {
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let cpu0 = cpu_secs(pid);
    tokio::time::sleep_until(until.into()).await;
    let cpu = cpu_secs(pid) - cpu0;
    let mut out = Load {
        conns: Vec::new(),
        qps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        max_ms: 0.0,
        clients_served: 0,
        errors: 0,
        first_error: None,
        cpu_us_per_query: 0.0,
    };
    let mut lat = Vec::new();
    for t in tasks {
        let (c, l, e) = t.await.unwrap();
        out.clients_served += usize::from(!l.is_empty());
        lat.extend(l);
        out.conns.extend(c);
        if let Some(e) = e {
            out.errors += 1;
            out.first_error.get_or_insert(e);
        }
    }
    lat.sort_unstable();
    out.qps = lat.len() as f64 / seconds.as_secs_f64();
    out.p50_ms = pct(&lat, 0.5);
    out.p99_ms = pct(&lat, 0.99);
    out.p999_ms = pct(&lat, 0.999);
    out.max_ms = lat.last().map_or(0.0, |&m| m as f64 / 1000.0);
    out.cpu_us_per_query = if lat.is_empty() { 0.0 } else { cpu * 1e6 / lat.len() as f64 };
    out
}

/// One target's figures, as (row label, value) pairs.
struct Report {
    name: String,
    version: String,
    rows: Vec<(String, f64, String)>,
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, label: impl Into<String>, value: f64, shown: String) {
        self.rows.push((label.into(), value, shown));
    }
}

/// Lets a pooler reach its quiet state before RSS is read: pgbroker's clients hibernate after
/// 1 s of quiet and the memory they freed goes back to the system within the next second.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(4)).await;
}

async fn measure(p: &Pooler, o: &Opts) -> Report {
    let n = o.clients;
    let mut r = Report { name: p.name.into(), version: p.version.clone(), rows: Vec::new(), notes: Vec::new() };
    let limit = proc_nofile(p.pid);
    if limit < n as u64 + 100 {
        r.notes.push(format!("its open-files limit is {limit}: too low for {n} clients"));
    }
    // Warm-up: the pool, its first server and lazily built state exist before the baseline.
    let mut c = Conn::connect(p.port).await.expect("warm-up login");
    c.select1().await.expect("warm-up query");
    c.terminate().await;
    settle().await;
    let base = rss_kib(p.pid);
    r.add("RSS at start (after one warm-up client), KiB", base as f64, base.to_string());

    eprintln!("{}: {n} connects, {} in flight, kept open", p.name, o.concurrency);
    let cn = connect_many(p.port, n, o.concurrency, false, p.pid).await;
    let kept = cn.conns.len();
    r.add(format!("connects/s ({n} logins kept open, {} in flight)", o.concurrency), cn.per_sec, f0(cn.per_sec));
    r.add("  login latency p50 / p99, ms", cn.p99_ms, format!("{:.2} / {:.2}", cn.p50_ms, cn.p99_ms));
    let per_k = cn.cpu_s * 1000.0 / kept.max(1) as f64 * 1000.0;
    r.add("  pooler CPU per 1000 logins, ms", per_k, f0(per_k));
    if cn.errors > 0 {
        r.notes.push(format!("{} login errors, first: {}", cn.errors, cn.first_error.unwrap_or_default()));
    }
    settle().await;
    let idle = rss_kib(p.pid);
    r.add(format!("RSS with {kept} idle clients, KiB"), idle as f64, idle.to_string());
    let per = (idle as f64 - base as f64) / kept.max(1) as f64;
    r.add("RSS per idle client (logged in), KiB", per, f2(per));

    eprintln!("{}: {kept} clients running SELECT 1 for {}+{} s", p.name, o.warmup, o.seconds);
    let load = select_loop(cn.conns, Duration::from_secs(o.warmup), Duration::from_secs(o.seconds), p.pid).await;
    r.add(format!("SELECT 1 queries/s, {kept} clients, pool {}", o.pool), load.qps, f0(load.qps));
    r.add("  latency p50 / p99, ms", load.p99_ms, format!("{:.1} / {:.1}", load.p50_ms, load.p99_ms));
    let spread = if load.p50_ms > 0.0 { load.p99_ms / load.p50_ms } else { 0.0 };
    r.add("  p99 / p50", spread, f2(spread));
    r.add("  latency p99.9 / max, ms", load.max_ms, format!("{:.1} / {:.1}", load.p999_ms, load.max_ms));
    r.add("  clients served at least once", load.clients_served as f64, load.clients_served.to_string());
    r.add("  pooler CPU per query, µs", load.cpu_us_per_query, f2(load.cpu_us_per_query));
    if load.errors > 0 {
        r.notes.push(format!("{} query errors, first: {}", load.errors, load.first_error.unwrap_or_default()));
    }
    settle().await;
    let used = rss_kib(p.pid);
    let per_used = (used as f64 - base as f64) / load.conns.len().max(1) as f64;
    r.add("RSS per idle client after the query loop, KiB", per_used, f2(per_used));

    for c in load.conns {
        c.terminate().await;
    }
    settle().await;
    let after = rss_kib(p.pid);
    let grew = after as f64 - base as f64;
    r.add("RSS after all clients left − at start, KiB", grew, f0(grew));

    eprintln!("{}: {n} connects, {} in flight, each closed after login", p.name, o.concurrency);
    let churn = connect_many(p.port, n, o.concurrency, true, p.pid).await;
    r.add(
        format!("connects/s ({n} logins, each closed at once, {} in flight)", o.concurrency),
        churn.per_sec,
        f0(churn.per_sec),
    );
    r.add("  login latency p50 / p99, ms", churn.p99_ms, format!("{:.2} / {:.2}", churn.p50_ms, churn.p99_ms));
    if churn.errors > 0 {
        r.notes.push(format!("{} churn login errors, first: {}", churn.errors, churn.first_error.unwrap_or_default()));
    }
    settle().await;
    let end = rss_kib(p.pid);
    r.add("RSS after the connect/close round − at start, KiB", end as f64 - base as f64, f0(end as f64 - base as f64));
    r
}

fn f0(v: f64) -> String {
    format!("{v:.0}")
}

fn f2(v: f64) -> String {
    format!("{v:.2}")
}

fn table(reports: &[Report]) -> String {
    let mut t = String::from("| measure |");
    for r in reports {
        let _ = write!(t, " {} |", r.name);
    }
    let both = reports.len() == 2;
    if both {
        t.push_str(" pgbroker / PgBouncer (of the last figure) |");
    }
    t.push_str("\n|---|");
    for _ in 0..reports.len() + usize::from(both) {
        t.push_str("---|");
    }
    t.push('\n');
    let rows = reports.first().map_or(0, |r| r.rows.len());
    for i in 0..rows {
        let _ = write!(t, "| {} |", reports[0].rows[i].0);
        for r in reports {
            let _ = write!(t, " {} |", r.rows.get(i).map_or("", |x| x.2.as_str()));
        }
        if both {
            let (a, b) = (reports[0].rows[i].1, reports[1].rows[i].1);
            let label = &reports[0].rows[i].0;
            let comparable = !label.starts_with("RSS after") && !label.contains("served");
            if comparable && b.abs() > f64::EPSILON {
                let _ = write!(t, " {:.2} |", a / b);
            } else {
                t.push_str(" |");
            }
        }
        t.push('\n');
    }
    t
}

fn main() {
    let o = Opts::parse();
    ensure_nofile(o.clients as u64 + 1000);
    let pg = Cluster::start(ClusterOptions { max_connections: 4 * o.pool + 40, ..ClusterOptions::default() })
        .expect("start PostgreSQL");
    pg.psql("postgres", &format!("CREATE DATABASE {DB}")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let setup = Setup {
        pool: o.pool,
        pool_mode: "transaction".into(),
        auth: o.auth.clone(),
        wrap: Vec::new(),
        start_timeout: Duration::from_secs(10),
    };
    let mut reports = Vec::new();
    for t in &o.targets {
        let dir = tempfile::tempdir().unwrap();
        let pooler = match t.as_str() {
            "pgbroker" => start_pgbroker(&pg, &setup, dir.path()),
            "pgbouncer" => match start_pgbouncer(&pg, &setup, dir.path()) {
                Some(p) => p,
                None => {
                    eprintln!("pgbouncer not available: skipped (apt-get install pgbouncer)");
                    continue;
                }
            },
            other => {
                eprintln!("unknown target {other}");
                continue;
            }
        };
        let report = rt.block_on(measure(&pooler, &o));
        pooler.stop();
        reports.push(report);
    }
    let mut out = format!(
        "Connections and memory: {} clients, {} logins in flight, auth {}, transaction mode, pool {}, \
         SELECT 1 loop {} s after {} s warm-up; clients in the benchmark process (2 tokio workers) on the \
         same {} cores.\n\n",
        o.clients,
        o.concurrency,
        o.auth,
        o.pool,
        o.seconds,
        o.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for r in &reports {
        let _ = writeln!(out, "- {}: {}", r.name, r.version);
    }
    let _ = write!(out, "\n{}", table(&reports));
    for r in &reports {
        for n in &r.notes {
            let _ = writeln!(out, "\n{}: {n}", r.name);
        }
    }
    println!("{out}");
    if let Some(dir) = &o.out {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("conns.md"), &out).unwrap();
    }
}
