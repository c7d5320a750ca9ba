//! Fault injection against a real PostgreSQL: a restart, a stop, a backend that stops
//! answering, clients that vanish mid-request or never read, and a storm of connections.
//! Every wait is bounded; tests that restart, stop or freeze PostgreSQL start their own
//! cluster so the others are not disturbed.
#![allow(clippy::unwrap_used)]

mod common;
use common::process::BrokerProcess;
use common::{pg, rows, startup_packet};
use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::block_in_place;
use tokio::time::{Instant, sleep, timeout};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Scheduling: the storm needs the machine to itself; the other tests may run side by side.

static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn shared_gate() -> tokio::sync::RwLockReadGuard<'static, ()> {
    GATE.read().await
}

async fn exclusive_gate() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    GATE.write().await
}

// ---------------------------------------------------------------------------------------------
// Clusters, configs and brokers.

/// A cluster of the test's own (to restart, stop or freeze), trusting TCP logins.
fn own_cluster() -> Cluster {
    let opts = ClusterOptions { hba: vec!["host all all 127.0.0.1/32 trust".into()], ..ClusterOptions::default() };
    Cluster::start(opts).expect("start PostgreSQL")
}

/// Broker config text: loopback listeners, trust auth (no auth file), `postgres` as console
/// admin, the `[broker]` lines in `broker`, then `databases`.
fn config_text(listen: &str, http: &str, broker: &str, databases: &str) -> String {
    format!(
        "[broker]\nlisten = \"{listen}\"\nhttp_listen = \"{http}\"\nlog_connections = false\n\
         log_disconnections = false\n{broker}\n\
         [auth]\ntype = \"trust\"\nadmin_users = [\"postgres\"]\n\n{databases}"
    )
}

/// A `[databases.NAME]` section: database `postgres` on 127.0.0.1:`port`, login postgres.
fn db(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[databases.{name}]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\nuser = \"postgres\"\n\
         password = \"postgres\"\n{extra}\n"
    )
}

fn config(broker: &str, databases: &str) -> Config {
    let text = config_text("127.0.0.1:0", "127.0.0.1:0", broker, databases);
    Config::parse(&text, None, &|_| None).unwrap()
}

async fn start_broker(broker: &str, databases: &str) -> Broker {
    within(Broker::start(config(broker, databases))).await.unwrap()
}

/// Connects through the broker as `postgres` to `database`.
async fn try_client(addr: SocketAddr, database: &str) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user=postgres password=postgres dbname={database} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn client(addr: SocketAddr, database: &str) -> Client {
    timeout(10 * SEC, try_client(addr, database)).await.expect("connect in time").expect("connect")
}

/// A direct connection (not through a broker) to database `postgres` on 127.0.0.1:`port`.
async fn direct(port: u16) -> Client {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres password=postgres dbname=postgres");
    let (client, conn) = timeout(10 * SEC, tokio_postgres::connect(&conninfo, NoTls)).await.unwrap().unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `f`, which must finish within 10 s.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    timeout(10 * SEC, f).await.expect("no answer within 10 s")
}

/// The first column of the first row.
async fn one(c: &Client, sql: &str) -> String {
    let msgs = within(c.simple_query(sql)).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .expect("a row")
}

/// The SHOW POOLS row of `database`.
async fn pool_row(console: &Client, database: &str) -> HashMap<String, String> {
    rows(console, "SHOW POOLS").await.into_iter().find(|r| r["database"] == database).expect("pool listed")
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// Polls `check` until it returns true; false if `limit` passes first.
async fn eventually<F, Fut>(limit: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::poll(limit, check).await.is_ok()
}

/// Polls `get` until `done` accepts its value: `Ok(value)`, or `Err(last value)` once
/// `limit` has passed.
async fn settle<T: std::fmt::Debug, F, Fut>(limit: Duration, get: F, done: impl Fn(&T) -> bool) -> Result<T, T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    common::poll(limit, || async {
        let v = get().await;
        if done(&v) { Ok(v) } else { Err(v) }
    })
    .await
}

/// Backends whose (current or last) query contains `marker`, leaving out the test's own
/// pg_stat_activity lookups.
async fn backends_running(direct: &Client, marker: &str) -> Vec<HashMap<String, String>> {
    let sql = format!(
        "SELECT pid, state, coalesce(wait_event, '') AS wait_event FROM pg_stat_activity \
         WHERE query LIKE '%{marker}%' AND query NOT LIKE '%pg_stat_activity%'"
    );
    rows(direct, &sql).await
}

/// Sends SIGSTOP to a backend; SIGCONT when dropped, whatever happens to the test.
struct Frozen(i32);

impl Frozen {
    fn new(pid: i32) -> Frozen {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw protocol, for clients that misbehave on purpose and for thousands of cheap clients.

/// Messages (tag, body) read until `stop` matches a tag or the peer closes (`closed`).
struct Reply {
    msgs: Vec<(u8, Vec<u8>)>,
    closed: bool,
}

impl Reply {
    fn has(&self, tag: u8) -> bool {
        self.msgs.iter().any(|(t, _)| *t == tag)
    }

    /// The SQLSTATE of the first ErrorResponse.
    fn error_code(&self) -> Option<String> {
        let (_, body) = self.msgs.iter().find(|(t, _)| *t == b'E')?;
        body.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into_owned())
    }
}

async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, stop: impl Fn(u8) -> bool) -> std::io::Result<Reply> {
    let mut msgs = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            msgs.push((tag, buf[5..1 + len].to_vec()));
            buf.drain(..1 + len);
            if stop(tag) {
                return Ok(Reply { msgs, closed: false });
            }
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) => return Ok(Reply { msgs, closed: true }),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(Reply { msgs, closed: true }),
            Err(e) => return Err(e),
        }
    }
}

