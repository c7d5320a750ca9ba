//! The TOML file as written: serde DTOs with defaults and no unknown keys. Validation lives in `mod.rs`.

use serde::Deserialize;
use std::collections::BTreeMap;

/// A value that may be written as a number or a string (durations, "auto").
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum NumOrStr {
    /// An integer.
    Int(i64),
    /// A string, e.g. `"30s"` or `"auto"`.
    Str(String),
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct File {
    /// `[broker]`
    pub broker: Broker,
    /// `[budget]`
    pub budget: Budget,
    /// `[auth]`
    pub auth: Auth,
    /// `[databases.NAME]`
    pub databases: BTreeMap<String, Database>,
    /// `[websocket]`
    pub websocket: WebSocket,
    /// `[health]`
    pub health: Health,
}

/// `[health]`: thresholds of /health and the alerts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub degraded_utilization: Option<f64>,
    pub degraded_error_rate: Option<f64>,
    pub overloaded_wait: Option<NumOrStr>,
    pub overloaded_waiting_clients: Option<i64>,
    pub alert_utilization: Option<f64>,
    pub alert_waiting_clients: Option<i64>,
}

/// `[broker]`: listeners, pooling and timeouts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub http_header_timeout: Option<NumOrStr>,
    pub max_http_connections: Option<i64>,
    pub pool_mode: Option<String>,
    pub session_state: Option<String>,
    pub max_pinned_clients: Option<i64>,
    pub max_client_conn: Option<i64>,
    pub default_pool_size: Option<i64>,
    pub server_reset_query: Option<String>,
    pub query_wait_timeout: Option<NumOrStr>,
    pub client_login_timeout: Option<NumOrStr>,
    pub server_connect_timeout: Option<NumOrStr>,
    pub server_reset_timeout: Option<NumOrStr>,
    pub max_packet_size: Option<i64>,
    pub max_buffered_message: Option<i64>,
    pub tcp_keepalive: Option<bool>,
    pub min_pool_size: Option<i64>,
    pub reserve_pool_size: Option<i64>,
    pub reserve_pool_timeout: Option<NumOrStr>,
    pub max_db_connections: Option<i64>,
    pub max_user_connections: Option<i64>,
    pub server_lifetime: Option<NumOrStr>,
    pub server_idle_timeout: Option<NumOrStr>,
    pub server_max_uses: Option<i64>,
    pub server_login_retry: Option<NumOrStr>,
    pub server_check_query: Option<String>,
    pub server_check_delay: Option<NumOrStr>,
    pub max_client_conn_per_ip: Option<i64>,
    pub client_idle_timeout: Option<NumOrStr>,
    pub idle_transaction_timeout: Option<NumOrStr>,
    pub transaction_timeout: Option<NumOrStr>,
    pub track_extra_parameters: Option<Vec<String>>,
    pub max_prepared_statements: Option<i64>,
    pub max_client_prepared_statements: Option<i64>,
    pub max_client_prepared_bytes: Option<i64>,
    pub log_format: Option<String>,
    pub shutdown_timeout: Option<NumOrStr>,
    pub log_connections: Option<bool>,
    pub log_disconnections: Option<bool>,
    pub query_timeout: Option<NumOrStr>,
    pub client_tls_sslmode: Option<String>,
    pub client_tls_cert_file: Option<String>,
    pub client_tls_key_file: Option<String>,
    pub server_tls_sslmode: Option<String>,
    pub server_tls_ca_file: Option<String>,
}

/// `[budget]`: the inputs of the per-instance server connection budget.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub server_max_connections: Option<NumOrStr>,
    pub reserved_connections: Option<i64>,
    pub max_instances: Option<i64>,
    pub mode: Option<String>,
    pub fleet: Option<String>,
    pub fleet_interval: Option<NumOrStr>,
    pub fleet_min_budget: Option<i64>,
}

/// `[auth]`: how clients authenticate to the broker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub file: Option<String>,
    pub admin_users: Option<Vec<String>>,
    pub stats_users: Option<Vec<String>>,
    /// PgBouncer's `auth_query`.
    #[serde(alias = "auth_query")]
    pub query: Option<String>,
    /// PgBouncer's `auth_user`.
    #[serde(alias = "auth_user")]
    pub user: Option<String>,
    #[serde(alias = "auth_password")]
    pub password: Option<String>,
    /// PgBouncer's `auth_dbname`.
    #[serde(alias = "auth_dbname")]
    pub dbname: Option<String>,
    pub failure_delay: Option<NumOrStr>,
    pub max_failures_per_ip: Option<i64>,
    pub max_failures_global: Option<i64>,
}

/// `[databases.NAME]`: one upstream database.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    pub url: Option<String>,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<i64>,
    pub pool_mode: Option<String>,
    pub session_state: Option<String>,
    pub max_pinned_clients: Option<i64>,
    pub min_pool_size: Option<i64>,
    pub reserve_pool_size: Option<i64>,
    pub max_db_connections: Option<i64>,
    pub channels: Option<Vec<String>>,
}

/// `[websocket]`: the LISTEN/NOTIFY bridge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocket {
    pub path: Option<String>,
    pub ping_interval: Option<NumOrStr>,
    pub pong_timeout: Option<NumOrStr>,
    pub idle_timeout: Option<NumOrStr>,
    pub max_ws_connections: Option<i64>,
    pub max_ws_connections_per_ip: Option<i64>,
    pub ws_send_queue: Option<i64>,
    pub max_channels_per_client: Option<i64>,
    pub allowed_origins: Option<Vec<String>>,
    pub tokens: Option<Vec<Token>>,
    pub envelope: Option<String>,
    pub default_channels: Option<Vec<String>>,
    pub replay_buffer: Option<i64>,
    pub replay_buffer_bytes: Option<i64>,
    pub listener_check_interval: Option<NumOrStr>,
    pub listener_check_timeout: Option<NumOrStr>,
    pub max_payload_bytes: Option<i64>,
    pub channels: Option<std::collections::BTreeMap<String, Channel>>,
}

/// `[websocket.channels.NAME]`: how one channel's notifications are shaped.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Channel {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub envelope: Option<String>,
    pub snapshot_query: Option<String>,
}

/// `[[websocket.tokens]]`: a bearer token and the channels it may subscribe to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Token {
    pub token: Option<String>,
    pub channels: Option<Vec<String>>,
}
