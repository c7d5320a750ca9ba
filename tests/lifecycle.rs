//! The broker as an operator runs it: a real `pgbroker` process with a config file, signals,
//! systemd notifications, and a second process taking over the same ports.
#![allow(clippy::unwrap_used)]

mod common;
use common::process::{BIN, BrokerProcess, Ports};
use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A broker process with the socket it sends its systemd notifications to; killed if the
/// test ends early.
struct Proc {
    process: BrokerProcess,
    notify: UnixDatagram,
}

impl Proc {
    fn signal(&self, sig: &str) {
        self.process.signal(sig);
    }

    /// The next sd_notify message, within `limit`.
    fn notification(&self, limit: Duration) -> Option<String> {
        self.notify.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 512];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a notification containing `what`, skipping others (watchdog pings).
    fn expect(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(m) = self.notification(Duration::from_secs(1))
                && m.contains(what)
            {
                return m;
            }
        }
        panic!("no {what:?} notification");
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(limit)
    }
}

/// Writes a config for the shared cluster: database `lc` (dbname `db`) in transaction mode.
fn write_config(dir: &Path, port: u16, http: u16, db: &str, pool_size: u32, max_connections: u32) -> PathBuf {
    std::fs::write(dir.join("userlist.txt"), userlist()).unwrap();
    let path = dir.join("pgbroker.toml");
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http}\"\npool_mode = \"transaction\"\n\
         shutdown_timeout = \"10s\"\n\
         [budget]\nserver_max_connections = {max_connections}\nreserved_connections = 5\n\
         [auth]\ntype = \"trust\"\nfile = \"userlist.txt\"\nadmin_users = [\"postgres\"]\n\
         [databases.lc]\nport = {}\ndbname = \"{db}\"\nuser = \"postgres\"\npassword = \"postgres\"\npool_size = {pool_size}\n",
        pg().port()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a broker on `config` (which listens on `port` and `http`) and waits for its
/// READY=1.
fn start(config: &Path, port: u16, http: u16, extra_env: &[(&str, &str)]) -> Proc {
    let sock_dir = tempfile::tempdir().unwrap().keep();
    let sock_path = sock_dir.join("notify");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    let sock = sock_path.to_str().unwrap();
    let mut env = vec![("NOTIFY_SOCKET", sock), ("RUST_LOG", "warn")];
    env.extend_from_slice(extra_env);
    let process = BrokerProcess::spawn(config, Ports { port, http }, &env);
    let p = Proc { process, notify };
    p.expect("READY=1");
    p
}

fn create_db(name: &str) {
    let exists = pg().psql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")).unwrap();
    if exists == "0" {
        pg().psql("postgres", &format!("CREATE DATABASE {name}")).unwrap();
    }
}

async fn server_conns(db: &str) -> usize {
    let c = direct("postgres").await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0);
    n as usize
}

async fn client(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=lc connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(c)
}

/// `n` clients running short transactions (each holding its server ~20 ms) until `stop`;
/// returns (committed, failed).
fn load(port: u16, n: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
            tasks.push(tokio::spawn(async move {
                let c = client(port).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match c.simple_query("BEGIN; SELECT pg_sleep(0.02); COMMIT").await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => bad.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed))
    })
}

