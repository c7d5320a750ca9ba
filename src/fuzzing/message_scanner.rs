//! `message_scanner`: the client relay's `Pipe` under the hold limit
//! (`broker.max_buffered_message`), read and written the way `relay::poll_fill` and the
//! client loop do, checked against a reference walk of the stream.

use crate::proto::frame::{FrameError, HEADER_LEN, STREAM_THRESHOLD};
use crate::proto::tag;
use crate::session::pipe::{Action, HIGH_WATER, Pipe, READ_CHUNK};
use crate::session::prepared::Prepared;

/// Hold limits (length field values): below the streaming threshold, where a message up to
/// 16 KiB is held whole anyway; at and around the config minimum (16384); above it.
const HOLDS: [usize; 8] = [16, 100, 4096, 16_383, 16_384, 20_000, 70_000, 16 << 20];
/// `max_packet_size` values: the default, and smaller ones so `TooLong` meets the hold limit.
const MAX_LENS: [usize; 4] = [(1 << 30) - 1, 200_000, 30_000, 1024];
/// Longest stream one input builds, so one run stays in the milliseconds.
const MAX_STREAM: usize = 256 * 1024;

/// Tags that may be streamed when past the hold limit. A fn pointer, as `Pipe::hold_limit`
/// takes: the first two are the client loop's (`client_loop::streamable`, with and without
/// statement names rewritten), the others odd classes.
const STREAMABLE: [fn(u8) -> bool; 5] =
    [|t| t == tag::QUERY, |t| t == tag::QUERY || t == tag::PARSE, |_| false, |_| true, |t| t & 1 == 0];

struct Plan {
    hold: usize,
    max_len: usize,
    short_writes: bool,
    may_stream: fn(u8) -> bool,
    /// 0: the loop inspecting settings (Terminate, Query, Parse); 1: also prepared statements;
    /// 2: Terminate only; 3: a fuzzer-chosen class.
    whole_mode: u8,
    whole_sel: u8,
    /// Read sizes, cycled; `usize::MAX` = whatever the buffer has room for.
    sizes: Vec<usize>,
    stream: Vec<u8>,
}

impl Plan {
    /// `[flags, classes, whole_sel, chunking, chunk sizes..., ops...]`.
    fn decode(data: &[u8]) -> Option<Plan> {
        let (&[flags, classes, whole_sel, chunking], rest) = data.split_first_chunk::<4>()?;
        let count = usize::from(chunking & 0x0f);
        let scale = (chunking >> 4) & 0x0f;
        let sizes = rest.get(..count)?.iter().map(|&b| (usize::from(b) + 1) << scale).collect();
        let hold = HOLDS[usize::from(flags & 7)];
        Some(Plan {
            hold,
            max_len: MAX_LENS[usize::from((flags >> 3) & 3)],
            short_writes: flags & 0x20 != 0,
            may_stream: STREAMABLE[usize::from(classes & 7) % STREAMABLE.len()],
            whole_mode: (classes >> 3) & 3,
            whole_sel,
            sizes,
            stream: build_stream(rest.get(count..)?, hold),
        })
    }

    /// Tags the loop asks whole (see `client_loop::scan_client`).
    fn whole(&self, t: u8) -> bool {
        let inspect = t == tag::TERMINATE || t == tag::QUERY || t == tag::PARSE;
        match self.whole_mode {
            0 => inspect,
            1 => inspect || Prepared::needs_whole(t),
            2 => t == tag::TERMINATE,
            _ => (t ^ self.whole_sel) & 0x1f == 0 || (self.whole_sel & 0x20 != 0 && t & 1 == 0),
        }
    }

    /// Most bytes of one message the pipe may hold back unscanned: what it must hold whole
    /// (up to the hold limit) or, for anything else, the streaming threshold.
    fn held_at_most(&self, t: u8, body_len: usize) -> usize {
        if self.whole(t) && body_len <= self.hold { (self.hold + 1).max(STREAM_THRESHOLD) } else { STREAM_THRESHOLD }
    }
}

