//! The bodies of the cargo-fuzz targets in `fuzz/fuzz_targets/`, one function per target.
//!
//! They live in the library so that `tests/fuzz_corpus.rs` replays the committed corpus
//! (`fuzz/corpus/<target>/`) through exactly the code the fuzzer runs, on stable Rust, in a
//! plain `cargo test`. Each function takes any bytes, returns nothing, and panics only when an
//! invariant breaks; the threat each one defends against is described at the top of its
//! target file. Not an API.

use crate::auth::scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer};
use crate::config::Config;
use crate::config::userlist::{ScramSecret, Secret, Userlist};
use crate::events::{EVENTS_CHANNEL, METRICS_CHANNEL};
use crate::notify::command::{self, BROKER_CHANNEL_PREFIX, Command};
use crate::notify::glob_match;
use crate::proto::check_channel;
use crate::proto::frame::{FrameError, HEADER_LEN};
use crate::proto::startup::{self, Packet};
use crate::session::pipe::{Action, Pipe};
use std::sync::{Arc, OnceLock};

// ---------------------------------------------------------------------------------------------
// decode_startup

/// Startup-phase packet parser: input is the 4-byte length prefix followed by the body.
/// Accepted StartupMessage parameters must be free of NUL bytes.
pub fn decode_startup(data: &[u8]) {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    if let Ok(len) = startup::body_len(*prefix) {
        // The session reads exactly `len` more bytes; a short input is a truncated read.
        if let Some(body) = rest.get(..len)
            && let Ok(Packet::Startup(startup)) = startup::parse(body)
        {
            for (name, value) in &startup.params {
                assert!(!name.is_empty(), "empty parameter name accepted");
                assert!(!name.contains('\0'), "NUL in parameter name {name:?}");
                assert!(!value.contains('\0'), "NUL in parameter value {value:?}");
            }
            for option in &startup.protocol_options {
                assert!(!option.contains('\0'), "NUL in protocol option {option:?}");
            }
        }
    }
    // Parsing the body on its own, whatever the prefix said, must not panic either.
    let _ = startup::parse(rest);
}

// ---------------------------------------------------------------------------------------------
// frame_scanner

const MAX_LENS: [usize; 4] = [1 << 20, 20_000, 100, 3];

struct Plan<'a> {
    max_len: usize,
    /// Consume only half of the approved bytes after a scan (a short write).
    short_writes: bool,
    whole_sel: u8,
    drop_tag: Option<u8>,
    stop_tag: Option<u8>,
    replace_tag: Option<u8>,
    sizes: Vec<usize>,
    stream: &'a [u8],
}

impl<'a> Plan<'a> {
    fn decode(data: &'a [u8]) -> Option<Plan<'a>> {
        let (&[flags, chunking, drop_tag, stop_tag, replace_tag], rest) = data.split_first_chunk::<5>()?;
        let count = usize::from(chunking & 0x0f);
        let scale = (chunking >> 4) & 7;
        let sizes_raw = rest.get(..count)?;
        let stream = rest.get(count..)?;
        let tag = |t: u8| (t != 0).then_some(t);
        Some(Plan {
            max_len: MAX_LENS[usize::from(flags & 3)],
            short_writes: flags & 4 != 0,
            whole_sel: flags >> 3,
            drop_tag: tag(drop_tag),
            stop_tag: tag(stop_tag),
            replace_tag: tag(replace_tag),
            sizes: sizes_raw.iter().map(|&b| (usize::from(b) + 1) << scale).collect(),
            stream,
        })
    }

    /// Tags that must be delivered whole: ReadyForQuery plus a fuzzer-chosen class.
    fn whole(&self, tag: u8) -> bool {
        tag == b'Z' || (tag ^ self.whole_sel) & 0x1f == 0 || (self.whole_sel & 0x10 != 0 && tag & 1 == 0)
    }

    fn chunks(&self) -> impl Iterator<Item = &'a [u8]> {
        let sizes = if self.sizes.is_empty() { vec![self.stream.len().max(1)] } else { self.sizes.clone() };
        let mut rest = self.stream;
        sizes.into_iter().cycle().map_while(move |n| {
            if rest.is_empty() {
                return None;
            }
            let (head, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            Some(head)
        })
    }
}

/// What the callback saw and decided, in order.
enum Seen {
    /// A whole message: forwarded (`Some` of itself), dropped (`Some(empty)`), or replaced.
    Whole(Vec<u8>),
    /// The header of a long message streamed through unchanged.
    Streamed,
    /// Stop on a whole message (nothing of it goes out) or a streamed one (what was buffered
    /// of it goes out).
    Stop { streamed: bool },
}

/// Outcome of relaying a stream: the bytes written out and how scanning ended.
struct Run {
    forwarded: Vec<u8>,
    seen: Vec<Seen>,
    end: Result<bool, FrameError>,
    drained: bool,
}

/// The length field of a message whose header was checked to be there.
fn length_field(header: &[u8]) -> i32 {
    match header.get(1..HEADER_LEN).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
        Some(b) => i32::from_be_bytes(b),
        None => panic!("message of {} bytes has no header", header.len()),
    }
}

