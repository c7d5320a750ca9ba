//! Validated configuration: one TOML file (plus the auth file it names) turned into typed settings.
//!
//! `raw` holds the file as written; this module checks every value and names the key at fault.

mod describe;
mod live;
mod pinning;
mod restart;
pub use pinning::{SessionState, max_pinned};
pub mod raw;
mod sections;
mod security;
mod syntax;
pub mod userlist;
mod validate;
pub use security::{AuthQuery, DEFAULT_AUTH_QUERY, Throttle, Tls};
use syntax::syntax_message;
use validate::Validator;
pub mod values;
pub use live::Live;
pub use restart::RESTART_ONLY;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use userlist::Userlist;

/// A config file that cannot be used, with the file and the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys / wrongly typed values.
    #[error("{path}: {message}")]
    Syntax {
        /// File path.
        path: PathBuf,
        /// The TOML parser's message, with line and key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// File path.
        path: PathBuf,
        /// Dotted key, e.g. `databases.bench.port`.
        key: String,
        /// What was expected.
        message: String,
    },
}

/// How long a client keeps a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// For the whole client session.
    Session,
    /// For one transaction.
    Transaction,
    /// For one statement.
    Statement,
}

impl PoolMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// No password; the user must still exist in the auth file when one is configured.
    Trust,
    /// MD5 challenge-response.
    Md5,
    /// SCRAM-SHA-256.
    ScramSha256,
}

impl AuthType {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Trust => "trust",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
        }
    }
}

/// `server_max_connections`: a number, or read from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMaxConnections {
    /// Read `max_connections` from the server.
    Auto,
    /// A fixed number.
    Fixed(u32),
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any.
    pub path: Option<PathBuf>,
    /// `[broker]`.
    pub broker: Broker,
    /// `[budget]`, with environment overrides applied.
    pub budget: Budget,
    /// `[auth]`, with the auth file loaded.
    pub auth: Auth,
    /// `[databases.*]` by client-facing name.
    pub databases: BTreeMap<String, Database>,
    /// `[websocket]`: the LISTEN/NOTIFY bridge.
    pub websocket: WebSocket,
    /// `[health]`: thresholds of /health and alerts.
    pub health: Health,
    /// TLS towards clients and servers (`[broker] client_tls_*`, `server_tls_*`).
    pub tls: Tls,
}

/// Thresholds of /health and of the alert events.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Budget use (0..1) at which status becomes `degraded`.
    pub degraded_utilization: f64,
    /// Share of requests failing with a server error at which status becomes `degraded`.
    pub degraded_error_rate: f64,
    /// Oldest client wait at which status becomes `overloaded`.
    pub overloaded_wait: Duration,
    /// Waiting clients at which status becomes `overloaded`.
    pub overloaded_waiting_clients: usize,
    /// Budget use (0..1) that raises the `budget_high` alert (cleared 10 points below).
    pub alert_utilization: f64,
    /// Waiting clients that raise the `clients_waiting` alert (cleared at half).
    pub alert_waiting_clients: usize,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for collectors.
    Json,
}

/// Settings of the LISTEN/NOTIFY to WebSocket bridge.
#[derive(Debug, Clone)]
pub struct WebSocket {
    /// URL path of the endpoint.
    pub path: String,
    /// Interval between WebSocket pings.
    pub ping_interval: Duration,
    /// A client that does not answer a ping within this is closed.
    pub pong_timeout: Duration,
    /// A connection without subscriptions for this long is closed (0 = never).
    pub idle_timeout: Duration,
    /// Most WebSocket connections at once.
    pub max_ws_connections: usize,
    /// Most WebSocket connections from one IP address.
    pub max_ws_connections_per_ip: usize,
    /// Notifications queued per client before it is closed as too slow.
    pub ws_send_queue: usize,
    /// Channels one client (a WebSocket connection, or a SQL client's LISTENs) may be
    /// subscribed to at once.
    pub max_channels_per_client: usize,
    /// Origins allowed to connect (empty = any).
    pub allowed_origins: Vec<String>,
    /// Bearer tokens; empty = no token needed.
    pub tokens: Vec<Token>,
    /// The message shape of notifications, for channels without their own.
    pub envelope: Envelope,
    /// Channels every connection is subscribed to on connect (and always listened on).
    pub default_channels: Vec<String>,
    /// Notifications kept per database for clients that resume (0 = no resume).
    pub replay_buffer: usize,
    /// Most payload bytes the replay buffer keeps per database.
    pub replay_buffer_bytes: usize,
    /// How often the listener proves it still receives (0 = never).
    pub listener_check_interval: Duration,
    /// How long the proof may take before the listener is replaced.
    pub listener_check_timeout: Duration,
    /// Largest payload `pgbroker_notify` may send in pieces; larger ones are dropped.
    pub max_payload_bytes: usize,
    /// Per-channel shapes (`[websocket.channels.NAME]`).
    pub channels: std::collections::BTreeMap<String, ChannelShape>,
}

