//! Why a checkout fails, and the SQLSTATE each failure becomes.

use crate::error::SqlState;
use crate::server::ServerError;
use std::time::Duration;
use thiserror::Error;

/// Why a checkout failed.
#[derive(Debug, Error)]
pub enum PoolError {
    /// No server became free in time.
    #[error("query_wait_timeout: no server connection available in pool {pool} within {waited:?} (pool_size {size})")]
    Timeout {
        /// Pool name.
        pool: String,
        /// The configured wait.
        waited: Duration,
        /// The pool's size.
        size: usize,
    },
    /// Opening a new server failed.
    #[error("cannot open a server connection for pool {pool}")]
    Connect {
        /// Pool name.
        pool: String,
        /// Cause.
        #[source]
        source: ServerError,
    },
    /// A recent login failure is being waited out (`server_login_retry`), or the one attempt
    /// allowed after it is under way.
    #[error("server login for pool {pool} failed recently ({message}); {}", retrying(*retry_in))]
    Backoff {
        /// Pool name.
        pool: String,
        /// The last failure.
        message: String,
        /// Its SQLSTATE.
        code: SqlState,
        /// Time left before the next attempt (zero: it is under way).
        retry_in: Duration,
    },
}

fn retrying(retry_in: Duration) -> String {
    match retry_in.as_millis() {
        0 => "a new attempt is under way".to_string(),
        ms => format!("retrying in {:?}", Duration::from_millis(ms as u64)),
    }
}

impl PoolError {
    /// The SQLSTATE a client sees.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::Timeout { .. } => SqlState::TOO_MANY_CONNECTIONS,
            PoolError::Connect { source, .. } => source.sqlstate(),
            PoolError::Backoff { code, .. } => *code,
        }
    }
}
