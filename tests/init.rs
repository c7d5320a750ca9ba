//! `pgbroker init`: from an app's own DATABASE_URL to a broker serving it, as an operator
//! runs it.
#![allow(clippy::unwrap_used)]

mod common;

use common::process::{BrokerProcess, Ports};
use pgbroker::cluster::{Cluster, ClusterOptions};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pgbroker");

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn init_from_the_apps_url_writes_a_setup_that_serves_psql_through_the_printed_url() {
    let pg = Cluster::start(ClusterOptions { max_connections: 40, ..ClusterOptions::default() }).unwrap();
    let direct = common::direct_to(&pg, "postgres").await;
    direct.batch_execute("CREATE ROLE app LOGIN PASSWORD 's3cr$t'").await.unwrap();
    direct.batch_execute("CREATE DATABASE orders OWNER app").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/pgbroker/pgbroker.toml");
    // Its HTTP listener takes the next port.
    let port = common::free_port_pair();
    let url = format!("postgres://app:s3cr%24t@127.0.0.1:{}/orders?sslmode=disable&application_name=web", pg.port());
    let init = |force: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["init", "--from", &url, "--instances", "2", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&config);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = init(false);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // floor((40 - 3 superuser reserved - 5 reserved_connections by default) / 2)
    assert!(stdout.contains("budget 16 for 127.0.0.1:"), "{stdout}");
    let app_url = stdout.lines().find_map(|l| l.strip_prefix("DATABASE_URL=")).unwrap().to_string();
    assert_eq!(app_url, format!("postgres://app:s3cr%24t@127.0.0.1:{port}/orders?application_name=web"));

    // The secret is in the two root-only files, never in the config.
    let etc = config.parent().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("s3cr"), "{text}");
    assert_eq!(mode(&config), 0o644);
    assert_eq!(mode(&etc.join("env")), 0o600);
    assert_eq!(mode(&etc.join("userlist.txt")), 0o600);
    assert_eq!(std::fs::read_to_string(etc.join("env")).unwrap(), "DB_PASSWORD='s3cr$t'\n");
    assert_eq!(std::fs::read_to_string(etc.join("userlist.txt")).unwrap(), "\"app\" \"s3cr$t\"\n");

    // A second run refuses to overwrite; --force does.
    let again = init(false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"), "{again:?}");
    assert!(init(true).status.success());

    // Started as the unit starts it: the env file's variable in the environment.
    let broker =
        BrokerProcess::spawn(&config, Ports { port, http: port.wrapping_add(1) }, &[("DB_PASSWORD", "s3cr$t")]);
    broker.wait_listening().await;
    assert_eq!(common::psql(&app_url, "SELECT current_user || '@' || current_database()"), "app@orders");
}

#[test]
fn init_writes_nothing_when_the_server_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgbroker.toml");
    let url = format!("postgres://app:x@127.0.0.1:{}/orders", common::free_port());
    let out = Command::new(BIN).args(["init", "--from", &url, "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the server") && err.contains("nothing was written"), "{err}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no file written");
}

#[test]
fn init_reads_database_url_from_the_environment_when_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["init", "--config"])
        .arg(dir.path().join("pgbroker.toml"))
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"), "{out:?}");
    let out = Command::new(BIN)
        .args(["init", "--config"])
        .arg(dir.path().join("pgbroker.toml"))
        .env("DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres://"), "{out:?}");
}
