//! The `pgbroker` command line: `check` and `demo` as an operator runs them.
#![allow(clippy::unwrap_used)]

mod common;

use common::psql;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pgbroker");

#[test]
fn check_prints_effective_settings_and_budget_with_env_overrides() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pgbroker.toml");
    let out = Command::new(BIN)
        .args(["check", "--config", conf])
        .env("DB_MAX_CONNECTIONS", "100")
        .env("MAX_INSTANCES", "4")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:6432\""), "{text}");
    assert!(text.contains("[databases.bench]"), "{text}");
    assert!(text.contains("<redacted>") && !text.contains("password = \"postgres\""), "{text}");
    assert!(text.contains("budget 23 for 127.0.0.1:5432"), "floor((100 - 5) / 4): {text}");
    assert!(text.contains("[DB_MAX_CONNECTIONS]") && text.contains("[MAX_INSTANCES]"), "{text}");
}

#[test]
fn check_reads_max_connections_from_the_server_for_auto() {
    use pgbroker::cluster::{Cluster, ClusterOptions};
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let path = dir.path().join("pgbroker.toml");
    let text = format!(
        "[budget]\nserver_max_connections = \"auto\"\nreserved_connections = 10\nmax_instances = 3\n\
         [auth]\nfile = \"users.txt\"\n[databases.postgres]\nport = {}\nuser = \"postgres\"\npassword = \"postgres\"\n",
        pg.port()
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    // floor((40 - superuser_reserved_connections 3 - 10) / 3) = 9
    assert!(text.contains("budget 9 for 127.0.0.1:"), "{text}");
    assert!(text.contains("max_connections 40 [server]"), "{text}");
}

#[test]
fn check_fails_clearly_when_the_budget_is_below_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.txt"), "").unwrap();
    let path = dir.path().join("pgbroker.toml");
    let text = "[budget]\nserver_max_connections = 20\nreserved_connections = 5\nmax_instances = 16\n\
                [auth]\nfile = \"users.txt\"\n[databases.app]\n";
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("below 1") && err.contains("max_instances 16"), "{err}");
}

#[test]
fn check_rejects_a_bad_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[broker]\nmax_client_conn = \"lots\"\n").unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("max_client_conn"), "{err}");
}

#[test]
fn check_reports_a_missing_file() {
    let out = Command::new(BIN).args(["check", "--config", "/nonexistent/pgbroker.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pgbroker.toml"));
}

/// A running `pgbroker demo` and the lines it printed.
struct Demo {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Demo {
    fn start() -> Demo {
        Demo::start_with(&[])
    }

    /// The demo with `args` after `demo --listen 127.0.0.1:0`.
    fn start_with(args: &[&str]) -> Demo {
        let mut child = Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Demo { child, lines }
    }

    /// The rest of the first printed line (trimmed) that starts with `prefix`.
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap();
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }

    /// Ctrl-C, and a clean exit.
    fn stop(&mut self) {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "demo exits cleanly: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "demo did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    /// A test that failed midway still stops the demo (and so its cluster).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
    }
}

#[test]
fn demo_serves_psql_with_scram_and_cleans_up_on_ctrl_c() {
    let mut demo = Demo::start();
    let url = demo.line("DATABASE_URL=");
    // The reference config's auth.type is scram-sha-256: the broker offers only SASL, so this
    // login is a SCRAM exchange between libpq and the broker.
    assert_eq!(psql(&url, "SELECT current_user || '@' || current_database()"), "postgres@bench");
    demo.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_row_changes_arriving_over_the_bridge_and_its_admin_login_works() {
    use futures_util::StreamExt;
    let mut demo = Demo::start();
    let url = demo.line("DATABASE_URL=");
    let watch = demo.line("WATCH_URL=");
    let http = watch.strip_prefix("http://").and_then(|r| r.split('/').next()).unwrap().to_string();
    let admin = format!("postgres://admin:{}", demo.line("psql \"postgres://admin:").split('"').next().unwrap());
    let ws_url = format!("ws://{http}/ws?database=bench&channels=employee_changes");
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let mut next = async || loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.unwrap().unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str::<serde_json::Value>(&t).unwrap();
        }
    };
    assert_eq!(next().await["type"], "connection_ack");
    assert_eq!(next().await["type"], "subscribed");
    let snapshot = next().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["data"].as_array().map(Vec::len), Some(2), "the table's two rows");
    let insert = url.clone();
    tokio::task::spawn_blocking(move || psql(&insert, "INSERT INTO employees (name) VALUES ('Linus')")).await.unwrap();
    let change = next().await;
    assert_eq!((change["type"].as_str(), change["data"]["name"].as_str()), (Some("employee_update"), Some("Linus")));
    let pools = tokio::task::spawn_blocking(move || psql(&admin, "SHOW POOLS")).await.unwrap();
    assert!(pools.contains("bench"), "the admin console answers: {pools}");
    tokio::task::spawn_blocking(move || demo.stop()).await.unwrap();
}