impl WebSocket {
    /// The envelope and `type` of `channel`'s notifications.
    pub fn shape<'a>(&'a self, channel: &'a str) -> (Envelope, &'a str) {
        match self.channels.get(channel) {
            Some(c) => (c.envelope.unwrap_or(self.envelope), c.kind.as_deref().unwrap_or(channel)),
            None => (self.envelope, channel),
        }
    }
}

/// The JSON shape of a notification sent to a WebSocket client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Envelope {
    /// `{"type":"notification","channel","payload","pid","timestamp","messageId"}`.
    #[default]
    Notification,
    /// `{"type":<channel's type>,"channel","data","timestamp","messageId"}`, the shape of
    /// hand-written realtime services.
    Typed,
}

impl Envelope {
    /// The config value naming it.
    pub fn as_str(self) -> &'static str {
        match self {
            Envelope::Notification => "notification",
            Envelope::Typed => "typed",
        }
    }
}

/// `[websocket.channels.NAME]`.
#[derive(Debug, Clone, Default)]
pub struct ChannelShape {
    /// The typed envelope's `type` (default: the channel name).
    pub kind: Option<String>,
    /// Overrides `[websocket] envelope`.
    pub envelope: Option<Envelope>,
    /// Run through the pool on subscribe and after a `resync`: its one value is sent as a
    /// snapshot before the channel's notifications.
    pub snapshot_query: Option<String>,
}

/// A bearer token and the channels (glob patterns) it may subscribe to.
#[derive(Clone)]
pub struct Token {
    /// The secret.
    pub token: String,
    /// Channel patterns, `*` matching any run of characters.
    pub channels: Vec<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("token", &"<redacted>").field("channels", &self.channels).finish()
    }
}

/// Listener, pooling and timeout settings.
#[derive(Debug, Clone)]
pub struct Broker {
    /// PostgreSQL protocol listener.
    pub listen: SocketAddr,
    /// HTTP listener (metrics, health, WebSocket bridge).
    pub http_listen: SocketAddr,
    /// How long an HTTP client may take to send a request head (restart required).
    pub http_header_timeout: Duration,
    /// Most HTTP connections open at once on `http_listen`, WebSockets included; more are
    /// closed at accept (restart required).
    pub max_http_connections: usize,
    /// Default pool mode.
    pub pool_mode: PoolMode,
    /// Default `session_state`.
    pub session_state: SessionState,
    /// Default `max_pinned_clients` (`None`: half the pool size).
    pub max_pinned_clients: Option<u32>,
    /// Most client connections open at once.
    pub max_client_conn: usize,
    /// Pool size for databases that do not set one; `None` splits the budget across databases.
    pub default_pool_size: Option<u32>,
    /// Query run on a server before another client gets it in session mode (empty = none).
    pub server_reset_query: String,
    /// How long a client waits for a server before 53300.
    pub query_wait_timeout: Duration,
    /// How long a client may take to finish startup and authentication.
    pub client_login_timeout: Duration,
    /// How long connecting and logging in to a server may take.
    pub server_connect_timeout: Duration,
    /// How long resetting a server after use may take before it is closed instead.
    pub server_reset_timeout: Duration,
    /// Largest message accepted from a client (the length field's value).
    pub max_packet_size: usize,
    /// Largest client message the broker holds whole to read or rewrite it (Parse, Bind,
    /// Describe, Close in transaction mode); a longer Query is streamed, others refused.
    pub max_buffered_message: usize,
    /// TCP keepalive on client and server sockets.
    pub tcp_keepalive: bool,
    /// Servers kept open per pool even when idle.
    pub min_pool_size: u32,
    /// Extra servers a pool may open for clients waiting longer than `reserve_pool_timeout`.
    pub reserve_pool_size: u32,
    /// How long a client waits before the reserve may be used.
    pub reserve_pool_timeout: Duration,
    /// Most servers per database across users (0 = no limit besides the budget).
    pub max_db_connections: u32,
    /// Most servers per server user across databases (0 = no limit).
    pub max_user_connections: u32,
    /// Servers older than this are closed when next idle (jittered ±10%; 0 = never).
    pub server_lifetime: Duration,
    /// Idle servers beyond `min_pool_size` are closed after this long (0 = never).
    pub server_idle_timeout: Duration,
    /// A server is retired after this many checkouts (0 = unlimited).
    pub server_max_uses: u64,
    /// After a failed server login, the longest wait before retrying (backoff doubles up to it).
    pub server_login_retry: Duration,
    /// Query run on a server idle longer than `server_check_delay` before handing it out
    /// (empty string = an empty query, the cheapest round trip).
    pub server_check_query: String,
    /// Idle time after which a server is checked before use (0 = always check).
    pub server_check_delay: Duration,
    /// Most client connections from one IP address (0 = no limit).
    pub max_client_conn_per_ip: usize,
    /// Clients idle (not in a transaction) longer than this are disconnected (0 = never).
    pub client_idle_timeout: Duration,
    /// Clients idle inside a transaction longer than this are disconnected (0 = never).
    pub idle_transaction_timeout: Duration,
    /// Transactions (a server held) longer than this end the client (0 = never).
    pub transaction_timeout: Duration,
    /// Settings PostgreSQL does not report that are tracked per client in transaction mode.
    pub track_extra_parameters: Vec<String>,
    /// Named prepared statements kept per server in transaction mode (0 = pass-through).
    pub max_prepared_statements: usize,
    /// Named prepared statements one client may hold in transaction/statement mode; a Parse
    /// past it fails (54000).
    pub max_client_prepared_statements: usize,
    /// Bytes of statement names and text one client's named statements may hold.
    pub max_client_prepared_bytes: usize,
    /// Log format (restart required).
    pub log_format: LogFormat,
    /// How long a graceful stop waits for transactions before cancelling them.
    pub shutdown_timeout: Duration,
    /// Log each client login (PgBouncer's `log_connections`).
    pub log_connections: bool,
    /// Log each client disconnect with its reason (`log_disconnections`).
    pub log_disconnections: bool,
    /// A query with no answer from its server for this long is cancelled, and the server
    /// closed if it stays silent (0 = never; PgBouncer's `query_timeout`).
    pub query_timeout: Duration,
}

