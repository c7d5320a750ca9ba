//! TLS both ways, checked with real clients: psql (libpq) towards the broker with
//! `sslmode=require`/`verify-full` and `channel_binding=require`, and the broker towards a
//! PostgreSQL with `ssl = on`, against a CA made in the test.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pgbroker::app::Broker;
use pgbroker::config::Config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// A test CA and the PEM files of one certificate it signed.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes a CA and a leaf certificate for `names`, written as ca.pem, cert.pem, key.pem.
    fn new(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "pgbroker test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes a broker config next to `pki`'s files and loads it (so reload re-reads it).
fn tls_config(pki: &Pki, auth_type: &str, broker_extra: &str, db_extra: &str) -> Config {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("userlist.txt"), userlist()).unwrap();
    let text = format!(
        r#"
[broker]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
client_login_timeout = "5s"
client_tls_cert_file = "{cert}"
client_tls_key_file = "{key}"
{broker_extra}

[budget]
server_max_connections = 100

[auth]
type = "{auth_type}"
file = "userlist.txt"

[databases.bench]
host = "127.0.0.1"
port = {port}
user = "postgres"
password = "postgres"
pool_size = 2
{db_extra}
"#,
        cert = pki.file("cert.pem").display(),
        key = pki.file("key.pem").display(),
        port = pg().port(),
    );
    let path = dir.join("pgbroker.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// Runs psql through the broker; returns (success, stdout + stderr).
fn psql(addr: SocketAddr, host: &str, user: &str, password: &str, opts: &str, sql: &str) -> (bool, String) {
    let conninfo = format!("host={host} hostaddr={} port={} user={user} dbname=bench {opts}", addr.ip(), addr.port());
    let out = Command::new("psql")
        .args(["-X", "-At", "-d", &conninfo, "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn conninfo_line(addr: SocketAddr, opts: &str) -> (bool, String) {
    psql(addr, "localhost", "postgres", "postgres", opts, "\\conninfo")
}

async fn start(config: Config) -> Broker {
    Broker::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_require_gets_an_encrypted_session() {
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"prefer\"", "")).await;
    let (ok, out) = tokio::task::spawn_blocking({
        let addr = b.local_addr();
        move || conninfo_line(addr, "sslmode=require")
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("SSL connection"), "psql reports TLS: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_accepts_the_test_ca_and_rejects_another_name() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"require\"", "")).await;
    let addr = b.local_addr();
    let ca = pki.file("ca.pem").display().to_string();
    let (ok, out) = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || {
            psql(
                addr,
                "localhost",
                "postgres",
                "postgres",
                &format!("sslmode=verify-full sslrootcert={ca}"),
                "SELECT 42",
            )
        }
    })
    .await
    .unwrap();
    assert!(ok && out.contains("42"), "{out}");
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(addr, "db.example", "postgres", "postgres", &format!("sslmode=verify-full sslrootcert={ca}"), "SELECT 1")
    })
    .await
    .unwrap();
    assert!(!ok, "a certificate for localhost must not pass as db.example: {out}");
    assert!(out.contains("does not match host name"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_against_an_unknown_ca_fails() {
    let pki = Pki::new(&["localhost"]);
    let other = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"require\"", "")).await;
    let addr = b.local_addr();
    let ca = other.file("ca.pem").display().to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(addr, "localhost", "postgres", "postgres", &format!("sslmode=verify-full sslrootcert={ca}"), "SELECT 1")
    })
    .await
    .unwrap();
    // Both CAs share a name, so OpenSSL finds the wrong one and fails on its signature.
    assert!(!ok, "{out}");
    assert!(out.contains("SSL error"), "{out}");
}

#[tokio::test]
async fn require_refuses_plaintext_clients_with_28000() {
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"require\"", "")).await;
    let err = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&err), "28000");
    let db_error = err.as_db_error().unwrap();
    assert!(db_error.message().contains("SSL required"), "{}", db_error.message());
    let counted =
        || async { b.app().admission().refusals().tls_required.load(std::sync::atomic::Ordering::Relaxed) == 1 };
    common::eventually("the refusal counted as tls_required", Duration::from_secs(5), counted).await;
}

#[tokio::test]
async fn sslrequest_is_refused_when_tls_is_disabled() {
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"disable\"", "")).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_succeeds_with_scram_over_tls() {
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"prefer\"", "")).await;
    let addr = b.local_addr();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(addr, "localhost", "scramuser", "scramsecret", "sslmode=require channel_binding=require", "SELECT 'bound'")
    })
    .await
    .unwrap();
    assert!(ok && out.contains("bound"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_with_a_wrong_password_still_fails() {
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "scram-sha-256", "client_tls_sslmode = \"prefer\"", "")).await;
    let addr = b.local_addr();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(addr, "localhost", "scramuser", "wrong", "sslmode=require channel_binding=require", "SELECT 1")
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("password authentication failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_a_new_certificate() {
    let first = Pki::new(&["localhost"]);
    let config = tls_config(&first, "scram-sha-256", "client_tls_sslmode = \"require\"", "");
    let b = start(config).await;
    let addr = b.local_addr();
    let second = Pki::new(&["localhost"]);
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(second.file(f), first.file(f)).unwrap();
    }
    b.app().reload().await.unwrap();
    let verify = |pki: &Pki| format!("sslmode=verify-full sslrootcert={}", pki.file("ca.pem").display());
    let (new_ca, old_ca) = (verify(&second), verify(&first));
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let with_new = psql(addr, "localhost", "postgres", "postgres", &new_ca, "SELECT 1");
        let with_old = psql(addr, "localhost", "postgres", "postgres", &old_ca, "SELECT 1");
        (with_new.0 && !with_old.0, format!("{}\n{}", with_new.1, with_old.1))
    })
    .await
    .unwrap();
    assert!(ok, "after reload the new certificate is served: {out}");
}

