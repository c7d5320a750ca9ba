//! The security settings: TLS both ways (`[broker] client_tls_*`, `server_tls_*`), the
//! `auth_query` lookup and login throttling (`[auth]`).

use super::{ConfigError, Validator, raw};
use crate::tls::{ClientMode, ClientTls, ServerMode, ServerTls};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// TLS settings with their certificates and keys loaded.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Client-facing: mode and acceptor.
    pub client: ClientTls,
    /// `client_tls_cert_file`, resolved.
    pub client_cert_file: Option<PathBuf>,
    /// `client_tls_key_file`, resolved.
    pub client_key_file: Option<PathBuf>,
    /// Server-facing: mode and connector.
    pub server: ServerTls,
}

/// Looking up a client's secret in the database instead of the auth file.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthQuery {
    /// The query; `$1` is the user name; returns (name, secret).
    pub query: String,
    /// The user it runs as.
    pub user: String,
    /// That user's password (else the auth file's plain password for it).
    pub password: Option<String>,
    /// Database it runs in; `None` = the client's database's `dbname`.
    pub dbname: Option<String>,
}

impl std::fmt::Debug for AuthQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthQuery")
            .field("query", &self.query)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

/// PgBouncer's default `auth_query`: expired or non-login roles yield no secret.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

/// Login hardening: how failures are slowed down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Delay before a failed login is answered.
    pub failure_delay: Duration,
    /// Failed logins per IP address per minute before further attempts are refused (0 = off).
    pub max_failures_per_ip: u32,
    /// Failed logins from all addresses per minute before new exchanges are spaced out (0 = off).
    pub max_failures_global: u32,
}

impl Validator<'_> {
    pub(super) fn tls(&self, b: &raw::Broker, base: &Path) -> Result<Tls, ConfigError> {
        let file = |key: &str, v: &Option<String>| -> Result<Option<PathBuf>, ConfigError> {
            Ok(self.string(key, v)?.filter(|s| !s.is_empty()).map(|f| base.join(f)))
        };
        let client_cert_file = file("broker.client_tls_cert_file", &b.client_tls_cert_file)?;
        let client_key_file = file("broker.client_tls_key_file", &b.client_tls_key_file)?;
        let client_mode = match self.string("broker.client_tls_sslmode", &b.client_tls_sslmode)? {
            None => ClientMode::Disable,
            Some(s) => ClientMode::parse(&s).ok_or_else(|| {
                self.invalid(
                    "broker.client_tls_sslmode",
                    format!("expected \"disable\", \"allow\", \"prefer\" or \"require\", got {s:?}"),
                )
            })?,
        };
        let client = match (client_mode, &client_cert_file, &client_key_file) {
            (ClientMode::Disable, _, _) => ClientTls::disabled(),
            (mode, Some(cert), Some(key)) => ClientTls::load(mode, cert, key)
                .map_err(|e| self.invalid("broker.client_tls_cert_file", crate::error::chain(&e)))?,
            (mode, _, _) => {
                return Err(self.invalid(
                    "broker.client_tls_sslmode",
                    format!("\"{}\" needs client_tls_cert_file and client_tls_key_file", mode.as_str()),
                ));
            }
        };
        let ca_file = file("broker.server_tls_ca_file", &b.server_tls_ca_file)?;
        let server_mode = match self.string("broker.server_tls_sslmode", &b.server_tls_sslmode)? {
            None => ServerMode::Prefer,
            Some(s) => ServerMode::parse(&s).ok_or_else(|| {
                self.invalid(
                    "broker.server_tls_sslmode",
                    format!(
                        "expected \"disable\", \"prefer\", \"require\", \"verify-ca\" or \"verify-full\", got {s:?}"
                    ),
                )
            })?,
        };
        if matches!(server_mode, ServerMode::VerifyCa | ServerMode::VerifyFull) && ca_file.is_none() {
            return Err(self.invalid(
                "broker.server_tls_sslmode",
                format!("\"{}\" needs server_tls_ca_file", server_mode.as_str()),
            ));
        }
        let server = ServerTls::load(server_mode, ca_file.as_deref())
            .map_err(|e| self.invalid("broker.server_tls_ca_file", crate::error::chain(&e)))?;
        Ok(Tls { client, client_cert_file, client_key_file, server })
    }

    pub(super) fn auth_query(&self, a: &raw::Auth) -> Result<Option<AuthQuery>, ConfigError> {
        let query = self.string("auth.query", &a.query)?.filter(|q| !q.is_empty());
        let Some(user) = self.string("auth.user", &a.user)?.filter(|u| !u.is_empty()) else {
            if query.is_some() {
                return Err(self.invalid("auth.query", "needs auth.user, the role that runs it"));
            }
            return Ok(None);
        };
        Ok(Some(AuthQuery {
            query: query.unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_string()),
            user,
            password: self.string("auth.password", &a.password)?,
            dbname: self.string("auth.dbname", &a.dbname)?.filter(|d| !d.is_empty()),
        }))
    }

    pub(super) fn throttle(&self, a: &raw::Auth) -> Result<Throttle, ConfigError> {
        let failure_delay = match &a.failure_delay {
            None => Duration::from_millis(250),
            some => self.duration("auth.failure_delay", some, 0)?,
        };
        if failure_delay > Duration::from_secs(10) {
            return Err(self.invalid("auth.failure_delay", "must be at most 10s (it holds a connection open)"));
        }
        Ok(Throttle {
            failure_delay,
            max_failures_per_ip: self.int("auth.max_failures_per_ip", a.max_failures_per_ip, 30, 0)?,
            max_failures_global: self.int("auth.max_failures_global", a.max_failures_global, 300, 0)?,
        })
    }
}

/// Warns when the auth file can be read by users other than its owner (it holds secrets).
impl super::Config {
    /// Logs a warning for each file of secrets (the auth file, the TLS key) that group or
    /// others may read. Called once logging is up: at start, by `check`, and on reload.
    pub fn warn_insecure_files(&self) {
        let files = [("auth file", self.auth.file.as_deref()), ("TLS key", self.tls.client_key_file.as_deref())];
        for (what, path) in files {
            if let Some(path) = path {
                warn_if_readable_by_others(what, path);
            }
        }
    }
}

fn warn_if_readable_by_others(what: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the {what} holds secrets but is readable by group or others; chmod 600 it"
            );
        }
    }
}
