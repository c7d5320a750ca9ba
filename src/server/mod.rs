//! One upstream PostgreSQL connection: connect over TCP or a Unix socket, log in, run the
//! broker's own small queries (reset, parameter setup). Clients' bytes never pass through here;
//! the session relays them on `stream` directly.

mod negotiate;
pub mod passthrough;
mod query;
pub mod statements;
pub mod stream;

use crate::error::SqlState;
use crate::proto::TxnStatus;
use crate::tls::ServerTls;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
pub use passthrough::Credential;
use passthrough::KeysClient;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
pub use stream::Stream;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

/// Largest message accepted from a server during login and the broker's own queries.
const MAX_SERVER_MESSAGE: usize = 64 * 1024 * 1024;

/// Where and as whom to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name, IP address, or Unix socket directory (starts with `/`).
    pub host: String,
    /// Port; for Unix sockets it names the socket file.
    pub port: u16,
    /// Database on the server.
    pub dbname: String,
    /// Login user.
    pub user: String,
    /// What proves the login, if the server asks (a password, or pass-through secrets).
    pub credential: Option<Credential>,
    /// TCP keepalive on the socket.
    pub keepalive: bool,
    /// TLS to the server (`server_tls_sslmode`; never used on Unix sockets).
    pub tls: ServerTls,
    /// `application_name` sent at login (fleet mode tags the broker's connections with it).
    pub application_name: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}/{}", self.user, self.addr(), self.dbname)
    }
}

impl Target {
    /// `host:port`, or the socket path for Unix sockets; used in logs and cancel requests.
    pub fn addr(&self) -> String {
        if self.is_unix() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Opens a bare socket to the server (also used to send CancelRequest).
    pub async fn open(&self) -> Result<Stream, ServerError> {
        let connect = |source| ServerError::Connect { addr: self.addr(), source };
        if self.is_unix() {
            Ok(Stream::Unix(UnixStream::connect(self.addr()).await.map_err(connect)?))
        } else {
            let s = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(connect)?;
            crate::net::tune(&s, self.keepalive);
            Ok(Stream::Tcp(s))
        }
    }
}

/// Why a server connection failed or must be dropped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket could not be opened.
    #[error("cannot connect to server {addr}")]
    Connect {
        /// Server address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Connecting and logging in took longer than `server_connect_timeout`.
    #[error("timed out connecting to server {addr} after {after:?}")]
    Timeout {
        /// Server address.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The server refused the login or a broker query with an ErrorResponse.
    #[error("server error {code:?}: {message}")]
    Refused {
        /// SQLSTATE from the server.
        code: SqlState,
        /// The server's message.
        message: String,
    },
    /// The server asked for a password the broker does not have.
    #[error("server asks for a password for user {user:?} but none is configured")]
    NoPassword {
        /// Login user.
        user: String,
    },
    /// The server asked for a method the known credential cannot answer (a stored md5 hash
    /// cannot answer SCRAM, SCRAM keys cannot answer md5 or cleartext).
    #[error(
        "server asks for {0} authentication, which the client's stored secret cannot answer; configure the database's user and password, or store the same kind of secret the server uses"
    )]
    NeedsPassword(&'static str),
    /// A SCRAM pass-through exchange failed (the server holds another verifier).
    #[error("SCRAM pass-through to the server failed")]
    ScramKeys(#[source] crate::server::passthrough::KeysError),
    /// An authentication method the broker cannot answer.
    #[error("server requested an unsupported authentication method ({0})")]
    UnsupportedAuth(&'static str),
    /// The server sent something unexpected.
    #[error("protocol error from server: {0}")]
    Protocol(String),
    /// The socket failed.
    #[error("server connection failed")]
    Io(#[from] io::Error),
    /// The server closed the connection.
    #[error("server closed the connection unexpectedly")]
    Closed,
    /// The server does not do TLS but the config requires it.
    #[error("server {addr} does not support TLS, but server_tls_sslmode = {mode}")]
    TlsRefused {
        /// Server address.
        addr: String,
        /// The configured mode.
        mode: &'static str,
    },
    /// The TLS handshake failed (certificate not trusted, wrong host name, ...).
    #[error("TLS handshake with server {addr} failed")]
    Tls {
        /// Server address.
        addr: String,
        /// Cause, from rustls.
        #[source]
        source: io::Error,
    },
}

impl ServerError {
    /// The SQLSTATE a client sees for this failure.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ServerError::Refused { code, .. } => *code,
            ServerError::Connect { .. }
            | ServerError::Timeout { .. }
            | ServerError::TlsRefused { .. }
            | ServerError::Tls { .. } => SqlState::CANNOT_CONNECT,
            ServerError::NoPassword { .. }
            | ServerError::NeedsPassword(_)
            | ServerError::ScramKeys(_)
            | ServerError::UnsupportedAuth(_) => SqlState::INVALID_AUTHORIZATION,
            ServerError::Protocol(_) => SqlState::PROTOCOL_VIOLATION,
            ServerError::Io(_) | ServerError::Closed => SqlState::CONNECTION_FAILURE,
        }
    }
}

/// What the broker needs to cancel a query running on a server.
#[derive(Debug)]
pub struct CancelTarget {
    /// The server's connection details.
    pub target: Arc<Target>,
    /// BackendKeyData process id.
    pub pid: i32,
    /// BackendKeyData secret.
    pub secret: i32,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One setting of a client's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Lowercase name, for comparisons (setting names are case-insensitive).
    pub key: String,
    /// Name as the server reports it (or as the client sent it).
    pub name: String,
    /// Value in the server's canonical form once a server has applied it.
    pub value: String,
}

/// A logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    /// The socket; sessions relay client traffic on it directly.
    pub stream: Stream,
    /// Broker-wide id, for logs.
    pub id: u64,
    /// ParameterStatus values the server reported, in arrival order.
    pub params: Vec<(String, String)>,
    /// Key for cancelling this server's running query.
    pub cancel: Arc<CancelTarget>,
    /// Transaction status at the last ReadyForQuery.
    pub status: TxnStatus,
    /// When the connection was opened.
    pub created: Instant,
    /// The same, as wall-clock time (for display).
    pub connected_at: std::time::SystemTime,
    /// When it was last returned to its pool.
    pub last_used: Instant,
    /// When it is retired (`server_lifetime`), if ever.
    pub expires: Option<Instant>,
    /// Checkouts so far (`server_max_uses`).
    pub uses: u64,
    /// The pool configuration generation it was opened under.
    pub generation: u64,
    /// Settings the broker applied that PostgreSQL does not report (lowercase name, value).
    pub applied: Vec<(String, String)>,
    /// The client settings it was last found to have; cleared whenever its settings may have
    /// changed, after which the next client compares them one by one again.
    pub(crate) synced: Option<std::sync::Arc<Vec<Setting>>>,
    /// Broker-named prepared statements this server holds (transaction mode).
    pub statements: statements::Statements,
    /// Bytes read from the server by the broker's own queries and not consumed yet.
    pub rbuf: BytesMut,
    /// Notifications that arrived during the broker's own queries (listener connections).
    pub notifications: std::collections::VecDeque<Notification>,
}

/// A NotificationResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The notifying backend's process id.
    pub pid: i32,
    /// The channel.
    pub channel: String,
    /// The payload.
    pub payload: String,
}