/// Builds the stream from ops: `00xxxxxx tag size` a message (body filled with the op byte;
/// size picks the length: small, around the hold limit, around the streaming threshold, or
/// large), `01nnnnnn bytes...` n raw bytes, `10ffffff` cut the last message to f/64 of it,
/// `11nnnnnn` repeat the last message n+1 times.
fn build_stream(mut ops: &[u8], hold: usize) -> Vec<u8> {
    let mut stream = Vec::new();
    let mut last = 0..0;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        if stream.len() >= MAX_STREAM {
            break;
        }
        let arg = usize::from(op & 0x3f);
        match op >> 6 {
            0 => {
                let Some((&[t, size], rest)) = ops.split_first_chunk::<2>() else { break };
                ops = rest;
                let v = usize::from(size & 0x3f);
                let field = match size >> 6 {
                    0 => 4 + v,
                    1 => (hold + v).saturating_sub(32).max(4),
                    2 => STREAM_THRESHOLD + v - 33,
                    _ => (v + 1) * 4096 + v,
                };
                let start = stream.len();
                stream.push(t);
                stream.extend_from_slice(&i32::try_from(field).unwrap_or(i32::MAX).to_be_bytes());
                let end = (start + field + 1).min(MAX_STREAM);
                stream.resize(end.max(stream.len()), op);
                last = start..stream.len();
            }
            1 => {
                let n = arg.min(ops.len());
                let start = stream.len();
                stream.extend_from_slice(&ops[..n]);
                ops = &ops[n..];
                last = start..stream.len();
            }
            2 => {
                let keep = last.start + (last.len() * arg) / 64;
                stream.truncate(keep);
                last = last.start..keep;
            }
            _ => {
                let msg = stream[last.clone()].to_vec();
                for _ in 0..=arg {
                    if stream.len() >= MAX_STREAM {
                        break;
                    }
                    stream.extend_from_slice(&msg);
                }
            }
        }
    }
    stream
}

/// The header at `at`: tag and length field.
fn header(stream: &[u8], at: usize) -> Option<(u8, i32)> {
    let h = stream.get(at..at + HEADER_LEN)?;
    Some((h[0], i32::from_be_bytes([h[1], h[2], h[3], h[4]])))
}

/// What relaying the whole stream must come to, whatever the reads: the number of bytes
/// forwarded and the framing error that ended it, if any. A message asked whole past the hold
/// limit and not streamable is refused from its header, before any of it is forwarded; a
/// partial message at the end goes out only if it is streamed.
fn reference(plan: &Plan) -> (usize, Option<FrameError>) {
    let stream = &plan.stream;
    let mut at = 0;
    while let Some((t, raw)) = header(stream, at) {
        if raw < 4 {
            return (at, Some(FrameError::BadLength { tag: t, len: raw }));
        }
        let body_len = raw as usize;
        if body_len > plan.max_len {
            return (at, Some(FrameError::TooLong { tag: t, len: body_len, max: plan.max_len }));
        }
        let asked = plan.whole(t);
        if asked && body_len > plan.hold && !(plan.may_stream)(t) {
            return (at, Some(FrameError::TooLongToHold { tag: t, len: body_len, max: plan.hold }));
        }
        let len = body_len + 1;
        if stream.len() - at >= len {
            at += len;
            continue;
        }
        let held = asked && body_len <= plan.hold;
        return (if len > STREAM_THRESHOLD && !held { stream.len() } else { at }, None);
    }
    (at, None)
}

/// Checks one message handed to the scan callback at stream offset `at`; returns the bytes
/// of the stream it covers.
fn check_callback(plan: &Plan, at: usize, t: u8, msg: &[u8]) -> usize {
    let stream = &plan.stream;
    assert!(stream.get(at..at + msg.len()) == Some(msg), "callback bytes at {at} differ from the stream");
    let Some((_, raw)) = header(msg, 0) else { panic!("callback for {} bytes, no header", msg.len()) };
    assert!(raw >= 4 && raw as usize <= plan.max_len, "length {raw} let through");
    let body_len = raw as usize;
    let asked = plan.whole(t);
    if asked && body_len > plan.hold {
        assert!((plan.may_stream)(t), "tag {t:#04x} of {body_len} bytes past the hold limit {} let through", plan.hold);
    }
    if msg.len() != body_len + 1 {
        assert_eq!(msg.len(), HEADER_LEN, "partial message that is not just a header");
        assert!(!(asked && body_len <= plan.hold), "tag {t:#04x} ({body_len} bytes) must be held whole, was streamed");
        assert!(body_len + 1 > STREAM_THRESHOLD, "message of {body_len} bytes streamed below the threshold");
    }
    body_len + 1
}

