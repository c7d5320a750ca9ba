//! `pgbroker` as an operator runs it: a process started with a config file, its stderr in a
//! log file, killed (and reaped) when the test lets go of it.

use super::{eventually, free_port};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pgbroker");

/// How long a broker may take to start listening (a debug build on a loaded machine).
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// The two ports a broker process listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Client connections (`broker.listen`).
    pub port: u16,
    /// HTTP: metrics, health, WebSocket (`broker.http_listen`).
    pub http: u16,
}

impl Ports {
    /// Two free ports.
    pub fn free() -> Ports {
        Ports { port: free_port(), http: free_port() }
    }
}

/// A running `pgbroker --config FILE`.
pub struct BrokerProcess {
    child: Mutex<Child>,
    /// Where it listens.
    pub ports: Ports,
    config: PathBuf,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl BrokerProcess {
    /// Picks two free ports, writes `config(ports)` to `pgbroker.toml` in a temporary
    /// directory of its own, starts the broker with `RUST_LOG=info`, and waits until its
    /// client port accepts connections.
    pub async fn start(config: impl FnOnce(Ports) -> String) -> BrokerProcess {
        Self::start_with(config, &[]).await
    }

    /// [`start`](Self::start) with environment variables added (`RUST_LOG` among them to
    /// change the log level).
    pub async fn start_with(config: impl FnOnce(Ports) -> String, env: &[(&str, &str)]) -> BrokerProcess {
        let p = Self::spawn_new(config, env);
        p.wait_listening().await;
        p
    }

    /// Like [`start_with`](Self::start_with), without waiting for the port.
    pub fn spawn_new(config: impl FnOnce(Ports) -> String, env: &[(&str, &str)]) -> BrokerProcess {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports::free();
        let path = dir.path().join("pgbroker.toml");
        std::fs::write(&path, config(ports)).unwrap();
        let mut p = Self::spawn(&path, ports, env);
        p._dir = Some(dir);
        p
    }

    /// Starts a broker on an existing config file that listens on `ports`, without waiting.
    /// Its stderr goes to a log file next to the config (one per process).
    pub fn spawn(config: &Path, ports: Ports, env: &[(&str, &str)]) -> BrokerProcess {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let stem = config.file_stem().unwrap_or_default().to_string_lossy();
        let log = config.with_file_name(format!("{stem}.{n}.log"));
        let mut cmd = Command::new(BIN);
        // An error it exits with stays one line (no backtrace), so the log's tail shows it.
        cmd.arg("--config").arg(config).env("RUST_LOG", "info").env("RUST_LIB_BACKTRACE", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let stderr = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().unwrap();
        BrokerProcess { child: Mutex::new(child), ports, config: config.to_path_buf(), log, _dir: None }
    }

    /// Waits (at most [`START_LIMIT`]) until the client port accepts connections; panics
    /// with the log's tail if the process exits or the time passes.
    pub async fn wait_listening(&self) {
        let addr = self.addr();
        let ready = super::poll(START_LIMIT, || async move {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => Ok(Ok(())),
                Err(_) if !self.alive() => Ok(Err(())),
                Err(e) => Err(e),
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(())) => panic!("broker on {addr} exited; its log:\n{}", self.log_tail(20)),
            Err(e) => {
                panic!("broker on {addr} not listening within {START_LIMIT:?} ({e}); its log:\n{}", self.log_tail(20))
            }
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.port))
    }

    /// The HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.http))
    }

    /// The config file (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// Sends a signal (`-HUP`, `-TERM`, ...).
    pub fn signal(&self, sig: &str) {
        Command::new("kill").args([sig, &self.pid().to_string()]).status().unwrap();
    }

    /// Whether it is still running.
    pub fn alive(&self) -> bool {
        self.child().try_wait().unwrap().is_none()
    }

    /// Waits (at most `limit`) for it to exit.
    pub fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(super::POLL);
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits (at most `limit`) until a line of its log contains `what`; returns that line.
    pub async fn log_line(&self, what: &str, limit: Duration) -> String {
        let pending = format!("no log line with {what:?}");
        eventually(&pending, limit, || async {
            self.log().lines().find(|l| l.contains(what)).map(str::to_string).ok_or_else(|| self.log_tail(5))
        })
        .await
    }
}
