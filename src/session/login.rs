//! Login: startup packet exchange, authentication, then hand-off to the pool mode's loop.

use super::{Refusal, SessionError, welcome};
use crate::admission::Refused;
use crate::auth;
use crate::clients::NewClient;
use crate::config::{Config, Database};
use crate::error::SqlState;
use crate::net::{ClientIo, ClientStream};
use crate::pool::Pool;
use crate::proto::build;
use crate::proto::startup::{Packet, Startup};
use crate::server::Credential;
use crate::session::Shared;
use crate::tls::{Acceptor, ClientMode};
use std::sync::Arc;

/// A client that passed authentication.
pub(super) struct Login {
    /// Its startup packet.
    pub startup: Startup,
    /// Client-facing database name.
    pub database: String,
    /// The database's settings; `None` for the admin console.
    pub db: Option<Database>,
    /// Client user name.
    pub user: String,
    /// What proves this user to a server (for databases without a configured user).
    pub credential: Option<Credential>,
}

/// Runs the whole session: login within `client_login_timeout`, then the pool mode's loop.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    io: &mut ClientIo<ClientStream>,
    id: u64,
    peer: std::net::SocketAddr,
    admin_only: bool,
) -> Result<(), SessionError> {
    let cfg = shared.config();
    let limit = cfg.broker.client_login_timeout;
    // The handshake's state (TLS, SCRAM) is boxed: it lives for the login only, while the
    // session future it would enlarge lives as long as the client.
    let ticket = shared.admission.logging_in().enter(admin_only);
    let handshake = tokio::time::timeout(limit, Box::pin(handshake(shared, &cfg, io, peer.ip())));
    let outcome = tokio::select! {
        r = handshake => r,
        () = ticket.evicted() => Ok(Err(SessionError::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            format!(
                "{}: this connection was still logging in after {:?} and made room for a newer one",
                Refused::MaxClientConn(cfg.broker.max_client_conn),
                crate::admission::logins::SLOW_LOGIN
            ),
        ))),
    };
    drop(ticket);
    let login = match outcome {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            count_refusal(shared, &e);
            if matches!(&e, SessionError::Fatal { code, .. } if *code == SqlState::INVALID_PASSWORD) {
                // Answered late (the failure was counted as the exchange ended): guessing
                // costs time, and then a refusal.
                tokio::time::sleep(cfg.auth.throttle.failure_delay).await;
            }
            return Err(e);
        }
        Err(_) => {
            shared.admission.refusals().login_timeout.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(SessionError::fatal(
                SqlState::PROTOCOL_VIOLATION,
                format!("client_login_timeout: login not completed within {limit:?}"),
            ));
        }
    };
    let Some(login) = login else {
        return Ok(());
    };
    if admin_only && login.db.is_some() {
        shared.admission.refusals().max_client_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(SessionError::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            Refused::MaxClientConn(cfg.broker.max_client_conn).to_string(),
        ));
    }
    let application_name = login.startup.param("application_name").unwrap_or_default().to_string();
    let Some(db) = login.db.as_ref() else {
        let registered = shared.clients.register(NewClient {
            id,
            user: login.user.clone(),
            database: login.database.clone(),
            pool: None,
            addr: peer,
            application_name,
        });
        tracing::info!(user = %login.user, "admin console login");
        let _uncounted = shared.admission.uncount_console();
        return shared.console.serve(io, &login.user, &registered.client).await;
    };
    let pool = pool_for(shared, &cfg, &login, db);
    // Only the mode is needed from here on (the login and its database settings are dropped
    // by the mode's loop once it has what it needs).
    let mode = db.pool_mode;
    let registered = shared.clients.register(NewClient {
        id,
        user: login.user.clone(),
        database: login.database.clone(),
        pool: Some(pool.key().clone()),
        addr: peer,
        application_name,
    });
    let client = registered.client.clone();
    if cfg.broker.log_connections {
        tracing::info!(user = %login.user, database = %login.database, "client logged in");
    }
    welcome::run(shared, &cfg, io, login, pool, mode, client).await
}

