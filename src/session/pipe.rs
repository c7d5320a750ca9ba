//! One direction of the relay: a buffer of bytes read from one peer, the front of which has
//! been scanned and approved for the other peer. Approved bytes are written out unchanged.

use crate::proto::frame::{FrameError, HEADER_LEN, Scanner, Step};
use bytes::{Buf, BytesMut};

/// Bytes buffered per direction before reading pauses (unless one message needs more).
pub(crate) const HIGH_WATER: usize = 64 * 1024;
/// Smallest free space offered to a read.
pub(crate) const READ_CHUNK: usize = super::buffers::CHUNK;

/// What to do with a scanned message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass it on unchanged.
    Forward,
    /// Remove it from the stream (whole messages only).
    Drop,
    /// Put the bytes written to the scratch buffer in its place (whole messages only).
    Replace,
    /// Stop scanning; the message and everything after it stay unapproved.
    Stop,
}

/// Buffered bytes of one direction.
pub struct Pipe {
    buf: BytesMut,
    /// Bytes at the front approved for writing.
    ready: usize,
    /// Bytes the scanner needs buffered to make progress.
    need: usize,
    scanner: Scanner,
    /// Written bytes may sit in the writer's buffer until flushed.
    pub(super) unflushed: bool,
    /// Replacement bytes written by a scan callback.
    scratch: BytesMut,
    /// Bytes written out since `take_written`.
    written: u64,
}

impl Pipe {
    /// An empty pipe accepting messages up to `max_len` bytes.
    pub fn new(max_len: usize) -> Pipe {
        Pipe {
            buf: BytesMut::new(),
            ready: 0,
            need: 0,
            scanner: Scanner::new(max_len),
            unflushed: false,
            scratch: BytesMut::new(),
            written: 0,
        }
    }

    /// Holds a message scanned whole only up to `max_whole` bytes (see `Scanner::hold_limit`).
    pub fn hold_limit(mut self, max_whole: usize, may_stream: fn(u8) -> bool) -> Pipe {
        self.scanner = self.scanner.hold_limit(max_whole, may_stream);
        self
    }

    /// Approved bytes waiting to be written.
    #[inline]
    pub fn ready(&self) -> &[u8] {
        &self.buf[..self.ready]
    }

