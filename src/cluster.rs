//! Throwaway PostgreSQL clusters for tests, `pgbroker demo` and benchmarks.
//!
//! A cluster lives in a short temp dir (`pgbXXXXXX/{data,s,postgres.log}`). A `sh` watchdog
//! owns the postmaster: when the owning process exits (even by panic or SIGKILL) it stops the
//! server and deletes the dir. As root, `initdb`/`postgres`/`pg_ctl` run as the `postgres` user.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors from starting, using or stopping a [`Cluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL bindir (with `initdb` and `postgres`) was found.
    #[error("PostgreSQL binaries not found: {0}")]
    NoBinaries(String),
    /// Running as root but no `postgres` OS user exists in /etc/passwd.
    #[error("running as root, but no `postgres` user in /etc/passwd to run the server as")]
    NoPostgresUser,
    /// A filesystem or process operation failed (what was being done, the error).
    #[error("I/O error while {0}")]
    Io(String, #[source] std::io::Error),
    /// An external command failed (command, exit status, tail of its stderr).
    #[error("command failed ({1}): {0}\n{2}")]
    Command(String, String, String),
    /// The requested port was already taken (port, server log tail).
    #[error("port {0} is already in use; server log tail:\n{1}")]
    PortInUse(u16, String),
    /// The server exited or did not become ready in time (reason, server log tail).
    #[error("PostgreSQL failed to start: {0}; server log tail:\n{1}")]
    Start(String, String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io(context, source)
}

/// Settings for a new cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Superuser role created by initdb.
    pub superuser: String,
    /// Password of the superuser (SCRAM over TCP).
    pub password: String,
    /// TCP port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// Value of `max_connections`.
    pub max_connections: u32,
    /// Extra postgresql.conf settings (values are quoted unless they start with `'`).
    pub extra_conf: Vec<(String, String)>,
    /// Extra pg_hba.conf lines, placed before the defaults.
    pub hba: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            superuser: "postgres".into(),
            password: "postgres".into(),
            port: None,
            max_connections: 100,
            extra_conf: Vec::new(),
            hba: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL cluster; stopped and deleted on drop or owner exit.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    port: u16,
    superuser: String,
    password: String,
    bindir: PathBuf,
    /// How to become the `postgres` OS user: `None` (not root), `runuser`'s path, or `"su"`.
    run_as: Option<String>,
    watchdog: Option<Child>,
    stopped: bool,
}

