//! Threat: either peer of the relay. After login, every byte from clients and servers goes
//! through `Pipe::scan`, which trusts nothing but a tag and a length field. A panic, an
//! over-long message let past `max_packet_size`, bytes approved that were never read (or
//! forwarded twice, or left behind when a message is dropped or replaced), or framing that
//! depends on how TCP happened to split the stream would let one peer crash the broker,
//! desynchronise the other side's protocol state, or smuggle messages past the tags the
//! broker inspects (ReadyForQuery, Terminate, ...).
//!
//! Input: `[flags, chunking, drop_tag, stop_tag, replace_tag, chunk sizes..., stream...]`; the
//! stream is fed to a `Pipe` in chunks of the given sizes (cycled), and what comes out is
//! checked against a model built from the callback's decisions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbroker::proto::frame::{FrameError, HEADER_LEN};
use pgbroker::session::pipe::{Action, Pipe};

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
        let tag = |t: u8| (t != 0).then_some(t);
        Some(Plan {
            max_len: MAX_LENS[usize::from(flags & 3)],
            short_writes: flags & 4 != 0,
            whole_sel: flags >> 3,
            drop_tag: tag(drop_tag),
            stop_tag: tag(stop_tag),
            replace_tag: tag(replace_tag),
            sizes: sizes_raw.iter().map(|&b| (usize::from(b) + 1) << scale).collect(),
            stream: &rest[count..],
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

/// Checks what the scanner hands to the callback; returns true when `msg` is a whole message
/// (as opposed to the header of a streamed one).
fn check_message(plan: &Plan, tag: u8, msg: &[u8]) -> bool {
    assert!(msg.len() >= HEADER_LEN, "message shorter than a header");
    assert_eq!(msg[0], tag, "tag does not match the first byte");
    let raw = i32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
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
                    let record = Seen::Stop { streamed: !whole };
                    (Action::Stop, record)
                } else if !whole {
                    // Drop and Replace do not apply to streamed messages.
                    let action = match plan.drop_tag == Some(tag) {
                        true => Action::Drop,
                        false => Action::Forward,
                    };
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
        let rest = &stream[at..];
        let header = rest.get(..HEADER_LEN).expect("callback for a message without a header");
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize + 1;
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

fuzz_target!(|data: &[u8]| {
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
});