    /// Marks `n` approved bytes as written.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.written += n as u64;
        self.buf.advance(n);
        self.ready -= n;
        self.need = self.need.saturating_sub(n);
    }

    /// True when nothing is buffered at all, approved or not.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Gives the buffers back when nothing is in them, so an idle client holds no buffer
    /// memory (the next read takes one from the thread's spares, see `buffers`).
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && !self.scanner.in_message() && self.buf.capacity() > 0 {
            super::buffers::give(std::mem::take(&mut self.buf));
            self.scratch = BytesMut::new();
        }
    }

    /// True when the pipe holds no buffer memory (see `release_if_empty`).
    pub fn is_released(&self) -> bool {
        self.buf.capacity() == 0
    }

    /// True when bytes are buffered that were not approved yet (a partial message).
    pub fn has_unscanned(&self) -> bool {
        self.buf.len() > self.ready || self.scanner.in_message()
    }

    /// The tag of the next unscanned message once its header is buffered.
    pub fn peek_tag(&self) -> Option<u8> {
        if self.scanner.in_message() {
            return None;
        }
        let rest = self.buf.get(self.ready..)?;
        (rest.len() >= HEADER_LEN).then(|| rest[0])
    }

    /// The whole messages buffered after the approved prefix (none while a long message is
    /// half-way through), without scanning them.
    pub fn whole_messages(&self) -> impl Iterator<Item = (u8, &[u8])> {
        let rest = if self.scanner.in_message() { &[][..] } else { self.buf.get(self.ready..).unwrap_or_default() };
        crate::proto::frame::messages(rest)
    }

    /// True when a long message is half-way through the scanner.
    pub fn in_message(&self) -> bool {
        self.scanner.in_message()
    }

    /// Bytes written since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    /// Drops the approved bytes without writing them.
    pub fn discard_ready(&mut self) {
        let n = self.ready;
        self.buf.advance(n);
        self.ready = 0;
        self.need = self.need.saturating_sub(n);
    }

    /// True when another read fits within the buffering limit: below `HIGH_WATER`, and past
    /// it only to complete a message the scanner must see whole, once everything approved
    /// before it has been written. (`need` counts the approved bytes too: letting it raise
    /// the limit while they wait for a peer that does not read buffered without bound.)
    #[inline]
    pub fn wants_read(&self) -> bool {
        self.buf.len() < HIGH_WATER || (self.ready == 0 && self.buf.len() < self.need)
    }

    /// True when the buffer holds `HIGH_WATER` or more: its reader is slow, and whoever
    /// would add to it (the broker's own replies too) waits.
    #[inline]
    pub fn is_backed_up(&self) -> bool {
        self.buf.len() >= HIGH_WATER
    }

    /// The buffer to read into, with room reserved.
    #[inline]
    pub fn read_buf(&mut self) -> &mut BytesMut {
        if self.buf.capacity() == 0 {
            self.buf = super::buffers::take();
        }
        let want = READ_CHUNK.max(self.need.saturating_sub(self.buf.len()));
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        &mut self.buf
    }

    /// Scans the unapproved bytes, calling `on` with each message's tag and bytes (the whole
    /// message, or only its header for a long message streamed through in pieces) and a
    /// scratch buffer for `Action::Replace`. Returns true if `on` asked to stop.
    #[inline]
    pub fn scan(
        &mut self,
        whole: impl Fn(u8) -> bool,
        mut on: impl FnMut(u8, &[u8], &mut BytesMut) -> Action,
    ) -> Result<bool, FrameError> {
        loop {
            let rest = &self.buf[self.ready..];
            match self.scanner.next(rest, &whole)? {
                Step::Whole { tag, len } => match on(tag, &rest[..len], &mut self.scratch) {
                    // Bytes left in the scratch buffer count only with Replace.
                    Action::Forward => {
                        self.scratch.clear();
                        self.ready += len;
                    }
                    Action::Drop => {
                        self.scratch.clear();
                        self.cut(len);
                    }
                    Action::Replace => {
                        let with = std::mem::take(&mut self.scratch);
                        self.splice(len, &with);
                        self.scratch = with;
                        self.scratch.clear();
                    }
                    Action::Stop => {
                        self.scratch.clear();
                        return Ok(true);
                    }
                },
                Step::Start { tag, avail, .. } => {
                    // Too long to hold: it can only be forwarded.
                    let stop = on(tag, &rest[..HEADER_LEN], &mut self.scratch) == Action::Stop;
                    self.scratch.clear();
                    self.ready += avail;
                    if stop {
                        return Ok(true);
                    }
                }
                Step::Body(n) => self.ready += n,
                Step::NeedMore { need } => {
                    self.need = self.ready + need;
                    return Ok(false);
                }
            }
        }
    }

    /// Removes `len` bytes right after the approved prefix.
    fn cut(&mut self, len: usize) {
        if self.ready == 0 {
            self.buf.advance(len);
        } else {
            let at = self.ready;
            self.buf.copy_within(at + len.., at);
            self.buf.truncate(self.buf.len() - len);
        }
    }

    /// Inserts bytes of the broker's own right after the approved prefix, approved.
    pub fn insert(&mut self, bytes: &[u8]) {
        self.splice(0, bytes);
    }

    /// Replaces the `old` bytes right after the approved prefix with `with`, approved, moving
    /// the rest of the buffer in place (no allocation beyond the buffer's own growth).
    fn splice(&mut self, old: usize, with: &[u8]) {
        let at = self.ready;
        let end = self.buf.len();
        if with.len() > old {
            let grow = with.len() - old;
            self.buf.resize(end + grow, 0);
            self.buf.copy_within(at + old..end, at + with.len());
        } else if with.len() < old {
            self.buf.copy_within(at + old..end, at + with.len());
            self.buf.truncate(end - (old - with.len()));
        }
        self.buf[at..at + with.len()].copy_from_slice(with);
        if self.need > at {
            self.need = (self.need + with.len()).saturating_sub(old);
        }
        self.ready += with.len();
    }

    /// Drops everything buffered.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ready = 0;
        self.need = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn feed(p: &mut Pipe, bytes: &[u8]) {
        p.read_buf().extend_from_slice(bytes);
    }

    #[test]
    fn whole_messages_are_approved_and_partial_ones_wait() {
        let mut p = Pipe::new(1 << 20);
        let q = msg(b'Q', b"select 1\0");
        feed(&mut p, &q);
        feed(&mut p, &q[..3]);
        let mut seen = vec![];
        assert!(
            !p.scan(
                |_| false,
                |t, _, _| {
                    seen.push(t);
                    Action::Forward
                }
            )
            .unwrap()
        );
        assert_eq!(seen, vec![b'Q']);
        assert_eq!(p.ready(), &q[..]);
        assert!(p.has_unscanned());
    }

    #[test]
    fn dropped_messages_disappear_from_the_output() {
        let mut p = Pipe::new(1 << 20);
        let (a, b, c) = (msg(b'1', b""), msg(b'S', b"x\0y\0"), msg(b'Z', b"I"));
        for m in [&a, &b, &c] {
            feed(&mut p, m);
        }
        p.scan(
            |_| false,
            |t, _, _| {
                if t == b'S' { Action::Drop } else { Action::Forward }
            },
        )
        .unwrap();
        assert_eq!(p.ready(), [a, c].concat().as_slice());
    }

    #[test]
    fn replaced_messages_are_swapped_in_place() {
        let mut p = Pipe::new(1 << 20);
        let (a, z, b) = (msg(b'C', b"BEGIN\0"), msg(b'Z', b"T"), msg(b'N', b"x\0"));
        for m in [&a, &z, &b] {
            feed(&mut p, m);
        }
        let err = msg(b'E', b"Sfoo\0\0");
        let idle = msg(b'Z', b"I");
        p.scan(
            |_| false,
            |t, _, out| {
                if t == b'Z' {
                    out.extend_from_slice(&err);
                    out.extend_from_slice(&idle);
                    Action::Replace
                } else {
                    Action::Forward
                }
            },
        )
        .unwrap();
        assert_eq!(p.ready(), [a, err, idle, b].concat().as_slice());
        assert!(!p.has_unscanned());
    }

    #[test]
    fn inserted_bytes_go_after_the_approved_prefix() {
        let mut p = Pipe::new(1 << 20);
        let (a, b) = (msg(b'1', b""), msg(b'2', b""));
        feed(&mut p, &a);
        p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        feed(&mut p, &b[..3]);
        p.insert(b"ins");
        feed(&mut p, &b[3..]);
        p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        assert_eq!(p.ready(), [a.as_slice(), b"ins", b.as_slice()].concat().as_slice());
    }

    #[test]
    fn stop_leaves_the_message_unapproved() {
        let mut p = Pipe::new(1 << 20);
        let (q, x) = (msg(b'Q', b"select\0"), msg(b'X', b""));
        feed(&mut p, &[q.clone(), x].concat());
        assert!(p.scan(|_| false, |t, _, _| if t == b'X' { Action::Stop } else { Action::Forward }).unwrap());
        assert_eq!(p.ready(), &q[..]);
    }

    #[test]
    fn consumed_bytes_leave_the_buffer() {
        let mut p = Pipe::new(1 << 20);
        let q = msg(b'Q', b"select 1\0");
        feed(&mut p, &q);
        p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        p.consume(4);
        assert_eq!(p.ready(), &q[4..]);
        p.consume(q.len() - 4);
        assert!(p.is_empty());
    }

    #[test]
    fn an_empty_pipe_gives_its_buffer_back_and_a_busy_one_keeps_it() {
        let mut p = Pipe::new(1 << 20);
        let q = msg(b'Q', b"SELECT 1\0");
        feed(&mut p, &q[..3]);
        p.release_if_empty();
        assert!(p.buf.capacity() > 0, "a partial message stays");
        feed(&mut p, &q[3..]);
        p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        p.release_if_empty();
        assert!(p.buf.capacity() > 0, "approved bytes not yet written stay");
        let n = p.ready().len();
        p.consume(n);
        p.release_if_empty();
        assert_eq!(p.buf.capacity(), 0);
        assert!(p.wants_read());
    }

    #[test]
    fn unwritten_bytes_stop_reading_at_the_high_water_mark() {
        // A result streaming in while its reader reads nothing: 8 KiB reads, most ending
        // inside a message.
        let rows: Vec<u8> = (0..1000).flat_map(|_| msg(b'D', &[b'x'; 1000])).collect();
        let mut p = Pipe::new(1 << 20);
        let mut fed = 0;
        while p.wants_read() && fed < rows.len() {
            let n = READ_CHUNK.min(rows.len() - fed);
            feed(&mut p, &rows[fed..fed + n]);
            fed += n;
            p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        }
        assert!(fed < rows.len(), "read everything: no backpressure");
        assert!(p.buf.len() >= HIGH_WATER && p.buf.len() < HIGH_WATER + READ_CHUNK, "{}", p.buf.len());
        // Once the reader takes what was approved, reading goes on.
        let n = p.ready().len();
        p.consume(n);
        assert!(p.wants_read());
    }

    #[test]
    fn a_whole_message_past_the_high_water_mark_is_read_once_the_rest_is_written() {
        let mut p = Pipe::new(1 << 20);
        let small = msg(b'C', b"x\0");
        let big = msg(b'E', &vec![b'e'; 2 * HIGH_WATER]);
        feed(&mut p, &small);
        feed(&mut p, &big[..HIGH_WATER]);
        p.scan(|t| t == b'E', |_, _, _| Action::Forward).unwrap();
        assert_eq!(p.ready(), &small[..]);
        assert!(!p.wants_read(), "approved bytes first");
        p.consume(small.len());
        assert!(p.wants_read(), "then the rest of the message");
        feed(&mut p, &big[HIGH_WATER..]);
        p.scan(|t| t == b'E', |_, _, _| Action::Forward).unwrap();
        assert_eq!(p.ready(), &big[..]);
    }

    #[test]
    fn long_messages_stream_through_in_pieces() {
        let mut p = Pipe::new(1 << 20);
        let big = msg(b'd', &vec![1u8; 100_000]);
        feed(&mut p, &big[..20_000]);
        let mut tags = vec![];
        p.scan(
            |_| false,
            |t, m, _| {
                tags.push((t, m.len()));
                Action::Forward
            },
        )
        .unwrap();
        assert_eq!(tags, vec![(b'd', HEADER_LEN)]);
        assert_eq!(p.ready().len(), 20_000);
        p.consume(20_000);
        feed(&mut p, &big[20_000..]);
        p.scan(|_| false, |_, _, _| Action::Forward).unwrap();
        assert_eq!(p.ready().len(), big.len() - 20_000);
        assert!(!p.has_unscanned());
    }
}