fn query_msg(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Logs in as `postgres` to `database` over a raw socket (trust), up to ReadyForQuery.
async fn raw_login(addr: SocketAddr, database: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(&startup_packet(&[("user", "postgres"), ("database", database)])).await.map_err(|e| e.to_string())?;
    let reply = read_until(&mut s, &mut Vec::new(), |t| t == b'Z').await.map_err(|e| e.to_string())?;
    match (reply.error_code(), reply.has(b'Z')) {
        (None, true) => Ok(s),
        (code, _) => Err(format!("login failed: {code:?}, closed {}", reply.closed)),
    }
}

/// Runs `SELECT 1` on a raw connection and checks the answer.
async fn raw_select_one(s: &mut TcpStream) -> Result<(), String> {
    s.write_all(&query_msg("SELECT 1")).await.map_err(|e| e.to_string())?;
    let reply = read_until(s, &mut Vec::new(), |t| t == b'Z').await.map_err(|e| e.to_string())?;
    if let Some(code) = reply.error_code() {
        return Err(format!("SELECT 1 failed with {code}"));
    }
    let row = reply.msgs.iter().find(|(t, _)| *t == b'D').ok_or("no DataRow")?;
    // DataRow: 1 column, length 1, "1".
    match row.1.as_slice() {
        [0, 1, 0, 0, 0, 1, b'1'] => Ok(()),
        other => Err(format!("unexpected row {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The broker as a separate process, for memory and file descriptor measurements.

/// Starts `pgbroker --config FILE` (logging warnings) and waits until it accepts connections.
async fn broker_process(broker: &str, databases: &str) -> BrokerProcess {
    let config = |p: common::process::Ports| {
        config_text(&format!("127.0.0.1:{}", p.port), &format!("127.0.0.1:{}", p.http), broker, databases)
    };
    BrokerProcess::start_with(config, &[("RUST_LOG", "warn")]).await
}

/// Resident memory of the broker process, bytes.
fn rss(b: &BrokerProcess) -> u64 {
    proc_status_kb(&format!("/proc/{}/status", b.pid()), "VmRSS:") * 1024
}

fn proc_status_kb(path: &str, key: &str) -> u64 {
    let status = std::fs::read_to_string(path).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// (soft, hard) "Max open files" of a process, from /proc/PID/limits.
fn nofile(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let parse = |s: &str| if s == "unlimited" { u64::MAX } else { s.parse().unwrap() };
    (parse(f[3]), parse(f[4]))
}

// =============================================================================================
// 1. PostgreSQL restarted (`pg_ctl restart -m fast`) in transaction pooling.

/// A short transaction over three round trips, so the server is held across them.
async fn transaction(c: &Client) -> Result<(), tokio_postgres::Error> {
    within(c.batch_execute("BEGIN")).await?;
    within(c.simple_query("SELECT count(*) FROM pg_class")).await?;
    within(c.batch_execute("COMMIT")).await
}

/// Retries `transaction` on fresh connections when needed until one succeeds; how long it took.
async fn transaction_within(addr: SocketAddr, database: &str, c: Option<Client>, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut c = c;
    let mut last = String::new();
    while start.elapsed() < limit {
        if c.as_ref().is_none_or(Client::is_closed) {
            match timeout(5 * SEC, try_client(addr, database)).await {
                Ok(Ok(fresh)) => c = Some(fresh),
                other => {
                    last = format!("{other:?}");
                    sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        match timeout(5 * SEC, transaction(c.as_ref().unwrap())).await {
            Ok(Ok(())) => return start.elapsed(),
            other => last = format!("{other:?}"),
        }
        sleep(Duration::from_millis(100)).await;
    }
    panic!("no transaction succeeded within {limit:?}; last error: {last}");
}

/// An error that says the server went away: 57P01 (terminated by the restart), 08006 (the
/// broker lost the server), or the connection ended.
fn assert_server_went_away(e: &tokio_postgres::Error, who: &str) {
    println!("{who}: {e:?}");
    let ok = matches!(code(e).as_deref(), Some("57P01" | "08006")) || e.is_closed();
    assert!(ok, "{who}: expected 57P01, 08006 or a closed connection, got {e:?}");
}

/// What a load loop saw: (when, error SQLSTATE or text; None = success).
type Outcomes = Vec<(Instant, Option<String>)>;

/// Runs transactions until `stop` (at most 100,000), reconnecting when the broker closes the
/// connection.
async fn load_loop(addr: SocketAddr, stop: Arc<AtomicBool>, done: Arc<AtomicUsize>) -> Outcomes {
    let mut out = Vec::new();
    let mut c: Option<Client> = None;
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if c.as_ref().is_none_or(Client::is_closed) {
            match timeout(5 * SEC, try_client(addr, "app")).await {
                Ok(Ok(fresh)) => c = Some(fresh),
                other => {
                    out.push((Instant::now(), Some(format!("connect: {other:?}"))));
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let r = timeout(10 * SEC, transaction(c.as_ref().unwrap())).await;
        let outcome = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(code(&e).unwrap_or_else(|| format!("{e}"))),
            Err(_) => Some("timed out".into()),
        };
        if outcome.is_none() {
            done.fetch_add(1, Ordering::Relaxed);
        } else {
            sleep(Duration::from_millis(20)).await;
        }
        out.push((Instant::now(), outcome));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_fails_only_transactions_in_flight_and_every_client_recovers() {
    let _gate = shared_gate().await;
    let mut cluster = block_in_place(own_cluster);
    let b = start_broker(
        "pool_mode = \"transaction\"\nquery_wait_timeout = \"5s\"",
        &db("app", cluster.port(), "pool_size = 10"),
    )
    .await;
    let addr = b.local_addr();

    // Idle clients: each ran a transaction and holds no server now.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let c = client(addr, "app").await;
        transaction(&c).await.unwrap();
        idle.push(c);
    }
    // One client idle inside a transaction, one running a statement inside a transaction.
    let in_txn = client(addr, "app").await;
    within(in_txn.batch_execute("BEGIN")).await.unwrap();
    one(&in_txn, "SELECT 1").await;
    let running = client(addr, "app").await;
    within(running.batch_execute("BEGIN")).await.unwrap();
    let running_query = tokio::spawn(async move {
        let r = running.simple_query("SELECT pg_sleep(60) /* restart-running */").await.map(drop);
        (r, running)
    });
    let d = direct(cluster.port()).await;
    assert!(
        eventually(10 * SEC, || async { !backends_running(&d, "restart-running */").await.is_empty() }).await,
        "the long statement never started"
    );
    drop(d);
    // Two clients running transactions in a loop throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let loaders: Vec<_> = (0..2).map(|_| tokio::spawn(load_loop(addr, stop.clone(), done.clone()))).collect();
    assert!(eventually(10 * SEC, || async { done.load(Ordering::Relaxed) >= 10 }).await, "load never ran");

    let restart_at = Instant::now();
    block_in_place(|| cluster.restart_server()).unwrap();
    let back = Instant::now();
    println!("restart took {:?}", back - restart_at);

    // Idle clients kept their broker connection, and ask at once. Their next transactions
    // succeed within 10 s; a failure before that is an ERROR about the server being
    // unreachable (the login backoff the restart window started, whose SQLSTATE is that of the
    // last failed login), never a dead server: no FATAL, no lost connection.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in idle.into_iter().enumerate() {
        assert!(!c.is_closed(), "idle client {i} lost its broker connection");
        tasks.spawn(async move {
            let mut refused = Vec::new();
            loop {
                match transaction(&c).await {
                    Ok(()) => break,
                    Err(e) => {
                        let db =
                            e.as_db_error().unwrap_or_else(|| panic!("idle client {i} lost its connection: {e:?}"));
                        assert_eq!(db.severity(), "ERROR", "idle client {i} was handed a dead server: {e:?}");
                        assert!(db.message().contains("pool app/postgres"), "idle client {i}: {e:?}");
                        assert!(!c.is_closed(), "idle client {i} lost its connection");
                        refused.push(format!("{} {}", db.code().code(), db.message()));
                        // Nothing is left open whichever statement failed.
                        let _ = within(c.batch_execute("ROLLBACK")).await;
                    }
                }
                assert!(back.elapsed() < 10 * SEC, "idle client {i}: no transaction within 10 s of the restart");
                sleep(Duration::from_millis(100)).await;
            }
            let recovered = back.elapsed();
            for n in 0..5 {
                transaction(&c)
                    .await
                    .unwrap_or_else(|e| panic!("idle client {i}, transaction {n} after recovery: {e:?}"));
            }
            (i, recovered, refused)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (i, recovered, refused) = r.unwrap();
        println!(
            "idle client {i}: through {recovered:?} after the restart; {} refusals before, the first: {:?}",
            refused.len(),
            refused.first()
        );
    }

    // The statement running during the restart failed: the server's 57P01, or the broker's 08006.
    let (r, running) = timeout(10 * SEC, running_query).await.expect("ends in time").unwrap();
    assert_server_went_away(&r.expect_err("the running statement must fail"), "running client");
    // The client idle in its transaction finds out at its next statement.
    let r = timeout(10 * SEC, in_txn.simple_query("SELECT 1")).await.expect("answer in time");
    assert_server_went_away(&r.expect_err("the open transaction must fail"), "client in a transaction");
    // Both get a transaction through again (on a new connection if the old one was closed).
    for (who, c) in [("running", running), ("in transaction", in_txn)] {
        let took = transaction_within(addr, "app", Some(c), 10 * SEC).await;
        println!("{who} client: next transaction after {took:?}");
    }

    // The load loops got through again within 10 s of the server being back.
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        let outcomes = timeout(20 * SEC, l).await.expect("load loop ends").unwrap();
        let errors: Vec<_> = outcomes.iter().filter_map(|(_, o)| o.as_deref()).collect();
        let first_ok = outcomes.iter().find(|(at, o)| *at >= back && o.is_none()).map(|(at, _)| *at - back);
        println!(
            "load loop: {} transactions, errors {errors:?}, first success {first_ok:?} after the restart",
            outcomes.len()
        );
        assert!(first_ok.is_some_and(|d| d < 10 * SEC), "a load loop did not recover within 10 s");
    }

    // The broker is still serving: a new client, and the console.
    transaction(&client(addr, "app").await).await.unwrap();
    let console = client(addr, "pgbroker").await;
    assert_eq!(pool_row(&console, "app").await["cl_waiting"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_never_hands_out_a_dead_pooled_server() {
    let _gate = shared_gate().await;
    let mut cluster = block_in_place(own_cluster);
    let b = start_broker(
        "pool_mode = \"transaction\"\nquery_wait_timeout = \"5s\"",
        &db("app", cluster.port(), "pool_size = 4"),
    )
    .await;
    let addr = b.local_addr();
    let console = client(addr, "pgbroker").await;

    // Four clients hold four servers at once, then give them back: four idle pooled servers.
    let mut clients = Vec::new();
    let mut old_pids = HashSet::new();
    for _ in 0..4 {
        let c = client(addr, "app").await;
        within(c.batch_execute("BEGIN")).await.unwrap();
        old_pids.insert(one(&c, "SELECT pg_backend_pid()").await);
        clients.push(c);
    }
    for c in &clients {
        within(c.batch_execute("COMMIT")).await.unwrap();
    }
    assert_eq!(old_pids.len(), 4);
    assert_eq!(pool_row(&console, "app").await["sv_idle"], "4");

    // No traffic while the server restarts: nothing starts a login backoff.
    block_in_place(|| cluster.restart_server()).unwrap();

    // Every query of every idle client succeeds at the first try, on a new server; the four
    // ask at once so that any dead server still pooled would be someone's.
    let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let mut new_pids = HashSet::new();
    for round in 0..5 {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, c) in clients.iter().enumerate() {
            let c = c.clone();
            tasks.spawn(async move { (i, timeout(10 * SEC, c.simple_query("SELECT pg_backend_pid()")).await) });
        }
        while let Some(r) = tasks.join_next().await {
            let (i, r) = r.unwrap();
            let msgs = r.expect("answer within 10 s").unwrap_or_else(|e| panic!("client {i}, round {round}: {e:?}"));
            let pid = msgs.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            new_pids.insert(pid.unwrap());
        }
    }
    assert!(new_pids.is_disjoint(&old_pids), "a server from before the restart answered: {new_pids:?} / {old_pids:?}");
    let listed: HashSet<String> =
        rows(&console, "SHOW SERVERS").await.into_iter().map(|r| r["remote_pid"].clone()).collect();
    assert!(listed.is_disjoint(&old_pids), "SHOW SERVERS still lists dead servers: {listed:?}");
}

// =============================================================================================
// 2. PostgreSQL stopped (`pg_ctl stop -m fast`).

/// The broker's server connection attempts that failed, from its `connection_error` events:
/// (when seen, the backoff it started in ms). Panics later if events were missed.
struct Attempts {
    seen: Arc<Mutex<Vec<(Instant, u64)>>>,
    missed: Arc<AtomicBool>,
}

impl Attempts {
    fn watch(b: &Broker) -> Attempts {
        let mut rx = b.app().events().subscribe(pgbroker::events::EVENTS_CHANNEL).unwrap();
        let (seen, missed) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (out, lagged) = (seen.clone(), missed.clone());
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        let v: serde_json::Value = serde_json::from_str(&msg).unwrap();
                        if v["event"] == "connection_error" {
                            out.lock().unwrap().push((Instant::now(), v["retryInMs"].as_u64().unwrap()));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => lagged.store(true, Ordering::Relaxed),
                    Err(_) => return,
                }
            }
        });
        Attempts { seen, missed }
    }

    fn since(&self, t: Instant) -> Vec<(Instant, u64)> {
        assert!(!self.missed.load(Ordering::Relaxed), "events were missed");
        self.seen.lock().unwrap().iter().copied().filter(|(at, _)| *at >= t).collect()
    }
}

/// What one request saw while the server was down: how long it took and its error.
struct Refusal {
    took: Duration,
    code: String,
    message: String,
}

/// Each client sends `SELECT 1` every 50 ms for `window` (at most 200 each).
async fn hammer(clients: &[Arc<Client>], window: Duration) -> Vec<Refusal> {
    let mut tasks = tokio::task::JoinSet::new();
    let until = Instant::now() + window;
    for c in clients {
        let c = c.clone();
        tasks.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..200 {
                if Instant::now() >= until {
                    break;
                }
                let t = Instant::now();
                let r = timeout(10 * SEC, c.simple_query("SELECT 1")).await.expect("answer within 10 s");
                let e = r.expect_err("the server is down: the request must fail");
                let db = e.as_db_error().unwrap_or_else(|| panic!("an ERROR from the broker, got {e:?}"));
                seen.push(Refusal { took: t.elapsed(), code: db.code().code().into(), message: db.message().into() });
                assert!(!c.is_closed(), "the client must stay connected: {e:?}");
                sleep(Duration::from_millis(50)).await;
            }
            seen
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_fails_requests_fast_and_spaces_attempts_exponentially() {
    let _gate = shared_gate().await;
    let mut cluster = block_in_place(own_cluster);
    let broker = "pool_mode = \"transaction\"\nserver_connect_timeout = \"2s\"\nserver_login_retry = \"15s\"";
    let b = start_broker(broker, &db("app", cluster.port(), "pool_size = 4")).await;
    let attempts = Attempts::watch(&b);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = client(b.local_addr(), "app").await;
        one(&c, "SELECT 1").await;
        clients.push(Arc::new(c));
    }

    block_in_place(|| cluster.stop_server()).unwrap();
    let stopped = Instant::now();
    let refusals = hammer(&clients, Duration::from_millis(4500)).await;

    // Every request got an ERROR of class 08 (connection exception) fast, well within
    // server_connect_timeout, and the client stayed connected (checked in `hammer`).
    assert!(refusals.len() >= 40, "only {} requests", refusals.len());
    for r in &refusals {
        assert!(r.code.starts_with("08"), "{} {}", r.code, r.message);
        assert!(r.took < 2 * SEC, "a request took {:?}, more than server_connect_timeout", r.took);
        assert!(r.message.contains("pool app/postgres"), "the message names the pool: {}", r.message);
    }
    let tried: Vec<_> = refusals.iter().filter(|r| r.message.contains("cannot open a server connection")).collect();
    let waited = refusals.iter().filter(|r| r.message.contains("failed recently")).count();
    assert!(tried.iter().all(|r| r.message.contains("Connection refused")), "the cause is named");
    println!(
        "{} requests in {:?}: {} made an attempt, {waited} were told to wait (e.g. {:?}); slowest {:?}",
        refusals.len(),
        stopped.elapsed(),
        tried.len(),
        refusals.iter().find(|r| r.message.contains("retrying in")).map(|r| &r.message),
        refusals.iter().map(|r| r.took).max()
    );

    // Attempts, counted by the broker's connection_error events: a handful, not one per request.
    let made = attempts.since(stopped);
    let delays: Vec<u64> = made.iter().map(|(_, d)| *d).collect();
    println!("attempts at {:?} with backoffs {delays:?}", made.iter().map(|(at, _)| *at - stopped).collect::<Vec<_>>());
    assert_eq!(made.len(), tried.len(), "one attempt per request that was not told to wait");
    assert!(waited >= refusals.len() / 2, "most requests must wait out the backoff");
    // The first failures (the four clients may try at once) start a 1 s backoff; after that
    // a single probe at a time, each failure doubling the wait: 1 s, 2 s, 4 s in 4.5 s.
    // Rounds of attempts: (first attempt, the backoff it started, attempts in the round).
    let rounds: Vec<(Instant, u64, usize)> = made.iter().fold(Vec::new(), |mut rounds, &(at, delay)| {
        match rounds.last_mut() {
            Some((_, d, n)) if *d == delay => *n += 1,
            _ => rounds.push((at, delay, 1)),
        }
        rounds
    });
    assert!(rounds[0].2 <= 4, "more first attempts than clients: {delays:?}");
    assert!(rounds[1..].iter().all(|r| r.2 == 1), "more than one probe at a time: {delays:?}");
    assert_eq!(rounds.iter().map(|r| r.1).collect::<Vec<_>>(), [1000, 2000, 4000], "doubling backoff");
    for w in rounds.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap >= Duration::from_millis(w[0].1 - 200), "attempt {gap:?} after a {} ms backoff", w[0].1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_reconnects_by_itself_when_a_stopped_server_starts_again() {
    let _gate = shared_gate().await;
    let mut cluster = block_in_place(own_cluster);
    let broker =
        "pool_mode = \"transaction\"\nserver_connect_timeout = \"2s\"\nserver_login_retry = \"4s\"\nmin_pool_size = 1";
    let b = start_broker(broker, &db("app", cluster.port(), "pool_size = 4")).await;
    let addr = b.local_addr();
    let app = Arc::new(client(addr, "app").await);
    one(&app, "SELECT 1").await;
    let console = client(addr, "pgbroker").await;

    // Down long enough for the backoff to grow (1 s, 2 s, then the 4 s cap), with a client
    // asking throughout.
    block_in_place(|| cluster.stop_server()).unwrap();
    let refusals = hammer(std::slice::from_ref(&app), Duration::from_millis(3500)).await;
    assert!(refusals.iter().all(|r| r.code.starts_with("08")));
    assert_eq!(pool_row(&console, "app").await["sv_idle"], "0");

    block_in_place(|| cluster.start_server()).unwrap();
    let back = Instant::now();
    // With no client request, the broker opens a server again (min_pool_size = 1) once its
    // backoff (at most server_login_retry, 4 s) is over.
    let reopened = eventually(4 * SEC + 6 * SEC, || async { pool_row(&console, "app").await["sv_idle"] == "1" }).await;
    assert!(reopened, "no server reopened within server_login_retry + 6 s");
    println!("server reopened {:?} after PostgreSQL was back", back.elapsed());
    // The client that saw the errors was never disconnected, and its next query just works.
    assert!(!app.is_closed());
    for _ in 0..5 {
        one(&app, "SELECT 1").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_server_login_fails_after_server_connect_timeout() {
    let _gate = shared_gate().await;
    let cluster = block_in_place(own_cluster);
    let broker = "pool_mode = \"transaction\"\nserver_connect_timeout = \"2s\"";
    let b = start_broker(broker, &db("app", cluster.port(), "pool_size = 4")).await;
    let holder = client(b.local_addr(), "app").await;
    let asker = client(b.local_addr(), "app").await;
    // The pool's one server is busy with a transaction, so the next request needs a new one.
    within(holder.batch_execute("BEGIN")).await.unwrap();

    // A frozen postmaster: the kernel still completes the TCP handshake, nobody answers the
    // startup packet.
    let pidfile = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid")).unwrap();
    let frozen = Frozen::new(pidfile.lines().next().unwrap().trim().parse().unwrap());
    let t = Instant::now();
    let e = within(asker.simple_query("SELECT 1")).await.expect_err("no server can be opened");
    let took = t.elapsed();
    let db = e.as_db_error().unwrap_or_else(|| panic!("an ERROR, the client stays: {e:?}"));
    println!("frozen postmaster: {} {} after {took:?}", db.code().code(), db.message());
    assert_eq!(db.code().code(), "08001");
    assert!(db.message().contains("timed out connecting to server"), "{}", db.message());
    assert!(took >= Duration::from_millis(1900) && took <= 4 * SEC, "failed after {took:?}");
    // The next request does not wait again: the failure is remembered for the backoff.
    let t = Instant::now();
    let e = within(asker.simple_query("SELECT 1")).await.expect_err("still no server");
    assert!(t.elapsed() < SEC, "waited {:?}", t.elapsed());
    assert!(e.as_db_error().unwrap().message().contains("failed recently"), "{e:?}");
    // The transaction on an existing server goes on: backends do not need the postmaster.
    assert_eq!(one(&holder, "SELECT 1").await, "1");
    within(holder.batch_execute("COMMIT")).await.unwrap();
    drop(frozen);
    assert!(!asker.is_closed());
}

// =============================================================================================
// 3. A server that stops answering (SIGSTOP), and idle servers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_ends_a_query_on_a_frozen_server_while_other_pools_work() {
    let _gate = shared_gate().await;
    let cluster = block_in_place(own_cluster);
    let port = cluster.port();
    let dbs = db("stuck", port, "pool_mode = \"session\"\npool_size = 1") + &db("other", port, "pool_size = 2");
    let b =
        start_broker("pool_mode = \"transaction\"\nquery_timeout = \"1s\"\nquery_wait_timeout = \"5s\"", &dbs).await;
    let addr = b.local_addr();
    let stuck = Arc::new(client(addr, "stuck").await);
    let pid: i32 = one(&stuck, "SELECT pg_backend_pid()").await.parse().unwrap();
    let other = client(addr, "other").await;
    one(&other, "SELECT 1").await;

    let frozen = Frozen::new(pid);
    let started = Instant::now();
    let query = {
        let stuck = stuck.clone();
        tokio::spawn(async move {
            let r = stuck.simple_query("SELECT 1").await.map(drop);
            (r, started.elapsed())
        })
    };
    // Meanwhile another pool on the same server answers, each query within a second.
    let mut answered = 0;
    while !query.is_finished() && started.elapsed() < 10 * SEC {
        let r = timeout(SEC, other.simple_query("SELECT 1")).await;
        assert!(matches!(r, Ok(Ok(_))), "the other pool stalled: {r:?}");
        answered += 1;
        sleep(Duration::from_millis(100)).await;
    }
    let (r, took) = timeout(10 * SEC, query).await.expect("the query ends").unwrap();
    let e = r.expect_err("the frozen server cannot answer");
    println!("frozen server: {e:?} after {took:?}; the other pool answered {answered} queries meanwhile");
    assert_eq!(code(&e).as_deref(), Some("57014"), "{e:?}");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("query_timeout"), "{message}");
    // Cancel after query_timeout (1 s); the frozen backend cannot act on it, so the server is
    // closed CANCEL_GRACE (1 s) later. 2 s of slack for a loaded machine.
    assert!(took >= Duration::from_millis(1900) && took <= 4 * SEC, "ended after {took:?}");
    assert!(answered >= 5, "the other pool answered only {answered} queries");
    assert!(eventually(5 * SEC, || async { stuck.is_closed() }).await, "the client is told FATAL and disconnected");

    // Its pool (size 1) has its slot back while the backend is still frozen.
    let again = client(addr, "stuck").await;
    let new_pid: i32 = timeout(5 * SEC, one(&again, "SELECT pg_backend_pid()")).await.unwrap().parse().unwrap();
    assert_ne!(new_pid, pid);
    let console = client(addr, "pgbroker").await;
    let listed: Vec<String> =
        rows(&console, "SHOW SERVERS").await.into_iter().map(|r| r["remote_pid"].clone()).collect();
    assert!(!listed.contains(&pid.to_string()), "the frozen server is still pooled: {listed:?}");

    // Thawed, the abandoned backend finds its connection closed and exits.
    drop(frozen);
    let d = direct(port).await;
    let gone = eventually(10 * SEC, || async {
        rows(&d, &format!("SELECT 1 FROM pg_stat_activity WHERE pid = {pid}")).await.is_empty()
    })
    .await;
    assert!(gone, "backend {pid} still there after SIGCONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_servers_are_closed_after_server_idle_timeout() {
    let _gate = shared_gate().await;
    let broker = "pool_mode = \"transaction\"\nserver_idle_timeout = \"2s\"";
    let b = start_broker(broker, &db("idle", pg().port(), "pool_size = 3")).await;
    let addr = b.local_addr();
    let console = client(addr, "pgbroker").await;
    let mut clients = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..3 {
        let c = client(addr, "idle").await;
        within(c.batch_execute("BEGIN")).await.unwrap();
        pids.push(one(&c, "SELECT pg_backend_pid()").await);
        clients.push(c);
    }
    for c in &clients {
        within(c.batch_execute("COMMIT")).await.unwrap();
    }
    let released = Instant::now();
    assert_eq!(pool_row(&console, "idle").await["sv_idle"], "3");
    // Watch the count: when the first server goes, and that they all go.
    let mut first_close = None;
    loop {
        let idle = pool_row(&console, "idle").await["sv_idle"].clone();
        if idle != "3" && first_close.is_none() {
            first_close = Some(released.elapsed());
        }
        if idle == "0" {
            break;
        }
        assert!(released.elapsed() < 2 * SEC + 5 * SEC, "idle servers not closed within server_idle_timeout + 5 s");
        sleep(Duration::from_millis(50)).await;
    }
    let first_close = first_close.unwrap();
    println!("idle servers closed {first_close:?} after their last use");
    assert!(first_close >= Duration::from_millis(1900), "closed after only {first_close:?}");
    // PostgreSQL sees them go too.
    let d = direct(pg().port()).await;
    let list = pids.join(",");
    let gone = eventually(5 * SEC, || async {
        rows(&d, &format!("SELECT 1 FROM pg_stat_activity WHERE pid IN ({list})")).await.is_empty()
    })
    .await;
    assert!(gone, "backends {list} still connected");
}

// =============================================================================================
// 4. A client that vanishes mid-COPY or mid-result.

/// Waits until the broker's pool for `database` has no clients and no servers in use, and no
/// backend runs the query marked `marker`; then a new client (the pool has one server)
/// gets a server and `check` answers `expect`.
async fn assert_freed(addr: SocketAddr, database: &str, marker: &str, check: &str, expect: &str) {
    let d = direct(pg().port()).await;
    let gone = settle(10 * SEC, || backends_running(&d, marker), Vec::is_empty).await;
    let console = client(addr, "pgbroker").await;
    if gone.is_err() {
        for cmd in ["SHOW POOLS", "SHOW SERVERS", "SHOW CLIENTS"] {
            println!("{cmd}: {:?}", rows(&console, cmd).await);
        }
    }
    assert!(gone.is_ok(), "a backend still runs the abandoned query: {gone:?}");
    let settled = settle(
        10 * SEC,
        || pool_row(&console, database),
        |row| ["cl_active", "cl_waiting", "sv_active", "sv_login"].iter().all(|k| row[*k] == "0"),
    )
    .await;
    assert!(settled.is_ok(), "pool counts did not return: {settled:?}");
    let next = client(addr, database).await;
    let answer = timeout(5 * SEC, one(&next, check)).await.expect("the next client gets the server");
    assert_eq!(answer, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_copy_frees_its_server() {
    let _gate = shared_gate().await;
    let d = direct(pg().port()).await;
    within(d.batch_execute("DROP TABLE IF EXISTS resil_copy; CREATE TABLE resil_copy (n int, s text)")).await.unwrap();
    let broker = "pool_mode = \"transaction\"\nquery_wait_timeout = \"10s\"";
    let b = start_broker(broker, &db("vanish_copy", pg().port(), "pool_size = 1")).await;
    let addr = b.local_addr();

    let mut s = within(raw_login(addr, "vanish_copy")).await.unwrap();
    within(s.write_all(&query_msg("COPY resil_copy FROM STDIN /* vanish-copy */"))).await.unwrap();
    let reply =
        timeout(10 * SEC, read_until(&mut s, &mut Vec::new(), |t| t == b'G' || t == b'Z')).await.unwrap().unwrap();
    assert!(reply.has(b'G'), "no CopyInResponse");
    let mut data = Vec::new();
    for n in 0..1000 {
        let row = format!("{n}\tsome text\n");
        data.push(b'd');
        data.extend_from_slice(&((row.len() + 4) as u32).to_be_bytes());
        data.extend_from_slice(row.as_bytes());
    }
    within(s.write_all(&data)).await.unwrap();
    assert!(!backends_running(&d, "vanish-copy */").await.is_empty(), "the COPY is not running");
    drop(s); // gone without CopyDone

    assert_freed(addr, "vanish_copy", "vanish-copy */", "SELECT count(*) FROM resil_copy", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_result_frees_its_server() {
    let _gate = shared_gate().await;
    let broker = "pool_mode = \"transaction\"\nquery_wait_timeout = \"10s\"";
    let b = start_broker(broker, &db("vanish_rows", pg().port(), "pool_size = 1")).await;
    let addr = b.local_addr();

    let mut s = within(raw_login(addr, "vanish_rows")).await.unwrap();
    within(s.write_all(&query_msg("SELECT generate_series(1, 5000000) /* vanish-result */"))).await.unwrap();
    // Read a little of the result, then leave.
    let mut got = 0;
    let mut chunk = [0u8; 8192];
    while got < 256 * 1024 {
        let n = timeout(10 * SEC, s.read(&mut chunk)).await.expect("rows arrive").unwrap();
        assert!(n > 0, "the broker closed the connection");
        got += n;
    }
    let d = direct(pg().port()).await;
    assert!(!backends_running(&d, "vanish-result */").await.is_empty(), "the query is not running");
    drop(s);

    assert_freed(addr, "vanish_rows", "vanish-result */", "SELECT 1", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_query_has_the_query_cancelled() {
    let _gate = shared_gate().await;
    let broker = "pool_mode = \"transaction\"\nquery_wait_timeout = \"10s\"";
    let b = start_broker(broker, &db("vanish_sleep", pg().port(), "pool_size = 1")).await;
    let addr = b.local_addr();

    // A backend busy without writing does not notice its client is gone: only a cancel
    // stops it before the 60 s are up.
    let mut s = within(raw_login(addr, "vanish_sleep")).await.unwrap();
    within(s.write_all(&query_msg("SELECT pg_sleep(60) /* vanish-sleep */"))).await.unwrap();
    let d = direct(pg().port()).await;
    let running = settle(10 * SEC, || backends_running(&d, "vanish-sleep */"), |r| !r.is_empty()).await;
    assert!(running.is_ok(), "the query is not running");
    drop(s);

    assert_freed(addr, "vanish_sleep", "vanish-sleep */", "SELECT 1", "1").await;
}

// =============================================================================================
// 5. A client that never reads.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_the_brokers_own_replies_does_not_grow_broker_memory() {
    let _gate = shared_gate().await;
    let b = broker_process("pool_mode = \"transaction\"", &db("selfreply", pg().port(), "pool_size = 2")).await;
    // Measured once a login and a query have run: the first ones touch the runtime's
    // threads, allocator arenas and pools, which is not what this test looks for.
    let warm = client(b.addr(), "selfreply").await;
    assert_eq!(timeout(10 * SEC, one(&warm, "SELECT 1")).await.unwrap(), "1");
    drop(warm);
    let rss_before = rss(&b);
    // Close + Sync of a statement it never prepared, answered by the broker without a server
    // (CloseComplete, ReadyForQuery), 4 million times; the client reads none of it.
    let mut s = within(raw_login(b.addr(), "selfreply")).await.unwrap();
    let pair: &[u8] = &[b'C', 0, 0, 0, 7, b'S', b'x', 0, b'S', 0, 0, 0, 4];
    let flood = pair.repeat(4_000_000);
    let writer = tokio::spawn(async move {
        let _ = s.write_all(&flood).await;
        s
    });
    // A window for the broker to grow in, if it buffered what it cannot send: nothing is
    // supposed to happen, so there is no event to wait for.
    sleep(Duration::from_secs(6)).await;
    let grown = rss(&b).saturating_sub(rss_before);
    assert!(grown < 24 << 20, "broker RSS grew {} MiB", grown >> 20);
    writer.abort();
    let next = client(b.addr(), "selfreply").await;
    assert_eq!(timeout(10 * SEC, one(&next, "SELECT 1")).await.unwrap(), "1");
    assert!(b.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_does_not_grow_broker_memory() {
    let _gate = shared_gate().await;
    let b = broker_process("pool_mode = \"transaction\"", &db("flood", pg().port(), "pool_size = 2")).await;
    let rss_before = rss(&b);

    // About 2 GB of result, and the client never reads a byte of it.
    let mut s = within(raw_login(b.addr(), "flood")).await.unwrap();
    let flood = query_msg("SELECT repeat('x', 1000) FROM generate_series(1, 2000000) /* never-read */");
    within(s.write_all(&flood)).await.unwrap();

    // Backpressure: the backend ends up blocked writing to the broker, which stopped reading.
    let d = direct(pg().port()).await;
    let blocked_on_write = |rows: &Vec<HashMap<String, String>>| rows.iter().any(|r| r["wait_event"] == "ClientWrite");
    let blocked = settle(30 * SEC, || backends_running(&d, "never-read */"), blocked_on_write).await;
    assert!(blocked.is_ok(), "the backend never blocked on writing: {blocked:?}");

    // The broker's memory stays flat while the backend waits.
    let mut samples = Vec::new();
    for _ in 0..20 {
        samples.push(rss(&b));
        sleep(Duration::from_millis(250)).await;
    }
    let mib = |v: u64| v as f64 / (1024.0 * 1024.0);
    let max = *samples.iter().max().unwrap();
    println!(
        "broker RSS: {:.1} MiB before, {:.1}..{:.1} MiB while the client does not read",
        mib(rss_before),
        mib(*samples.iter().min().unwrap()),
        mib(max)
    );
    assert!(max < 64 << 20, "broker RSS {:.1} MiB", mib(max));
    let (early, late) = samples.split_at(samples.len() / 2);
    let growth = late.iter().max().unwrap().saturating_sub(*early.iter().max().unwrap());
    assert!(growth < 2 << 20, "RSS still growing: {samples:?}");
    let still = backends_running(&d, "never-read */").await;
    assert!(blocked_on_write(&still), "backend no longer blocked: {still:?}");

    // The client leaves; the broker serves the next one and the backend goes away.
    drop(s);
    let next = client(b.addr(), "flood").await;
    assert_eq!(timeout(10 * SEC, one(&next, "SELECT 1")).await.unwrap(), "1");
    let gone = eventually(10 * SEC, || async { backends_running(&d, "never-read */").await.is_empty() }).await;
    assert!(gone, "the abandoned query still runs");
    assert!(b.alive(), "broker exited: {}", b.log_tail(20));
}

// =============================================================================================
// 6. A connection storm.

const STORM: usize = 10_000;

/// Raises this process's soft RLIMIT_NOFILE to the hard limit (children inherit it); fails
/// clearly if the hard limit cannot fit the storm.
fn raise_nofile(need: u64) {
    let me = std::process::id().to_string();
    let (soft, hard) = nofile(&me);
    assert!(
        hard >= need,
        "the connection storm needs {need} file descriptors, but the hard RLIMIT_NOFILE is {hard}: \
         raise it (e.g. `ulimit -Hn 20000` as root, or LimitNOFILE in the CI runner) to run this test"
    );
    if soft < need {
        let status = Command::new("prlimit").args(["--pid", &me, &format!("--nofile={hard}:{hard}")]).status();
        assert!(status.is_ok_and(|s| s.success()), "prlimit could not raise the soft NOFILE limit from {soft}");
    }
    let (soft, _) = nofile(&me);
    assert!(soft >= need, "soft RLIMIT_NOFILE is {soft} after raising it; need {need}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_10000_clients_is_served_while_the_console_answers() {
    let _gate = exclusive_gate().await;
    // Test side: one socket per client plus a margin; the broker: the same plus its servers.
    let need = STORM as u64 + 100;
    raise_nofile(need);
    let started = Instant::now();
    let broker = "pool_mode = \"transaction\"\nmax_client_conn = 10000\ndefault_pool_size = 20\n\
                  query_wait_timeout = \"60s\"\nclient_login_timeout = \"60s\"";
    let b = broker_process(broker, &db("storm", pg().port(), "")).await;
    let (broker_soft, _) = nofile(&b.pid().to_string());
    assert!(broker_soft >= need, "the broker's soft NOFILE limit is {broker_soft}; need {need}");

    // Console sessions do not count against max_client_conn (an operator must get in when the
    // broker is full): the storm gets all 10,000 slots. The console is polled from a thread
    // and runtime of its own, so the time measured is the broker's, not the time this
    // process takes to get round to it among 10,000 client tasks.
    let storm_done = Arc::new(AtomicBool::new(false));
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let poller = {
        let (done, addr) = (storm_done.clone(), b.addr());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let console = client(addr, "pgbroker").await;
                let _ = connected_tx.send(());
                let (mut polls, mut slowest) = (0u32, Duration::ZERO);
                while !done.load(Ordering::Relaxed) && polls < 5000 {
                    let t = Instant::now();
                    let r = timeout(10 * SEC, console.simple_query("SHOW POOLS")).await;
                    assert!(matches!(r, Ok(Ok(_))), "SHOW POOLS failed during the storm: {r:?}");
                    slowest = slowest.max(t.elapsed());
                    polls += 1;
                    sleep(Duration::from_millis(100)).await;
                }
                (polls, slowest, pool_row(&console, "storm").await)
            })
        })
    };
    within(connected).await.unwrap();

    // 10,000 clients, at most 500 connecting at once, each kept open once served.
    let clients = STORM;
    let gate = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let gate = gate.clone();
        let addr = b.addr();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let served = timeout(60 * SEC, async {
                let mut s = raw_login(addr, "storm").await?;
                raw_select_one(&mut s).await?;
                Ok::<_, String>(s)
            })
            .await;
            served.unwrap_or_else(|_| Err("not served within 60 s".into()))
        });
    }
    let mut open = Vec::with_capacity(clients);
    let mut failures: HashMap<String, usize> = HashMap::new();
    let all = timeout(100 * SEC, async {
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(s) => open.push(s),
                Err(e) => *failures.entry(e).or_default() += 1,
            }
        }
    })
    .await;
    let storm_took = started.elapsed();
    assert!(all.is_ok(), "the storm did not finish within 100 s ({} served)", open.len());
    assert!(failures.is_empty(), "failures: {failures:?}");
    assert_eq!(open.len(), clients);
    // Every slot is taken: the 10,001st client is refused with 53300, while another console
    // session still gets in (the admin reserve).
    let mut extra = within(TcpStream::connect(b.addr())).await.unwrap();
    within(extra.write_all(&startup_packet(&[("user", "postgres"), ("database", "storm")]))).await.unwrap();
    let reply = within(read_until(&mut extra, &mut Vec::new(), |t| t == b'Z' || t == b'E')).await.unwrap();
    assert_eq!(reply.error_code().as_deref(), Some("53300"));
    let late_console = within(client(b.addr(), "pgbroker")).await;
    assert!(within(late_console.simple_query("SHOW POOLS")).await.is_ok(), "a console session when full");
    drop(late_console);

    storm_done.store(true, Ordering::Relaxed);
    let (polls, slowest, row) = block_in_place(|| poller.join()).unwrap();
    println!(
        "storm: {} of {clients} served in {storm_took:?}; console answered {polls} SHOW POOLS, slowest {slowest:?}; \
         broker RSS {:.1} MiB",
        open.len(),
        rss(&b) as f64 / (1024.0 * 1024.0)
    );
    assert!(slowest <= 2 * SEC, "the console took {slowest:?} to answer SHOW POOLS");
    assert!(polls >= 5, "the console was polled only {polls} times");
    // All of them were connected at once, on no more than the pool's 20 servers.
    assert_eq!(row["cl_active"], clients.to_string(), "{row:?}");
    let servers: usize = row["sv_active"].parse::<usize>().unwrap() + row["sv_idle"].parse::<usize>().unwrap();
    assert!(servers <= 20, "{row:?}");
    drop(open);
    assert!(b.alive(), "broker exited: {}", b.log_tail(20));
}