/// Checks what the scanner hands to the callback; returns true when `msg` is a whole message
/// (as opposed to the header of a streamed one).
fn check_message(plan: &Plan, tag: u8, msg: &[u8]) -> bool {
    assert!(msg.len() >= HEADER_LEN, "message shorter than a header");
    assert_eq!(msg[0], tag, "tag does not match the first byte");
    let raw = length_field(msg);
    assert!(raw >= 4, "length field {raw} below 4 accepted");
    let body_len = raw as usize;
    assert!(body_len <= plan.max_len, "message of {body_len} bytes reported with max_len {}", plan.max_len);
    if msg.len() == body_len + 1 {
        return true;
    }
    assert_eq!(msg.len(), HEADER_LEN, "partial message that is not just a header");
    assert!(!plan.whole(tag), "tag {tag:#04x} must be delivered whole but was streamed");
    false
}

/// The replacement for a message: nothing, itself, or itself twice (shrink, same, grow).
fn replacement(msg: &[u8]) -> Vec<u8> {
    msg.repeat(msg.len() % 3)
}

fn relay<'a>(plan: &Plan, chunks: impl Iterator<Item = &'a [u8]>, forward_all: bool) -> Run {
    let mut pipe = Pipe::new(plan.max_len);
    let mut run = Run { forwarded: Vec::new(), seen: Vec::new(), end: Ok(false), drained: true };
    let mut fed = 0usize;
    let mut inserted = 0usize;
    for chunk in chunks {
        pipe.read_buf().extend_from_slice(chunk);
        fed += chunk.len();
        let seen = &mut run.seen;
        run.end = pipe.scan(
            |t| plan.whole(t),
            |tag, msg, out| {
                assert!(out.is_empty(), "scratch buffer not empty: {} bytes", out.len());
                let whole = check_message(plan, tag, msg);
                if forward_all {
                    return Action::Forward;
                }
                let (action, record) = if plan.stop_tag == Some(tag) {
                    (Action::Stop, Seen::Stop { streamed: !whole })
                } else if !whole {
                    // Drop and Replace do not apply to streamed messages.
                    let action = if plan.drop_tag == Some(tag) { Action::Drop } else { Action::Forward };
                    (action, Seen::Streamed)
                } else if plan.drop_tag == Some(tag) {
                    (Action::Drop, Seen::Whole(Vec::new()))
                } else if plan.replace_tag == Some(tag) {
                    let with = replacement(msg);
                    out.extend_from_slice(&with);
                    inserted += with.len();
                    (Action::Replace, Seen::Whole(with))
                } else {
                    (Action::Forward, Seen::Whole(msg.to_vec()))
                };
                seen.push(record);
                action
            },
        );
        let n = if plan.short_writes { pipe.ready().len() / 2 } else { pipe.ready().len() };
        run.forwarded.extend_from_slice(&pipe.ready()[..n]);
        pipe.consume(n);
        assert!(
            run.forwarded.len() <= fed + inserted,
            "forwarded {} bytes of {fed} fed + {inserted} inserted",
            run.forwarded.len(),
        );
        if !matches!(run.end, Ok(false)) {
            // An error or Stop ends the session.
            break;
        }
    }
    let rest = pipe.ready().len();
    run.forwarded.extend_from_slice(pipe.ready());
    pipe.consume(rest);
    assert!(run.forwarded.len() <= fed + inserted);
    run.drained = pipe.is_empty();
    run
}

/// Rebuilds the expected output from the stream and the callback's decisions. Returns it and,
/// after a Stop on a streamed message, that message: a prefix of it may follow the output.
fn model<'a>(stream: &'a [u8], seen: &[Seen]) -> (Vec<u8>, &'a [u8]) {
    let mut out = Vec::new();
    let mut at = 0;
    for s in seen {
        let rest = stream.get(at..).unwrap_or_default();
        let Some(header) = rest.get(..HEADER_LEN) else {
            panic!("callback for a message without a header at offset {at}");
        };
        let len = length_field(header) as usize + 1;
        let msg = &rest[..len.min(rest.len())];
        match s {
            Seen::Whole(bytes) => out.extend_from_slice(bytes),
            Seen::Streamed => out.extend_from_slice(msg),
            Seen::Stop { streamed: true } => return (out, msg),
            Seen::Stop { streamed: false } => return (out, &[]),
        }
        at += msg.len();
    }
    (out, &[])
}

