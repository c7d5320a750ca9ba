//! Client startup and authentication through the broker, and server login methods.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn scram_client_with_plain_secret_logs_in_and_queries() {
    let b = broker(config()).await;
    let c = connect_bench(b.local_addr()).await;
    let row = c.query_one("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[tokio::test]
async fn scram_client_with_stored_scram_secret_logs_in() {
    let b = broker(config()).await;
    let c = connect(b.local_addr(), "scramuser", "scramsecret", "bench").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_refused_with_28p01() {
    let b = broker(config()).await;
    let e = connect(b.local_addr(), "postgres", "nope", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn unknown_user_is_refused_like_a_wrong_password() {
    let b = broker(config()).await;
    let e = connect(b.local_addr(), "nobody", "x", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn md5_auth_accepts_plain_and_stored_md5_secrets() {
    let b = broker(config_with("md5", "")).await;
    let c = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let c = connect(b.local_addr(), "md5user", "md5secret", "bench").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let e = connect(b.local_addr(), "md5user", "wrong", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn md5_auth_with_a_scram_secret_upgrades_to_scram() {
    let b = broker(config_with("md5", "")).await;
    let c = connect(b.local_addr(), "scramuser", "scramsecret", "bench").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn trust_auth_needs_only_a_known_user() {
    let b = broker(config_with("trust", "")).await;
    let c = connect(b.local_addr(), "postgres", "anything", "bench").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let e = connect(b.local_addr(), "stranger", "x", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn unknown_database_gets_3d000() {
    let b = broker(config()).await;
    let e = connect(b.local_addr(), "postgres", "postgres", "nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&e), "3D000");
    assert!(e.as_db_error().unwrap().message().contains("nosuchdb"), "{e:?}");
}

#[tokio::test]
async fn database_without_user_logs_in_as_the_client() {
    let b = broker(config()).await;
    let c = connect(b.local_addr(), "app", "apppw", "appdb").await.unwrap();
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
}

#[tokio::test]
async fn server_over_unix_socket_works() {
    let b = broker(config()).await;
    let c = connect(b.local_addr(), "postgres", "postgres", "viasocket").await.unwrap();
    let row = c.query_one("SELECT inet_server_addr() IS NULL", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "expected a Unix-socket server session");
}

fn server_login_db(name: &str, user: &str, password: Option<&str>) -> String {
    let pg = pg();
    let pw = password.map(|p| format!("password = \"{p}\"\n")).unwrap_or_default();
    format!(
        "[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"bench\"\nuser = \"{user}\"\n{pw}",
        pg.port()
    )
}

#[tokio::test]
async fn server_login_works_with_trust_cleartext_md5_and_scram() {
    let extra = [
        server_login_db("s_trust", "u_trust", None),
        server_login_db("s_clear", "u_clear", Some("clearpw")),
        server_login_db("s_md5", "u_md5", Some("md5pw")),
        server_login_db("s_scram", "u_scram", Some("scrampw")),
    ]
    .join("\n");
    let b = broker(config_with("scram-sha-256", &extra)).await;
    for (db, user) in [("s_trust", "u_trust"), ("s_clear", "u_clear"), ("s_md5", "u_md5"), ("s_scram", "u_scram")] {
        let c = connect_bench_db(b.local_addr(), db).await;
        let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), user, "database {db}");
    }
}

async fn connect_bench_db(addr: std::net::SocketAddr, db: &str) -> tokio_postgres::Client {
    connect(addr, "postgres", "postgres", db).await.unwrap()
}

#[tokio::test]
async fn server_login_failure_reaches_the_client_with_the_server_code() {
    let extra = server_login_db("s_bad", "u_scram", Some("wrong"));
    let b = broker(config_with("scram-sha-256", &extra)).await;
    let e = connect(b.local_addr(), "postgres", "postgres", "s_bad").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_answered_n_then_startup_proceeds() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    for code in [80_877_104i32, 80_877_103] {
        let mut req = 8i32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        send(&mut s, &req).await;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    let mut first = [0u8; 9];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(first, [b'R', 0, 0, 0, 8, 0, 0, 0, 0], "AuthenticationOk");
}

#[tokio::test]
async fn newer_protocol_minor_and_pq_options_get_negotiate_protocol_version() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    let mut pkt = startup_packet(&[("user", "postgres"), ("database", "bench"), ("_pq_.frob", "1")]);
    pkt[4..8].copy_from_slice(&((3i32 << 16) | 2).to_be_bytes());
    send(&mut s, &pkt).await;
    let mut head = [0u8; 13];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'v');
    assert_eq!(&head[5..9], &0i32.to_be_bytes(), "newest minor version supported");
    assert_eq!(&head[9..13], &1i32.to_be_bytes(), "one option not recognised");
    let rest = read_until_close(&mut s, Duration::from_millis(500)).await;
    assert!(rest.windows(10).any(|w| w == b"_pq_.frob\0"));
    assert!(rest.windows(9).any(|w| w == [b'R', 0, 0, 0, 8, 0, 0, 0, 0]), "login continues");
}

#[tokio::test]
async fn missing_user_is_refused_with_28000() {
    let b = broker(config()).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &startup_packet(&[("database", "bench")])).await;
    let reply = read_until_close(&mut s, Duration::from_secs(2)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("28000"));
}

#[tokio::test]
async fn max_client_conn_refuses_extra_clients_with_53300() {
    let mut cfg = config();
    cfg.broker.max_client_conn = 2;
    let b = broker(cfg).await;
    let _a = connect_bench(b.local_addr()).await;
    let _b = connect_bench(b.local_addr()).await;
    let e = connect(b.local_addr(), "postgres", "postgres", "bench").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    drop(_a);
    // The slot frees once the broker sees the first client leave.
    let mut ok = false;
    for _ in 0..50 {
        if connect(b.local_addr(), "postgres", "postgres", "bench").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a slot frees when a client leaves");
}
