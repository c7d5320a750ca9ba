//! Hardened authentication: `auth_query` instead of an auth file (with md5 and SCRAM
//! pass-through to the server), the failed-login delay, the per-IP throttle, the warning for
//! an auth file others can read, and secrets kept out of logs and the admin console.
#![allow(clippy::unwrap_used)]

mod common;
use common::process::{BIN, BrokerProcess};
use common::*;
use pgbroker::config::Config;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

/// Roles only these tests use: one whose password expired, one for the log check.
fn roles() {
    static ROLES: Once = Once::new();
    ROLES.call_once(|| {
        pg().psql(
            "postgres",
            "CREATE ROLE u_expired LOGIN PASSWORD 'expiredpw' VALID UNTIL '2000-01-01';
             CREATE ROLE u_logcheck LOGIN PASSWORD 'dbpw-SECRET2';
             CREATE ROLE u_rotate LOGIN PASSWORD 'first';",
        )
        .unwrap();
    });
}

/// A broker with no auth file: users are looked up with the default `auth_query` as
/// `postgres`; database `bench` has no user, so servers log in as the client.
fn auth_query_config(auth_type: &str, extra_auth: &str) -> Config {
    roles();
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"transaction\"\n\
         query_wait_timeout = \"5s\"\n\
         [auth]\ntype = \"{auth_type}\"\nuser = \"postgres\"\npassword = \"postgres\"\n{extra_auth}\n\
         [databases.bench]\nhost = \"127.0.0.1\"\nport = {}\npool_size = 4\n",
        pg().port()
    );
    Config::parse(&text, None, &|_| None).unwrap()
}

async fn current_user(addr: std::net::SocketAddr, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
    let c = connect(addr, user, password, "bench").await?;
    Ok(c.query_one("SELECT current_user::text", &[]).await?.get(0))
}

#[tokio::test]
async fn auth_query_admits_a_scram_user_absent_from_any_auth_file_and_logs_in_as_it() {
    let b = broker(auth_query_config("scram-sha-256", "")).await;
    // u_scram is stored as SCRAM: the server login replays the client's proof keys.
    assert_eq!(current_user(b.local_addr(), "u_scram", "scrampw").await.unwrap(), "u_scram");
}

#[tokio::test]
async fn auth_query_admits_an_md5_user_and_answers_the_servers_md5_challenge_from_the_hash() {
    let b = broker(auth_query_config("md5", "")).await;
    // u_md5 is stored as md5 and pg_hba asks it for md5: the stored hash answers.
    assert_eq!(current_user(b.local_addr(), "u_md5", "md5pw").await.unwrap(), "u_md5");
}

#[tokio::test]
async fn auth_query_refuses_a_wrong_password_an_unknown_user_and_an_expired_role_alike() {
    let b = broker(auth_query_config("scram-sha-256", "failure_delay = \"0s\"\nmax_failures_per_ip = 0")).await;
    for (user, password) in [("u_scram", "wrong"), ("nobody_here", "x"), ("u_expired", "expiredpw")] {
        let e = current_user(b.local_addr(), user, password).await.unwrap_err();
        assert_eq!(sqlstate(&e), "28P01", "{user}: {e}");
        let shown = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert_eq!(shown, format!("password authentication failed for user \"{user}\""));
    }
}

