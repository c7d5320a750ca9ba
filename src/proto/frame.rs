//! Framing of tagged messages: walks a byte stream, inspecting only tags and lengths.
//!
//! The scanner never copies: it tells the caller how many bytes of its buffer form the next
//! message (or the next piece of a long one) so the caller can forward them unchanged.

use thiserror::Error;

/// Tag byte plus the four-byte length, which counts itself but not the tag.
pub const HEADER_LEN: usize = 5;

/// Messages up to this size are always delivered whole; longer ones may be streamed in pieces.
pub const STREAM_THRESHOLD: usize = 16 * 1024;

/// A framing violation; the connection it came from cannot be trusted any more.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below 4.
    #[error("invalid length {len} in message of type {}", tag_name(*.tag))]
    BadLength {
        /// Message tag.
        tag: u8,
        /// Length field as received.
        len: i32,
    },
    /// The length field is over the configured maximum.
    #[error("message of type {} is {len} bytes, over max_packet_size ({max})", tag_name(*.tag))]
    TooLong {
        /// Message tag.
        tag: u8,
        /// Length field as received.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A message the reader must hold whole (it reads or rewrites it) is longer than it may
    /// hold; refused from the header, before the body is read.
    #[error(
        "message of type {} is {len} bytes, over broker.max_buffered_message ({max}), the most held of a message the broker must read whole",
        tag_name(*.tag)
    )]
    TooLongToHold {
        /// Message tag.
        tag: u8,
        /// Length field as received.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Renders a tag for error messages: printable ASCII as `'Q'`, anything else as hex.
pub fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() { format!("'{}'", tag as char) } else { format!("0x{tag:02x}") }
}

/// The whole messages at the front of `buf`, as (tag, message bytes), stopping at the first
/// incomplete or malformed one. For buffers the broker built or already framed.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let header = rest.get(..HEADER_LEN)?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let total = usize::try_from(len).ok().filter(|l| *l >= 4)? + 1;
        let (msg, after) = (rest.get(..total)?, rest.get(total..)?);
        rest = after;
        Some((msg[0], msg))
    })
}

/// What the next bytes of the buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A whole message of `len` bytes (tag included) starts the buffer.
    Whole {
        /// Message tag.
        tag: u8,
        /// Total length including the tag byte.
        len: usize,
    },
    /// The first `avail` bytes of a long message of `len` bytes; the rest arrives as `Body`.
    Start {
        /// Message tag.
        tag: u8,
        /// Total length including the tag byte.
        len: usize,
        /// Bytes of it present now, header included.
        avail: usize,
    },
    /// `n` more bytes of the long message announced by `Start`.
    Body(usize),
    /// Not enough bytes to decide; at least `need` bytes must be buffered.
    NeedMore {
        /// Bytes the buffer must hold before calling again.
        need: usize,
    },
}

/// Walks consecutive messages. Feed it the unconsumed front of the buffer each time and
/// consume exactly the bytes each returned step covers.
#[derive(Debug, Clone)]
pub struct Scanner {
    body_left: usize,
    max_len: usize,
    /// Longest message delivered whole for a tag the caller asks whole (length field value).
    max_whole: usize,
    /// Tags the caller asks whole but can take streamed when longer than `max_whole`.
    may_stream: fn(u8) -> bool,
}

impl Scanner {
    /// A scanner refusing messages longer than `max_len` bytes (length field value).
    pub fn new(max_len: usize) -> Scanner {
        Scanner { body_left: 0, max_len, max_whole: max_len, may_stream: |_| false }
    }

    /// Holds a message the caller asks whole only up to `max_whole` bytes: past it, a tag
    /// `may_stream` accepts is streamed, and any other is refused from its header
    /// (`TooLongToHold`), so a peer cannot make the reader buffer up to `max_len`.
    pub fn hold_limit(mut self, max_whole: usize, may_stream: fn(u8) -> bool) -> Scanner {
        self.max_whole = max_whole;
        self.may_stream = may_stream;
        self
    }

    /// True when a long message is half-way through.
    pub fn in_message(&self) -> bool {
        self.body_left > 0
    }

