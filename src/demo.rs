//! `pgbroker demo`: a throwaway PostgreSQL with pgbroker in front, until Ctrl-C.

use crate::app::Broker;
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;
use anyhow::Context;
use std::net::SocketAddr;

/// The shipped reference config; the demo runs with its defaults.
const REFERENCE_CONFIG: &str = include_str!("../conf/pgbroker.toml");

/// Starts PostgreSQL and the broker on `listen`, prints how to connect, waits for a signal.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    eprintln!("starting a throwaway PostgreSQL cluster...");
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await?
        .context("cannot start PostgreSQL (is the postgresql server package installed?)")?;
    cluster.psql("postgres", "CREATE DATABASE bench")?;

    let dir = tempfile::Builder::new().prefix("pgbroker-demo").tempdir()?;
    std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"postgres\"\n")?;
    let mut config = Config::parse(REFERENCE_CONFIG, Some(&dir.path().join("pgbroker.toml")), &|_| None)?;
    config.broker.listen = listen;
    for db in config.databases.values_mut() {
        db.host = cluster.host().to_string();
        db.port = cluster.port();
    }
    let broker = Broker::start(config).await.with_context(|| {
        format!("cannot listen on {listen} (is something else using it? try --listen 127.0.0.1:6543)")
    })?;
    let addr = broker.local_addr();
    println!();
    println!("pgbroker is listening on {addr}, in front of PostgreSQL on port {}.", cluster.port());
    println!();
    println!("  DATABASE_URL=postgres://postgres:postgres@{addr}/bench");
    println!("  psql \"postgres://postgres:postgres@{addr}/bench\"");
    println!();
    println!("Press Ctrl-C to stop; the cluster and its files are removed.");

    crate::app::wait_for_stop_signal().await?;
    eprintln!("stopping...");
    broker.stop();
    drop(broker);
    tokio::task::spawn_blocking(move || cluster.stop()).await??;
    Ok(())
}
