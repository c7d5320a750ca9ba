//! Client authentication by the broker itself: trust, md5 or SCRAM-SHA-256 against the auth
//! file or, for users it lacks, a secret looked up with `auth_query`.

pub mod md5;
pub mod query;
pub mod scram;
pub mod throttle;

use crate::config::userlist::{ScramSecret, Secret, UserEntry};
use crate::config::{Auth, AuthType};
use crate::error::SqlState;
use crate::net::{ClientIo, ClientIoError};
use crate::proto::{build, read_i32, split_cstr, tag};
use crate::server::Credential;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncRead, AsyncWrite};

/// Why a client was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The client's connection failed, or it broke message framing.
    #[error(transparent)]
    Client(#[from] ClientIoError),
    /// Refused: the client is told `message` with `code`.
    #[error("{message}")]
    Refused {
        /// SQLSTATE sent to the client.
        code: SqlState,
        /// Message sent to the client.
        message: String,
    },
}

impl AuthError {
    /// A refusal the client is told about.
    pub fn refused(code: SqlState, message: impl Into<String>) -> AuthError {
        AuthError::Refused { code, message: message.into() }
    }
}

/// Largest password or SASL message accepted from a client.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// What a successful login yields: what can prove the same user to a server, for
/// databases without a configured user (the password, or pass-through secrets).
#[derive(Debug, Default)]
pub struct Authenticated {
    /// The server login credential, if the login revealed one.
    pub credential: Option<Credential>,
}

/// Authenticates `user` against `entry` (from the auth file or `auth_query`; `None`: unknown
/// user, who still goes through a full exchange so names cannot be probed), writing the
/// challenge messages and reading the answers. Nothing is sent on success: the caller follows
/// with AuthenticationOk. `binding` is the TLS connection's `tls-server-end-point` data: with
/// it SCRAM-SHA-256-PLUS is offered too.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
    auth: &Auth,
    user: &str,
    entry: Option<&UserEntry>,
    binding: Option<Arc<[u8]>>,
) -> Result<Authenticated, AuthError> {
    let from_secret = || match entry.map(|e| &e.secret) {
        Some(Secret::Plain(p)) => Some(Credential::Password(p.clone())),
        Some(Secret::Md5(h)) => Some(Credential::Md5(*h)),
        _ => None,
    };
    let scram_keys = |client_key: Option<[u8; 32]>| {
        from_secret().or_else(|| {
            let server_key = entry?.scram.as_ref()?.server_key;
            Some(Credential::ScramKeys { client_key: client_key?, server_key })
        })
    };
    let credential = match (auth.kind, entry) {
        (AuthType::Trust, _) if auth.file.is_none() && auth.query.is_none() => Ok(from_secret()),
        (AuthType::Trust, e) => e.map(|_| from_secret()).ok_or(()),
        (AuthType::Md5, Some(e)) if matches!(e.secret, Secret::Scram(_)) => {
            // As PostgreSQL does: an md5 rule with a SCRAM secret upgrades to SCRAM.
            scram_exchange(io, user, e.scram.clone(), binding).await?.map(scram_keys)
        }
        // An unknown user gets the challenge most known users get, so the method does not
        // tell them apart.
        (AuthType::Md5, None) if !auth.users.unknown_users_get_md5() => {
            scram_exchange(io, user, None, binding).await?.map(scram_keys)
        }
        (AuthType::Md5, e) => md5_exchange(io, e, user).await?.then(from_secret).ok_or(()),
        (AuthType::ScramSha256, e) => {
            scram_exchange(io, user, e.and_then(|e| e.scram.clone()), binding).await?.map(scram_keys)
        }
    };
    match credential {
        Ok(credential) => Ok(Authenticated { credential }),
        Err(()) => Err(failed(user)),
    }
}

fn failed(user: &str) -> AuthError {
    // Same answer for unknown users and wrong passwords, so names cannot be probed.
    AuthError::refused(SqlState::INVALID_PASSWORD, format!("password authentication failed for user \"{user}\""))
}

fn malformed(what: &str) -> AuthError {
    AuthError::refused(SqlState::PROTOCOL_VIOLATION, format!("malformed authentication message: {what}"))
}

