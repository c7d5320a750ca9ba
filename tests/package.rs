//! The Debian package as an operator uses it: install, check, `init` from an app's URL, run
//! as the unit runs it, upgrade over itself, remove, purge. It installs into this machine, so
//! it runs as root only (CI runs as root) and builds the package with `cargo deb`.
#![allow(clippy::unwrap_used)]

mod common;

use pgbroker::cluster::{Cluster, ClusterOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

const ETC: &str = "/etc/pgbroker";
/// `nobody`: the unit runs the broker as a user of its own (DynamicUser).
const UNPRIVILEGED: &str = "65534";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.env("DEBIAN_FRONTEND", "noninteractive").output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).to_string()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn is_installed() -> bool {
    Command::new("dpkg").args(["-s", "pgbroker"]).output().is_ok_and(|o| o.status.success())
}

/// Builds the package from this tree (as the README says) and returns its path.
fn build_package() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("cargo").args(["deb", "--strip", "--quiet"]).current_dir(manifest).output().unwrap();
    assert!(
        out.status.success(),
        "cargo deb failed (install it with `cargo install cargo-deb`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // cargo deb prints the package's path last.
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap().trim())
}

/// Purges the package however the test ends, so a failure leaves the machine as it was.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "pgbroker"]).env("DEBIAN_FRONTEND", "noninteractive").output();
    }
}

/// Kills the broker however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_configures_serves_upgrades_and_purges() {
    if !nix_is_root() {
        eprintln!("NOT RUN: installing a package needs root; CI runs this test as root");
        return;
    }
    assert!(
        is_installed() || !Path::new(ETC).exists(),
        "{ETC} exists and is not the package's: refusing to install over an operator's setup"
    );
    let deb = build_package();
    let _purge = Purge;

    // Install: the binary, the units, the config and env file as conffiles, the auth file 0600.
    run(Command::new("dpkg").args(["-i", "--force-confold"]).arg(&deb));
    let files = stdout(Command::new("dpkg").args(["-L", "pgbroker"]));
    for f in [
        "/usr/bin/pgbroker",
        "/etc/pgbroker/pgbroker.toml",
        "/etc/pgbroker/env",
        "/usr/share/pgbroker/pgbroker-fleet.sql",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not in:\n{files}");
    }
    let unit = |name: &str| {
        files
            .lines()
            .find(|l| l.ends_with(&format!("systemd/system/{name}")))
            .unwrap_or_else(|| panic!("{name}: {files}"))
            .to_string()
    };
    let (service, socket) = (unit("pgbroker.service"), unit("pgbroker.socket"));
    assert_eq!(mode("/usr/bin/pgbroker"), 0o755);
    assert_eq!(mode("/etc/pgbroker/pgbroker.toml"), 0o644);
    assert_eq!(mode("/etc/pgbroker/env"), 0o600);
    assert_eq!(mode("/etc/pgbroker/userlist.txt"), 0o600);
    let conffiles = stdout(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}\n", "pgbroker"]));
    assert!(
        conffiles.contains("/etc/pgbroker/pgbroker.toml ") && conffiles.contains("/etc/pgbroker/env "),
        "{conffiles}"
    );
    let verify = run(Command::new("systemd-analyze").args(["verify", "--man=no", &service, &socket]));
    assert!(verify.stderr.is_empty(), "{}", String::from_utf8_lossy(&verify.stderr));
    // Installed, not started: there is nothing to serve until it is configured.
    let active = Command::new("systemctl").args(["is-active", "pgbroker"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&active.stdout).trim().eq("active"));

    // The packaged config checks (its server's limits given as an operator would in env).
    let check = stdout(Command::new("/usr/bin/pgbroker").arg("check").env("DB_MAX_CONNECTIONS", "100"));
    assert!(check.contains("budget"), "{check}");

    // init from an app's URL into the installed paths: no --force needed over the packaged files.
    let pg = Cluster::start(ClusterOptions::default()).unwrap();
    let direct = common::direct_to(&pg, "postgres").await;
    direct.batch_execute("CREATE ROLE app LOGIN PASSWORD 'pw'").await.unwrap();
    direct.batch_execute("CREATE DATABASE orders OWNER app").await.unwrap();
    // Its HTTP listener takes the next port.
    let port = common::free_port_pair();
    let url = format!("postgres://app:pw@127.0.0.1:{}/orders", pg.port());
    let init = stdout(Command::new("/usr/bin/pgbroker").args([
        "init",
        "--from",
        &url,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]));
    let app_url = init.lines().find_map(|l| l.strip_prefix("DATABASE_URL=")).unwrap().to_string();
    assert_eq!(mode("/etc/pgbroker/env"), 0o600);
    assert_eq!(mode("/etc/pgbroker/userlist.txt"), 0o600);
    let env = std::fs::read_to_string("/etc/pgbroker/env").unwrap();
    let password = env.lines().find_map(|l| l.strip_prefix("DB_PASSWORD=")).unwrap().trim_matches('\'').to_string();
    run(Command::new("/usr/bin/pgbroker").arg("check").env("DB_PASSWORD", &password));

    // Run as ExecStart does: an unprivileged user, the env file's variables, the auth file
    // handed over in a credentials directory only that user can read.
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy("/etc/pgbroker/userlist.txt", creds.path().join("userlist.txt")).unwrap();
    run(Command::new("chown").args(["-R", &format!("{UNPRIVILEGED}:{UNPRIVILEGED}")]).arg(creds.path()));
    std::fs::set_permissions(creds.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let broker = Running(
        Command::new("setpriv")
            .args([&format!("--reuid={UNPRIVILEGED}"), &format!("--regid={UNPRIVILEGED}"), "--clear-groups"])
            .args(["/usr/bin/pgbroker", "--config", "/etc/pgbroker/pgbroker.toml"])
            .env("DB_PASSWORD", &password)
            .env("CREDENTIALS_DIRECTORY", creds.path())
            .spawn()
            .unwrap(),
    );
    common::eventually("the installed broker to listen", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(common::psql(&app_url, "SELECT current_user || '@' || current_database()"), "app@orders");
    drop(broker);

    // Upgrade over itself: the operator's edits stay.
    let edited =
        format!("{}# tuned by the operator\n", std::fs::read_to_string("/etc/pgbroker/pgbroker.toml").unwrap());
    std::fs::write("/etc/pgbroker/pgbroker.toml", &edited).unwrap();
    run(Command::new("dpkg").args(["-i", "--force-confold"]).arg(&deb));
    assert_eq!(std::fs::read_to_string("/etc/pgbroker/pgbroker.toml").unwrap(), edited);
    assert!(std::fs::read_to_string("/etc/pgbroker/userlist.txt").unwrap().contains("\"app\""));

    // Remove keeps the configuration; purge removes it.
    run(Command::new("dpkg").args(["-r", "pgbroker"]));
    assert!(!Path::new("/usr/bin/pgbroker").exists());
    assert_eq!(std::fs::read_to_string("/etc/pgbroker/pgbroker.toml").unwrap(), edited);
    run(Command::new("dpkg").args(["-P", "pgbroker"]));
    assert!(!Path::new(ETC).exists(), "purge leaves {ETC}");
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
