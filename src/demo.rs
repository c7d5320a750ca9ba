//! `pgbroker demo`: a throwaway PostgreSQL with pgbroker in front, until Ctrl-C.

use crate::app::Broker;
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::config::userlist;
use crate::config::values::{PgUrl, parse_pg_url};
use crate::config::{ChannelShape, Config, Envelope};
use anyhow::Context;
use std::net::SocketAddr;

/// The shipped reference config; the demo runs with its defaults.
const REFERENCE_CONFIG: &str = include_str!("../conf/pgbroker.toml");

/// The shipped function for payloads of any size, used by the demo's trigger.
const NOTIFY_FUNCTION: &str = include_str!("../conf/pgbroker-notify.sql");

/// A table whose every change is pushed to the bridge's `employee_changes` channel, as an
/// app's trigger would do.
const WATCHED_TABLE: &str = "
CREATE TABLE employees (id serial PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO employees (name) VALUES ('Ada'), ('Grace');
CREATE FUNCTION employees_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgbroker_notify('employee_changes', row_to_json(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER employees_notify AFTER INSERT OR UPDATE OR DELETE ON employees
    FOR EACH ROW EXECUTE FUNCTION employees_notify();
";

/// The channel the demo's table notifies.
const CHANNEL: &str = "employee_changes";

/// Where the demo's broker sends its servers.
enum Upstream {
    /// A throwaway cluster with the watched table, removed at the end.
    Throwaway(Cluster),
    /// An existing server (`--database-url`): nothing is created on it.
    Existing(PgUrl),
}

/// Starts the broker on `listen` in front of a throwaway PostgreSQL, or of the server at
/// `database_url`; prints how to use it and waits for a signal.
pub async fn run(listen: SocketAddr, database_url: Option<String>) -> anyhow::Result<()> {
    let upstream = match database_url {
        Some(url) => Upstream::Existing(parse_pg_url(&url).map_err(|e| anyhow::anyhow!("--database-url: {e}"))?),
        None => Upstream::Throwaway(throwaway().await?),
    };
    // Clients log in as the server login; the admin console as admin:admin.
    let (login, password) = match &upstream {
        Upstream::Throwaway(_) => ("postgres".to_string(), "postgres".to_string()),
        Upstream::Existing(url) => {
            (url.user.clone().context("--database-url needs a user")?, url.password.clone().unwrap_or_default())
        }
    };
    let dir = tempfile::Builder::new().prefix("pgbroker-demo").tempdir()?;
    let users = format!("{}{}", userlist::line(&login, &password), userlist::line("admin", "admin"));
    std::fs::write(dir.path().join("userlist.txt"), users)?;
    let mut config = Config::parse(REFERENCE_CONFIG, Some(&dir.path().join("pgbroker.toml")), &|_| None)?;
    config.broker.listen = listen;
    // The HTTP listener next to it (6433 beside 6432), or any free port beside a free one.
    config.broker.http_listen = SocketAddr::new(listen.ip(), if listen.port() == 0 { 0 } else { listen.port() + 1 });
    let database = match &upstream {
        Upstream::Throwaway(cluster) => {
            for db in config.databases.values_mut() {
                db.host = cluster.host().to_string();
                db.port = cluster.port();
            }
            let shape = ChannelShape {
                kind: Some("employee_update".into()),
                envelope: Some(Envelope::Typed),
                snapshot_query: Some("SELECT coalesce(json_agg(e ORDER BY e.id), '[]') FROM employees e".into()),
            };
            config.websocket.channels.insert(CHANNEL.into(), shape);
            "bench".to_string()
        }
        Upstream::Existing(url) => {
            let database = url.dbname.clone().unwrap_or_else(|| login.clone());
            let mut db = config.databases.values().next().cloned().context("the reference config has a database")?;
            db.host = url.host.clone().unwrap_or_else(|| "localhost".into());
            db.port = url.port.unwrap_or(5432);
            db.dbname = database.clone();
            db.user = Some(login.clone());
            db.password = Some(password.clone());
            config.databases.clear();
            config.databases.insert(database.clone(), db);
            database
        }
    };
    let broker = Broker::start(config).await.with_context(|| {
        format!(
            "cannot start (is something else using {listen}? try --listen 127.0.0.1:6543; is the server reachable?)"
        )
    })?;
    let (addr, http) = (broker.local_addr(), broker.http_addr());
    let app_url = format!("postgres://{}:{}@{addr}/{database}", encode(&login), encode(&password));
    println!();
    match &upstream {
        Upstream::Throwaway(c) => {
            println!("pgbroker is listening on {addr}, in front of a throwaway PostgreSQL on port {}.", c.port())
        }
        Upstream::Existing(u) => println!(
            "pgbroker is listening on {addr}, in front of PostgreSQL at {}:{}.",
            u.host.as_deref().unwrap_or("localhost"),
            u.port.unwrap_or(5432)
        ),
    }
    println!();
    println!("Connect an app or psql through it:");
    println!("  DATABASE_URL={app_url}");
    println!("  psql \"{app_url}\"");
    println!();
    if matches!(upstream, Upstream::Throwaway(_)) {
        println!("Watch table changes arrive over WebSocket: open the status page, then change a row.");
        println!("  WATCH_URL=http://{http}/?watch={CHANNEL}");
        println!("  psql \"{app_url}\" -c \"INSERT INTO employees (name) VALUES ('Linus')\"");
        println!("  (a WebSocket client: ws://{http}/ws?database={database}&channels={CHANNEL})");
    } else {
        println!("The status page, and LISTEN/NOTIFY over WebSocket (NOTIFY my_channel, '...' on the server):");
        println!("  http://{http}/");
        println!("  ws://{http}/ws?database={database}&channels=my_channel");
    }
    println!();
    println!("The admin console, metrics and health:");
    println!("  psql \"postgres://admin:admin@{addr}/pgbroker\" -c \"SHOW POOLS\"");
    println!("  curl http://{http}/metrics");
    println!("  curl http://{http}/health");
    println!();
    match &upstream {
        Upstream::Throwaway(_) => println!("Press Ctrl-C to stop; the cluster and its files are removed."),
        Upstream::Existing(_) => println!("Press Ctrl-C to stop; nothing was changed on the server."),
    }

    crate::app::wait_for_stop_signal().await?;
    eprintln!("stopping...");
    broker.stop();
    drop(broker);
    if let Upstream::Throwaway(mut cluster) = upstream {
        tokio::task::spawn_blocking(move || cluster.stop()).await??;
    }
    Ok(())
}

/// A throwaway cluster with the watched table; the server binaries are installed first if
/// they are missing and this process may (root, or sudo without a password).
async fn throwaway() -> anyhow::Result<Cluster> {
    eprintln!("starting a throwaway PostgreSQL cluster...");
    let mut started = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await?;
    if let Err(ClusterError::NoBinaries(_)) = &started {
        install_postgres()?;
        started = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await?;
    }
    let cluster = started.context("cannot start PostgreSQL")?;
    cluster.psql("postgres", "CREATE DATABASE bench")?;
    cluster.psql("bench", NOTIFY_FUNCTION)?;
    cluster.psql("bench", WATCHED_TABLE)?;
    Ok(cluster)
}

/// The Debian/Ubuntu package of the PostgreSQL server binaries.
const INSTALL: &str = "apt-get install -y -q postgresql";

/// Installs the server binaries with apt-get, announcing it, when this process may; else
/// says the one command that will.
fn install_postgres() -> anyhow::Result<()> {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let sudo =
        !root && std::process::Command::new("sudo").args(["-n", "true"]).output().is_ok_and(|o| o.status.success());
    let apt = std::path::Path::new("/usr/bin/apt-get").exists();
    if !apt || !(root || sudo) {
        anyhow::bail!(
            "the PostgreSQL server binaries are not installed. Install them with\n  sudo apt-get update && sudo {INSTALL}\n\
             (or set PG_BINDIR to their directory), or put pgbroker in front of a server you have:\n  \
             cargo run --release -- demo --database-url postgres://user:password@host:5432/dbname"
        );
    }
    eprintln!("the PostgreSQL server binaries are not installed: installing them ({INSTALL})...");
    let prefix: &[&str] = if root { &[] } else { &["sudo", "-n"] };
    for args in [&["apt-get", "update", "-q"][..], &INSTALL.split(' ').collect::<Vec<_>>()[..]] {
        let cmd: Vec<&str> = prefix.iter().chain(args).copied().collect();
        let status = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("cannot run {}", cmd.join(" ")))?;
        anyhow::ensure!(status.success(), "{} failed ({status})", cmd.join(" "));
    }
    Ok(())
}

/// Percent-encodes what a URL's user or password part cannot hold as is.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