    /// The next step over `buf`. `whole` says which tags must be delivered whole whatever
    /// their size (those the caller needs to read, such as ReadyForQuery).
    #[inline]
    pub fn next(&mut self, buf: &[u8], whole: impl Fn(u8) -> bool) -> Result<Step, FrameError> {
        if self.body_left > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore { need: 1 });
            }
            let n = self.body_left.min(buf.len());
            self.body_left -= n;
            return Ok(Step::Body(n));
        }
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(Step::NeedMore { need: HEADER_LEN });
        };
        let tag = header[0];
        let raw = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if raw < 4 {
            return Err(FrameError::BadLength { tag, len: raw });
        }
        let body_len = raw as usize;
        if body_len > self.max_len {
            return Err(FrameError::TooLong { tag, len: body_len, max: self.max_len });
        }
        // Checked before the message is complete, so the answer does not depend on how the
        // bytes arrived; one comparison for the usual short message.
        let hold = if body_len > self.max_whole && whole(tag) {
            if !(self.may_stream)(tag) {
                return Err(FrameError::TooLongToHold { tag, len: body_len, max: self.max_whole });
            }
            false
        } else {
            whole(tag)
        };
        let len = body_len + 1;
        if buf.len() >= len {
            return Ok(Step::Whole { tag, len });
        }
        if len <= STREAM_THRESHOLD || hold {
            return Ok(Step::NeedMore { need: len });
        }
        self.body_left = len - buf.len();
        Ok(Step::Start { tag, len, avail: buf.len() })
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

    #[test]
    fn whole_message_is_reported_with_total_length() {
        let m = msg(b'Q', b"select 1\0");
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.next(&m, |_| false).unwrap(), Step::Whole { tag: b'Q', len: m.len() });
    }

    #[test]
    fn partial_header_needs_five_bytes() {
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.next(&[b'Q', 0, 0], |_| false).unwrap(), Step::NeedMore { need: 5 });
    }

    #[test]
    fn short_message_waits_until_whole() {
        let m = msg(b'Q', b"select 1\0");
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.next(&m[..7], |_| false).unwrap(), Step::NeedMore { need: m.len() });
    }

    #[test]
    fn long_message_is_streamed_in_pieces() {
        let m = msg(b'd', &vec![7u8; STREAM_THRESHOLD * 2]);
        let mut s = Scanner::new(1 << 20);
        let first = 1000;
        assert_eq!(s.next(&m[..first], |_| false).unwrap(), Step::Start { tag: b'd', len: m.len(), avail: first });
        assert!(s.in_message());
        assert_eq!(s.next(&m[first..first + 10], |_| false).unwrap(), Step::Body(10));
        let rest = m.len() - first - 10;
        let mut tail = m[first + 10..].to_vec();
        tail.extend_from_slice(&msg(b'c', b""));
        assert_eq!(s.next(&tail, |_| false).unwrap(), Step::Body(rest));
        assert_eq!(s.next(&tail[rest..], |_| false).unwrap(), Step::Whole { tag: b'c', len: 5 });
    }

    #[test]
    fn long_message_of_a_whole_tag_is_not_streamed() {
        let m = msg(b'P', &vec![b'x'; STREAM_THRESHOLD * 2]);
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.next(&m[..100], |t| t == b'P').unwrap(), Step::NeedMore { need: m.len() });
    }

    #[test]
    fn a_whole_tag_past_the_hold_limit_is_streamed_or_refused_from_its_header() {
        let header = [b'Q', 0x3f, 0xff, 0xff, 0xff];
        let mut s = Scanner::new(1 << 30).hold_limit(1 << 20, |t| t == b'Q');
        assert_eq!(s.next(&header, |_| true).unwrap(), Step::Start { tag: b'Q', len: 0x4000_0000, avail: 5 });
        let mut s = Scanner::new(1 << 30).hold_limit(1 << 20, |t| t == b'Q');
        let err = s.next(&[b'P', 0x3f, 0xff, 0xff, 0xff], |_| true).unwrap_err();
        assert_eq!(err, FrameError::TooLongToHold { tag: b'P', len: 0x3fff_ffff, max: 1 << 20 });
        // Whatever arrived already: a message past the limit is refused even when whole.
        let m = msg(b'P', &vec![b'x'; (1 << 20) + 1]);
        assert!(s.next(&m, |_| true).is_err());
        // Up to the limit it is held whole; tags not asked whole stream as before.
        let m = msg(b'P', &vec![b'x'; (1 << 20) - 4]);
        assert_eq!(s.next(&m[..100], |_| true).unwrap(), Step::NeedMore { need: m.len() });
        let big = msg(b'd', &vec![b'x'; 2 << 20]);
        assert!(matches!(s.next(&big[..100], |t| t != b'd').unwrap(), Step::Start { .. }));
    }

    #[test]
    fn length_below_four_is_rejected() {
        let mut s = Scanner::new(1 << 20);
        let err = s.next(&[b'Q', 0, 0, 0, 3], |_| false).unwrap_err();
        assert_eq!(err, FrameError::BadLength { tag: b'Q', len: 3 });
        let err = s.next(&[b'Q', 0xff, 0xff, 0xff, 0xff], |_| false).unwrap_err();
        assert_eq!(err, FrameError::BadLength { tag: b'Q', len: -1 });
    }

    #[test]
    fn length_over_maximum_is_rejected_before_buffering() {
        let mut s = Scanner::new(1000);
        let err = s.next(&[b'Q', 0, 0, 0x10, 0], |_| false).unwrap_err();
        assert_eq!(err, FrameError::TooLong { tag: b'Q', len: 4096, max: 1000 });
    }
}