#[tokio::test]
async fn after_a_password_change_new_logins_reach_the_server_with_the_new_secret() {
    let b = broker(auth_query_config("scram-sha-256", "")).await;
    assert_eq!(current_user(b.local_addr(), "u_rotate", "first").await.unwrap(), "u_rotate");
    pg().psql("postgres", "ALTER ROLE u_rotate PASSWORD 'second'").unwrap();
    // Force a new server login: the pool's idle servers were logged in with the old secret.
    let admin = direct("postgres").await;
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'u_rotate'", &[])
        .await
        .unwrap();
    let e = current_user(b.local_addr(), "u_rotate", "first").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01", "the old password no longer logs in: {e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match current_user(b.local_addr(), "u_rotate", "second").await {
            Ok(user) => break assert_eq!(user, "u_rotate"),
            Err(e) if Instant::now() < deadline => {
                // A pooled server killed above may be handed out once before it is noticed.
                assert_ne!(sqlstate(&e), "28P01", "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("new password never reached the server: {e}"),
        }
    }
}

#[tokio::test]
async fn a_failed_login_is_answered_only_after_failure_delay() {
    let b = broker(config_with("scram-sha-256", "")).await;
    let delay = b.app().config().auth.throttle.failure_delay;
    assert!(delay >= Duration::from_millis(100), "default failure_delay is a real delay: {delay:?}");
    let started = Instant::now();
    let e = connect(b.local_addr(), "app", "not-the-password", "appdb").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    assert!(started.elapsed() >= delay, "answered after {:?}, before failure_delay {delay:?}", started.elapsed());
    // A correct login is not slowed down.
    let started = Instant::now();
    connect(b.local_addr(), "app", "apppw", "appdb").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn repeated_failures_from_one_ip_are_refused_even_with_the_right_password() {
    let b = broker(config_with("scram-sha-256", "")).await;
    let mut cfg = (*b.app().config()).clone();
    cfg.auth.throttle.failure_delay = Duration::ZERO;
    cfg.auth.throttle.max_failures_per_ip = 3;
    b.app().store_config(cfg);
    for _ in 0..3 {
        let e = connect(b.local_addr(), "app", "guess", "appdb").await.unwrap_err();
        assert_eq!(sqlstate(&e), "28P01");
    }
    let e = connect(b.local_addr(), "app", "apppw", "appdb").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28000", "{e}");
    let message = e.as_db_error().unwrap().message().to_string();
    assert!(message.contains("too many failed logins") && message.contains("127.0.0.1"), "{message}");
    let counted =
        || async { b.app().admission().refusals().auth_throttled.load(std::sync::atomic::Ordering::Relaxed) == 1 };
    common::eventually("the refusal counted as auth_throttled", Duration::from_secs(5), counted).await;
}

#[tokio::test]
async fn failures_past_the_global_rate_slow_new_logins_without_refusing_them() {
    let b = broker(config_with("scram-sha-256", "")).await;
    let mut cfg = (*b.app().config()).clone();
    cfg.auth.throttle.failure_delay = Duration::ZERO;
    cfg.auth.throttle.max_failures_per_ip = 1000;
    // 30 a minute: past them, one login exchange every 2 s.
    cfg.auth.throttle.max_failures_global = 30;
    b.app().store_config(cfg);
    for _ in 0..30 {
        let e = connect(b.local_addr(), "app", "guess", "appdb").await.unwrap_err();
        assert_eq!(sqlstate(&e), "28P01");
    }
    let slowed = || b.app().admission().throttle().slowed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(slowed(), 0, "within the rate nobody waits");
    // The next two start 2 s apart: another guess, then the right password, which gets in,
    // slowed and not refused.
    let started = Instant::now();
    connect(b.local_addr(), "app", "guess", "appdb").await.unwrap_err();
    connect(b.local_addr(), "app", "apppw", "appdb").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
    assert_eq!(slowed(), 1);
    // The address logged in within the minute: it is not slowed any more.
    connect(b.local_addr(), "app", "apppw", "appdb").await.unwrap();
    assert_eq!(slowed(), 1);
    let (_, metrics) = http_get(b.http_addr(), "/metrics").await;
    assert!(metrics.contains("pgbroker_logins_slowed_total 1"), "{metrics}");
}

/// Runs `pgbroker check` on a config whose auth file has `mode`; returns stderr.
fn check_with_auth_file_mode(mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "\"app\" \"apppw\"\n").unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(mode)).unwrap();
    let path = dir.path().join("pgbroker.toml");
    let text = format!(
        "[budget]\nserver_max_connections = 50\n[auth]\ntype = \"md5\"\nfile = \"users.txt\"\n\
         [databases.app]\nport = {}\n",
        pg().port()
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_auth_file_readable_by_others_is_a_warning_at_start() {
    let err = check_with_auth_file_mode(0o644);
    assert!(err.contains("readable by group or others") && err.contains("users.txt"), "{err}");
    let err = check_with_auth_file_mode(0o600);
    assert!(!err.contains("readable by group or others"), "{err}");
}

#[tokio::test]
async fn secrets_and_query_parameters_never_reach_the_logs_or_the_admin_console() {
    roles();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "\"postgres\" \"postgres\"\n\"app\" \"client-SECRET1\"\n").unwrap();
    let config = |p: common::process::Ports| {
        format!(
            "[broker]\nlisten = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:0\"\npool_mode = \"transaction\"\n\
             [auth]\ntype = \"scram-sha-256\"\nfile = \"{}\"\nadmin_users = [\"postgres\"]\n\
             user = \"postgres\"\npassword = \"authq-SECRET4\"\n\
             [databases.logcheck]\nport = {}\ndbname = \"bench\"\nuser = \"u_logcheck\"\npassword = \"dbpw-SECRET2\"\n",
            p.port,
            users.display(),
            pg().port()
        )
    };
    let broker = BrokerProcess::start_with(config, &[("RUST_LOG", "debug")]).await;
    let addr = broker.addr();
    let c = connect(addr, "app", "client-SECRET1", "logcheck").await.unwrap();
    let echoed: String = c.query_one("SELECT $1::text", &[&"param-SECRET3"]).await.unwrap().get(0);
    assert_eq!(echoed, "param-SECRET3");
    let e = c.query_one("SELECT $1::text::int", &[&"param-SECRET5"]).await.unwrap_err();
    assert!(e.as_db_error().is_some());
    let _ = connect(addr, "app", "wrong-SECRET6", "logcheck").await.unwrap_err();
    let admin = connect(addr, "postgres", "postgres", "pgbroker").await.unwrap();
    let mut console = String::new();
    for cmd in ["SHOW CONFIG", "SHOW DATABASES", "SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS"] {
        for m in admin.simple_query(cmd).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                for i in 0..r.len() {
                    console.push_str(r.get(i).unwrap_or_default());
                    console.push(' ');
                }
            }
        }
    }
    drop((c, admin));
    // SIGTERM, so the broker logs its shutdown too.
    broker.signal("-TERM");
    broker.wait_exit(Duration::from_secs(15)).expect("the broker exits");
    let logs = broker.log();
    assert!(logs.contains("DEBUG") || logs.contains("debug"), "debug logging was on: {logs}");
    assert!(console.contains("u_logcheck"), "the console answered: {console}");
    for secret in ["SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5", "SECRET6"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
        assert!(!console.contains(secret), "{secret} on the admin console:\n{console}");
    }
}

