//! The `pgbroker` command line: `check` and `demo` as an operator runs them.
#![allow(clippy::unwrap_used)]

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

#[test]
fn demo_serves_psql_with_scram_and_cleans_up_on_ctrl_c() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap();
        if let Some(u) = line.trim().strip_prefix("DATABASE_URL=") {
            break u.to_string();
        }
    };
    // The reference config's auth.type is scram-sha-256: the broker offers only SASL, so this
    // login is a SCRAM exchange between libpq and the broker.
    let out = Command::new("psql")
        .arg(&url)
        .args(["-X", "-A", "-t", "-c", "SELECT current_user || '@' || current_database()"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres@bench");

    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exits cleanly: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
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
