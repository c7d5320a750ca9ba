//! `ws_frames`: the WebSocket bridge's frame path. The fuzzer's bytes are what a client sends
//! after the upgrade; they go through hyper, axum's `WebSocketUpgrade` with the bridge's own
//! limits (`ws::limits`) and tungstenite, over an in-memory duplex on a current-thread
//! runtime, to a loop that answers like the bridge's. What the server yields is checked
//! against a reference reading of RFC 6455 (as tungstenite applies it, server side).

use crate::notify::command::{self, Command};
use crate::notify::json;
use crate::notify::ws::{self, MAX_CLIENT_MESSAGE};
use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::BTreeSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The client's half of the handshake.
const UPGRADE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: pgbroker\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
/// Room in each direction of the in-memory connection.
const DUPLEX_BUF: usize = 64 * 1024;
/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;
/// The `connection_ack` the bridge sends first; any id will do.
const ACK_ID: u64 = 1;

/// A message the server side yielded (or, for the reference, must yield).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// How the server side's stream of messages ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The client closed; the bridge stops reading.
    Closed,
    /// The stream ended with this error (its text).
    Error(String),
    /// The stream ended without an error.
    Ended,
}

/// What the bridge-like loop saw and sent.
struct Served {
    got: Vec<Got>,
    end: End,
    /// Text replies sent, the ack first.
    replies: Vec<String>,
}

/// Why the reference says the stream must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The input ran out, between frames or inside one.
    Eof,
    /// The client sent a Close.
    Closed,
    /// A frame or message over `MAX_CLIENT_MESSAGE`, refused from its header.
    TooLong,
    /// Text that is not UTF-8.
    Utf8,
    /// Any other protocol violation (unmasked, reserved bits or opcodes, control frame
    /// rules, a continuation out of place).
    Protocol,
}

/// A frame header read from `rest`; `None` when the input ends inside it.
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    size: usize,
}

fn parse_header(rest: &[u8]) -> Option<Header> {
    let (&[b0, b1], after) = rest.split_first_chunk::<2>()?;
    let (len, ext) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(*after.first_chunk::<2>()?)), 2),
        127 => (u64::from_be_bytes(*after.first_chunk::<8>()?), 8),
        n => (u64::from(n), 0),
    };
    let mask = if b1 & 0x80 != 0 { Some(*after.get(ext..)?.first_chunk::<4>()?) } else { None };
    let size = 2 + ext + if mask.is_some() { 4 } else { 0 };
    Some(Header { fin: b0 & 0x80 != 0, rsv: b0 & 0x70, opcode: b0 & 0x0f, mask, len, size })
}

/// True when `bytes` may still become UTF-8 with more bytes after them.
fn utf8_so_far(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).map_or_else(|e| e.error_len().is_none(), |_| true)
}

/// The messages a server must yield for `data`, and why it stops.
fn reference(data: &[u8]) -> (Vec<Got>, Expect) {
    let mut got = Vec::new();
    // A fragmented message: text or not, and its bytes so far.
    let mut partial: Option<(bool, Vec<u8>)> = None;
    let mut rest = data;
    loop {
        let Some(h) = parse_header(rest) else { return (got, Expect::Eof) };
        if matches!(h.opcode, 3..=7 | 11..=15) {
            return (got, Expect::Protocol);
        }
        if h.len > MAX_CLIENT_MESSAGE as u64 {
            return (got, Expect::TooLong);
        }
        let len = h.len as usize;
        let Some(payload) = rest.get(h.size..h.size + len) else { return (got, Expect::Eof) };
        rest = &rest[h.size + len..];
        let Some(mask) = h.mask else { return (got, Expect::Protocol) };
        let payload: Vec<u8> = payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        if h.rsv != 0 {
            return (got, Expect::Protocol);
        }
        if h.opcode >= 8 && (!h.fin || len > MAX_CONTROL) {
            return (got, Expect::Protocol);
        }
        match h.opcode {
            8 => {
                let close = match payload.len() {
                    0 => None,
                    1 => return (got, Expect::Protocol),
                    _ => {
                        let Ok(reason) = String::from_utf8(payload[2..].to_vec()) else { return (got, Expect::Utf8) };
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        // Codes a peer may not send are reported as a protocol error.
                        let allowed = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
                        Some(if allowed { (code, reason) } else { (1002, "Protocol violation".to_string()) })
                    }
                };
                got.push(Got::Close(close));
                return (got, Expect::Closed);
            }
            9 => got.push(Got::Ping(payload)),
            10 => got.push(Got::Pong(payload)),
            0 => {
                let Some((text, mut bytes)) = partial.take() else { return (got, Expect::Protocol) };
                if bytes.len() + len > MAX_CLIENT_MESSAGE {
                    return (got, Expect::TooLong);
                }
                bytes.extend_from_slice(&payload);
                if text && !utf8_so_far(&bytes) {
                    return (got, Expect::Utf8);
                }
                if !h.fin {
                    partial = Some((text, bytes));
                } else if !text {
                    got.push(Got::Binary(bytes));
                } else {
                    let Ok(s) = String::from_utf8(bytes) else { return (got, Expect::Utf8) };
                    got.push(Got::Text(s));
                }
            }
            _ => {
                if partial.is_some() {
                    return (got, Expect::Protocol);
                }
                let text = h.opcode == 1;
                if !h.fin {
                    if text && !utf8_so_far(&payload) {
                        return (got, Expect::Utf8);
                    }
                    partial = Some((text, payload));
                } else if !text {
                    got.push(Got::Binary(payload));
                } else {
                    let Ok(s) = String::from_utf8(payload) else { return (got, Expect::Utf8) };
                    got.push(Got::Text(s));
                }
            }
        }
    }
}

