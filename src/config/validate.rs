//! The checks that turn raw values into typed settings: the shared helpers (strings,
//! durations, integers, addresses) and the broker, auth and database sections.

use super::values::{expand_env, parse_duration, parse_pg_url};
use super::{Auth, AuthType, Broker, ConfigError, Database, Env, LogFormat, PoolMode, raw};
use crate::config::userlist::Userlist;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Checks raw values, naming the key at fault in every error.
pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    pub(super) env: Env<'a>,
}

impl Validator<'_> {
    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_owned(), key: key.to_string(), message: message.into() }
    }

    pub(super) fn string(&self, key: &str, v: &Option<String>) -> Result<Option<String>, ConfigError> {
        v.as_deref().map(|s| expand_env(s, self.env).map_err(|m| self.invalid(key, m))).transpose()
    }

    pub(super) fn duration(&self, key: &str, v: &Option<raw::NumOrStr>, default: u64) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(raw::NumOrStr::Int(n)) => {
                u64::try_from(*n).map(Duration::from_secs).map_err(|_| self.invalid(key, "must not be negative"))
            }
            Some(raw::NumOrStr::Str(s)) => {
                let s = expand_env(s, self.env).map_err(|m| self.invalid(key, m))?;
                parse_duration(&s).map_err(|m| self.invalid(key, m))
            }
        }
    }

    pub(super) fn int<T: TryFrom<i64>>(
        &self,
        key: &str,
        v: Option<i64>,
        default: T,
        min: i64,
    ) -> Result<T, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if n < min => Err(self.invalid(key, format!("must be at least {min}, got {n}"))),
            Some(n) => T::try_from(n).map_err(|_| self.invalid(key, format!("{n} is out of range"))),
        }
    }

    pub(super) fn addr(&self, key: &str, v: &Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
        let s = self.string(key, v)?.unwrap_or_else(|| default.to_string());
        s.parse().map_err(|_| self.invalid(key, format!("expected an address such as \"127.0.0.1:6432\", got {s:?}")))
    }

    pub(super) fn pool_mode(&self, key: &str, v: &Option<String>) -> Result<Option<PoolMode>, ConfigError> {
        Ok(match self.string(key, v)?.as_deref() {
            None => None,
            Some("session") => Some(PoolMode::Session),
            Some("transaction") => Some(PoolMode::Transaction),
            Some("statement") => Some(PoolMode::Statement),
            Some(other) => {
                return Err(
                    self.invalid(key, format!("expected \"session\", \"transaction\" or \"statement\", got {other:?}"))
                );
            }
        })
    }

    pub(super) fn broker(&self, b: &raw::Broker) -> Result<Broker, ConfigError> {
        Ok(Broker {
            listen: self.addr("broker.listen", &b.listen, "127.0.0.1:6432")?,
            http_listen: self.addr("broker.http_listen", &b.http_listen, "127.0.0.1:6433")?,
            http_header_timeout: self.duration("broker.http_header_timeout", &b.http_header_timeout, 10)?,
            max_http_connections: self.int("broker.max_http_connections", b.max_http_connections, 1024, 1)?,
            pool_mode: self.pool_mode("broker.pool_mode", &b.pool_mode)?.unwrap_or(PoolMode::Session),
            session_state: self.session_state("broker.session_state", &b.session_state)?.unwrap_or_default(),
            max_pinned_clients: self.max_pinned_clients("broker.max_pinned_clients", b.max_pinned_clients)?,
            max_client_conn: self.int("broker.max_client_conn", b.max_client_conn, 10_000, 1)?,
            default_pool_size: b
                .default_pool_size
                .map(|n| self.int("broker.default_pool_size", Some(n), 0, 1))
                .transpose()?,
            server_reset_query: self
                .string("broker.server_reset_query", &b.server_reset_query)?
                .unwrap_or_else(|| "DISCARD ALL".to_string()),
            query_wait_timeout: self.duration("broker.query_wait_timeout", &b.query_wait_timeout, 120)?,
            client_login_timeout: self.duration("broker.client_login_timeout", &b.client_login_timeout, 15)?,
            server_connect_timeout: self.duration("broker.server_connect_timeout", &b.server_connect_timeout, 15)?,
            server_reset_timeout: self.duration("broker.server_reset_timeout", &b.server_reset_timeout, 10)?,
            max_packet_size: self.int("broker.max_packet_size", b.max_packet_size, (1 << 30) - 1, 1024)?,
            max_buffered_message: self.int("broker.max_buffered_message", b.max_buffered_message, 16 << 20, 16384)?,
            tcp_keepalive: b.tcp_keepalive.unwrap_or(true),
            min_pool_size: self.int("broker.min_pool_size", b.min_pool_size, 0, 0)?,
            reserve_pool_size: self.int("broker.reserve_pool_size", b.reserve_pool_size, 0, 0)?,
            reserve_pool_timeout: self.duration("broker.reserve_pool_timeout", &b.reserve_pool_timeout, 5)?,
            max_db_connections: self.int("broker.max_db_connections", b.max_db_connections, 0, 0)?,
            max_user_connections: self.int("broker.max_user_connections", b.max_user_connections, 0, 0)?,
            server_lifetime: self.duration("broker.server_lifetime", &b.server_lifetime, 3600)?,
            server_idle_timeout: self.duration("broker.server_idle_timeout", &b.server_idle_timeout, 600)?,
            server_max_uses: self.int("broker.server_max_uses", b.server_max_uses, 0, 0)?,
            server_login_retry: self.duration("broker.server_login_retry", &b.server_login_retry, 15)?,
            server_check_query: self.string("broker.server_check_query", &b.server_check_query)?.unwrap_or_default(),
            server_check_delay: self.duration("broker.server_check_delay", &b.server_check_delay, 30)?,
            max_client_conn_per_ip: self.int("broker.max_client_conn_per_ip", b.max_client_conn_per_ip, 0, 0)?,
            client_idle_timeout: self.duration("broker.client_idle_timeout", &b.client_idle_timeout, 0)?,
            idle_transaction_timeout: self.duration(
                "broker.idle_transaction_timeout",
                &b.idle_transaction_timeout,
                0,
            )?,
            transaction_timeout: self.duration("broker.transaction_timeout", &b.transaction_timeout, 0)?,
            track_extra_parameters: b.track_extra_parameters.clone().unwrap_or_else(|| vec!["search_path".to_string()]),
            max_prepared_statements: self.int("broker.max_prepared_statements", b.max_prepared_statements, 200, 0)?,
            max_client_prepared_statements: self.int(
                "broker.max_client_prepared_statements",
                b.max_client_prepared_statements,
                10_000,
                1,
            )?,
            max_client_prepared_bytes: self.int(
                "broker.max_client_prepared_bytes",
                b.max_client_prepared_bytes,
                16 << 20,
                1024,
            )?,
            log_format: match self.string("broker.log_format", &b.log_format)?.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(
                        self.invalid("broker.log_format", format!("expected \"text\" or \"json\", got {other:?}"))
                    );
                }
            },
            shutdown_timeout: self.duration("broker.shutdown_timeout", &b.shutdown_timeout, 30)?,
            log_connections: b.log_connections.unwrap_or(true),
            log_disconnections: b.log_disconnections.unwrap_or(true),
            query_timeout: self.duration("broker.query_timeout", &b.query_timeout, 0)?,
        })
    }

    pub(super) fn auth(&self, a: &raw::Auth, base: &Path) -> Result<Auth, ConfigError> {
        let kind = match self.string("auth.type", &a.kind)?.as_deref() {
            None | Some("scram-sha-256") => AuthType::ScramSha256,
            Some("md5") => AuthType::Md5,
            Some("trust") => AuthType::Trust,
            Some(other) => {
                return Err(self
                    .invalid("auth.type", format!("expected \"trust\", \"md5\" or \"scram-sha-256\", got {other:?}")));
            }
        };
        let file = self.string("auth.file", &a.file)?.map(|f| base.join(f));
        let query = self.auth_query(a)?;
        let users = match &file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| self.invalid("auth.file", format!("cannot read {}: {e}", f.display())))?;
                Userlist::parse(&text).map_err(|e| self.invalid("auth.file", format!("{}: {e}", f.display())))?
            }
            None if kind == AuthType::Trust || query.is_some() => Userlist::default(),
            None => {
                return Err(self.invalid(
                    "auth.file",
                    format!("required with auth.type = \"{}\" (or set auth.user for auth_query)", kind.as_str()),
                ));
            }
        };
        Ok(Auth {
            kind,
            file,
            admin_users: a.admin_users.clone().unwrap_or_default(),
            stats_users: a.stats_users.clone().unwrap_or_default(),
            users: Arc::new(users),
            query,
            throttle: self.throttle(a)?,
        })
    }

    pub(super) fn database(&self, name: &str, d: &raw::Database, broker: &Broker) -> Result<Database, ConfigError> {
        let key = |k: &str| format!("databases.{name}.{k}");
        let mut host = self.string(&key("host"), &d.host)?;
        let mut port = d.port;
        let mut dbname = self.string(&key("dbname"), &d.dbname)?;
        let mut user = self.string(&key("user"), &d.user)?;
        let mut password = self.string(&key("password"), &d.password)?;
        if let Some(url) = self.string(&key("url"), &d.url)? {
            if host.is_some() || port.is_some() || dbname.is_some() || user.is_some() || password.is_some() {
                return Err(self.invalid(&key("url"), "give either url or host/port/dbname/user/password, not both"));
            }
            let u = parse_pg_url(&url).map_err(|m| self.invalid(&key("url"), m))?;
            (host, dbname, user, password) = (u.host, u.dbname, u.user, u.password);
            port = u.port.map(i64::from);
        }
        Ok(Database {
            host: host.unwrap_or_else(|| "127.0.0.1".to_string()),
            port: self.int(&key("port"), port, 5432, 1)?,
            dbname: dbname.unwrap_or_else(|| name.to_string()),
            user,
            password,
            pool_size: d.pool_size.map(|n| self.int(&key("pool_size"), Some(n), 0, 1)).transpose()?,
            pool_mode: self.pool_mode(&key("pool_mode"), &d.pool_mode)?.unwrap_or(broker.pool_mode),
            session_state: self.session_state(&key("session_state"), &d.session_state)?.unwrap_or(broker.session_state),
            max_pinned_clients: self
                .max_pinned_clients(&key("max_pinned_clients"), d.max_pinned_clients)?
                .or(broker.max_pinned_clients),
            min_pool_size: self.int(&key("min_pool_size"), d.min_pool_size, broker.min_pool_size, 0)?,
            reserve_pool_size: self.int(&key("reserve_pool_size"), d.reserve_pool_size, broker.reserve_pool_size, 0)?,
            max_db_connections: self.int(
                &key("max_db_connections"),
                d.max_db_connections,
                broker.max_db_connections,
                0,
            )?,
            channels: d.channels.clone().unwrap_or_default(),
        })
    }
}
