//! Shared error vocabulary: the SQLSTATE a failure becomes on the wire, and which side caused it.

/// A five-character PostgreSQL SQLSTATE code, as sent in an ErrorResponse's `C` field.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl SqlState {
    /// 08P01: malformed or unexpected protocol message.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    /// 08006: a connection failed (the server went away under a client).
    pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
    /// 08001: the broker could not open a server connection.
    pub const CANNOT_CONNECT: SqlState = SqlState(*b"08001");
    /// 28P01: wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    /// 28000: unknown user or authentication method not usable.
    pub const INVALID_AUTHORIZATION: SqlState = SqlState(*b"28000");
    /// 3D000: the database named at startup is not configured.
    pub const INVALID_CATALOG_NAME: SqlState = SqlState(*b"3D000");
    /// 53300: too many connections (client limit, pool wait timeout).
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    /// 57P01: the broker is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    /// 0A000: a feature the broker does not support.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    /// 57P05: a client idle longer than `client_idle_timeout`.
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState(*b"57P05");
    /// 25P03: a client idle inside a transaction longer than `idle_transaction_timeout`.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState(*b"25P03");
    /// 25P04: a transaction longer than `transaction_timeout`.
    pub const TRANSACTION_TIMEOUT: SqlState = SqlState(*b"25P04");
    /// 22023: a value (here, a channel name) is not acceptable.
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState(*b"22023");
    /// 01000: a warning, sent as a notice.
    pub const WARNING: SqlState = SqlState(*b"01000");
    /// 53400: a limit of the broker's own was exceeded (a listening client's queue).
    pub const CONFIGURATION_LIMIT_EXCEEDED: SqlState = SqlState(*b"53400");
    /// 42P01: a table does not exist.
    pub const UNDEFINED_TABLE: SqlState = SqlState(*b"42P01");
    /// 42501: the user may not run this admin command.
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState(*b"42501");
    /// F0000: the config file is invalid.
    pub const CONFIG_FILE_ERROR: SqlState = SqlState(*b"F0000");
    /// 55000: the command cannot run in the current state.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState(*b"55000");
    /// 58000: an internal broker failure.
    pub const SYSTEM_ERROR: SqlState = SqlState(*b"58000");

    /// 42601 is a syntax error; used here for unknown admin commands and bad SQL made by clients.
    pub const SYNTAX_ERROR: SqlState = SqlState(*b"42601");

    /// 54000: a per-client cap of the broker's (channels LISTENed) would be exceeded.
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState(*b"54000");

    /// 42P05: a Parse named a prepared statement the client already has.
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState(*b"42P05");
    /// 57014: a statement cancelled, by a cancel request or `statement_timeout`.
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");

    /// A code received from a server; anything not five ASCII alphanumerics becomes XX000.
    pub fn from_code(code: &str) -> SqlState {
        match <[u8; 5]>::try_from(code.as_bytes()) {
            Ok(b) if b.iter().all(u8::is_ascii_alphanumeric) => SqlState(b),
            _ => SqlState(*b"XX000"),
        }
    }

    /// The code as a string.
    pub fn code(&self) -> &str {
        // Always ASCII by construction.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }
}

/// Whether an I/O error is an ordinary disconnect rather than a failure worth a warning.
pub fn is_disconnect(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(err.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected)
}

/// An error and its causes on one line ("a: b: c"), for messages sent to clients and logs.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