/// Highest server connection count seen over `period`.
async fn peak(db: &str, period: Duration) -> usize {
    let until = Instant::now() + period;
    let mut max = 0;
    while Instant::now() < until {
        max = max.max(server_conns(db).await);
        // The sampling period.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_pool_size_and_budget_under_load_without_failures() {
    create_db("lc_reload");
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_reload", 2, 55);
    let p = start(&path, port, http, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(port, 8, stop.clone());
    let before = peak("lc_reload", Duration::from_secs(2)).await;
    assert!(before <= 2, "pool_size 2: saw {before}");
    // Bigger pool.
    write_config(dir.path(), port, http, "lc_reload", 6, 55);
    p.signal("-HUP");
    p.expect("READY=1");
    let grown = peak("lc_reload", Duration::from_secs(2)).await;
    assert!(grown > 2 && grown <= 6, "pool_size 6: saw {grown}");
    // Smaller budget: floor((8 - 5) / 1) = 3 across the pool.
    write_config(dir.path(), port, http, "lc_reload", 6, 8);
    p.signal("-HUP");
    p.expect("READY=1");
    // Servers over the new budget close as their transactions end.
    eventually("the pool to shrink to the budget of 3", Duration::from_secs(10), || async {
        let n = server_conns("lc_reload").await;
        if n <= 3 { Ok(()) } else { Err(n) }
    })
    .await;
    let shrunk = peak("lc_reload", Duration::from_secs(2)).await;
    assert!(shrunk <= 3, "budget 3: saw {shrunk}");
    stop.store(true, Ordering::Relaxed);
    let (committed, failed) = running.await.unwrap();
    assert_eq!(failed, 0, "{committed} committed");
    assert!(committed > 50);
}

#[tokio::test]
async fn invalid_reload_keeps_the_old_config_and_is_counted() {
    create_db("lc_bad");
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_bad", 2, 55);
    let p = start(&path, port, http, &[]);
    std::fs::write(&path, "[broker]\nthis is not toml\n").unwrap();
    p.signal("-HUP");
    p.expect("READY=1");
    let c = client(port).await.unwrap();
    assert_eq!(one(&c, "SELECT 'still serving'").await, "still serving");
    let (_, metrics) = http_get(p.process.http_addr(), "/metrics").await;
    assert!(metrics.contains("pgbroker_config_reload_failures_total 1"), "{metrics}");
}

#[tokio::test]
async fn sigterm_lets_transactions_commit_and_refuses_new_clients() {
    create_db("lc_term");
    pg().psql("lc_term", "CREATE TABLE IF NOT EXISTS t (i int)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_term", 4, 55);
    let mut p = start(&path, port, http, &[]);
    let busy = client(port).await.unwrap();
    busy.simple_query("BEGIN; INSERT INTO t VALUES (42)").await.unwrap();
    let idle = client(port).await.unwrap();
    one(&idle, "SELECT 1").await;
    p.signal("-TERM");
    p.expect("STOPPING=1");
    // The idle client was told and closed; the busy one finishes its transaction.
    eventually("the idle client to be closed", Duration::from_secs(5), || async { idle.is_closed() }).await;
    assert!(idle.simple_query("SELECT 1").await.is_err(), "idle client closed at once");
    busy.simple_query("COMMIT").await.unwrap();
    let committed = pg().psql("lc_term", "SELECT count(*) FROM t WHERE i = 42").unwrap();
    assert_eq!(committed, "1");
    assert!(busy.simple_query("SELECT 1").await.is_err(), "closed after its transaction");
    // New clients are refused: nothing listens any more.
    assert!(client(port).await.is_err());
    let status = p.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status}");
}

/// `clients` tasks that connect, run `SELECT 1` and disconnect over and over (as
/// `pgbench -C`), bounded to two minutes, counting what was served and what failed.
struct Churn {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Churn {
    fn start(port: u16, clients: usize) -> Churn {
        let (stop, served) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, served, errors) = (stop.clone(), served.clone(), errors.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let result = match client(port).await {
                            Ok(c) => c.simple_query("SELECT 1").await.map(drop).map_err(|e| format!("query: {e:?}")),
                            Err(e) => Err(format!("connect: {e:?}")),
                        };
                        match result {
                            Ok(()) => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Churn { stop, served, errors, tasks }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `n` more rounds than now have been served.
    async fn serves(&self, what: &str, more: usize) {
        let target = self.served() + more;
        eventually(what, Duration::from_secs(10), || async { self.served() >= target }).await;
    }

    /// Stops the clients and returns what they served and the errors they saw.
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.served.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_takes_over_the_port_while_the_first_drains() {
    // Lets the kernel hand connections queued on a closing SO_REUSEPORT socket to the other.
    let _ = Command::new("sysctl").args(["-qw", "net.ipv4.tcp_migrate_req=1"]).status();
    create_db("lc_swap");
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_swap", 4, 55);
    let mut old = start(&path, port, http, &[]);
    let churn = Churn::start(port, 1);
    churn.serves("the old process to serve the loop", 5).await;
    // Logging at info, the new process tells when it serves a client.
    let new = start(&path, port, http, &[("RUST_LOG", "info")]);
    new.process.log_line("client logged in", Duration::from_secs(10)).await;
    old.signal("-TERM");
    assert!(old.wait_exit(Duration::from_secs(20)).expect("old process exited").success());
    churn.serves("the new process alone to serve the loop", 10).await;
    let (served, errors) = churn.stop().await;
    assert!(errors.is_empty(), "{served} served; {errors:?}");
    assert!(served > 20);
    drop(new);
}

#[tokio::test]
async fn systemd_notifications_ready_reloading_stopping_and_watchdog() {
    create_db("lc_notify");
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_notify", 2, 55);
    let mut p = start(&path, port, http, &[("WATCHDOG_USEC", "400000")]);
    p.expect("WATCHDOG=1");
    p.signal("-HUP");
    let reloading = p.expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    p.expect("READY=1");
    p.signal("-TERM");
    p.expect("STOPPING=1");
    assert!(p.wait_exit(Duration::from_secs(15)).expect("exited").success());
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        if std::env::var("PGBROKER_SKIP_SYSTEMD").is_ok() {
            eprintln!("SKIPPED: no systemd-analyze (PGBROKER_SKIP_SYSTEMD set)");
            return;
        }
        panic!("systemd-analyze is needed: apt-get install systemd (or set PGBROKER_SKIP_SYSTEMD=1)");
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().unwrap();
    // ExecStart must name an existing binary: point it at the one just built.
    let service = std::fs::read_to_string(units.join("pgbroker.service"))
        .unwrap()
        .replace("ExecStart=pgbroker", &format!("ExecStart={BIN}"));
    std::fs::write(dir.path().join("pgbroker.service"), service).unwrap();
    std::fs::copy(units.join("pgbroker.socket"), dir.path().join("pgbroker.socket")).unwrap();
    let out = Command::new(analyze)
        .current_dir(dir.path())
        .args(["verify", "--man=no", "pgbroker.service", "pgbroker.socket"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Processes a test started indirectly (by hand-overs): killed if the test ends early.
struct Orphans(Vec<u32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// True once `pid` has exited (gone, or a zombie its new parent has not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn admin_client(port: u16) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=pgbroker connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_in_a_row_refuse_no_one_and_each_old_process_exits_after_its_drain() {
    // Four asked for on the admin console (UPGRADE), the fifth with SIGUSR2.
    create_db("lc_upgrade");
    pg().psql("lc_upgrade", "CREATE TABLE IF NOT EXISTS up (round int); DELETE FROM up").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_upgrade", 4, 55);
    let mut first = start(&path, port, http, &[]);
    // Eight clients that connect, query and disconnect, over and over (as `pgbench -C`).
    let churn = Churn::start(port, 8);
    churn.serves("the first process to serve the clients", 20).await;
    let mut orphans = Orphans(Vec::new());
    let mut old = first.process.pid();
    for round in 0..5 {
        // A transaction open across the hand-over commits on the process it began on.
        let tx = client(port).await.unwrap();
        tx.batch_execute(&format!("BEGIN; INSERT INTO up VALUES ({round})")).await.unwrap();
        if round < 4 {
            let admin = admin_client(port).await;
            let reply = admin.simple_query("UPGRADE").await;
            assert!(reply.is_ok(), "upgrade {round}: {reply:?}");
            drop(admin);
        } else {
            // The last one as systemd would ask for it.
            Command::new("kill").args(["-USR2", &old.to_string()]).status().unwrap();
        }
        // The process that handed over tells systemd (here: the test) who serves now.
        let new: u32 = first.expect("MAINPID=").trim().trim_start_matches("MAINPID=").parse().unwrap();
        orphans.0.push(new);
        assert_ne!(new, old);
        tx.batch_execute("COMMIT").await.unwrap();
        drop(tx);
        if round == 0 {
            let status = first.wait_exit(Duration::from_secs(20)).expect("the first process exited after its drain");
            assert!(status.success(), "{status}");
        } else {
            eventually("the old process to exit after its drain", Duration::from_secs(20), || async { exited(old) })
                .await;
        }
        churn.serves("the new process to serve the clients", 20).await;
        old = new;
    }
    let (served, errors) = churn.stop().await;
    assert!(errors.is_empty(), "{served} served; {} failed: {errors:?}", errors.len());
    assert!(!exited(old), "the last process serves on");
    assert_eq!(
        pg().psql("lc_upgrade", "SELECT count(*) FROM up").unwrap(),
        "5",
        "every in-flight transaction committed"
    );
    eprintln!("{served} connect-query-disconnect rounds served through 5 upgrades; processes {:?}", orphans.0);
}

#[tokio::test]
async fn an_upgrade_to_a_binary_that_cannot_start_leaves_the_old_one_serving() {
    create_db("lc_badup");
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let path = write_config(dir.path(), port, http, "lc_badup", 4, 55);
    let p = start(&path, port, http, &[]);
    // The new process reads the config file as it is now: broken.
    std::fs::write(&path, "[broker\nlisten = ").unwrap();
    let admin = admin_client(port).await;
    let err = admin.simple_query("UPGRADE").await.expect_err("the upgrade fails");
    let text = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_else(|| err.to_string());
    assert!(text.contains("exited before it was ready"), "{text}");
    p.process.log_line("upgrade failed; this process keeps serving", Duration::from_secs(5)).await;
    let c = client(port).await.unwrap();
    assert_eq!(one(&c, "SELECT 1").await, "1");
    assert!(p.process.alive());
}