/// A server's reply to one of the broker's own queries that failed.
#[derive(Debug, Clone)]
pub struct QueryError {
    /// SQLSTATE.
    pub code: SqlState,
    /// Message.
    pub message: String,
}

impl ServerConn {
    /// Connects and logs in, bounded by `timeout` in total.
    pub async fn connect(target: Arc<Target>, timeout: Duration) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(timeout, Self::connect_inner(target.clone())).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout { addr: target.addr(), after: timeout }),
        }
    }

    async fn connect_inner(target: Arc<Target>) -> Result<ServerConn, ServerError> {
        let mut stream = negotiate::encrypt(&target, target.open().await?).await?;
        let mut out = BytesMut::with_capacity(256);
        let mut params = vec![("user", target.user.as_str()), ("database", target.dbname.as_str())];
        if let Some(name) = &target.application_name {
            params.push(("application_name", name.as_str()));
        }
        frontend::startup_message(params, &mut out)?;
        stream.write_all(&out).await?;
        let mut rbuf = BytesMut::with_capacity(1024);
        let mut scram: Option<Scram> = None;
        let mut params = Vec::new();
        let mut key = None;
        loop {
            out.clear();
            match read_message(&mut stream, &mut rbuf).await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = credential(&target)?.password().ok_or(ServerError::NeedsPassword("password"))?;
                    frontend::password_message(password.as_bytes(), &mut out)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = credential(&target)?
                        .md5_response(&target.user, body.salt())
                        .ok_or(ServerError::NeedsPassword("md5"))?;
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let (mut plain, mut plus) = (false, false);
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next()? {
                        plain |= m == SCRAM_SHA_256;
                        plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    // Bind to the TLS channel whenever both sides can, as libpq's default does.
                    let hash = stream.tls_server_end_point();
                    let (mechanism, binding) = match &hash {
                        Some(hash) if plus => (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash.clone())),
                        Some(_) if plain => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        None if plain => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => return Err(ServerError::UnsupportedAuth("SASL without SCRAM-SHA-256")),
                    };
                    let s = match credential(&target)? {
                        Credential::Password(p) => Scram::Password(ScramSha256::new(p.as_bytes(), binding)),
                        Credential::ScramKeys { client_key, server_key } => {
                            let bound = hash.filter(|_| mechanism == SCRAM_SHA_256_PLUS);
                            Scram::Keys(KeysClient::new(*client_key, *server_key, bound))
                        }
                        Credential::Md5(_) => return Err(ServerError::NeedsPassword("SCRAM")),
                    };
                    let first = match &s {
                        Scram::Password(s) => s.message().to_vec(),
                        Scram::Keys(k) => k.first(),
                    };
                    frontend::sasl_initial_response(mechanism, &first, &mut out)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    match scram.as_mut().ok_or_else(|| protocol("SASL continue before start"))? {
                        Scram::Password(s) => {
                            s.update(body.data())?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        Scram::Keys(k) => {
                            let reply = k.handle_server_first(body.data()).map_err(scram_keys)?;
                            frontend::sasl_response(&reply, &mut out)?;
                        }
                    }
                }
                Message::AuthenticationSaslFinal(body) => {
                    match scram.as_mut().ok_or_else(|| protocol("SASL final before start"))? {
                        Scram::Password(s) => s.finish(body.data())?,
                        Scram::Keys(k) => k.handle_server_final(body.data()).map_err(scram_keys)?,
                    }
                }
                Message::AuthenticationGss | Message::AuthenticationGssContinue(_) | Message::AuthenticationSspi => {
                    return Err(ServerError::UnsupportedAuth("GSSAPI/SSPI"));
                }
                Message::AuthenticationKerberosV5 | Message::AuthenticationScmCredential => {
                    return Err(ServerError::UnsupportedAuth("Kerberos V5 / SCM credentials"));
                }
                Message::ParameterStatus(body) => {
                    set_param(&mut params, body.name()?, body.value()?);
                }
                Message::BackendKeyData(body) => key = Some((body.process_id(), body.secret_key())),
                Message::ErrorResponse(body) => {
                    let QueryError { code, message } = error_fields(&body);
                    return Err(ServerError::Refused { code, message });
                }
                Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => break,
                _ => return Err(protocol("unexpected message during login")),
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
        }
        let (pid, secret) = key.unwrap_or((0, 0));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(server = id, addr = %target.addr(), pid, "server connected");
        Ok(ServerConn {
            stream,
            id,
            params,
            cancel: Arc::new(CancelTarget { target, pid, secret }),
            status: TxnStatus::Idle,
            created: Instant::now(),
            connected_at: std::time::SystemTime::now(),
            last_used: Instant::now(),
            expires: None,
            uses: 0,
            generation: 0,
            applied: Vec::new(),
            synced: None,
            statements: statements::Statements::default(),
            rbuf: BytesMut::new(),
            notifications: std::collections::VecDeque::new(),
        })
    }

    /// Records a ParameterStatus the server sent while relaying.
    pub fn observe_parameter_status(&mut self, body: &[u8]) {
        self.synced = None;
        if let Some((name, value)) = parse_parameter_status(body) {
            set_param(&mut self.params, name, value);
        }
    }

    /// True if the idle socket has nothing to read and is not closed. A server that spoke or
    /// hung up while idle (admin kill, restart, idle_session_timeout) must not be handed out.
    pub fn is_idle_healthy(&self) -> bool {
        matches!(self.stream.probe(), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The value of a reported parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of a reported parameter, matching the name case-insensitively.
    pub fn param_ci(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Records a non-reported setting the broker applied (lowercase name).
    pub fn set_applied(&mut self, key: &str, value: &str) {
        self.synced = None;
        set_param(&mut self.applied, key, value);
    }

    /// Records that `sql` ran on the session as a whole: a `DISCARD ALL` or `RESET ALL`
    /// took every setting the broker applied back to its default.
    pub fn after_reset(&mut self, sql: &str) {
        self.synced = None;
        let lower = sql.to_ascii_lowercase();
        if lower.contains("discard all") || lower.contains("reset all") {
            self.applied.clear();
        }
    }
}

/// Splits a ParameterStatus body (`name\0value\0`).
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = crate::proto::split_cstr(body)?;
    let (value, _) = crate::proto::split_cstr(rest)?;
    Some((std::str::from_utf8(name).ok()?, std::str::from_utf8(value).ok()?))
}

fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => {
            if v != value {
                value.clone_into(v);
            }
        }
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

/// A SCRAM exchange with the server, by password or by pass-through keys.
enum Scram {
    Password(ScramSha256),
    Keys(KeysClient),
}

fn scram_keys(e: crate::server::passthrough::KeysError) -> ServerError {
    ServerError::ScramKeys(e)
}

fn credential(target: &Target) -> Result<&Credential, ServerError> {
    target.credential.as_ref().ok_or_else(|| ServerError::NoPassword { user: target.user.clone() })
}

fn protocol(what: &str) -> ServerError {
    ServerError::Protocol(what.to_string())
}

fn error_fields(body: &postgres_protocol::message::backend::ErrorResponseBody) -> QueryError {
    let mut code = SqlState::SYSTEM_ERROR;
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            crate::proto::field::CODE => code = SqlState::from_code(&String::from_utf8_lossy(f.value_bytes())),
            crate::proto::field::MESSAGE => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    QueryError { code, message }
}

/// Reads one whole backend message, bounded in size.
async fn read_message(stream: &mut Stream, buf: &mut BytesMut) -> Result<Message, ServerError> {
    loop {
        if let Some(h) = Header::parse(buf)?
            && h.len() as usize > MAX_SERVER_MESSAGE
        {
            return Err(protocol("message over 64 MiB during a broker query"));
        }
        if let Some(m) = Message::parse(buf)? {
            return Ok(m);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ServerError::Closed);
        }
    }
}