/// The bridge's answer to a text frame, with no database listener and no App: `command`
/// in `notify::ws` with the broker's own channels counted as subscribed.
fn reply(text: &str, reserved: &mut BTreeSet<String>) -> String {
    let reply = match command::parse(text, None) {
        Err(refusal) => refusal.to_json(),
        Ok(Command::Subscribe { broker, database, .. }) => {
            reserved.extend(broker);
            if database.is_empty() {
                json::channels("subscribed", &reserved.iter().cloned().collect::<Vec<_>>())
            } else {
                json::error("unavailable", "no listener")
            }
        }
        Ok(Command::Unsubscribe(channels)) => {
            match channels {
                None => reserved.clear(),
                Some(chs) => reserved.retain(|c| !chs.contains(c)),
            }
            json::channels("unsubscribed", &reserved.iter().cloned().collect::<Vec<_>>())
        }
        Ok(Command::Ping) => json::pong(),
    };
    let value: serde_json::Value = match serde_json::from_str(&reply) {
        Ok(v) => v,
        Err(e) => panic!("reply is not JSON ({e}): {reply:?}"),
    };
    let kind = value["type"].as_str().unwrap_or_default();
    assert!(["subscribed", "unsubscribed", "pong", "error"].contains(&kind), "reply {reply}");
    reply
}

/// The server side: the ack, then every message read and answered as the bridge does
/// (`ws::session_loop`), until a Close, an error or the end.
async fn bridge(mut socket: WebSocket, done: mpsc::UnboundedSender<Served>) {
    let mut served = Served { got: Vec::new(), end: End::Ended, replies: vec![json::ack(ACK_ID)] };
    let mut reserved = BTreeSet::new();
    let ack = Message::Text(json::ack(ACK_ID).into());
    let mut sent = socket.send(ack).await;
    while sent.is_ok() {
        let answer = match socket.recv().await {
            Some(Ok(Message::Text(text))) => {
                served.got.push(Got::Text(text.to_string()));
                reply(&text, &mut reserved)
            }
            Some(Ok(Message::Binary(bytes))) => {
                served.got.push(Got::Binary(bytes.to_vec()));
                json::error("bad_request", "send JSON text messages")
            }
            Some(Ok(Message::Ping(p))) => {
                served.got.push(Got::Ping(p.to_vec()));
                continue;
            }
            Some(Ok(Message::Pong(p))) => {
                served.got.push(Got::Pong(p.to_vec()));
                continue;
            }
            Some(Ok(Message::Close(c))) => {
                served.got.push(Got::Close(c.map(|c| (c.code, c.reason.to_string()))));
                served.end = End::Closed;
                break;
            }
            Some(Err(e)) => {
                served.end = End::Error(e.to_string());
                break;
            }
            None => break,
        };
        served.replies.push(answer.clone());
        sent = socket.send(Message::Text(answer.into())).await;
    }
    if let Err(e) = sent {
        panic!("a reply could not be sent: {e}");
    }
    let _ = done.send(served);
}

