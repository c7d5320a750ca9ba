//! The untagged startup-phase packets: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.

use super::{MAX_STARTUP_LEN, read_i32, split_cstr};
use thiserror::Error;

/// The one-byte answer to SSLRequest (and GSSENCRequest): go ahead with the handshake.
pub const ENCRYPTION_ACCEPTED: u8 = b'S';
/// The one-byte answer to SSLRequest (and GSSENCRequest): continue unencrypted.
pub const ENCRYPTION_REFUSED: u8 = b'N';

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol major version 3, the only one spoken.
const PROTOCOL_MAJOR: i32 = 3;

/// A CancelRequest's key: the process id and secret the broker handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    /// BackendKeyData process id.
    pub pid: i32,
    /// BackendKeyData secret.
    pub secret: i32,
}

/// A decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// SSLRequest: answered 'N' until TLS is configured.
    SslRequest,
    /// GSSENCRequest: answered 'N'.
    GssEncRequest,
    /// CancelRequest with a 4-byte secret; longer (protocol 3.2) keys carry `None` since the
    /// broker never issues them.
    Cancel(Option<CancelKey>),
    /// StartupMessage.
    Startup(Startup),
}

/// A StartupMessage's contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Startup {
    /// Requested protocol minor version (3.x).
    pub minor: u16,
    /// Parameters in the order sent, excluding `_pq_.` protocol options.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options sent by the client; none are supported.
    pub protocol_options: Vec<String>,
}

impl Startup {
    /// The value of a startup parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a startup packet was refused; each becomes a 08P01 ErrorResponse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    /// The length prefix is out of range.
    #[error("invalid startup packet length {0}")]
    BadLength(i64),
    /// The packet is too short for its request code.
    #[error("startup packet truncated")]
    Truncated,
    /// A protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol {
        /// Requested major version.
        major: i32,
        /// Requested minor version.
        minor: i32,
    },
    /// Parameters are not NUL-terminated pairs ending with an empty name.
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
    /// A parameter name or value is not UTF-8.
    #[error("invalid startup packet: parameter is not valid UTF-8")]
    NotUtf8,
}

/// Validates the 4-byte length prefix and returns the length of the rest of the packet.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, StartupError> {
    let len = i32::from_be_bytes(prefix);
    // The length counts itself; 8 is the smallest packet (SSLRequest).
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(StartupError::BadLength(len.into()));
    }
    Ok(len as usize - 4)
}

/// Parses a startup-phase packet body (everything after the length prefix).
pub fn parse(body: &[u8]) -> Result<Packet, StartupError> {
    let code = read_i32(body).ok_or(StartupError::Truncated)?;
    let rest = body.get(4..).ok_or(StartupError::Truncated)?;
    match code {
        SSL_REQUEST => Ok(Packet::SslRequest),
        GSSENC_REQUEST => Ok(Packet::GssEncRequest),
        CANCEL_REQUEST => parse_cancel(rest),
        _ => parse_startup(code, rest).map(Packet::Startup),
    }
}

fn parse_cancel(rest: &[u8]) -> Result<Packet, StartupError> {
    let pid = read_i32(rest).ok_or(StartupError::Truncated)?;
    let secret = rest.get(4..).ok_or(StartupError::Truncated)?;
    // Protocol 3.2 allows secrets of 4 to 256 bytes; ours are always 4.
    match secret.len() {
        4 => Ok(Packet::Cancel(Some(CancelKey { pid, secret: read_i32(secret).ok_or(StartupError::Truncated)? }))),
        5..=256 => Ok(Packet::Cancel(None)),
        _ => Err(StartupError::Truncated),
    }
}

fn parse_startup(code: i32, mut rest: &[u8]) -> Result<Startup, StartupError> {
    let (major, minor) = (code >> 16, code & 0xffff);
    if major != PROTOCOL_MAJOR {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    let mut startup = Startup { minor: minor as u16, ..Startup::default() };
    loop {
        let (name, after) = split_cstr(rest).ok_or(StartupError::Layout("missing terminator"))?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Layout("data after terminator"));
            }
            return Ok(startup);
        }
        let (value, after) = split_cstr(after).ok_or(StartupError::Layout("missing value"))?;
        let name = std::str::from_utf8(name).map_err(|_| StartupError::NotUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::NotUtf8)?;
        if name.starts_with("_pq_.") {
            startup.protocol_options.push(name.to_owned());
        } else {
            startup.params.push((name.to_owned(), value.to_owned()));
        }
        rest = after;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn startup_body(minor: i32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut v = ((3 << 16) | minor).to_be_bytes().to_vec();
        for (k, val) in params {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn startup_parameters_are_kept_in_order() {
        let body = startup_body(0, &[("user", "app"), ("database", "bench")]);
        let Packet::Startup(s) = parse(&body).unwrap() else { panic!("not a startup") };
        assert_eq!(s.param("user"), Some("app"));
        assert_eq!(s.params[1].0, "database");
        assert_eq!(s.minor, 0);
    }

    #[test]
    fn protocol_options_are_separated_from_parameters() {
        let body = startup_body(2, &[("user", "a"), ("_pq_.compression", "on")]);
        let Packet::Startup(s) = parse(&body).unwrap() else { panic!("not a startup") };
        assert_eq!(s.minor, 2);
        assert_eq!(s.protocol_options, vec!["_pq_.compression".to_string()]);
        assert_eq!(s.params.len(), 1);
    }

    #[test]
    fn ssl_gss_and_cancel_requests_are_recognised() {
        assert_eq!(parse(&SSL_REQUEST.to_be_bytes()).unwrap(), Packet::SslRequest);
        assert_eq!(parse(&GSSENC_REQUEST.to_be_bytes()).unwrap(), Packet::GssEncRequest);
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(parse(&c).unwrap(), Packet::Cancel(Some(CancelKey { pid: 7, secret: 9 })));
        c.extend_from_slice(&[1; 28]);
        assert_eq!(parse(&c).unwrap(), Packet::Cancel(None));
    }

    #[test]
    fn wrong_major_version_is_refused() {
        let body = 0x0002_0000i32.to_be_bytes();
        assert!(matches!(parse(&body), Err(StartupError::UnsupportedProtocol { major: 2, .. })));
    }

    #[test]
    fn malformed_layouts_are_errors() {
        let mut body = startup_body(0, &[("user", "a")]);
        body.pop();
        assert!(parse(&body).is_err());
        let mut body = startup_body(0, &[]);
        body.extend_from_slice(b"junk");
        assert!(parse(&body).is_err());
        assert!(parse(&[0, 3]).is_err());
        let mut body = (3i32 << 16).to_be_bytes().to_vec();
        body.extend_from_slice(&[0xff, 0xfe, 0, b'x', 0, 0]);
        assert_eq!(parse(&body), Err(StartupError::NotUtf8));
    }

    #[test]
    fn length_prefix_is_bounded() {
        assert!(body_len(7i32.to_be_bytes()).is_err());
        assert!(body_len(10_001i32.to_be_bytes()).is_err());
        assert!(body_len((-1i32).to_be_bytes()).is_err());
        assert_eq!(body_len(8i32.to_be_bytes()).unwrap(), 4);
    }
}
