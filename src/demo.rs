//! `pgbroker demo`: a throwaway PostgreSQL with pgbroker in front, until Ctrl-C.

use crate::app::Broker;
use crate::cluster::{Cluster, ClusterOptions};
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

/// Starts PostgreSQL and the broker on `listen`, prints how to connect, waits for a signal.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    eprintln!("starting a throwaway PostgreSQL cluster...");
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await?
        .context("cannot start PostgreSQL (is the postgresql server package installed?)")?;
    cluster.psql("postgres", "CREATE DATABASE bench")?;
    cluster.psql("bench", NOTIFY_FUNCTION)?;
    cluster.psql("bench", WATCHED_TABLE)?;

    let dir = tempfile::Builder::new().prefix("pgbroker-demo").tempdir()?;
    std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"postgres\"\n\"admin\" \"admin\"\n")?;
    let mut config = Config::parse(REFERENCE_CONFIG, Some(&dir.path().join("pgbroker.toml")), &|_| None)?;
    config.broker.listen = listen;
    // The HTTP listener next to it (6433 beside 6432), or any free port beside a free one.
    config.broker.http_listen = SocketAddr::new(listen.ip(), if listen.port() == 0 { 0 } else { listen.port() + 1 });
    let shape = ChannelShape {
        kind: Some("employee_update".into()),
        envelope: Some(Envelope::Typed),
        snapshot_query: Some("SELECT coalesce(json_agg(e ORDER BY e.id), '[]') FROM employees e".into()),
    };
    config.websocket.channels.insert(CHANNEL.into(), shape);
    for db in config.databases.values_mut() {
        db.host = cluster.host().to_string();
        db.port = cluster.port();
    }
    let broker = Broker::start(config).await.with_context(|| {
        format!("cannot listen on {listen} (is something else using it? try --listen 127.0.0.1:6543)")
    })?;
    let (addr, http) = (broker.local_addr(), broker.http_addr());
    println!();
    println!("pgbroker is listening on {addr}, in front of PostgreSQL on port {}.", cluster.port());
    println!();
    println!("Connect an app or psql through it:");
    println!("  DATABASE_URL=postgres://postgres:postgres@{addr}/bench");
    println!("  psql \"postgres://postgres:postgres@{addr}/bench\"");
    println!();
    println!("Watch table changes arrive over WebSocket: open the status page, then change a row.");
    println!("  WATCH_URL=http://{http}/?watch={CHANNEL}");
    println!(
        "  psql \"postgres://postgres:postgres@{addr}/bench\" -c \"INSERT INTO employees (name) VALUES ('Linus')\""
    );
    println!("  (a WebSocket client: ws://{http}/ws?database=bench&channels={CHANNEL})");
    println!();
    println!("The admin console, metrics and health:");
    println!("  psql \"postgres://admin:admin@{addr}/pgbroker\" -c \"SHOW POOLS\"");
    println!("  curl http://{http}/metrics");
    println!("  curl http://{http}/health");
    println!();
    println!("Press Ctrl-C to stop; the cluster and its files are removed.");

    crate::app::wait_for_stop_signal().await?;
    eprintln!("stopping...");
    broker.stop();
    drop(broker);
    tokio::task::spawn_blocking(move || cluster.stop()).await??;
    Ok(())
}