#[tokio::test]
async fn a_user_name_with_a_newline_cannot_forge_a_log_line() {
    let config = |p: common::process::Ports| {
        format!(
            "[broker]\nlisten = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:0\"\n[auth]\ntype = \"trust\"\n\
             [databases.bench]\nport = {}\nuser = \"postgres\"\npassword = \"postgres\"\n",
            p.port,
            pg().port()
        )
    };
    let broker = BrokerProcess::start(config).await;
    let forged = "x\n2026-01-01T00:00:00.000000Z  INFO pgbroker: FORGED admin granted";
    let mut s = raw(broker.addr()).await;
    let database = format!("nosuchdb\u{1b}[2J{forged}");
    send(&mut s, &startup_packet(&[("user", forged), ("database", &database)])).await;
    let reply = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("3D000"), "refused: unknown database");
    broker.signal("-TERM");
    broker.wait_exit(Duration::from_secs(15)).expect("the broker exits");
    let logs = broker.log();
    assert!(logs.contains("nosuchdb\\x1b[2J"), "the refusal was logged, escaped:\n{logs}");
    assert!(!logs.contains('\u{1b}'), "no terminal escape reaches the log:\n{logs}");
    assert!(logs.lines().all(|l| !l.contains("FORGED") || !l.starts_with("2026-01-01")), "a forged line:\n{logs}");
}