/// `Pipe::scan` over a message stream: input is
/// `[flags, chunking, drop_tag, stop_tag, replace_tag, chunk sizes..., stream...]`.
pub fn frame_scanner(data: &[u8]) {
    let Some(plan) = Plan::decode(data) else {
        return;
    };

    // Forward, Drop, Replace and Stop as the fuzzer chose, over the fuzzer's chunking: the
    // output must be exactly what those decisions make of the stream.
    let run = relay(&plan, plan.chunks(), false);
    let (expected, partial) = model(plan.stream, &run.seen);
    let ok = run.forwarded.starts_with(&expected)
        && partial.starts_with(&run.forwarded[expected.len().min(run.forwarded.len())..]);
    assert!(
        ok,
        "forwarded {} bytes, model {} (+ up to {} of a streamed message)",
        run.forwarded.len(),
        expected.len(),
        partial.len()
    );

    // Forward-only: chunking must not change what is forwarded or whether framing fails.
    let one = relay(&plan, std::iter::once(plan.stream), true);
    let many = relay(&plan, plan.chunks(), true);
    assert!(plan.stream.starts_with(&one.forwarded), "forwarded bytes are not a prefix of the stream");
    assert_eq!(one.end, many.end, "framing outcome depends on chunking");
    assert!(
        one.forwarded == many.forwarded,
        "one chunk forwarded {} bytes, many chunks {}",
        one.forwarded.len(),
        many.forwarded.len()
    );
    if one.end.is_ok() {
        assert_eq!(
            one.drained,
            one.forwarded.len() == plan.stream.len(),
            "buffer emptiness disagrees with bytes forwarded"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// scram_server

/// PBKDF2 with 4096 iterations costs milliseconds: derive the verifier once per process.
fn scram_secret() -> Arc<ScramSecret> {
    static SECRET: OnceLock<Arc<ScramSecret>> = OnceLock::new();
    let init = || Arc::new(ScramSecret::derive(b"pencil", b"fuzz-salt-16byte", 4096));
    Arc::clone(SECRET.get_or_init(init))
}

fn scram(plus: bool) -> ScramServer {
    let (mech, cb) = if plus { (SCRAM_SHA_256_PLUS, Some(vec![0xab; 32])) } else { (SCRAM_SHA_256, None) };
    match ScramServer::new(scram_secret(), mech, cb) {
        Ok(s) => s,
        Err(e) => panic!("cannot start {mech}: {e}"),
    }
}

/// Runs client-final and checks the outcome; nobody can know the random server nonce, and
/// without the password no proof can match.
fn scram_finish(srv: &mut ScramServer, msg: &[u8]) {
    let r = srv.handle_client_final(msg);
    assert!(r.is_err(), "client-final accepted without the password: {r:?}");
    assert!(srv.client_key().is_none(), "client key recovered from a failed proof");
    // The exchange is over whatever happened: anything more is out of order.
    assert_eq!(srv.handle_client_final(msg), Err(ScramError::OutOfOrder));
    assert_eq!(srv.handle_client_first(msg), Err(ScramError::OutOfOrder));
}

/// SCRAM-SHA-256 server exchange: the first byte picks the split point and mode; the rest is
/// client-first + client-final, or (bit 0x40) only client-final after a valid client-first.
pub fn scram_server(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let plus = ctl & 0x80 != 0;
    let mut srv = scram(plus);
    if ctl & 0x40 != 0 {
        // Valid client-first; only the final message is fuzzed.
        let first: &[u8] = if plus { b"p=tls-server-end-point,,n=,r=abc" } else { b"n,,n=,r=abc" };
        let reply = srv.handle_client_first(first);
        assert!(reply.is_ok(), "valid client-first refused: {reply:?}");
        scram_finish(&mut srv, rest);
        return;
    }
    let split = (usize::from(ctl & 0x3f) * rest.len()) / 0x3f;
    let (first, last) = rest.split_at(split.min(rest.len()));
    match srv.handle_client_first(first) {
        Ok(reply) => {
            let text = match String::from_utf8(reply) {
                Ok(t) => t,
                Err(e) => panic!("server-first is not UTF-8: {e}"),
            };
            assert!(text.starts_with("r="), "server-first {text:?}");
            assert!(text.ends_with(",i=4096"), "server-first {text:?}");
            scram_finish(&mut srv, last);
        }
        Err(_) => assert_eq!(srv.handle_client_final(last), Err(ScramError::OutOfOrder)),
    }
}

// ---------------------------------------------------------------------------------------------
// userlist

const USERLIST_MAX_LEN: usize = 512;
const USERLIST_MAX_LINES: usize = 3;

/// `Debug` of a cleartext-password entry whose password appears nowhere in it.
fn reference_debug() -> &'static str {
    static DEBUG: OnceLock<String> = OnceLock::new();
    DEBUG.get_or_init(|| match Userlist::parse("\"u\" \"\x01\"") {
        Ok(list) => format!("{:?}", list.get("u")),
        Err(e) => panic!("reference userlist refused: {e}"),
    })
}

/// Auth file parser: input is UTF-8 text of at most 512 bytes and 3 lines (each cleartext
/// password costs one 4096-iteration PBKDF2).
pub fn userlist(data: &[u8]) {
    if data.len() > USERLIST_MAX_LEN {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    if lines > USERLIST_MAX_LINES {
        return;
    }
    let Ok(list) = Userlist::parse(text) else {
        return;
    };
    assert!(list.len() <= lines, "{} users from {lines} lines", list.len());
    assert_eq!(list.users().count(), list.len());
    for user in list.users() {
        let Some(entry) = list.get(user) else {
            panic!("listed user {user:?} has no entry");
        };
        match &entry.secret {
            Secret::Plain(p) if p.is_empty() => {
                assert!(entry.scram.is_none(), "empty password got a SCRAM verifier");
            }
            Secret::Plain(p) => {
                let scram = entry.scram.as_deref();
                assert_eq!(scram.map(|s| s.iterations), Some(4096));
                assert_eq!(entry.password(), Some(p.as_str()));
                let shown = format!("{:?}", Some(entry));
                if !reference_debug().contains(p.as_str()) {
                    assert!(!shown.contains(p.as_str()), "password leaked: {shown}");
                }
            }
            Secret::Md5(_) => {
                assert!(entry.scram.is_none(), "md5 secret got a SCRAM verifier");
                assert_eq!(entry.password(), None);
            }
            Secret::Scram(s) => {
                assert!(s.iterations > 0 && !s.salt.is_empty(), "degenerate verifier");
                assert_eq!(entry.scram.as_deref(), Some(s));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config

const CONFIG_MAX_LEN: usize = 4096;

/// `Config::parse` reads `auth.file`. Inputs naming an absolute path or leaving the current
/// directory are skipped so the fuzzer cannot make it read /dev/zero, a FIFO, or the
/// developer's files; relative paths (resolved in the current directory) are still exercised.
fn reads_outside(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(file) = table.get("auth").and_then(|a| a.get("file")).and_then(|f| f.as_str()) else {
        return false;
    };
    let path = std::path::Path::new(file);
    path.has_root()
        || path.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::Prefix(_)))
        || file.contains(['\0', '~'])
}

/// Config file parser: input is UTF-8 TOML of at most 4 KiB, parsed with no path and an
/// empty environment. Any input yields a `Config` or a `ConfigError`, never a panic.
pub fn config(data: &[u8]) {
    if data.len() > CONFIG_MAX_LEN {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if reads_outside(text) {
        return;
    }
    if let Ok(config) = Config::parse(text, None, &|_| None) {
        // Rendering the validated settings (what `pgbroker check` prints) must not panic either.
        let _ = config.describe();
    }
}

// ---------------------------------------------------------------------------------------------
// ws_json

/// Token patterns the restricted runs use, with an oracle for each written without
/// `glob_match`.
const WS_PATTERNS: [&str; 3] = ["orders.*", "*.audit", EVENTS_CHANNEL];

fn ws_pattern_oracle(ch: &str) -> bool {
    ch.starts_with("orders.") || (ch.len() >= ".audit".len() && ch.ends_with(".audit")) || ch == EVENTS_CHANNEL
}

/// The error codes a refused frame may carry.
const WS_CODES: [&str; 3] = ["bad_request", "bad_channel", "forbidden_channel"];

/// Checks a refusal's reply is the JSON error object the client is promised.
fn ws_check_refusal(refusal: &command::Refusal) {
    assert!(WS_CODES.contains(&refusal.code), "unknown error code {:?}", refusal.code);
    let reply = refusal.to_json();
    let value = match serde_json::from_str::<serde_json::Value>(&reply) {
        Ok(v) => v,
        Err(e) => panic!("error reply is not JSON ({e}): {reply:?}"),
    };
    assert_eq!(value["type"], "error", "{reply}");
    assert_eq!(value["code"], refusal.code, "{reply}");
    assert_eq!(value["message"], refusal.message.as_str(), "{reply}");
}

/// Checks one channel a subscribe let through.
fn ws_check_accepted(ch: &str, restricted: bool) {
    if ch.starts_with(BROKER_CHANNEL_PREFIX) {
        assert!(ch == EVENTS_CHANNEL || ch == METRICS_CHANNEL, "unknown broker channel {ch:?} accepted");
    } else {
        assert!(check_channel(ch).is_ok(), "invalid channel {ch:?} accepted");
        assert!(!ch.is_empty() && ch.len() <= crate::proto::MAX_CHANNEL_LEN && !ch.contains('\0'));
        // The listener sends `LISTEN <escaped>`: it must be one quoted identifier naming
        // exactly this channel, whatever quotes the name holds.
        let ident = postgres_protocol::escape::escape_identifier(ch);
        let inner = ident.strip_prefix('"').and_then(|s| s.strip_suffix('"'));
        let Some(inner) = inner else {
            panic!("LISTEN identifier {ident:?} is not quoted");
        };
        assert!(!inner.replace("\"\"", "").contains('"'), "lone quote in identifier {ident:?}");
        assert_eq!(inner.replace("\"\"", "\""), ch, "identifier {ident:?} names another channel");
    }
    if restricted {
        assert!(ws_pattern_oracle(ch), "channel {ch:?} accepted outside the token's patterns");
    }
    // Patterns that must match any accepted name (the fuzzer's names as glob patterns).
    assert!(glob_match("*", ch) && glob_match("**", ch));
    assert!(glob_match(&format!("{ch}*"), ch) && glob_match(&format!("*{ch}"), ch));
    if !ch.contains('*') {
        assert!(glob_match(ch, ch), "{ch:?} does not match itself");
        assert!(!glob_match(ch, &format!("{ch}x")), "{ch:?} matches a longer name");
    }
}

/// WebSocket bridge command parser: input is one client text frame (non-UTF-8 inputs are
/// skipped, as the WebSocket layer refuses them). Parsed with no token, a token with fixed
/// patterns, and a token allowing nothing.
pub fn ws_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let patterns: Vec<String> = WS_PATTERNS.iter().map(|p| p.to_string()).collect();
    let open = command::parse(text, None);
    let restricted = command::parse(text, Some(&patterns));
    let nothing = command::parse(text, Some(&[][..]));
    for (result, is_restricted) in [(&open, false), (&restricted, true), (&nothing, true)] {
        match result {
            Ok(Command::Subscribe { broker, database, .. }) => {
                assert!(!broker.is_empty() || !database.is_empty(), "subscribe to no channel accepted");
                assert!(broker.iter().all(|c| c.starts_with(BROKER_CHANNEL_PREFIX)));
                assert!(!database.iter().any(|c| c.starts_with(BROKER_CHANNEL_PREFIX)));
                for ch in broker.iter().chain(database) {
                    ws_check_accepted(ch, is_restricted);
                }
            }
            Ok(Command::Unsubscribe(_) | Command::Ping) => {}
            Err(refusal) => ws_check_refusal(refusal),
        }
    }
    assert!(!matches!(nothing, Ok(Command::Subscribe { .. })), "a token allowing nothing subscribed");
    // A token only ever takes channels away: what it accepts is accepted the same without one,
    // a refusal that is not about the token is the same without one, and outcomes that do not
    // depend on the channels (anything but a subscribe, a bad request) do not depend on it.
    if restricted.is_ok() {
        assert_eq!(restricted, open, "the token changed an accepted command");
    }
    for result in [&restricted, &nothing] {
        if let Err(refusal) = result
            && refusal.code != "forbidden_channel"
        {
            assert_eq!(result, &open, "the token changed a refusal that was not about the token");
        }
    }
    let about_channels =
        matches!(&open, Ok(Command::Subscribe { .. }) | Err(command::Refusal { code: "bad_channel", .. }));
    if !about_channels {
        assert_eq!(restricted, open, "the token changed an outcome that does not depend on channels");
        assert_eq!(nothing, open, "the empty token changed an outcome that does not depend on channels");
    }
}

// ---------------------------------------------------------------------------------------------
// message_scanner, ws_frames

mod message_scanner;
mod ws_frames;
pub use message_scanner::message_scanner;
pub use ws_frames::ws_frames;
