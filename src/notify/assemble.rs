//! Payloads over NOTIFY's 8000 bytes, put back together. `conf/pgbroker-notify.sql` sends
//! one as numbered pieces, each `pgbroker:1:<xid>:<call>:<i>:<n>:<piece>`; PostgreSQL delivers
//! a transaction's notifications together and in order, so the pieces of one call arrive one
//! after the other and a call whose pieces stop before the last never completes. At most one
//! payload is in assembly at a time, and never more than `max_bytes` of it.

/// The prefix of a piece.
const PREFIX: &str = "pgbroker:1:";

/// A whole notification, ready for subscribers.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    /// The channel.
    pub channel: String,
    /// The whole payload.
    pub payload: String,
    /// The sending transaction, for a payload `pgbroker_notify` sent.
    pub xid: Option<u64>,
}

/// One piece, parsed.
struct Piece<'a> {
    xid: Option<u64>,
    call: &'a str,
    index: usize,
    total: usize,
    text: &'a str,
}

fn parse(payload: &str) -> Option<Piece<'_>> {
    let rest = payload.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(5, ':');
    let xid = parts.next()?.parse().ok();
    let call = parts.next()?;
    let index = parts.next()?.parse().ok()?;
    let total = parts.next()?.parse().ok()?;
    let text = parts.next()?;
    (index >= 1 && index <= total).then_some(Piece { xid, call, index, total, text })
}

/// The payload in assembly.
#[derive(Debug)]
struct Partial {
    pid: i32,
    xid: Option<u64>,
    channel: String,
    call: String,
    next: usize,
    total: usize,
    text: String,
}

/// Puts pieces back together; plain notifications pass through.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: Option<Partial>,
    /// The call (pid, id) whose payload was dropped: its remaining pieces go silently.
    skipping: Option<(i32, String)>,
    /// Payloads dropped: incomplete, or over the size cap.
    pub dropped: u64,
}

impl Assembler {
    /// Takes one notification as received; returns a whole one when there is one.
    pub fn push(&mut self, pid: i32, channel: String, payload: String, max_bytes: usize) -> Option<Whole> {
        let Some(piece) = parse(&payload) else {
            self.abandon("a plain notification came between its pieces");
            return Some(Whole { channel, payload, xid: None });
        };
        if self.skipping.as_ref().is_some_and(|(p, c)| *p == pid && c == piece.call) {
            return None;
        }
        self.skipping = None;
        let continues = self.partial.as_ref().is_some_and(|p| {
            p.pid == pid
                && p.channel == channel
                && p.call == piece.call
                && p.next == piece.index
                && p.total == piece.total
        });
        if !continues {
            self.abandon("another notification came before its last piece");
            if piece.index != 1 {
                self.skipping = Some((pid, piece.call.to_string()));
                self.drop_payload(&channel, "its first pieces were not received");
                return None;
            }
            let text = String::with_capacity(piece.text.len().min(max_bytes));
            self.partial = Some(Partial {
                pid,
                xid: piece.xid,
                channel,
                call: piece.call.to_string(),
                next: 1,
                total: piece.total,
                text,
            });
        }
        let p = self.partial.as_mut()?;
        if p.text.len() + piece.text.len() > max_bytes {
            let channel = p.channel.clone();
            self.partial = None;
            self.skipping = Some((pid, piece.call.to_string()));
            self.drop_payload(&channel, &format!("larger than websocket.max_payload_bytes ({max_bytes})"));
            return None;
        }
        p.text.push_str(piece.text);
        p.next += 1;
        if p.next <= p.total {
            return None;
        }
        let p = self.partial.take()?;
        Some(Whole { channel: p.channel, payload: p.text, xid: p.xid })
    }

    /// Gives up the payload in assembly, if any (the connection it came on is gone, or
    /// something else came before its last piece).
    pub fn abandon(&mut self, why: &str) {
        if let Some(p) = self.partial.take() {
            self.drop_payload(&p.channel, why);
        }
    }

    fn drop_payload(&mut self, channel: &str, why: &str) {
        self.dropped += 1;
        tracing::warn!(channel, reason = why, "dropping a pgbroker_notify payload that did not arrive whole");
    }

    /// Bytes held for the payload in assembly.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.text.capacity())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CAP: usize = 1 << 20;

    fn piece(call: &str, i: usize, n: usize, text: &str) -> String {
        format!("{PREFIX}1234:{call}:{i}:{n}:{text}")
    }

    fn whole(channel: &str, payload: &str) -> Option<Whole> {
        Some(Whole { channel: channel.into(), payload: payload.into(), xid: None })
    }

    #[test]
    fn plain_notifications_pass_through() {
        let mut a = Assembler::default();
        assert_eq!(a.push(1, "c".into(), "hello".into(), CAP), whole("c", "hello"));
    }

    #[test]
    fn pieces_in_order_make_one_payload() {
        let mut a = Assembler::default();
        assert_eq!(a.push(1, "c".into(), piece("x", 1, 3, "ab"), CAP), None);
        assert_eq!(a.push(1, "c".into(), piece("x", 2, 3, "c:d"), CAP), None);
        let w = Whole { channel: "c".into(), payload: "abc:de".into(), xid: Some(1234) };
        assert_eq!(a.push(1, "c".into(), piece("x", 3, 3, "e"), CAP), Some(w), "with its transaction id");
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn a_payload_whose_pieces_stop_is_dropped_when_the_next_begins() {
        let mut a = Assembler::default();
        a.push(1, "c".into(), piece("x", 1, 3, "ab"), CAP);
        let w = a.push(2, "c".into(), piece("y", 1, 1, "new"), CAP).unwrap();
        assert_eq!(w.payload, "new");
        assert_eq!(a.dropped, 1);
    }

    #[test]
    fn a_piece_without_its_first_is_dropped() {
        let mut a = Assembler::default();
        assert_eq!(a.push(1, "c".into(), piece("x", 2, 3, "cd"), CAP), None);
        assert_eq!(a.dropped, 1);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn a_payload_over_the_cap_is_dropped_and_frees_its_memory() {
        let mut a = Assembler::default();
        assert_eq!(a.push(1, "c".into(), piece("x", 1, 3, &"a".repeat(600)), 1000), None);
        assert_eq!(a.push(1, "c".into(), piece("x", 2, 3, &"b".repeat(600)), 1000), None);
        assert_eq!((a.dropped, a.held()), (1, 0));
        assert_eq!(a.push(1, "c".into(), piece("x", 3, 3, "c"), 1000), None, "the rest is dropped too");
        assert_eq!(a.dropped, 1, "and counted once");
    }

    #[test]
    fn malformed_headers_are_plain_payloads() {
        let mut a = Assembler::default();
        for p in ["pgbroker:1:x", "pgbroker:1:1:x:0:1:t", "pgbroker:1:1:x:2:1:t", "pgbroker:1:1:x:a:1:t"] {
            assert_eq!(a.push(1, "c".into(), p.into(), CAP), whole("c", p));
        }
    }
}