/// Runs the handshake and `data` through the server stack; returns what it served and every
/// byte it wrote after the 101 response.
async fn exchange(data: &[u8]) -> (Served, Vec<u8>) {
    let (client, server) = tokio::io::duplex(DUPLEX_BUF);
    let (done, mut served) = mpsc::unbounded_channel();
    let route = get(move |upgrade: WebSocketUpgrade| {
        let done = done.clone();
        async move { ws::limits(upgrade).on_upgrade(move |socket| bridge(socket, done)) }
    });
    let router = Router::new().route("/", route);
    let service = hyper::service::service_fn(move |req| {
        let mut router = router.clone();
        tower_service::Service::call(&mut router, req)
    });
    let conn = tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(server), service).with_upgrades());
    let (mut rd, mut wr) = tokio::io::split(client);
    if let Err(e) = wr.write_all(UPGRADE_REQUEST).await {
        panic!("cannot send the upgrade request: {e}");
    }
    let mut head = Vec::new();
    let frames_at = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match rd.read_buf(&mut head).await {
            Ok(0) | Err(_) => panic!("no upgrade response: {:?}", String::from_utf8_lossy(&head)),
            Ok(_) => {}
        }
    };
    assert!(head.starts_with(b"HTTP/1.1 101 "), "upgrade refused: {:?}", String::from_utf8_lossy(&head));
    let mut out = head.split_off(frames_at);
    let reader = tokio::spawn(async move {
        // Until the server drops its end.
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    // The server may stop reading early (an error): then the rest cannot be written.
    let _ = wr.write_all(data).await;
    let _ = wr.shutdown().await;
    let Some(served) = served.recv().await else { panic!("the WebSocket task ended without a result (panicked?)") };
    let out = match reader.await {
        Ok(out) => out,
        Err(e) => panic!("reader failed: {e}"),
    };
    drop(wr);
    if let Ok(Err(e)) = conn.await {
        panic!("HTTP connection failed: {e}");
    }
    (served, out)
}

/// The frames the server wrote: each final, unmasked, without reserved bits, and a text,
/// pong or close frame; returns the texts and pong payloads.
fn server_frames(mut out: &[u8]) -> (Vec<String>, Vec<Vec<u8>>) {
    let (mut texts, mut pongs) = (Vec::new(), Vec::new());
    while !out.is_empty() {
        let Some(h) = parse_header(out) else { panic!("server wrote a truncated frame header") };
        assert!(h.mask.is_none(), "server frame is masked");
        assert!(h.fin && h.rsv == 0, "server frame fragmented or with reserved bits");
        let Some(payload) = out.get(h.size..h.size.saturating_add(h.len as usize)) else {
            panic!("server wrote a truncated frame")
        };
        match h.opcode {
            1 => match std::str::from_utf8(payload) {
                Ok(s) => texts.push(s.to_string()),
                Err(e) => panic!("server text frame is not UTF-8: {e}"),
            },
            10 => pongs.push(payload.to_vec()),
            8 => assert!(payload.len() != 1 && payload.len() <= MAX_CONTROL, "bad close frame from server"),
            op => panic!("server sent opcode {op}"),
        }
        out = &out[h.size + h.len as usize..];
    }
    (texts, pongs)
}

/// WebSocket frames from a client after the upgrade: input is the raw byte stream.
pub fn ws_frames(data: &[u8]) {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    let (served, out) = rt.block_on(exchange(data));
    let (want, why) = reference(data);

    for g in &served.got {
        let (size, most) = match g {
            Got::Text(t) => (t.len(), MAX_CLIENT_MESSAGE),
            Got::Binary(b) => (b.len(), MAX_CLIENT_MESSAGE),
            Got::Ping(p) | Got::Pong(p) => (p.len(), MAX_CONTROL),
            Got::Close(c) => (c.as_ref().map_or(0, |(_, r)| r.len() + 2), MAX_CONTROL),
        };
        assert!(size <= most, "message of {size} bytes yielded, over {most}: {g:?}");
    }
    assert!(served.got == want, "yielded {:?}\nexpected {:?}", served.got, want);
    match (why, &served.end) {
        (Expect::Closed, End::Closed) => {}
        (Expect::TooLong, End::Error(e)) => {
            // Refused from the header: the stream did not wait for the payload.
            assert!(e.contains("Message too long"), "over-limit frame ended with {e:?}");
        }
        (Expect::Utf8, End::Error(e)) => assert!(e.contains("UTF-8"), "bad text ended with {e:?}"),
        (Expect::Protocol, End::Error(e)) => {
            assert!(!e.contains("without closing handshake"), "violation waited for the end of input: {e:?}");
        }
        (Expect::Eof, End::Error(e)) => assert!(e.contains("without closing handshake"), "end of input gave {e:?}"),
        (why, end) => panic!("expected the stream to end with {why:?}, it ended with {end:?}"),
    }

    let (texts, pongs) = server_frames(&out);
    assert_eq!(texts, served.replies, "the texts written are not the replies sent");
    // Pings are answered in order; one not yet answered when the next came may be dropped.
    let pings: Vec<&Vec<u8>> =
        served.got.iter().filter_map(|g| if let Got::Ping(p) = g { Some(p) } else { None }).collect();
    let mut pending = pings.iter();
    for pong in &pongs {
        assert!(pending.any(|p| *p == pong), "pong {pong:?} answers no ping");
    }
}
