//! Test harness: one throwaway PostgreSQL per test binary, and brokers started in-process.
#![allow(dead_code, clippy::unwrap_used)]
pub mod http;

use pgbroker::app::Broker;
use pgbroker::cluster::{Cluster, ClusterOptions};
use pgbroker::config::Config;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

pub mod process;

/// Stored md5 secret for user `md5user`, password `md5secret`: "md5" + md5("md5secret" + "md5user").
pub const MD5USER_SECRET: &str = "md51df59ed3db2d942a46e855424bbafc45";

/// The shared cluster: database `bench`, plus roles that need each server auth method.
pub fn pg() -> &'static Cluster {
    static PG: OnceLock<Cluster> = OnceLock::new();
    PG.get_or_init(|| {
        let opts = ClusterOptions {
            hba: vec![
                "host all u_trust 127.0.0.1/32 trust".into(),
                "host all u_clear 127.0.0.1/32 password".into(),
                "host all u_md5 127.0.0.1/32 md5".into(),
            ],
            ..ClusterOptions::default()
        };
        let c = Cluster::start(opts).expect("start PostgreSQL");
        c.psql("postgres", "CREATE DATABASE bench").expect("create database");
        c.psql(
            "postgres",
            "CREATE ROLE u_trust LOGIN;
             CREATE ROLE u_clear LOGIN PASSWORD 'clearpw';
             CREATE ROLE u_scram LOGIN PASSWORD 'scrampw';
             CREATE ROLE app LOGIN PASSWORD 'apppw';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN PASSWORD 'md5pw';
             GRANT ALL ON DATABASE bench TO app;",
        )
        .expect("set up roles");
        c
    })
}

/// The auth file tests use: plain, md5 and SCRAM secrets.
pub fn userlist() -> String {
    let scram = postgres_protocol::password::scram_sha_256(b"scramsecret");
    format!(
        "\"postgres\" \"postgres\"\n\"app\" \"apppw\"\n\"md5user\" \"{MD5USER_SECRET}\"\n\"scramuser\" \"{scram}\"\n"
    )
}

/// A config for the shared cluster: listen on a free port, SCRAM auth, and databases
/// `bench` (server login postgres), `appdb` (the client's own login) and `viasocket`
/// (Unix socket). `extra` is appended (more `[databases.*]` sections).
pub fn config_with(auth_type: &str, extra: &str) -> Config {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("userlist.txt"), userlist()).unwrap();
    let text = format!(
        r#"
[broker]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
query_wait_timeout = "5s"
client_login_timeout = "10s"

[auth]
type = "{auth_type}"
file = "userlist.txt"
admin_users = ["postgres"]
stats_users = ["app"]

[databases.bench]
host = "127.0.0.1"
port = {port}
user = "postgres"
password = "postgres"
pool_size = 4

[databases.appdb]
host = "127.0.0.1"
port = {port}
dbname = "bench"
pool_size = 4

[databases.viasocket]
host = "{socket}"
port = {port}
dbname = "bench"
user = "postgres"
pool_size = 2
{extra}
"#,
        port = pg.port(),
        socket = pg.socket_dir().display(),
    );
    Config::parse(&text, Some(&dir.join("pgbroker.toml")), &|_| None).unwrap()
}

/// The default test config.
pub fn config() -> Config {
    config_with("scram-sha-256", "")
}

/// Starts a broker with `config`.
pub async fn broker(config: Config) -> Broker {
    Broker::start(config).await.unwrap()
}

/// A libpq-style connection string through the broker.
pub fn conninfo(addr: SocketAddr, user: &str, password: &str, db: &str) -> String {
    format!("host={} port={} user={user} password={password} dbname={db} connect_timeout=10", addr.ip(), addr.port())
}

/// Connects with tokio-postgres; the connection task runs in the background.
pub async fn connect(addr: SocketAddr, user: &str, password: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(&conninfo(addr, user, password, db), NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects as postgres to `bench` through the broker.
pub async fn connect_bench(addr: SocketAddr) -> Client {
    connect(addr, "postgres", "postgres", "bench").await.unwrap()
}

/// The SQLSTATE of a failed tokio-postgres call.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no code: {e}"))
}

/// A raw TCP connection to the broker for byte-level tests.
pub async fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// A StartupMessage for `user`/`database` with extra parameters.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3i32 << 16).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    pkt
}

