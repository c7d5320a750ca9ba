//! PostgreSQL wire protocol, version 3: framing, the startup packet, and builders for what the broker sends.
//!
//! Nothing here touches sockets, config or pools; it is pure and fuzzed.

pub mod build;
pub mod frame;
pub mod startup;

/// Longest channel name PostgreSQL keeps (NAMEDATALEN - 1).
pub const MAX_CHANNEL_LEN: usize = 63;

/// Why a channel name cannot be listened on.
pub fn check_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err("channel name is longer than 63 bytes");
    }
    if name.contains('\0') {
        return Err("channel name contains a NUL byte");
    }
    Ok(())
}

/// Largest untagged startup-phase packet accepted (PostgreSQL itself allows 10 000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Frontend (client → server) message tags the broker looks at.
pub mod tag {
    /// Simple query.
    pub const QUERY: u8 = b'Q';
    /// Extended protocol: Parse.
    pub const PARSE: u8 = b'P';
    /// Extended protocol: Bind.
    pub const BIND: u8 = b'B';
    /// Extended protocol: Describe.
    pub const DESCRIBE: u8 = b'D';
    /// Extended protocol: Execute.
    pub const EXECUTE: u8 = b'E';
    /// Extended protocol: Close.
    pub const CLOSE: u8 = b'C';
    /// Extended protocol: Sync.
    pub const SYNC: u8 = b'S';
    /// Extended protocol: Flush.
    pub const FLUSH: u8 = b'H';
    /// Fast-path function call.
    pub const FUNCTION_CALL: u8 = b'F';
    /// COPY data (both directions).
    pub const COPY_DATA: u8 = b'd';
    /// COPY done (both directions).
    pub const COPY_DONE: u8 = b'c';
    /// COPY failed (frontend).
    pub const COPY_FAIL: u8 = b'f';
    /// Terminate.
    pub const TERMINATE: u8 = b'X';
    /// Password / SASL responses during authentication.
    pub const PASSWORD: u8 = b'p';

    /// Backend: ReadyForQuery.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// Backend: ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// Backend: ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// Backend: NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// Backend: NotificationResponse.
    pub const NOTIFICATION: u8 = b'A';
    /// Backend: Authentication*.
    pub const AUTHENTICATION: u8 = b'R';
    /// Backend: BackendKeyData.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// Backend: ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// Backend: BindComplete.
    pub const BIND_COMPLETE: u8 = b'2';
    /// Backend: CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// Backend: RowDescription.
    pub const ROW_DESCRIPTION: u8 = b'T';
    /// Backend: NoData.
    pub const NO_DATA: u8 = b'n';
    /// Backend: CommandComplete.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// Backend: EmptyQueryResponse.
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// Backend: PortalSuspended.
    pub const PORTAL_SUSPENDED: u8 = b's';
    /// Backend: DataRow.
    pub const DATA_ROW: u8 = b'D';
    /// Backend: NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// Backend: CopyInResponse.
    pub const COPY_IN_RESPONSE: u8 = b'G';
}

/// What a Close or Describe names: its first byte.
pub mod target {
    /// A prepared statement (a portal is `P`).
    pub const STATEMENT: u8 = b'S';
}

/// Field types of ErrorResponse and NoticeResponse.
pub mod field {
    /// Severity, localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized.
    pub const SEVERITY_V: u8 = b'V';
    /// SQLSTATE code.
    pub const CODE: u8 = b'C';
    /// Primary message.
    pub const MESSAGE: u8 = b'M';
    /// Detail.
    pub const DETAIL: u8 = b'D';
}

/// The value of field `kind` of an ErrorResponse or NoticeResponse (`msg` whole, header
/// included), if present.
pub fn error_field(msg: &[u8], kind: u8) -> Option<&[u8]> {
    let mut fields = msg.get(frame::HEADER_LEN..)?;
    while let Some((&k, rest)) = fields.split_first() {
        if k == 0 {
            return None;
        }
        let (value, after) = split_cstr(rest)?;
        if k == kind {
            return Some(value);
        }
        fields = after;
    }
    None
}

/// Transaction status byte carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

impl TxnStatus {
    /// Decodes the status byte; unknown bytes are treated as "in a transaction", the safe side.
    pub fn from_byte(b: u8) -> TxnStatus {
        match b {
            b'I' => TxnStatus::Idle,
            b'E' => TxnStatus::Failed,
            _ => TxnStatus::InTransaction,
        }
    }

    /// The status byte.
    pub fn as_byte(self) -> u8 {
        match self {
            TxnStatus::Idle => b'I',
            TxnStatus::InTransaction => b'T',
            TxnStatus::Failed => b'E',
        }
    }
}

/// Splits a NUL-terminated string off the front of `buf`, returning it and the rest.
pub fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    let (s, rest) = buf.split_at(nul);
    Some((s, rest.get(1..)?))
}

/// Reads a big-endian i32 from the front of `buf`.
pub fn read_i32(buf: &[u8]) -> Option<i32> {
    let bytes: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(i32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_checked() {
        assert!(check_channel("employee_changes").is_ok());
        assert!(check_channel("").is_err());
        assert!(check_channel(&"x".repeat(64)).is_err());
        assert!(check_channel("a\0b").is_err());
    }
}
