//! Hostile and broken input: each ends only the offending client, with a clear error.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// After each abuse, an ordinary client must still get its query answered.
async fn other_client_still_works(addr: std::net::SocketAddr) {
    let c = connect_bench(addr).await;
    let row = c.query_one("SELECT 'still here'::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "still here");
}

/// A logged-in raw connection (trust auth) whose welcome has been read.
async fn logged_in(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let mut s = raw(addr).await;
    send(&mut s, &startup_packet(&[("user", "postgres"), ("database", "bench")])).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test]
async fn garbage_startup_packet_gets_08p01_and_others_carry_on() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn oversized_startup_length_is_refused_without_buffering() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    let mut pkt = 0x7fff_ffffi32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&(3i32 << 16).to_be_bytes());
    send(&mut s, &pkt).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn truncated_startup_packet_then_close_affects_no_one_else() {
    let b = broker(config_with("trust", "")).await;
    let mut s = raw(b.local_addr()).await;
    let pkt = startup_packet(&[("user", "postgres"), ("database", "bench")]);
    send(&mut s, &pkt[..pkt.len() / 2]).await;
    s.shutdown().await.unwrap();
    drop(s);
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn silent_client_is_dropped_after_client_login_timeout() {
    let mut cfg = config_with("trust", "");
    cfg.broker.client_login_timeout = Duration::from_millis(300);
    let b = broker(cfg).await;
    let mut s = raw(b.local_addr()).await;
    send(&mut s, &[0, 0, 0]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    assert!(String::from_utf8_lossy(&reply).contains("client_login_timeout"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn message_length_below_four_after_login_gets_08p01() {
    let b = broker(config_with("trust", "")).await;
    let mut s = logged_in(b.local_addr()).await;
    send(&mut s, &[b'Q', 0, 0, 0, 2]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn message_over_max_packet_size_gets_08p01() {
    let mut cfg = config_with("trust", "");
    cfg.broker.max_packet_size = 64 * 1024;
    let b = broker(cfg).await;
    let mut s = logged_in(b.local_addr()).await;
    send(&mut s, &[b'Q', 0x10, 0, 0, 0]).await;
    let reply = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    assert!(String::from_utf8_lossy(&reply).contains("max_packet_size"));
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn truncated_message_then_disconnect_closes_the_dirty_server() {
    let mut cfg = config_with("trust", "");
    cfg.databases.get_mut("bench").unwrap().pool_size = Some(1);
    let b = broker(cfg).await;
    let mut s = logged_in(b.local_addr()).await;
    // Half a Query: the server never saw a whole message, but the broker must not trust it.
    send(&mut s, &[b'Q', 0, 0, 0, 100, b'S', b'E']).await;
    drop(s);
    other_client_still_works(b.local_addr()).await;
}

#[tokio::test]
async fn random_bytes_from_many_clients_never_take_the_broker_down() {
    let b = broker(config_with("trust", "")).await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..40 {
        let mut s = raw(b.local_addr()).await;
        let mut junk = vec![0u8; 16 + round * 7];
        for byte in &mut junk {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        if round % 2 == 0 {
            // A valid startup first, then junk as protocol messages.
            let pkt = startup_packet(&[("user", "postgres"), ("database", "bench")]);
            let _ = s.write_all(&pkt).await;
        }
        let _ = s.write_all(&junk).await;
        let _ = read_until_close(&mut s, Duration::from_millis(200)).await;
    }
    other_client_still_works(b.local_addr()).await;
}