impl Cluster {
    /// Creates, configures and starts a cluster, blocking until it accepts connections.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let me = fs::metadata("/proc/self").map_err(io("reading /proc/self"))?;
        let ids = (me.uid() == 0).then(postgres_ids).transpose()?;
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 70 {
            base = PathBuf::from("/tmp"); // Unix socket paths are limited to 107 bytes
        }
        let dir = tempfile::Builder::new().prefix("pgb").tempdir_in(&base);
        let dir = dir.map_err(io("creating the temp dir"))?.keep();
        let runuser = which("runuser").map(|p| p.display().to_string());
        // From here on, an early return drops `c`, which removes the dir.
        let mut c = Cluster {
            data: dir.join("data"),
            socket: dir.join("s"),
            dir,
            port: 0,
            superuser: opts.superuser.clone(),
            password: opts.password.clone(),
            bindir,
            run_as: ids.map(|_| runuser.unwrap_or_else(|| "su".into())),
            watchdog: None,
            stopped: false,
        };
        let own = |p: &Path| match ids {
            Some((u, g)) => chown(p, Some(u), Some(g)).map_err(io(format!("chown {p:?}"))),
            None => Ok(()),
        };
        own(&c.dir)?;
        fs::create_dir(&c.socket).map_err(io("creating the socket dir"))?;
        own(&c.socket)?;
        let pwfile = c.dir.join("pwfile");
        let pw = fs::write(&pwfile, format!("{}\n", opts.password)); // in a 0700 dir
        let pw = pw.and_then(|()| fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)));
        pw.map_err(io("writing the password file"))?;
        own(&pwfile)?;
        let (initdb, data, pwf) = (c.bin("initdb"), q(&c.data), q(&pwfile));
        let user = sh_quote(&opts.superuser);
        let fixed = "--auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync";
        let cmd = format!("{initdb} -D {data} -U {user} --pwfile={pwf} {fixed}");
        run(&c.as_pg(&cmd))?;
        fs::remove_file(&pwfile).map_err(io("removing the password file"))?;
        let conf_path = c.data.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf_path).map_err(io("reading postgresql.conf"))?;
        let hba = opts.hba.join("\n");
        let hba = format!("{hba}\nlocal all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n");
        fs::write(c.data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        let sock = conf_quote(&c.socket.display().to_string());
        let max = opts.max_connections;
        let mut attempt = 0;
        loop {
            attempt += 1;
            c.port = opts.port.map_or_else(free_port, Ok)?;
            let port = c.port;
            let mut conf = format!(
                "{base_conf}\n# added by pgbroker\nlisten_addresses = '127.0.0.1'\nport = {port}
unix_socket_directories = {sock}\nmax_connections = {max}\nfsync = off\nsynchronous_commit = off
full_page_writes = off\nshared_buffers = '32MB'\nlog_min_messages = warning
logging_collector = off\n"
            );
            for (k, v) in &opts.extra_conf {
                conf += &format!("{k} = {}\n", conf_quote(v));
            }
            fs::write(&conf_path, conf).map_err(io("writing postgresql.conf"))?;
            let _ = fs::remove_file(c.dir.join("postgres.log"));
            let _ = fs::remove_file(c.dir.join("exited"));
            c.spawn_watchdog()?;
            match c.wait_ready() {
                Err(ClusterError::PortInUse(..)) if opts.port.is_none() && attempt < 5 => {
                    tracing::debug!(port = c.port, "port taken, retrying with another one");
                    c.reap_watchdog();
                }
                other => return other.map(|()| c),
            }
        }
    }

    /// Shell-quoted path of a PostgreSQL program.
    fn bin(&self, name: &str) -> String {
        q(&self.bindir.join(name))
    }

    /// Wraps a shell command so it runs as the `postgres` OS user when we are root.
    fn as_pg(&self, cmd: &str) -> String {
        match self.run_as.as_deref() {
            None => cmd.to_string(),
            Some("su") => format!("su postgres -s /bin/sh -c {}", sh_quote(cmd)),
            Some(runuser) => format!("{} -u postgres -- {cmd}", sh_quote(runuser)),
        }
    }

    fn spawn_watchdog(&mut self) -> Result<(), ClusterError> {
        let (dir, data, owner) = (q(&self.dir), q(&self.data), std::process::id());
        let pg = self.bin("postgres");
        let start = self.as_pg(&format!("{pg} -D {data} -c log_destination=stderr"));
        // postgres runs in a subshell that records its exit status in `exited`; the loop waits
        // for the owner to die (or the dir to vanish, or postgres to exit), then cleans up.
        let script = format!(
            r#"cd / || exit 1
D={dir}; P="$D/data/postmaster.pid"; M="$D/exited"
( {start} </dev/null >>"$D/postgres.log" 2>&1; echo $? >"$M" ) &
pg=$!
while kill -0 {owner} 2>/dev/null && [ -d "$D/data" ] && [ ! -f "$M" ]; do sleep 0.5; done
[ -f "$P" ] || [ -f "$M" ] || sleep 1
p=$(head -n 1 "$P" 2>/dev/null)
if [ -n "$p" ]; then
  kill -INT "$p" 2>/dev/null
  i=0
  while [ -f "$P" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  [ -f "$P" ] && kill -9 "$p" 2>/dev/null
fi
wait $pg
kill -0 {owner} 2>/dev/null || rm -rf "$D"
"#
        );
        tracing::debug!(port = self.port, %start, "starting postgres under a watchdog");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null());
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        // Own process group: a terminal's Ctrl-C aimed at the tests must not kill the watchdog.
        let child = cmd.process_group(0).spawn();
        self.watchdog = Some(child.map_err(io("spawning the watchdog shell"))?);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let (isready, sock, port) = (self.bin("pg_isready"), q(&self.socket), self.port);
        let isready = format!("{isready} -q -t 2 -h {sock} -p {port}");
        loop {
            if let Ok(status) = fs::read_to_string(self.dir.join("exited")) {
                let log = self.log_tail();
                if log.contains("could not bind") || log.contains("Address already in use") {
                    return Err(ClusterError::PortInUse(self.port, log));
                }
                let why = format!("postgres exited with status {}", status.trim());
                return Err(ClusterError::Start(why, log));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() && run(&isready).is_ok() {
                tracing::debug!(port = self.port, dir = ?self.dir, "postgres is ready");
                return Ok(());
            }
            if Instant::now() > deadline {
                let why = "not accepting connections within 30 s".to_string();
                return Err(ClusterError::Start(why, self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Last 20 lines of the server log.
    fn log_tail(&self) -> String {
        tail(&fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default())
    }

    /// Waits up to 5 s for the watchdog shell to finish by itself, then kills it.
    fn reap_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(w.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// TCP port the server listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// TCP host of the server, always `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }
    /// Directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket
    }
    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
    /// Name of the superuser role.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }
    /// Password of the superuser role.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Connection URL `postgres://user:pass@127.0.0.1:port/dbname` (percent-encoded parts).
    pub fn url(&self, dbname: &str) -> String {
        let (u, p) = (pct(&self.superuser), pct(&self.password));
        format!("postgres://{u}:{p}@127.0.0.1:{}/{}", self.port, pct(dbname))
    }

    /// Runs `sql` with psql over the Unix socket as superuser; returns trimmed stdout.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, ClusterError> {
        let (psql, sock, user) = (self.bin("psql"), q(&self.socket), sh_quote(&self.superuser));
        let (db, sql) = (sh_quote(dbname), sh_quote(sql));
        let args = format!("-h {sock} -p {} -U {user} -d {db} -c {sql}", self.port);
        let out = run(&format!("{psql} -X -A -t -v ON_ERROR_STOP=1 {args}"))?;
        Ok(out.trim().to_string())
    }

    /// Fast-stops the server and removes the temp dir; later calls do nothing.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let mut result = self.pg_ctl_stop();
        self.reap_watchdog(); // it sees postgres gone and exits without touching the dir
        if self.dir.exists() {
            tracing::debug!(dir = ?self.dir, "removing cluster dir");
            let rm = fs::remove_dir_all(&self.dir).or_else(|_| fs::remove_dir_all(&self.dir));
            result = result.and(rm.map_err(io(format!("removing {:?}", self.dir))));
        }
        result
    }
}

impl Cluster {
    /// `pg_ctl stop -m fast -w` if a postmaster runs: sessions end with 57P01, then it exits.
    fn pg_ctl_stop(&self) -> Result<(), ClusterError> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let (pg_ctl, data) = (self.bin("pg_ctl"), q(&self.data));
        run(&self.as_pg(&format!("{pg_ctl} -D {data} -m fast -w -t 30 stop"))).map(drop)
    }

    /// Fast-stops the server (`pg_ctl stop -m fast -w`: sessions end with 57P01) but keeps
    /// its files, so [`Cluster::start_server`] can bring it back on the same port. Returns
    /// once the postmaster is gone.
    pub fn stop_server(&mut self) -> Result<(), ClusterError> {
        self.pg_ctl_stop()?;
        self.reap_watchdog(); // it sees postgres gone and exits, leaving the dir
        Ok(())
    }

    /// Starts a server stopped by [`Cluster::stop_server`] again, on the same port and under a
    /// new watchdog; returns once it accepts connections.
    pub fn start_server(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            let why = "the cluster was removed by stop()".to_string();
            return Err(ClusterError::Start(why, String::new()));
        }
        if self.data.join("postmaster.pid").exists() {
            return Ok(()); // already running
        }
        let _ = fs::remove_file(self.dir.join("exited"));
        self.spawn_watchdog()?;
        self.wait_ready()
    }

    /// What `pg_ctl restart -m fast -w` does, a fast stop then a start on the same port,
    /// done as [`Cluster::stop_server`] + [`Cluster::start_server`] so the new postmaster is
    /// owned by a watchdog like the first (pg_ctl's own start would leave it orphaned, and the
    /// old watchdog would stop it).
    pub fn restart_server(&mut self) -> Result<(), ClusterError> {
        self.stop_server()?;
        self.start_server()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs a shell command from `/`, returning stdout, or an error with the tail of its output.
fn run(script: &str) -> Result<String, ClusterError> {
    tracing::debug!(command = script, "running");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir("/");
    let out = cmd.stdin(Stdio::null()).output();
    let out = out.map_err(io(format!("running `{script}`")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let output = tail(&format!("{stdout}{stderr}"));
    let status = out.status.to_string();
    Err(ClusterError::Command(script.into(), status, output))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn q(p: &Path) -> String {
    sh_quote(&p.display().to_string())
}

fn conf_quote(v: &str) -> String {
    match v.starts_with('\'') {
        true => v.to_string(),
        false => format!("'{}'", v.replace('\'', "''")),
    }
}

fn pct(s: &str) -> String {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let enc = |b: u8| match keep(b) {
        true => (b as char).to_string(),
        false => format!("%{b:02X}"),
    };
    s.bytes().map(enc).collect()
}

fn free_port() -> Result<u16, ClusterError> {
    let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
    Ok(addr.map_err(io("picking a free port"))?.port())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/sbin", "/sbin"]);
    dirs.map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// uid and gid of the `postgres` OS user, parsed from /etc/passwd.
fn postgres_ids() -> Result<(u32, u32), ClusterError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
    let mut fields = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>());
    let user = fields.find(|f| f.len() > 3 && f[0] == "postgres");
    let ids = user.and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)));
    ids.ok_or(ClusterError::NoPostgresUser)
}

/// `PG_BINDIR`, else `pg_config --bindir`, else the newest `/usr/lib/postgresql/N/bin`.
fn find_bindir() -> Result<PathBuf, ClusterError> {
    let ok = |d: &PathBuf| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        let msg = format!("PG_BINDIR={d:?} has no initdb/postgres");
        return ok(&d).then_some(d).ok_or(ClusterError::NoBinaries(msg));
    }
    let mut config = Command::new("pg_config");
    let config = config.arg("--bindir").stderr(Stdio::null()).output();
    let config = config.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let entries = fs::read_dir("/usr/lib/postgresql").into_iter().flatten();
    let version = |e: &fs::DirEntry| e.file_name().to_str()?.parse::<u32>().ok();
    let versioned = |e: fs::DirEntry| Some((version(&e)?, e.path().join("bin")));
    let mut versions: Vec<_> = entries.flatten().filter_map(versioned).collect();
    versions.sort();
    let newest_first = versions.into_iter().rev().map(|v| v.1);
    let mut all = config.into_iter().chain(newest_first);
    let msg = "set PG_BINDIR or install postgresql (no initdb found)";
    all.find(ok).ok_or(ClusterError::NoBinaries(msg.into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    const CHILD_ENV: &str = "PGB_WATCHDOG_CHILD";

    /// Shared cluster, never dropped: the watchdog cleans it up when the test binary exits.
    fn shared() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let opts = ClusterOptions {
                max_connections: 37,
                extra_conf: vec![("work_mem".into(), "8MB".into())],
                hba: vec!["local all nobody reject".into()],
                ..Default::default()
            };
            Cluster::start(opts).unwrap()
        })
    }

    async fn select_one(config: &str) -> Result<i32, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(config, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client.query_one("SELECT 1", &[]).await?.get(0))
    }

    #[tokio::test]
    async fn connects_over_tcp_with_scram_and_unix_socket() {
        let c = tokio::task::spawn_blocking(shared).await.unwrap();
        let (port, sock) = (c.port(), c.socket_dir().display());
        let tcp = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        assert_eq!(select_one(&format!("{tcp} password=postgres")).await.unwrap(), 1);
        assert!(select_one(&format!("{tcp} password=wrong")).await.is_err());
        assert_eq!(select_one(&c.url("postgres")).await.unwrap(), 1);
        let unix = format!("host={sock} port={port} user=postgres dbname=postgres");
        assert_eq!(select_one(&unix).await.unwrap(), 1);
    }

    #[test]
    fn psql_sees_options() {
        let c = shared();
        assert_eq!(c.psql("postgres", "SHOW max_connections").unwrap(), "37");
        assert_eq!(c.psql("postgres", "SHOW work_mem").unwrap(), "8MB");
        let first = "SELECT user_name FROM pg_hba_file_rules ORDER BY line_number LIMIT 1";
        assert_eq!(c.psql("postgres", first).unwrap(), "{nobody}");
        let err = c.psql("postgres", "SELEC 1").unwrap_err().to_string();
        assert!(err.contains("syntax error"), "{err}");
    }

    #[test]
    fn stop_removes_dir_and_is_idempotent() {
        let mut c = Cluster::start(ClusterOptions::default()).unwrap();
        let (dir, port) = (c.data_dir().parent().unwrap().to_path_buf(), c.port());
        assert!(dir.exists());
        c.stop().unwrap();
        assert!(!dir.exists());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        c.stop().unwrap();
    }

    #[test]
    fn restart_keeps_port_and_data() {
        let mut c = Cluster::start(ClusterOptions::default()).unwrap();
        let port = c.port();
        c.psql("postgres", "CREATE TABLE kept (x int)").unwrap();
        c.stop_server().unwrap();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "stopped");
        assert!(c.data_dir().exists(), "files kept");
        c.start_server().unwrap();
        assert_eq!(c.psql("postgres", "SELECT count(*) FROM kept").unwrap(), "0");
        let before = c.psql("postgres", "SELECT pg_postmaster_start_time()").unwrap();
        c.restart_server().unwrap();
        assert_eq!(c.port(), port);
        assert_ne!(c.psql("postgres", "SELECT pg_postmaster_start_time()").unwrap(), before);
        let dir = c.data_dir().parent().unwrap().to_path_buf();
        c.stop().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn two_clusters_get_different_ports() {
        let a = Cluster::start(ClusterOptions::default()).unwrap();
        let opts = ClusterOptions { max_connections: 20, ..Default::default() };
        let b = Cluster::start(opts).unwrap();
        assert_ne!(a.port(), b.port());
        assert_eq!(a.psql("postgres", "SHOW max_connections").unwrap(), "100");
        assert_eq!(b.psql("template1", "SHOW max_connections").unwrap(), "20");
    }

    #[test]
    fn taken_port_is_reported_with_log() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = Some(held.local_addr().unwrap().port());
        let opts = ClusterOptions { port, ..Default::default() };
        let err = Cluster::start(opts).unwrap_err();
        assert!(matches!(&err, ClusterError::PortInUse(..)), "{err}");
        assert!(err.to_string().contains("could not bind"), "{err}");
    }

    /// Run in a child process by `watchdog_cleans_up_after_owner_dies`: start, then SIGKILL self.
    #[test]
    fn watchdog_child() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let c = Cluster::start(ClusterOptions::default()).unwrap();
            let dir = c.data_dir().parent().unwrap().display();
            println!("PGB_DIR={} {dir}", c.port());
            let me = std::process::id().to_string();
            Command::new("kill").args(["-9", &me]).status().unwrap();
        }
    }

    #[test]
    fn watchdog_cleans_up_after_owner_dies() {
        let test = module_path!().split_once("::").unwrap().1.to_owned() + "::watchdog_child";
        let mut child = Command::new(std::env::current_exe().unwrap());
        child.args(["--exact", &test, "--nocapture"]).env(CHILD_ENV, "1");
        let out = child.stderr(Stdio::inherit()).output().unwrap(); // hangs if pipes leak
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find_map(|l| l.strip_prefix("PGB_DIR="));
        let (port, dir) = line.unwrap().split_once(' ').unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Path::new(dir).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!Path::new(dir).exists(), "watchdog left {dir} behind");
        assert!(TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err());
    }
}
