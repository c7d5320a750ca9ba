//! Server-side checks for PostgreSQL's md5 and cleartext password messages.

use std::sync::Arc;

use ::md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::scram::{SCRAM_SHA_256, ScramServer};
use crate::config::userlist::{ScramSecret, Secret};
use crate::crypto::{ct_eq, hex};

/// Highest iteration count postgres-protocol's SCRAM client accepts.
const CLIENT_MAX_ITERATIONS: u32 = 100_000;

/// Checks an md5 PasswordMessage body (without its NUL) against the user's secret and salt.
#[must_use]
pub fn verify_md5_response(entry_secret: &Secret, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let inner = match entry_secret {
        Secret::Plain(p) if p.is_empty() => return false,
        Secret::Plain(p) => {
            let mut md5 = Md5::new();
            md5.update(p.as_bytes());
            md5.update(user.as_bytes());
            hex(&md5.finalize())
        }
        Secret::Md5(stored) => hex(stored),
        // A SCRAM verifier cannot produce md5(password || user), as in PostgreSQL.
        Secret::Scram(_) => return false,
    };
    let mut md5 = Md5::new();
    md5.update(inner.as_bytes());
    md5.update(salt);
    let expected = hex(&md5.finalize());
    response.strip_prefix(b"md5").is_some_and(|r| ct_eq(expected.as_bytes(), r))
}

/// Checks a cleartext PasswordMessage body (without its NUL) against the user's secret.
#[must_use]
pub fn verify_cleartext(entry: &Secret, user: &str, password: &[u8]) -> bool {
    // PostgreSQL refuses empty passwords outright.
    if password.is_empty() {
        return false;
    }
    match entry {
        Secret::Plain(p) => ct_eq(p.as_bytes(), password),
        Secret::Md5(stored) => {
            let mut md5 = Md5::new();
            md5.update(password);
            md5.update(user.as_bytes());
            ct_eq(&md5.finalize(), stored)
        }
        Secret::Scram(secret) => scram_password_matches(secret, password),
    }
}

fn scram_password_matches(secret: &ScramSecret, password: &[u8]) -> bool {
    // SASLprep changes only non-ASCII UTF-8 (invalid input is used raw, as in PostgreSQL).
    // We have no SASLprep of our own, so for such passwords run the real SCRAM client,
    // which applies it, against our server; the client caps the iteration count.
    let needs_saslprep = std::str::from_utf8(password).is_ok_and(|s| !s.is_ascii());
    if needs_saslprep && secret.iterations <= CLIENT_MAX_ITERATIONS {
        return scram_exchange_succeeds(secret, password);
    }
    let derived = ScramSecret::derive(password, &secret.salt, secret.iterations);
    ct_eq(&derived.stored_key, &secret.stored_key)
}

fn scram_exchange_succeeds(secret: &ScramSecret, password: &[u8]) -> bool {
    let Ok(mut server) = ScramServer::new(Arc::new(secret.clone()), SCRAM_SHA_256, None) else {
        return false;
    };
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let Ok(first) = server.handle_client_first(client.message()) else {
        return false;
    };
    client.update(&first).is_ok() && server.handle_client_final(client.message()).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    const SALT: [u8; 4] = [0x2a, 0x3d, 0x8f, 0xe0];

    fn stored_md5(password: &str, user: &str) -> Secret {
        let text = postgres_protocol::password::md5(password.as_bytes(), user);
        Secret::parse(&text).unwrap()
    }

    #[test]
    fn plain_secret_matches_md5_hash() {
        let response = md5_hash(b"md5_user", b"password", SALT);
        assert_eq!(response, "md562af4dd09bbb41884907a838a3233294");
        let secret = Secret::Plain("password".into());
        assert!(verify_md5_response(&secret, "md5_user", SALT, response.as_bytes()));
    }

    #[test]
    fn stored_md5_secret_matches_md5_hash() {
        let secret = stored_md5("password", "md5_user");
        assert!(matches!(secret, Secret::Md5(_)));
        let response = md5_hash(b"md5_user", b"password", SALT);
        assert!(verify_md5_response(&secret, "md5_user", SALT, response.as_bytes()));
    }

    #[test]
    fn md5_wrong_password_user_or_salt_fails() {
        let good = md5_hash(b"u", b"pw", SALT);
        for secret in [Secret::Plain("pw".into()), stored_md5("pw", "u")] {
            let wrong = md5_hash(b"u", b"other", SALT);
            assert!(!verify_md5_response(&secret, "u", SALT, wrong.as_bytes()));
            assert!(!verify_md5_response(&secret, "u", [0; 4], good.as_bytes()));
            assert!(!verify_md5_response(&secret, "u", SALT, b""));
        }
        // A stored md5 secret already binds the user name; a plain one is hashed with it.
        let plain = Secret::Plain("pw".into());
        assert!(!verify_md5_response(&plain, "v", SALT, good.as_bytes()));
    }

    #[test]
    fn md5_with_scram_secret_fails() {
        let secret = Secret::Scram(ScramSecret::from_password("pw"));
        let response = md5_hash(b"u", b"pw", SALT);
        assert!(!verify_md5_response(&secret, "u", SALT, response.as_bytes()));
    }

    #[test]
    fn md5_with_empty_plain_password_fails() {
        let response = md5_hash(b"u", b"", SALT);
        assert!(!verify_md5_response(&Secret::Plain(String::new()), "u", SALT, response.as_bytes()));
    }

    #[test]
    fn cleartext_plain() {
        let secret = Secret::Plain("pw".into());
        assert!(verify_cleartext(&secret, "u", b"pw"));
        assert!(!verify_cleartext(&secret, "u", b"pW"));
        assert!(!verify_cleartext(&Secret::Plain(String::new()), "u", b""));
    }

    #[test]
    fn cleartext_stored_md5() {
        let secret = stored_md5("pw", "u");
        assert!(verify_cleartext(&secret, "u", b"pw"));
        assert!(!verify_cleartext(&secret, "u", b"px"));
        assert!(!verify_cleartext(&secret, "other", b"pw"));
    }

    #[test]
    fn cleartext_scram() {
        let secret = Secret::Scram(ScramSecret::from_password("pw"));
        assert!(verify_cleartext(&secret, "u", b"pw"));
        assert!(!verify_cleartext(&secret, "u", b"px"));
    }

    #[test]
    fn cleartext_scram_applies_saslprep() {
        // SASLprep maps U+00A0 (no-break space) to a space and drops U+00AD (soft hyphen).
        let secret = Secret::Scram(ScramSecret::from_password("p\u{a0}w\u{ad}"));
        assert!(verify_cleartext(&secret, "u", "p\u{a0}w\u{ad}".as_bytes()));
        assert!(verify_cleartext(&secret, "u", b"p w"));
        assert!(!verify_cleartext(&secret, "u", "p\u{a0}x".as_bytes()));
    }
}
