//! What the broker proves to a server on a client's behalf when a database has no configured
//! user: the client's password, or, as PgBouncer does, what a successful login revealed
//! without one: the stored md5 hash, or the SCRAM ClientKey recovered from the client's
//! proof. Both work only if the server stores the same secret (auth file copied from
//! `pg_authid`, or `auth_query`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::crypto::{ct_eq, hex, hmac_sha256};

/// A server login credential.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Cleartext password: every method works.
    Password(String),
    /// md5(password || user): answers md5 challenges only.
    Md5([u8; 16]),
    /// SCRAM-SHA-256 keys of the server's own verifier: answers SCRAM only.
    ScramKeys {
        /// HMAC(SaltedPassword, "Client Key"), recovered from the client's proof.
        client_key: [u8; 32],
        /// HMAC(SaltedPassword, "Server Key"), from the verifier, to check the server.
        server_key: [u8; 32],
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Password(_) => "Password(<redacted>)",
            Credential::Md5(_) => "Md5(<redacted>)",
            Credential::ScramKeys { .. } => "ScramKeys(<redacted>)",
        })
    }
}

impl Credential {
    /// The cleartext password, if known.
    pub fn password(&self) -> Option<&str> {
        match self {
            Credential::Password(p) => Some(p),
            _ => None,
        }
    }

    /// The md5 challenge answer (`md5` + hex) for `user` and `salt`, if this credential can
    /// give one.
    pub fn md5_response(&self, user: &str, salt: [u8; 4]) -> Option<String> {
        let inner = match self {
            Credential::Password(p) => {
                let mut md5 = ::md5::Md5::new();
                ::md5::Digest::update(&mut md5, p.as_bytes());
                ::md5::Digest::update(&mut md5, user.as_bytes());
                hex(&::md5::Digest::finalize(md5))
            }
            Credential::Md5(stored) => hex(stored),
            Credential::ScramKeys { .. } => return None,
        };
        let mut md5 = ::md5::Md5::new();
        ::md5::Digest::update(&mut md5, inner.as_bytes());
        ::md5::Digest::update(&mut md5, salt);
        Some(format!("md5{}", hex(&::md5::Digest::finalize(md5))))
    }
}

/// Why a key-based SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The server's message does not follow SCRAM.
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    /// The server's signature does not match: it does not hold the same verifier.
    #[error("the server's SCRAM signature does not match the pass-through keys")]
    BadServerSignature,
}

/// The client side of SCRAM-SHA-256 proving with a ClientKey instead of a password.
/// `cbind` is the gs2 header plus channel-binding data (`n,,` without binding).
pub struct KeysClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    gs2_header: String,
    cbind_data: Vec<u8>,
    client_first_bare: String,
    auth_message: Option<String>,
}

impl KeysClient {
    /// Starts an exchange; `binding` = (`p=tls-server-end-point` data) for -PLUS.
    pub fn new(client_key: [u8; 32], server_key: [u8; 32], binding: Option<Vec<u8>>) -> KeysClient {
        let nonce: [u8; 18] = rand::random();
        let (gs2_header, cbind_data) = match binding {
            Some(data) => ("p=tls-server-end-point,,".to_string(), data),
            None => ("n,,".to_string(), Vec::new()),
        };
        KeysClient {
            client_key,
            server_key,
            gs2_header,
            cbind_data,
            client_first_bare: format!("n=,r={}", STANDARD.encode(nonce)),
            auth_message: None,
        }
    }

    /// client-first-message.
    pub fn first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// Takes server-first-message, returns client-final-message.
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, KeysError> {
        let text = std::str::from_utf8(msg).map_err(|_| KeysError::Malformed("not UTF-8"))?;
        let nonce = text.split(',').find_map(|f| f.strip_prefix("r=")).ok_or(KeysError::Malformed("no r= nonce"))?;
        let ours = self.client_first_bare.strip_prefix("n=,r=").unwrap_or_default();
        if !nonce.starts_with(ours) || nonce.len() <= ours.len() {
            return Err(KeysError::Malformed("server nonce does not extend ours"));
        }
        let mut cbind = self.gs2_header.clone().into_bytes();
        cbind.extend_from_slice(&self.cbind_data);
        let without_proof = format!("c={},r={nonce}", STANDARD.encode(cbind));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let mut proof = self.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks server-final-message.
    pub fn handle_server_final(&self, msg: &[u8]) -> Result<(), KeysError> {
        let auth_message = self.auth_message.as_deref().ok_or(KeysError::Malformed("final before first"))?;
        let text = std::str::from_utf8(msg).map_err(|_| KeysError::Malformed("not UTF-8"))?;
        let v = text.strip_prefix("v=").ok_or(KeysError::Malformed("no v= verifier"))?;
        let v = STANDARD.decode(v).map_err(|_| KeysError::Malformed("v= is not base64"))?;
        let expected = hmac_sha256(&self.server_key, auth_message.as_bytes());
        if ct_eq(&expected, &v) { Ok(()) } else { Err(KeysError::BadServerSignature) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_from_the_hash_equals_the_one_from_the_password() {
        let salt = [1, 2, 3, 4];
        let from_password = Credential::Password("secret".into()).md5_response("alice", salt);
        let mut md5 = ::md5::Md5::new();
        ::md5::Digest::update(&mut md5, b"secretalice");
        let hash: [u8; 16] = ::md5::Digest::finalize(md5).into();
        assert_eq!(Credential::Md5(hash).md5_response("alice", salt), from_password);
        let keys = Credential::ScramKeys { client_key: [0; 32], server_key: [0; 32] };
        assert_eq!(keys.md5_response("alice", salt), None);
    }

    #[test]
    fn debug_output_redacts_every_credential() {
        let shown = format!("{:?}", Credential::Password("hunter2".into()));
        assert!(!shown.contains("hunter2"));
    }
}
