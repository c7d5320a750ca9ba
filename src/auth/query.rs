//! `auth_query`: a user missing from the auth file is looked up in the database, as
//! PgBouncer's `auth_query`/`auth_user` do, through a pool that logs in as `auth.user` (its
//! connections count against the budget like any other).

use super::AuthError;
use crate::config::Config;
use crate::config::userlist::{Secret, UserEntry};
use crate::error::SqlState;
use crate::registry::Registry;
use crate::server::Credential;

/// Looks up `user`'s secret for a client of `database`. `Ok(None)`: no such user, or one that
/// may not log in (no secret, expired, not LOGIN), which the caller treats like an unknown
/// user. An error means the lookup itself failed; the client is told so, with the cause.
pub async fn lookup(
    registry: &Registry,
    cfg: &Config,
    database: &str,
    user: &str,
) -> Result<Option<UserEntry>, AuthError> {
    let Some(aq) = cfg.auth.query.as_ref() else { return Ok(None) };
    let key = aq.dbname.as_deref().unwrap_or(database);
    let Some(db) = cfg.databases.get(key) else {
        return Err(AuthError::refused(SqlState::INVALID_CATALOG_NAME, format!("database \"{key}\" does not exist")));
    };
    let credential = aq
        .password
        .clone()
        .or_else(|| cfg.auth.users.get(&aq.user).and_then(|e| e.password()).map(str::to_owned))
        .map(Credential::Password);
    let pool = registry.pool(cfg, key, db, &aq.user, credential);
    let unavailable = |why: String| {
        tracing::warn!(database = key, auth_user = %aq.user, error = %why, "auth_query failed");
        AuthError::refused(SqlState::CANNOT_CONNECT, format!("authentication lookup (auth_query) failed: {why}"))
    };
    let mut server =
        pool.checkout(cfg.broker.query_wait_timeout).await.map_err(|e| unavailable(crate::error::chain(&e)))?;
    let result = server.query_row_with(&aq.query, &[user]).await;
    if result.is_ok() {
        // The connection is fine (even if the query failed): back to the pool.
        server.release = crate::pool::Release::Reuse;
    }
    drop(server);
    let row = match result {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return Err(unavailable(format!("{} ({})", e.message, e.code.code()))),
        Err(e) => return Err(unavailable(crate::error::chain(&e))),
    };
    // (name, secret); a role without a password, or expired, yields NULL.
    let Some(Some(secret)) = row.and_then(|r| r.into_iter().nth(1)) else {
        return Ok(None);
    };
    match Secret::parse(&secret) {
        Ok(secret) => Ok(Some(UserEntry::new(secret))),
        Err(e) => {
            tracing::warn!(user, error = %e, "auth_query returned a malformed secret");
            Ok(None)
        }
    }
}
