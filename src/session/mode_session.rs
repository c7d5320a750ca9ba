//! Session pooling: the client keeps one server from login to goodbye; bytes are relayed
//! unchanged both ways, and only tags are looked at to know whether the server ends clean.

use super::io::ClientIo;
use super::login::Login;
use super::pipe::{Action, Pipe};
use super::relay::{RelayError, poll_relay};
use super::{SessionError, params};
use crate::app::App;
use crate::config::Config;
use crate::error::SqlState;
use crate::pool::{Pool, Pooled, Release};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, build, tag};
use crate::server::ServerConn;
use std::future::poll_fn;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest message accepted from a server while relaying (PostgreSQL's own limit is 1 GiB).
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Client requests the server still owes a ReadyForQuery for, and extended-protocol messages
/// not yet closed by a Sync. A server goes back to the pool only when both are zero.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub sync_points: u32,
    pub unsynced: bool,
}

impl Pending {
    /// Accounts for a client message and says what to do with it (Terminate stops the relay).
    #[inline]
    pub fn observe_client(&mut self, t: u8) -> Action {
        match t {
            tag::TERMINATE => Action::Stop,
            tag::QUERY | tag::SYNC | tag::FUNCTION_CALL => {
                self.sync_points += 1;
                self.unsynced = false;
                Action::Forward
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                self.unsynced = true;
                Action::Forward
            }
            _ => Action::Forward,
        }
    }
}

pub(super) async fn run(
    app: &Arc<App>,
    cfg: &Config,
    io: &mut ClientIo<TcpStream>,
    login: Login,
    pool: Arc<Pool>,
) -> Result<(), SessionError> {
    let mut server = pool
        .checkout(cfg.broker.query_wait_timeout)
        .await
        .map_err(|e| SessionError::fatal(e.sqlstate(), crate::error::chain(&e)))?;
    // Until the startup settings are applied and the relay knows the state, close on drop.
    server.release = Release::Close;
    apply_settings(&mut server, &login).await?;
    server.release = Release::Reset;

    let registration = app.cancels.register();
    welcome(io, &server, registration.key.pid, registration.key.secret);
    io.flush().await?;
    registration.slot.set(Some(server.cancel.clone()));
    let result = relay(cfg, io, &mut server).await;
    registration.slot.set(None);
    result
}

/// Applies the client's startup parameters to its server session.
async fn apply_settings(server: &mut Pooled, login: &Login) -> Result<(), SessionError> {
    let Some(sql) = params::set_config_sql(&params::startup_settings(&login.startup)) else {
        return Ok(());
    };
    match server.simple_query(&sql).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            // The server is fine; only the client's setting was refused, as PostgreSQL
            // refuses a bad startup parameter.
            server.release = Release::Reset;
            Err(SessionError::fatal(e.code, e.message))
        }
        Err(e) => Err(SessionError::fatal(e.sqlstate(), crate::error::chain(&e))),
    }
}

/// ParameterStatus for every reported setting, our BackendKeyData, ReadyForQuery.
fn welcome(io: &mut ClientIo<TcpStream>, server: &ServerConn, pid: i32, secret: i32) {
    for (name, value) in &server.params {
        build::parameter_status(&mut io.wbuf, name, value);
    }
    build::backend_key_data(&mut io.wbuf, pid, secret);
    build::ready_for_query(&mut io.wbuf, b'I');
}

/// Relays until the client leaves or either side fails, then decides how the server goes back.
async fn relay(cfg: &Config, io: &mut ClientIo<TcpStream>, server: &mut Pooled) -> Result<(), SessionError> {
    let mut up = Pipe::new(cfg.broker.max_packet_size);
    let mut down = Pipe::new(MAX_SERVER_MESSAGE);
    let mut pending = Pending::default();
    // Bytes the client sent right behind its startup packet belong to the relay.
    let mut client_data = !io.rbuf.is_empty();
    if client_data {
        up.read_buf().extend_from_slice(&io.rbuf);
        io.rbuf.clear();
    }
    let outcome = loop {
        if client_data && scan_client(&mut up, &mut pending)? {
            break Ok(());
        }
        let ev = match poll_fn(|cx| poll_relay(cx, &mut io.stream, Some(&mut server.stream), &mut up, &mut down)).await
        {
            Ok(ev) => ev,
            Err(RelayError::Client(e)) => break Err(SessionError::Io(e)),
            Err(RelayError::Server(e)) => break Err(server_lost(io, &mut down, Some(e)).await),
        };
        if ev.server_data {
            scan_server(&mut down, server, &mut pending)?;
        }
        if ev.server_closed {
            break Err(server_lost(io, &mut down, None).await);
        }
        if ev.client_closed {
            break Err(SessionError::Disconnected);
        }
        client_data = ev.client_data;
    };
    let clean = pending.sync_points == 0 && !pending.unsynced && up.ready().is_empty() && !down.has_unscanned();
    server.release = if outcome.is_ok() || matches!(outcome, Err(SessionError::Disconnected | SessionError::Io(_))) {
        if clean { Release::Reset } else { Release::Close }
    } else {
        Release::Close
    };
    outcome
}

/// Looks at client messages; true when the client said Terminate.
fn scan_client(up: &mut Pipe, pending: &mut Pending) -> Result<bool, SessionError> {
    Ok(up.scan(|t| t == tag::TERMINATE, |t, _, _| pending.observe_client(t))?)
}

/// Looks at server messages: ReadyForQuery settles a request, ParameterStatus updates the
/// server's recorded settings.
fn scan_server(down: &mut Pipe, server: &mut ServerConn, pending: &mut Pending) -> Result<(), SessionError> {
    down.scan(
        |t| t == tag::READY_FOR_QUERY || t == tag::PARAMETER_STATUS,
        |t, msg, _| {
            let body = msg.get(HEADER_LEN..).unwrap_or_default();
            match t {
                tag::READY_FOR_QUERY => {
                    pending.sync_points = pending.sync_points.saturating_sub(1);
                    server.status = TxnStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                }
                tag::PARAMETER_STATUS => server.observe_parameter_status(body),
                _ => {}
            }
            Action::Forward
        },
    )
    .map_err(|e| SessionError::fatal(SqlState::PROTOCOL_VIOLATION, format!("server sent a bad message: {e}")))?;
    Ok(())
}

/// Passes on what the server said before dying, and tells the client.
async fn server_lost(io: &mut ClientIo<TcpStream>, down: &mut Pipe, err: Option<std::io::Error>) -> SessionError {
    let _ = io.stream.write_all(down.ready()).await;
    down.clear();
    tracing::warn!(error = ?err, "server connection lost");
    SessionError::fatal(SqlState::CONNECTION_FAILURE, "server closed the connection unexpectedly")
}