#[tokio::test]
async fn a_missing_certificate_file_is_a_config_error_naming_the_key() {
    let pki = Pki::new(&["localhost"]);
    std::fs::remove_file(pki.file("cert.pem")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[broker]\nclient_tls_sslmode = \"require\"\nclient_tls_cert_file = \"{}\"\nclient_tls_key_file = \"{}\"\n[auth]\ntype = \"trust\"\n",
        pki.file("cert.pem").display(),
        pki.file("key.pem").display()
    );
    let err = Config::parse(&text, Some(&dir.path().join("x.toml")), &|_| None).unwrap_err().to_string();
    assert!(err.contains("broker.client_tls_cert_file") && err.contains("cert.pem"), "{err}");
}

#[tokio::test]
async fn tls_modes_without_a_certificate_are_a_config_error() {
    let err = Config::parse("[broker]\nclient_tls_sslmode = \"require\"\n[auth]\ntype = \"trust\"\n", None, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("client_tls_cert_file"), "{err}");
    let err =
        Config::parse("[broker]\nserver_tls_sslmode = \"verify-full\"\n[auth]\ntype = \"trust\"\n", None, &|_| None)
            .unwrap_err()
            .to_string();
    assert!(err.contains("server_tls_ca_file"), "{err}");
}

// ---- towards the server ----

/// The error a client sees when the broker cannot log in to its server: at login in session
/// mode, or at the first query when the server is connected lazily.
async fn first_error(addr: SocketAddr) -> tokio_postgres::Error {
    match connect(addr, "postgres", "postgres", "bench").await {
        Err(e) => e,
        Ok(c) => c.simple_query("SELECT 1").await.unwrap_err(),
    }
}

/// Turns on TLS in the shared cluster with a certificate for 127.0.0.1 only;
/// returns the CA that signed it.
fn server_pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = Pki::new(&["127.0.0.1"]);
        let data = pg().data_dir();
        let owner = std::fs::metadata(data).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        for (from, to) in [("cert.pem", "server.crt"), ("key.pem", "server.key")] {
            let dest = data.join(to);
            std::fs::copy(pki.file(from), &dest).unwrap();
            std::os::unix::fs::chown(&dest, Some(owner), None).unwrap();
            std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        pg().psql("postgres", "ALTER SYSTEM SET ssl = on").unwrap();
        pg().psql("postgres", "SELECT pg_reload_conf()").unwrap();
        // The reload is asynchronous: wait until new connections are offered TLS.
        for _ in 0..100 {
            if pg().psql("postgres", "SHOW ssl").unwrap() == "on" {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pki
    })
}

fn server_side(mode: &str, ca: &Path, host: &str) -> Config {
    let client = Pki::new(&["localhost"]);
    let extra = format!("server_tls_sslmode = \"{mode}\"\nserver_tls_ca_file = \"{}\"", ca.display());
    let mut config = tls_config(&client, "scram-sha-256", &extra, "");
    config.databases.get_mut("bench").unwrap().host = host.to_string();
    config
}

#[tokio::test]
async fn verify_full_encrypts_server_connections() {
    let pki = server_pki();
    let b = start(server_side("verify-full", &pki.file("ca.pem"), "127.0.0.1")).await;
    let c = connect_bench(b.local_addr()).await;
    // The server login itself was SCRAM over TLS (the cluster offers SCRAM-SHA-256-PLUS).
    assert_eq!(one(&c, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await, "true");
}

#[tokio::test]
async fn verify_full_refuses_a_server_certificate_for_another_name() {
    let pki = server_pki();
    // "localhost" reaches the same server, but its certificate names only 127.0.0.1.
    let b = start(server_side("verify-full", &pki.file("ca.pem"), "localhost")).await;
    let err = first_error(b.local_addr()).await;
    assert_eq!(sqlstate(&err), "08001", "{err:?}");
}

#[tokio::test]
async fn verify_ca_accepts_a_certificate_for_another_name() {
    let pki = server_pki();
    let b = start(server_side("verify-ca", &pki.file("ca.pem"), "localhost")).await;
    let c = connect_bench(b.local_addr()).await;
    assert_eq!(one(&c, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await, "true");
}

#[tokio::test]
async fn verify_ca_refuses_a_server_signed_by_another_ca() {
    server_pki();
    let other = Pki::new(&["localhost"]);
    let b = start(server_side("verify-ca", &other.file("ca.pem"), "127.0.0.1")).await;
    let err = first_error(b.local_addr()).await;
    assert_eq!(sqlstate(&err), "08001", "{err:?}");
}

#[tokio::test]
async fn require_refuses_a_server_without_tls() {
    // A stand-in server that says no to SSLRequest, as PostgreSQL with ssl = off does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut req = [0u8; 8];
            if s.read_exact(&mut req).await.is_ok() {
                let _ = s.write_all(b"N").await;
            }
        }
    });
    let pki = Pki::new(&["localhost"]);
    let mut config = tls_config(&pki, "scram-sha-256", "server_tls_sslmode = \"require\"", "");
    config.databases.get_mut("bench").unwrap().port = port;
    let b = start(config).await;
    let err = first_error(b.local_addr()).await;
    assert_eq!(sqlstate(&err), "08001", "{err:?}");
    assert!(format!("{err:?}").contains("does not support TLS"), "{err:?}");
}