async fn read_password_message<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
) -> Result<bytes::Bytes, AuthError> {
    let (t, body) = io.read_message(MAX_AUTH_MESSAGE).await?;
    if t != tag::PASSWORD {
        return Err(AuthError::refused(
            SqlState::PROTOCOL_VIOLATION,
            format!("expected password response, got message type {}", crate::proto::frame::tag_name(t)),
        ));
    }
    Ok(body)
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
    entry: Option<&UserEntry>,
    user: &str,
) -> Result<bool, AuthError> {
    let salt: [u8; 4] = rand::random();
    build::auth_md5(&mut io.wbuf, salt);
    io.flush().await?;
    let body = read_password_message(io).await?;
    let (response, _) = split_cstr(&body).ok_or_else(|| malformed("password is not NUL-terminated"))?;
    Ok(entry.is_some_and(|e| md5::verify_md5_response(&e.secret, user, salt, response)))
}

/// A secret no password matches, so an unknown user goes through the same exchange as a
/// known one. Its salt comes from the name and a per-process key, as PostgreSQL derives
/// its mock salt: each name its own salt, the same each time it is asked, so salts do not
/// tell unknown names from known ones.
fn mock_secret(user: &str) -> Arc<ScramSecret> {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let salt = crate::crypto::hmac_sha256(key, user.as_bytes());
    Arc::new(ScramSecret {
        // PostgreSQL's defaults for a new secret.
        iterations: 4096,
        salt: salt.get(..16).unwrap_or(&salt).to_vec(),
        stored_key: crate::crypto::hmac_sha256(key, b"mock stored key"),
        server_key: crate::crypto::hmac_sha256(key, b"mock server key"),
    })
}

/// Runs a SCRAM exchange; `Ok(Ok(client_key))` when the proof is valid for a known secret,
/// `Ok(Err(()))` when it is not.
async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
    user: &str,
    secret: Option<Arc<ScramSecret>>,
    binding: Option<Arc<[u8]>>,
) -> Result<Result<Option<[u8; 32]>, ()>, AuthError> {
    let known = secret.is_some();
    let secret = secret.unwrap_or_else(|| mock_secret(user));
    // PostgreSQL's order: the channel-bound mechanism first when the connection allows it.
    let mechanisms: &[&str] = match binding {
        Some(_) => &[scram::SCRAM_SHA_256_PLUS, scram::SCRAM_SHA_256],
        None => &[scram::SCRAM_SHA_256],
    };
    build::auth_sasl(&mut io.wbuf, mechanisms);
    io.flush().await?;

    // SASLInitialResponse: mechanism name, then an Int32 length and the client-first-message.
    let body = read_password_message(io).await?;
    let (mechanism, rest) = split_cstr(&body).ok_or_else(|| malformed("mechanism"))?;
    let mechanism = std::str::from_utf8(mechanism).map_err(|_| malformed("mechanism"))?;
    let len = read_i32(rest).ok_or_else(|| malformed("length"))?;
    let data = rest.get(4..).unwrap_or_default();
    if usize::try_from(len).ok() != Some(data.len()) {
        return Err(malformed("SASL data length"));
    }
    let mut server = scram::ScramServer::new(secret, mechanism, binding.map(|b| b.to_vec())).map_err(scram_error)?;
    let server_first = server.handle_client_first(data).map_err(scram_error)?;
    build::auth_sasl_continue(&mut io.wbuf, &server_first);
    io.flush().await?;

    let body = read_password_message(io).await?;
    match server.handle_client_final(&body) {
        Ok(server_final) if known => {
            build::auth_sasl_final(&mut io.wbuf, &server_final);
            Ok(Ok(server.client_key()))
        }
        Ok(_) | Err(scram::ScramError::InvalidProof) => Ok(Err(())),
        Err(e) => Err(scram_error(e)),
    }
}

fn scram_error(e: scram::ScramError) -> AuthError {
    match e {
        scram::ScramError::InvalidProof => {
            AuthError::refused(SqlState::INVALID_PASSWORD, "password authentication failed")
        }
        other => AuthError::refused(SqlState::PROTOCOL_VIOLATION, format!("SCRAM exchange failed: {other}")),
    }
}