/// The first authentication request the broker sends `user`: its code (5 md5, 10 SASL) and,
/// for SASL, the salt of its server-first-message.
async fn challenge(addr: std::net::SocketAddr, user: &str) -> (i32, Option<String>) {
    use tokio::io::AsyncReadExt;
    let mut s = raw(addr).await;
    send(&mut s, &startup_packet(&[("user", user), ("database", "bench")])).await;
    let read_auth = async |s: &mut tokio::net::TcpStream| {
        let tag = s.read_u8().await.unwrap();
        assert_eq!(tag, b'R', "an authentication request");
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (i32::from_be_bytes([body[0], body[1], body[2], body[3]]), body[4..].to_vec())
    };
    let (code, _) = read_auth(&mut s).await;
    if code != 10 {
        return (code, None);
    }
    let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut msg = b"SCRAM-SHA-256\0".to_vec();
    msg.extend_from_slice(&(first.len() as i32).to_be_bytes());
    msg.extend_from_slice(first);
    let mut pkt = vec![b'p'];
    pkt.extend_from_slice(&((msg.len() + 4) as i32).to_be_bytes());
    pkt.extend_from_slice(&msg);
    send(&mut s, &pkt).await;
    let (code, data) = read_auth(&mut s).await;
    assert_eq!(code, 11, "SASL continue");
    let text = String::from_utf8(data).unwrap();
    let salt = text.split(',').find_map(|f| f.strip_prefix("s=")).map(str::to_string);
    (10, salt)
}

#[tokio::test]
async fn unknown_users_get_a_salt_of_their_own_that_stays_the_same() {
    let b = broker(config()).await;
    let (ghost, again) = (challenge(b.local_addr(), "ghost_one").await, challenge(b.local_addr(), "ghost_one").await);
    let other = challenge(b.local_addr(), "ghost_two").await;
    assert!(ghost.1.is_some(), "a SCRAM challenge for an unknown user: {ghost:?}");
    assert_eq!(ghost, again, "the same name gets the same salt, as a real user's does");
    assert_ne!(ghost.1, other.1, "each unknown name its own salt");
    let known = challenge(b.local_addr(), "app").await;
    assert_eq!(known.1.as_ref().map(String::len), ghost.1.as_ref().map(String::len), "salts of the same size");
}

#[tokio::test]
async fn under_md5_unknown_users_get_the_challenge_most_users_get() {
    // The test auth file: two plain, one md5 and one SCRAM secret; md5 challenges mostly.
    let b = broker(config_with("md5", "")).await;
    assert_eq!(challenge(b.local_addr(), "app").await.0, 5);
    assert_eq!(challenge(b.local_addr(), "scramuser").await.0, 10, "a SCRAM secret upgrades to SCRAM");
    assert_eq!(challenge(b.local_addr(), "ghost").await.0, 5, "an unknown user looks like most users");
}

/// How one raw SCRAM login that sends a wrong proof ended.
#[derive(Debug, PartialEq)]
enum Guess {
    /// Refused before any exchange, with this SQLSTATE.
    Refused(String),
    /// Its proof was evaluated, and answered with this SQLSTATE.
    Evaluated(String),
}