#[tokio::test]
async fn prefer_falls_back_to_plaintext_for_a_unix_socket() {
    server_pki();
    let pki = Pki::new(&["localhost"]);
    let mut config = tls_config(&pki, "scram-sha-256", "server_tls_sslmode = \"prefer\"", "");
    config.databases.get_mut("bench").unwrap().host = pg().socket_dir().display().to_string();
    let b = start(config).await;
    let c = connect_bench(b.local_addr()).await;
    assert_eq!(one(&c, "SELECT count(*)::text FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_hibernates_and_resumes_its_encrypted_session() {
    let pki = Pki::new(&["localhost"]);
    let extra = "client_tls_sslmode = \"require\"\npool_mode = \"transaction\"";
    let b = start(tls_config(&pki, "scram-sha-256", extra, "")).await;
    let addr = b.local_addr();
    let session = std::thread::spawn(move || {
        let conninfo = format!(
            "host=localhost hostaddr={} port={} user=postgres dbname=bench sslmode=require",
            addr.ip(),
            addr.port()
        );
        Command::new("psql")
            .args([
                "-X",
                "-At",
                "-d",
                &conninfo,
                "-c",
                "SELECT 'before'",
                "-c",
                "\\! sleep 2.5",
                "-c",
                "SELECT 'after'",
            ])
            .env("PGPASSWORD", "postgres")
            .output()
            .unwrap()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.app().hibernating_clients() == 0 {
        assert!(std::time::Instant::now() < deadline, "the TLS client never hibernated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::task::spawn_blocking(move || session.join().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().collect::<Vec<_>>(), ["before", "after"]);
}

/// Reads a TLS stream until a whole ReadyForQuery has arrived; returns how many bytes came.
async fn read_to_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let found = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while let Some(h) = got.get(at..at + 5) {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if got.len() < at + 1 + len {
                    break;
                }
                if h[0] == b'Z' {
                    return Some(());
                }
                at += 1 + len;
            }
        }
    })
    .await;
    matches!(found, Ok(Some(()))).then_some(got.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_slow_to_read_gets_the_end_of_its_reply_before_it_hibernates() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new(&["localhost"]);
    let b = start(tls_config(&pki, "trust", "client_tls_sslmode = \"require\"\npool_mode = \"transaction\"", "")).await;
    // A small receive window keeps most of a reply in the broker: in its socket, its TLS
    // buffer, or (the case this is about) written to TLS but not yet flushed.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(b.local_addr()).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let tls = pgbroker::tls::ServerTls::load(pgbroker::tls::ServerMode::VerifyFull, Some(&pki.file("ca.pem"))).unwrap();
    let name = pgbroker::tls::server_name("localhost").unwrap();
    let mut s = tls.connector().unwrap().connect(name, tcp).await.unwrap();
    s.write_all(&startup_packet(&[("user", "postgres"), ("database", "bench")])).await.unwrap();
    read_to_ready(&mut s, Duration::from_secs(10)).await.expect("logged in");
    // Where a reply stops fitting in the kernel's buffers depends on their autotuning: look
    // for that edge by halving. Replies that fit end with the broker released and hibernating;
    // the ones just past the edge end with their last bytes in TLS's buffer, which a hibernating
    // broker would never flush.
    let (mut fits, mut too_big) = (64 * 1024, 16 * 1024 * 1024);
    for _ in 0..9 {
        let size = (fits + too_big) / 2;
        let sql = format!("SELECT repeat('x', {size})\0");
        let mut q = vec![b'Q'];
        q.extend_from_slice(&(sql.len() as u32 + 4).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        s.write_all(&q).await.unwrap();
        s.flush().await.unwrap();
        // Past the broker's quiet period (1 to 2 s after the last activity).
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let hibernated = b.app().hibernating_clients() > 0;
        let got = read_to_ready(&mut s, Duration::from_secs(5)).await;
        assert!(got.is_some_and(|n| n > size), "a {size}-byte reply came incomplete (hibernating: {hibernated})");
        if hibernated { fits = size } else { too_big = size }
    }
}
