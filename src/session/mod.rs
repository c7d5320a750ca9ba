//! A client session: the task that owns one client socket from startup to goodbye.
//!
//! Login (startup packet, authentication) happens here; then the client loop relays bytes
//! between the client and a server checked out from its pool at its first message.

pub(crate) mod accounting;
mod buffers;
mod client_loop;
mod hints;
mod listen;
mod login;
pub(crate) mod params;
mod pending;
pub mod pipe;
pub mod prepared;
mod probe;
pub mod relay;
mod shared;
mod sql;
mod timers;
mod welcome;

pub use shared::{Console, ConsoleFuture, Shared};

use crate::error::{SqlState, is_disconnect};
use crate::net::{ClientIo, ClientIoError, ClientStream};
use crate::proto::build::{self, Severity};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

/// Why a session ended other than by the client saying goodbye.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The client went away.
    #[error("client disconnected")]
    Disconnected,
    /// The client socket failed.
    #[error("client connection failed")]
    Io(#[source] std::io::Error),
    /// The session is refused or ended with this error, which the client is told.
    #[error("{message}")]
    Fatal {
        /// SQLSTATE sent to the client.
        code: SqlState,
        /// Message sent to the client.
        message: String,
    },
    /// A login refused for a reason counted on its own (`pgbroker_refused_clients_total`).
    #[error("{1}")]
    Refused(Refusal, String),
    /// The client broke message framing.
    #[error("protocol violation")]
    Frame(#[from] crate::proto::frame::FrameError),
    /// The client sent a bad startup packet.
    #[error("invalid startup packet")]
    Startup(#[from] crate::proto::startup::StartupError),
    /// The TLS handshake failed (nothing more can be said to the client).
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
}

/// A client connection that failed or broke framing ends its session the same way.
impl From<ClientIoError> for SessionError {
    fn from(e: ClientIoError) -> SessionError {
        match e {
            ClientIoError::Disconnected => SessionError::Disconnected,
            ClientIoError::Io(e) => SessionError::Io(e),
            ClientIoError::Frame(e) => SessionError::Frame(e),
            ClientIoError::Startup(e) => SessionError::Startup(e),
        }
    }
}

/// A refused login ends its session with the refusal.
impl From<crate::auth::AuthError> for SessionError {
    fn from(e: crate::auth::AuthError) -> SessionError {
        match e {
            crate::auth::AuthError::Client(e) => e.into(),
            crate::auth::AuthError::Refused { code, message } => SessionError::Fatal { code, message },
        }
    }
}

/// A server that failed under the client (the client is told why, with its SQLSTATE).
impl From<crate::server::ServerError> for SessionError {
    fn from(e: crate::server::ServerError) -> Self {
        SessionError::fatal(e.sqlstate(), crate::error::chain(&e))
    }
}

/// No server for the client (the client is told why, with its SQLSTATE).
impl From<crate::pool::PoolError> for SessionError {
    fn from(e: crate::pool::PoolError) -> Self {
        SessionError::fatal(e.sqlstate(), crate::error::chain(&e))
    }
}

/// Refusals the broker counts apart from the SQLSTATE they are told with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed logins from the client's address.
    Throttled,
    /// A plaintext client under `client_tls_sslmode = require`.
    TlsRequired,
}

impl SessionError {
    /// A refusal the client is told about.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> SessionError {
        SessionError::Fatal { code, message: message.into() }
    }

    /// What the client is told, if anything can still reach it.
    fn client_message(&self) -> Option<(SqlState, String)> {
        match self {
            SessionError::Disconnected | SessionError::Io(_) | SessionError::Tls(_) => None,
            SessionError::Fatal { code, message } => Some((*code, message.clone())),
            // Both are refusals of the login itself, as PostgreSQL words them (28000).
            SessionError::Refused(_, message) => Some((SqlState::INVALID_AUTHORIZATION, message.clone())),
            // Not a violation: a limit of the broker's, which PostgreSQL would have taken.
            SessionError::Frame(e @ crate::proto::frame::FrameError::TooLongToHold { .. }) => {
                Some((SqlState::PROGRAM_LIMIT_EXCEEDED, e.to_string()))
            }
            SessionError::Frame(e) => Some((SqlState::PROTOCOL_VIOLATION, e.to_string())),
            SessionError::Startup(e) => Some((SqlState::PROTOCOL_VIOLATION, e.to_string())),
        }
    }

    /// True for ordinary ends not worth more than a debug line.
    fn is_quiet(&self) -> bool {
        match self {
            SessionError::Disconnected => true,
            SessionError::Io(e) => is_disconnect(e),
            _ => false,
        }
    }
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Serves one client until it leaves; every failure ends only this client. `admin_only`:
/// admitted past `max_client_conn` on the admin reserve, so only a console login may stay.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, admin_only: bool) {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("session", id, %peer);
    async move {
        let mut io = ClientIo::new(ClientStream::Plain(stream));
        let result = login::serve(&shared, &mut io, id, peer, admin_only).await;
        let log = shared.config().broker.log_disconnections;
        match &result {
            Ok(()) if log => tracing::info!(reason = "client close request", "client disconnected"),
            Err(e) if log || !e.is_quiet() => {
                tracing::info!(reason = %crate::error::chain(e), "client disconnected")
            }
            _ => {}
        }
        if let Err(e) = result
            && let Some((code, message)) = e.client_message()
        {
            send_fatal(&mut io, code, &message).await;
        }
    }
    .instrument(span)
    .await
}