/// Inputs of the per-instance server connection budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The server's `max_connections`, or `Auto`.
    pub server_max_connections: ServerMaxConnections,
    /// Connections left free for other tools.
    pub reserved_connections: u32,
    /// Instances sharing the server.
    pub max_instances: u32,
    /// Which inputs came from the environment (`DB_MAX_CONNECTIONS`, `MAX_INSTANCES`).
    pub env_overrides: Vec<&'static str>,
    /// `static` (divide by `max_instances`) or `fleet` (instances share live).
    pub mode: BudgetMode,
    /// Fleet name: instances with the same name share the server's connections.
    pub fleet: String,
    /// How often a fleet member heartbeats and the fleet runs a round.
    pub fleet_interval: Duration,
    /// Connections a joining instance gets at once when they fit.
    pub fleet_min_budget: u32,
}

/// How the budget is shared between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetMode {
    /// A fixed share: `(max_connections - reserved) / max_instances`.
    Static,
    /// A live fair share among the instances of one fleet, counted in the database.
    Fleet,
}

impl BudgetMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetMode::Static => "static",
            BudgetMode::Fleet => "fleet",
        }
    }
}

/// Client authentication settings.
#[derive(Debug, Clone)]
pub struct Auth {
    /// Method.
    pub kind: AuthType,
    /// Auth file path, resolved against the config file's directory.
    pub file: Option<PathBuf>,
    /// Users allowed on the admin console.
    pub admin_users: Vec<String>,
    /// Users allowed read-only on the admin console.
    pub stats_users: Vec<String>,
    /// The auth file's users (empty when there is no file).
    pub users: Arc<Userlist>,
    /// Secrets looked up in the database for users not in the auth file (`auth_query`).
    pub query: Option<AuthQuery>,
    /// Failed-login delay and per-IP limit.
    pub throttle: Throttle,
}

/// One upstream database.
#[derive(Clone, PartialEq, Eq)]
pub struct Database {
    /// Host name, IP, or Unix socket directory (starts with `/`).
    pub host: String,
    /// Port (also names the Unix socket file).
    pub port: u16,
    /// Database name on the server.
    pub dbname: String,
    /// Server login user; `None` = the client's own user.
    pub user: Option<String>,
    /// Server login password; `None` = the client's password from the auth file.
    pub password: Option<String>,
    /// Most servers for each (database, user) pool; `None` follows the broker default.
    pub pool_size: Option<u32>,
    /// Pool mode for this database.
    pub pool_mode: PoolMode,
    /// Transaction mode: pin clients to their server for state that cannot move, or refuse it.
    pub session_state: SessionState,
    /// Transaction mode: most clients of a pool pinned at once (`None`: half the pool size).
    pub max_pinned_clients: Option<u32>,
    /// Servers kept open per pool.
    pub min_pool_size: u32,
    /// Extra servers usable after `reserve_pool_timeout`.
    pub reserve_pool_size: u32,
    /// Most servers for this database across users (0 = no limit).
    pub max_db_connections: u32,
    /// Channels the bridge always LISTENs on (besides those subscribers ask for).
    pub channels: Vec<String>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("pool_mode", &self.pool_mode)
            .finish_non_exhaustive()
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Loads and validates a config file, reading the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, Some(path), &|k| std::env::var(k).ok())
    }

    /// Validates config text. `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let shown = path.map_or_else(|| PathBuf::from("<config>"), Path::to_path_buf);
        let file: raw::File = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: shown.clone(), message: syntax_message(text, &e) })?;
        let v = Validator { path: &shown, env };
        let base = path.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        let broker = v.broker(&file.broker)?;
        let databases = file
            .databases
            .iter()
            .map(|(name, db)| Ok((name.clone(), v.database(name, db, &broker)?)))
            .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
        Ok(Config {
            path: path.map(Path::to_path_buf),
            websocket: v.websocket(&file.websocket)?,
            health: v.health(&file.health)?,
            budget: v.budget(&file.budget)?,
            auth: v.auth(&file.auth, &base)?,
            tls: v.tls(&file.broker, &base)?,
            broker,
            databases,
        })
    }
}

#[cfg(test)]
mod tests;