fn count_refusal(shared: &Shared, e: &SessionError) {
    let r = shared.admission.refusals();
    let counter = match e {
        SessionError::Refused(Refusal::Throttled, _) => &r.auth_throttled,
        SessionError::Refused(Refusal::TlsRequired, _) => &r.tls_required,
        SessionError::Fatal { code, .. }
            if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION =>
        {
            &r.auth
        }
        SessionError::Fatal { code, .. } if *code == SqlState::INVALID_CATALOG_NAME => &r.unknown_database,
        SessionError::Frame(_) | SessionError::Startup(_) | SessionError::Tls(_) => &r.protocol,
        SessionError::Fatal { code, .. } if *code == SqlState::PROTOCOL_VIOLATION => &r.protocol,
        _ => return,
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn pool_for(shared: &Shared, cfg: &Config, login: &Login, db: &Database) -> Arc<Pool> {
    let server_user = db.user.as_deref().unwrap_or(&login.user);
    let credential = match db.user {
        Some(_) => db.password.clone().map(Credential::Password),
        None => login.credential.clone(),
    };
    let pool = shared.registry.pool(cfg, &login.database, db, server_user, credential.clone());
    if let Some(c) = credential.filter(|c| db.user.is_none() && pool.target().credential.as_ref() != Some(c)) {
        // The pool was made by an earlier login: this client proved a newer secret.
        pool.set_credential(c);
    }
    pool
}

/// Answers SSLRequest with `S` and runs the TLS handshake on the client's socket.
async fn start_tls(io: &mut ClientIo<ClientStream>, acceptor: &Acceptor) -> Result<(), SessionError> {
    io.write_byte(crate::proto::startup::ENCRYPTION_ACCEPTED).await.map_err(SessionError::Io)?;
    let Some(tcp) = io.stream.take_plain() else {
        return Err(SessionError::fatal(SqlState::PROTOCOL_VIOLATION, "SSLRequest on an encrypted connection"));
    };
    match acceptor.acceptor.accept(tcp).await {
        Ok(tls) => {
            io.stream = ClientStream::Tls(Box::new(tls), acceptor.end_point.clone());
            Ok(())
        }
        // Nothing can be said to the client in plaintext now; this ends only its session.
        Err(e) => Err(SessionError::Tls(e)),
    }
}

/// Startup packets and authentication. `None` means the connection only carried a cancel.
async fn handshake(
    shared: &Shared,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    ip: std::net::IpAddr,
) -> Result<Option<Box<Login>>, SessionError> {
    let startup = loop {
        match io.read_startup().await? {
            Packet::SslRequest | Packet::GssEncRequest if !io.rbuf.is_empty() => {
                // Bytes sent before our answer would be read as if they came after the
                // encryption handshake: refuse them, as PostgreSQL does (CVE-2021-23222).
                return Err(SessionError::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    "received unencrypted data after encryption request",
                ));
            }
            Packet::SslRequest if io.stream.is_tls() => {
                return Err(SessionError::fatal(SqlState::PROTOCOL_VIOLATION, "SSLRequest on an encrypted connection"));
            }
            Packet::SslRequest => {
                match cfg.tls.client.acceptor.as_ref().filter(|_| cfg.tls.client.mode != ClientMode::Disable) {
                    Some(acceptor) => start_tls(io, acceptor).await?,
                    None => io.write_byte(crate::proto::startup::ENCRYPTION_REFUSED).await.map_err(SessionError::Io)?,
                }
            }
            Packet::GssEncRequest => {
                io.write_byte(crate::proto::startup::ENCRYPTION_REFUSED).await.map_err(SessionError::Io)?
            }
            Packet::Cancel(key) => {
                if let Some(key) = key {
                    shared.cancels.cancel(ip, key).await;
                }
                return Ok(None);
            }
            Packet::Startup(s) => break s,
        }
    };
    if cfg.tls.client.mode == ClientMode::Require && !io.stream.is_tls() {
        return Err(SessionError::Refused(
            Refusal::TlsRequired,
            "SSL required: this broker refuses unencrypted connections (client_tls_sslmode = require)".into(),
        ));
    }
    // Counted from here, a failure unless the credentials prove right: an exchange abandoned
    // halfway, or a lookup of an unknown name, counts too.
    let attempt = match shared.admission.throttle().begin(ip, &cfg.auth.throttle).await {
        Ok(a) => a,
        Err(wait) => {
            return Err(SessionError::Refused(
                Refusal::Throttled,
                format!(
                    "too many failed logins from {}; try again in {} s",
                    crate::net::peer_key(ip),
                    wait.as_secs() + 1
                ),
            ));
        }
    };
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        build::negotiate_protocol_version(&mut io.wbuf, 0, &startup.protocol_options);
    }
    let user = match startup.param("user") {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => {
            return Err(SessionError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ));
        }
    };
    if startup.param("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
        return Err(SessionError::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by pgbroker",
        ));
    }
    let database = startup.param("database").filter(|d| !d.is_empty()).unwrap_or(&user).to_string();
    let binding = io.stream.tls_server_end_point();
    let looked_up;
    let entry = match cfg.auth.users.get(&user) {
        Some(e) => Some(e),
        None if cfg.auth.query.is_some() && !super::shared::is_console(&database) => {
            looked_up = auth::query::lookup(&shared.registry, cfg, &database, &user).await?;
            looked_up.as_ref()
        }
        None => None,
    };
    let authenticated = auth::authenticate(io, &cfg.auth, &user, entry, binding).await?;
    attempt.succeeded();
    let db = if super::shared::is_console(&database) {
        if !cfg.auth.admin_users.contains(&user) && !cfg.auth.stats_users.contains(&user) {
            return Err(SessionError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!("user \"{user}\" is not allowed on the admin console (auth.admin_users, auth.stats_users)"),
            ));
        }
        None
    } else {
        let Some(db) = cfg.databases.get(&database) else {
            return Err(SessionError::fatal(
                SqlState::INVALID_CATALOG_NAME,
                format!("database \"{database}\" does not exist"),
            ));
        };
        Some(db.clone())
    };
    build::auth_ok(&mut io.wbuf);
    // Boxed: the session's futures pass it on by value, and an async fn keeps a copy of
    // each argument besides the one it moves into its body.
    Ok(Some(Box::new(Login { db, database, user, credential: authenticated.credential, startup })))
}