/// Relays the stream through a capped pipe: reads only while `wants_read`, each read at most
/// the room `read_buf` offers (as `poll_read_buf` does) and at most the planned size; writes
/// all or half of what is approved. Returns the bytes forwarded and how scanning ended.
fn relay(plan: &Plan, sizes: &[usize]) -> (Vec<u8>, Result<(), FrameError>) {
    let stream = &plan.stream;
    let mut pipe = Pipe::new(plan.max_len).hold_limit(plan.hold, plan.may_stream);
    let most_held = (plan.hold + 1).max(STREAM_THRESHOLD);
    // How far the buffer may grow: what `wants_read` lets it reach plus a read into the room
    // `read_buf` reserved, with slack for the allocator doubling (see `buffers`).
    let most_capacity = 8 * (HIGH_WATER.max(most_held) + READ_CHUNK);
    let mut out = Vec::new();
    let (mut fed, mut seen) = (0, 0);
    let mut next_size = sizes.iter().copied().cycle();
    // Reads of a few bytes matter around headers, not 200 000 times over: at most ~2048 reads.
    let smallest = stream.len() >> 11;
    loop {
        let mut progress = false;
        if fed < stream.len() && pipe.wants_read() {
            let buffered = fed - out.len();
            assert!(
                buffered < HIGH_WATER.max(most_held),
                "reading with {buffered} bytes buffered (hold limit {})",
                plan.hold
            );
            let buf = pipe.read_buf();
            let room = buf.capacity() - buf.len();
            assert!(room >= READ_CHUNK, "read offered {room} bytes of room");
            assert!(buf.capacity() <= most_capacity, "buffer grew to {} bytes", buf.capacity());
            let n = next_size.next().unwrap_or(usize::MAX).max(smallest).min(room).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            progress = true;
        }
        let r = pipe.scan(
            |t| plan.whole(t),
            |t, msg, _| {
                seen += check_callback(plan, seen, t, msg);
                Action::Forward
            },
        );
        let ready = pipe.ready().len();
        assert_eq!(out.len() + ready, seen.min(fed), "approved bytes do not end where scanning did");
        match r {
            Err(e) => {
                out.extend_from_slice(pipe.ready());
                return (out, Err(e));
            }
            Ok(stopped) => assert!(!stopped, "stopped without being asked"),
        }
        check_held(plan, &pipe, fed - out.len() - ready, out.len() + ready);
        let n = if plan.short_writes { ready.div_ceil(2) } else { ready };
        out.extend_from_slice(&pipe.ready()[..n]);
        pipe.consume(n);
        progress |= n > 0;
        if fed == stream.len() && pipe.ready().is_empty() {
            return (out, Ok(()));
        }
        assert!(progress, "stalled: {} bytes buffered, none approved, no read wanted", fed - out.len());
    }
}

/// After a scan: what is buffered past the approved bytes (`unscanned`, starting at stream
/// offset `at`) is one message too short to scan, and never longer than the pipe may hold.
fn check_held(plan: &Plan, pipe: &Pipe, unscanned: usize, at: usize) {
    assert_eq!(pipe.has_unscanned(), unscanned > 0 || pipe.in_message());
    if pipe.in_message() {
        assert_eq!(unscanned, 0, "bytes of a streamed message left unapproved");
        return;
    }
    let Some((t, raw)) = header(&plan.stream, at).filter(|_| unscanned >= HEADER_LEN) else { return };
    let len = raw as usize + 1;
    assert!(unscanned < len, "a whole message of {len} bytes left unscanned");
    let most = plan.held_at_most(t, raw as usize);
    assert!(len <= most, "holding back a message of {len} bytes (tag {t:#04x}), at most {most} allowed");
}

/// `Pipe::scan` under a hold limit: input is
/// `[flags, classes, whole_sel, chunking, chunk sizes..., stream ops...]` (see `build_stream`).
pub fn message_scanner(data: &[u8]) {
    let Some(plan) = Plan::decode(data) else { return };
    let (forwarded, error) = reference(&plan);
    let expected = &plan.stream[..forwarded];
    let sizes = if plan.sizes.is_empty() { vec![usize::MAX] } else { plan.sizes.clone() };
    for reads in [&sizes[..], &[usize::MAX]] {
        let (out, end) = relay(&plan, reads);
        assert_eq!(end.err(), error, "framing outcome differs from the reference");
        if let Some(e @ FrameError::TooLongToHold { .. }) = error {
            // The error the client is sent names the setting.
            assert!(e.to_string().contains("broker.max_buffered_message"), "{e}");
        }
        assert!(
            out == expected,
            "forwarded {} bytes, expected {} of {} ({} differ)",
            out.len(),
            expected.len(),
            plan.stream.len(),
            out.iter().zip(expected).filter(|(a, b)| a != b).count()
        );
    }
}