/// Connects as `user`; once the exchange reaches server-first, reports it on `admitted` and
/// waits for `go` before sending a wrong proof.
async fn paused_guess(
    mut s: tokio::net::TcpStream,
    user: &str,
    admitted: tokio::sync::mpsc::UnboundedSender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> Guess {
    use tokio::io::AsyncReadExt;
    send(&mut s, &startup_packet(&[("user", user), ("database", "appdb")])).await;
    async fn message(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }
    let code = |tag: u8, body: &[u8]| {
        let mut msg = vec![tag];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(body);
        error_code(&msg).unwrap_or_else(|| format!("not an error: {}", tag as char))
    };
    let (tag, body) = message(&mut s).await;
    if tag != b'R' {
        return Guess::Refused(code(tag, &body));
    }
    let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut init = b"SCRAM-SHA-256\0".to_vec();
    init.extend_from_slice(&(first.len() as i32).to_be_bytes());
    init.extend_from_slice(first);
    send(&mut s, &[&[b'p'][..], &((init.len() + 4) as i32).to_be_bytes(), &init].concat()).await;
    let (_, server_first) = message(&mut s).await;
    let server_first = String::from_utf8_lossy(&server_first[4..]).to_string();
    let nonce = server_first.split(',').find_map(|f| f.strip_prefix("r=")).unwrap().to_string();
    let _ = admitted.send(());
    go.wait_for(|g| *g).await.unwrap();
    let last = format!("c=biws,r={nonce},p={}", "A".repeat(43) + "=");
    send(&mut s, &[&[b'p'][..], &((last.len() + 4) as i32).to_be_bytes(), last.as_bytes()].concat()).await;
    let (tag, body) = message(&mut s).await;
    Guess::Evaluated(code(tag, &body))
}

#[tokio::test]
async fn guesses_sent_together_are_evaluated_no_more_than_the_limit() {
    const LIMIT: usize = 5;
    let mut cfg = config_with("scram-sha-256", "");
    cfg.auth.throttle.max_failures_per_ip = LIMIT as u32;
    cfg.broker.client_login_timeout = Duration::from_secs(20);
    let b = broker(cfg).await;
    let (admitted_tx, mut admitted) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let guesses: Vec<_> = (0..30)
        .map(|_| {
            let (admitted, go) = (admitted_tx.clone(), go.clone());
            let addr = b.local_addr();
            tokio::spawn(async move { paused_guess(raw(addr).await, "app", admitted, go).await })
        })
        .collect();
    // The first LIMIT reach server-first; the others wait for one of them to end.
    for _ in 0..LIMIT {
        tokio::time::timeout(Duration::from_secs(10), admitted.recv()).await.expect("admitted in time").unwrap();
    }
    go_tx.send(true).unwrap();
    let mut outcomes = Vec::new();
    for g in guesses {
        outcomes.push(tokio::time::timeout(Duration::from_secs(15), g).await.expect("answered in time").unwrap());
    }
    let evaluated = outcomes.iter().filter(|o| matches!(o, Guess::Evaluated(_))).count();
    assert_eq!(evaluated, LIMIT, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| *o == Guess::Evaluated("28P01".into()) || *o == Guess::Refused("28000".into())));
}

#[tokio::test]
async fn an_honest_burst_of_logins_past_the_failure_limit_all_get_in() {
    let mut cfg = config_with("scram-sha-256", "");
    cfg.auth.throttle.max_failures_per_ip = 3;
    // Three exchanges at a time, each a PBKDF2 of a debug build: on a busy machine the last
    // of 40 can take longer than the usual test timeout, which is not what is tested here.
    cfg.broker.client_login_timeout = Duration::from_secs(60);
    cfg.databases.get_mut("appdb").unwrap().pool_mode = pgbroker::config::PoolMode::Transaction;
    let b = broker(cfg).await;
    let logins = (0..40).map(|_| connect(b.local_addr(), "app", "apppw", "appdb"));
    for c in futures_util::future::join_all(logins).await {
        let c = c.expect("an honest login is slowed at most, never refused");
        assert_eq!(one(&c, "SELECT 1").await, "1");
    }
}

/// A guess from source address `from`, sent at once.
async fn guess_from(addr: std::net::SocketAddr, from: [u8; 4]) -> Guess {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let s = socket.connect(addr).await.unwrap();
    let (admitted, _) = tokio::sync::mpsc::unbounded_channel();
    let (_go, go) = tokio::sync::watch::channel(true);
    paused_guess(s, "app", admitted, go).await
}

#[tokio::test]
async fn rotating_loopback_source_addresses_share_one_failure_count() {
    let mut cfg = config_with("scram-sha-256", "");
    cfg.auth.throttle.max_failures_per_ip = 3;
    cfg.auth.throttle.failure_delay = Duration::ZERO;
    let b = broker(cfg).await;
    for last in 2..5 {
        assert_eq!(guess_from(b.local_addr(), [127, 0, 0, last]).await, Guess::Evaluated("28P01".into()));
    }
    assert_eq!(guess_from(b.local_addr(), [127, 0, 0, 9]).await, Guess::Refused("28000".into()));
}