#[test]
fn run_refuses_to_start_when_the_budget_is_below_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.txt"), "").unwrap();
    let path = dir.path().join("pgbroker.toml");
    let text = "[broker]\nlisten = \"127.0.0.1:0\"\n[budget]\nserver_max_connections = 10\nreserved_connections = 5\n\
                max_instances = 6\n[auth]\nfile = \"users.txt\"\n[databases.app]\n";
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("below 1") && err.contains("floor((max_connections 10"), "{err}");
}

#[tokio::test]
async fn demo_fronts_an_existing_server_given_its_url_and_changes_nothing_on_it() {
    use pgbroker::cluster::{Cluster, ClusterOptions};
    let pg = Cluster::start(ClusterOptions::default()).unwrap();
    pg.psql("postgres", "CREATE ROLE shop LOGIN PASSWORD 'sh0p'").unwrap();
    pg.psql("postgres", "CREATE DATABASE orders OWNER shop").unwrap();
    let url = format!("postgres://shop:sh0p@127.0.0.1:{}/orders", pg.port());
    let mut demo = Demo::start_with(&["--database-url", &url]);
    let through = demo.line("DATABASE_URL=");
    assert!(through.starts_with("postgres://shop:sh0p@127.0.0.1:") && through.ends_with("/orders"), "{through}");
    let admin = format!("postgres://admin:{}", demo.line("psql \"postgres://admin:").split('"').next().unwrap());
    let (who, pools) = tokio::task::spawn_blocking(move || {
        (psql(&through, "SELECT current_user || '@' || current_database()"), psql(&admin, "SHOW POOLS"))
    })
    .await
    .unwrap();
    assert_eq!(who, "shop@orders");
    assert!(pools.contains("orders"), "the admin console answers: {pools}");
    assert_eq!(pg.psql("orders", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").unwrap(), "0");
    tokio::task::spawn_blocking(move || demo.stop()).await.unwrap();
}

#[test]
fn demo_without_server_binaries_says_the_one_command_that_installs_them() {
    // As a user that may not install (not root, no sudo), with the binaries hidden.
    if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
        eprintln!("NOT RUN: needs root to run the demo as another user");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "demo", "--listen", "127.0.0.1:0"])
        .env("PG_BINDIR", "/nonexistent")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sudo apt-get update && sudo apt-get install -y -q postgresql"), "{err}");
    assert!(err.contains("--database-url"), "{err}");
}

#[test]
fn the_test_command_finds_what_is_missing_and_says_how_it_installs_it() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test.sh");
    // Every lookup under a root that has nothing: PostgreSQL, psql, Chromium, systemd-analyze
    // and cargo-deb are all missing.
    let out =
        Command::new("bash").args([script, "--dry-run"]).env("PGBROKER_SETUP_ROOT", "/nonexistent").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("missing postgresql postgresql-client chromium systemd")
            && text.contains(
                "apt-get install -y -q --no-install-recommends postgresql postgresql-client chromium systemd"
            )
            && text.contains("cargo install cargo-deb"),
        "{text}"
    );
    // This machine has them all (CI installs them with the same script).
    let here = Command::new("bash").args([script, "--dry-run"]).output().unwrap();
    assert!(String::from_utf8_lossy(&here.stdout).contains("everything the tests need is here"), "{here:?}");
}

#[test]
fn ci_runs_the_readmes_test_command_verbatim_and_the_two_commands_come_first() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```").skip(1).step_by(2).map(|b| b.trim_start_matches("sh").trim()).collect();
    assert_eq!(&blocks[..2], ["cargo run --release -- demo", "bash scripts/test.sh"]);
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim() == "bash scripts/test.sh"), "{ci}");
}