/// How long a client being closed gets to take its last message: one that does not read
/// would otherwise hold its session, socket and slot for good.
pub(crate) const LAST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the client why it is being disconnected, best effort, for at most
/// `LAST_MESSAGE_WAIT`.
pub async fn send_fatal<S: tokio::io::AsyncWrite + Unpin>(io: &mut ClientIo<S>, code: SqlState, message: &str) {
    let mut buf = BytesMut::new();
    build::error_response(&mut buf, Severity::Fatal, code, message, None);
    let send = async {
        io.stream.write_all(&buf).await?;
        io.stream.flush().await?;
        io.stream.shutdown().await
    };
    let _ = tokio::time::timeout(LAST_MESSAGE_WAIT, send).await;
}

/// Fleet mode keeps the fleet's `application_name` on servers, since peers count the fleet's
/// connections by it: the client's own is taken out of the settings sent to servers and
/// returned, to be reported to the client. `None` outside fleet mode.
fn keep_fleet_tag(cfg: &crate::config::Config, settings: &mut Vec<(String, String)>) -> Option<String> {
    if cfg.budget.mode != crate::config::BudgetMode::Fleet {
        return None;
    }
    let mut own = String::new();
    settings.retain(|(k, v)| {
        let app = k.eq_ignore_ascii_case("application_name");
        if app {
            own.clone_from(v);
        }
        !app
    });
    Some(own)
}

/// The value to report to the client for setting `name`: its own application_name in fleet
/// mode (`own_name`, from `keep_fleet_tag`), else the server's.
fn reported<'a>(own_name: Option<&'a str>, name: &str, value: &'a str) -> &'a str {
    match own_name {
        Some(own) if name.eq_ignore_ascii_case("application_name") => own,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    /// Size of the future an async fn of four arguments returns.
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's future is allocated for the life of the client, idle or not: the large
    /// states it passes through (login, opening a server, waiting for one, the relay loop
    /// while the client is busy) are boxed while they last, and large values passed to its
    /// async fns are boxed (an async fn holds its arguments besides its locals), and values moved
    /// before an await are made in plain functions (an async fn keeps a moved-from local's
    /// place). 1032 bytes when written (4600 before boxing the login and the loop, 7296
    /// before the first boxing).
    #[test]
    fn a_session_future_is_small() {
        let size = future_size(super::run);
        assert!(size <= 1100, "session future is {size} bytes");
    }
}
