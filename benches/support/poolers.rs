//! pgbroker and PgBouncer started as their own processes with the same settings (transaction
//! mode, one database, an auth file, connection logging off), optionally under a wrapper such
//! as valgrind: what the benches that compare the two poolers share.
#![allow(dead_code)] // each bench uses part of it

use pgbroker::cluster::Cluster;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The login every bench client uses.
pub const USER: &str = "postgres";
/// Its password.
pub const PASSWORD: &str = "postgres";
/// The database both poolers serve.
pub const DB: &str = "bench";

/// How the poolers are set up.
pub struct Setup {
    /// Server connections per pool.
    pub pool: u32,
    /// `transaction` or `session`.
    pub pool_mode: String,
    /// `md5` or `trust`.
    pub auth: String,
    /// Command the pooler runs under (e.g. `valgrind --tool=callgrind ...`), or none.
    pub wrap: Vec<String>,
    /// How long the pooler may take to listen (longer under valgrind).
    pub start_timeout: Duration,
}

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const RAISE_NOFILE: &str = "ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"";

/// `sh -c 'ulimit -n <hard>; exec "$@"'`: the child's fd limit as high as allowed.
fn with_nofile() -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", RAISE_NOFILE, "sh"]);
    cmd
}

/// A pooler process.
pub struct Pooler {
    pub name: &'static str,
    pub version: String,
    child: Child,
    /// The pooler's own pid (not runuser's).
    pub pid: u32,
    pub port: u16,
}

impl Pooler {
    /// Stops it with SIGTERM, then SIGKILL after 5 s.
    pub fn stop(self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// Stops it with SIGTERM, then SIGKILL after `grace` (a wrapper may need time to write
    /// its results on the way out). True if it left by itself.
    pub fn stop_within(mut self, grace: Duration) -> bool {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-9", &self.pid.to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

fn wait_listening(port: u16, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// This package's release binary, or `PGBROKER_BIN` (to measure another build).
pub fn pgbroker_bin() -> PathBuf {
    std::env::var_os("PGBROKER_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pgbroker")))
}

pub fn start_pgbroker(pg: &Cluster, o: &Setup, dir: &Path) -> Pooler {
    let port = free_port();
    std::fs::write(dir.join("users.txt"), format!("\"{USER}\" \"{PASSWORD}\"\n")).unwrap();
    let toml = format!(
        "[broker]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"{mode}\"\n\
         max_client_conn = 20000\nlog_connections = false\nlog_disconnections = false\nserver_tls_sslmode = \"disable\"\n\
         [budget]\nserver_max_connections = {max}\nreserved_connections = 5\n\
         [auth]\ntype = \"{auth}\"\nfile = \"users.txt\"\n\
         [databases.{DB}]\nhost = \"127.0.0.1\"\nport = {pgport}\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\npool_size = {pool}\n",
        max = o.pool + 50,
        mode = o.pool_mode,
        auth = o.auth,
        pgport = pg.port(),
        pool = o.pool,
    );
    let config = dir.join("pgbroker.toml");
    std::fs::write(&config, toml).unwrap();
    let bin = pgbroker_bin();
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let log = std::fs::File::create(dir.join("pgbroker.log")).unwrap();
    let child = with_nofile()
        .args(&o.wrap)
        .arg(&bin)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pgbroker");
    assert!(
        wait_listening(port, o.start_timeout),
        "pgbroker did not start: see {}",
        dir.join("pgbroker.log").display()
    );
    let pid = child.id(); // sh exec'd it (or its wrapper, which runs it in-process)
    Pooler { name: "pgbroker", version: format!("{version} ({})", bin.display()), child, pid, port }
}

pub fn start_pgbouncer(pg: &Cluster, o: &Setup, dir: &Path) -> Option<Pooler> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| Path::new(p).exists())?;
    let version = Command::new(bin).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("PgBouncer").to_string();
    let port = free_port();
    let d = dir.display();
    let ini = format!(
        "[databases]\n{DB} = host=127.0.0.1 port={pgport} dbname={DB} user={USER}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
         listen_port = {port}\nunix_socket_dir =\nauth_type = {auth}\nauth_file = {d}/users.txt\npool_mode = {mode}\n\
         default_pool_size = {pool}\nmax_client_conn = 20000\nlog_connections = 0\nlog_disconnections = 0\n\
         logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
        pgport = pg.port(),
        mode = o.pool_mode,
        auth = o.auth,
        pool = o.pool,
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(dir.join("users.txt"), format!("\"{USER}\" \"{PASSWORD}\"\n")).unwrap();
    let _ = Command::new("chown").args(["-R", "postgres", &d.to_string()]).status();
    // PgBouncer refuses to run as root; runuser resets the soft fd limit to 1024, so the shell
    // raising it runs after runuser.
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", RAISE_NOFILE, "sh"]);
        c
    } else {
        with_nofile()
    };
    let child = cmd
        .args(&o.wrap)
        .arg(bin)
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !wait_listening(port, o.start_timeout) {
        eprintln!("pgbouncer did not start: see {d}/pgbouncer.log");
        return None;
    }
    let pid = std::fs::read_to_string(dir.join("pgbouncer.pid")).ok()?.trim().parse().ok()?;
    Some(Pooler { name: "PgBouncer", version, child, pid, port })
}

/// The newest installed PostgreSQL's pgbench, else `pgbench` from the PATH.
pub fn pgbench_bin() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin/pgbench"))))
        .filter(|(_, p): &(u32, PathBuf)| p.exists())
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p).unwrap_or_else(|| PathBuf::from("pgbench"))
}