/// Reads everything until the peer closes or `limit` passes; returns the bytes.
pub async fn read_until_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// The SQLSTATE (C field) of the first ErrorResponse in `bytes`, if any.
pub fn error_code(bytes: &[u8]) -> Option<String> {
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = (1 + len).min(rest.len());
        if rest[0] == b'E' {
            let body = &rest[5..end];
            for field in body.split(|&b| b == 0) {
                if let Some(code) = field.strip_prefix(b"C") {
                    return Some(String::from_utf8_lossy(code).into_owned());
                }
            }
        }
        rest = &rest[end..];
    }
    None
}

/// Sends bytes and closes the write side.
pub async fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
}

/// The default config with database `bench` in `mode` and a pool of `size`.
pub fn mode_config(mode: pgbroker::config::PoolMode, size: u32) -> Config {
    let mut cfg = config();
    let db = cfg.databases.get_mut("bench").unwrap();
    db.pool_mode = mode;
    db.pool_size = Some(size);
    cfg
}

/// Runs a simple query and returns the first column of every row as text.
pub async fn col(c: &Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

/// The first column of the first row, as text.
pub async fn one(c: &Client, sql: &str) -> String {
    col(c, sql).await.into_iter().next().expect("a row")
}

/// A direct connection to the test cluster (not through a broker).
pub async fn direct(db: &str) -> Client {
    direct_to(pg(), db).await
}

/// A direct connection to `pg` as its superuser (not through a broker).
pub async fn direct_to(pg: &Cluster, db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=postgres password=postgres dbname={db}", pg.port()),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Rows of a simple query as column-name → text maps.
pub async fn rows(c: &Client, sql: &str) -> Vec<std::collections::HashMap<String, String>> {
    let msgs = tokio::time::timeout(Duration::from_secs(10), c.simple_query(sql))
        .await
        .expect("answer in time")
        .expect("query");
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("NULL").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (free when asked: another process may take it before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port whose next port is free too, for a broker whose HTTP listener takes the port
/// after its client port (`pgbroker init --listen`, the demo).
pub fn free_port_pair() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// A plain HTTP/1.1 GET within 10 s: (status, body), or `None` when nothing answers. The body
/// ends at its Content-Length when there is one (a server may keep the connection open), else
/// where the server closes.
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = s.read(&mut buf).await.ok()?;
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw);
            match text.split_once("\r\n\r\n") {
                Some((head, body)) => {
                    let len = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                    });
                    if n == 0 || len.is_some_and(|l| body.len() >= l) {
                        let status = head.split_whitespace().nth(1)?.parse().ok()?;
                        return Some((status, body.to_string()));
                    }
                }
                None if n == 0 => return None,
                None => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fetch).await.ok().flatten()
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).await.unwrap_or_else(|| panic!("no HTTP answer from {addr}{path} within 10 s"))
}

/// What a condition polled by [`eventually`] returns: done with a value, or not yet with what
/// was seen (for the failure message).
pub trait Check {
    /// The value once the condition holds.
    type Done;
    /// What was seen while it did not.
    type Pending: std::fmt::Debug;
    /// `Ok` once the condition holds.
    fn check(self) -> Result<Self::Done, Self::Pending>;
}

impl Check for bool {
    type Done = ();
    type Pending = bool;
    fn check(self) -> Result<(), bool> {
        if self { Ok(()) } else { Err(false) }
    }
}

impl<T> Check for Option<T> {
    type Done = T;
    type Pending = Option<()>;
    fn check(self) -> Result<T, Option<()>> {
        self.ok_or(None)
    }
}

/// `Err(state)`: not yet, and `state` is what was seen.
impl<T, E: std::fmt::Debug> Check for Result<T, E> {
    type Done = T;
    type Pending = E;
    fn check(self) -> Result<T, E> {
        self
    }
}

/// How often [`eventually`] polls.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `f` every 25 ms until its condition holds (`true`, `Some(v)` or `Ok(v)`), at most
/// `limit`: `Ok(value)`, or `Err(what was seen last)` once `limit` has passed.
pub async fn poll<C, F, Fut>(limit: Duration, mut f: F) -> Result<C::Done, C::Pending>
where
    C: Check,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen = match f().await.check() {
            Ok(v) => return Ok(v),
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(seen);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for an observable condition instead of a fixed time: polls `f` every 25 ms until
/// it holds (`true`, `Some(v)` or `Ok(v)`) and returns its value; panics naming `what` and
/// the last state seen (the `Err`) if `limit` passes first.
pub async fn eventually<C, F, Fut>(what: &str, limit: Duration, f: F) -> C::Done
where
    C: Check,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    match poll(limit, f).await {
        Ok(v) => v,
        Err(seen) => panic!("{what}: not within {limit:?}; last seen: {seen:?}"),
    }
}

/// Runs `psql URL -c SQL` (no password from the environment) and returns its output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args(["-X", "-A", "-t", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
