//! Log lines that stay one line: peers choose user names, database names, channel names and
//! more that reach the logs, and a newline or a terminal escape in one of them must not
//! forge a line of its own or drive the operator's terminal.

use std::io::{self, Write};

/// A writer for the human log format that escapes control characters inside each event (the
/// event's final newline stays). The JSON format escapes them itself.
pub struct OneLine<W> {
    inner: W,
    /// Colours are on (a terminal): the formatter's own escape sequences pass.
    ansi: bool,
}

impl<W: Write> OneLine<W> {
    /// Wraps `inner`; with `ansi`, ESC passes for the formatter's colours.
    pub fn new(inner: W, ansi: bool) -> OneLine<W> {
        OneLine { inner, ansi }
    }
}

impl<W: Write> Write for OneLine<W> {
    /// Takes one formatted event (the formatter writes each whole) and writes it escaped.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        let keep = |b: u8| b >= 0x20 && b != 0x7f || b == b'\t' || (self.ansi && b == 0x1b);
        if body.iter().all(|&b| keep(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b if keep(b) => out.push(b),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn written(event: &[u8], ansi: bool) -> String {
        let mut w = OneLine::new(Vec::new(), ansi);
        w.write_all(event).unwrap();
        String::from_utf8(w.inner).unwrap()
    }

    #[test]
    fn a_newline_inside_an_event_cannot_start_a_forged_line() {
        let event = b"INFO client logged in user=x\n2026-01-01T00:00:00Z  INFO admin granted\n";
        assert_eq!(written(event, false), "INFO client logged in user=x\\n2026-01-01T00:00:00Z  INFO admin granted\n");
    }

    #[test]
    fn terminal_escapes_are_escaped_unless_colours_are_on() {
        assert_eq!(written(b"user=\x1b[2J\r\x07\x7f\n", false), "user=\\x1b[2J\\r\\x07\\x7f\n");
        assert_eq!(written(b"\x1b[32mINFO\x1b[0m\tok\n", true), "\x1b[32mINFO\x1b[0m\tok\n");
    }

    #[test]
    fn a_plain_event_passes_unchanged() {
        assert_eq!(written("user=zoë db=x\n".as_bytes(), false), "user=zoë db=x\n");
    }
}
