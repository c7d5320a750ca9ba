//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), following PostgreSQL's auth-scram.c.
//! Pure state machine: the caller moves the bytes of SASLInitialResponse / SASLResponse.

use std::mem;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::config::userlist::ScramSecret;
use crate::crypto::{ct_eq, hmac_sha256};
use ScramError::Malformed;

/// SASL mechanism name without channel binding.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// SASL mechanism name with `tls-server-end-point` channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Longest client message accepted; real ones are ~100 bytes.
const MAX_MESSAGE_LEN: usize = 8192;
/// Raw server nonce length, as PostgreSQL's SCRAM_RAW_NONCE_LEN.
const SERVER_NONCE_LEN: usize = 18;
const CB_TYPE_PREFIX: &str = "p=tls-server-end-point";

/// A failed SCRAM exchange; `sqlstate()` gives the code to report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client chose a mechanism we do not offer (or -PLUS without TLS).
    #[error("unsupported SASL mechanism")]
    UnsupportedMechanism,
    /// A message does not follow the SCRAM grammar or our restrictions.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Channel binding downgrade or mismatch.
    #[error("SCRAM channel binding check failed: {0}")]
    ChannelBinding(&'static str),
    /// A message arrived in the wrong state (including after an earlier failure).
    #[error("unexpected SCRAM message for the exchange state")]
    OutOfOrder,
    /// The proof does not match the secret: wrong password.
    #[error("SCRAM proof is invalid")]
    InvalidProof,
}

impl ScramError {
    /// SQLSTATE for the ErrorResponse, matching what PostgreSQL sends.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::InvalidProof => "28P01",
            ScramError::ChannelBinding(_) => "28000",
            _ => "08P01",
        }
    }
}

enum State {
    Initial,
    ServerFirstSent {
        /// c= must decode to exactly this (gs2 header plus any binding data).
        cbind_input: Vec<u8>,
        nonce: String,
        client_first_bare: String,
        server_first: String,
    },
    /// Finished, successfully or not; any further message is out of order.
    Done,
}

/// One server-side SCRAM-SHA-256 exchange.
pub struct ScramServer {
    secret: Arc<ScramSecret>,
    /// True when the client chose SCRAM-SHA-256-PLUS.
    plus: bool,
    /// tls-server-end-point hash; Some means the server offered -PLUS.
    channel_binding: Option<Vec<u8>>,
    server_nonce: String,
    state: State,
    client_key: Option<[u8; 32]>,
}

impl ScramServer {
    /// Starts an exchange for the client's mechanism; `channel_binding`: tls-server-end-point hash.
    pub fn new(
        secret: Arc<ScramSecret>,
        mechanism: &str,
        channel_binding: Option<Vec<u8>>,
    ) -> Result<ScramServer, ScramError> {
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if channel_binding.is_some() => true,
            _ => return Err(ScramError::UnsupportedMechanism),
        };
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::fill(&mut raw[..]);
        Ok(ScramServer {
            secret,
            plus,
            channel_binding,
            server_nonce: STANDARD.encode(raw),
            state: State::Initial,
            client_key: None,
        })
    }

    /// Consumes client-first-message, returns server-first-message.
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(mem::replace(&mut self.state, State::Done), State::Initial) {
            return Err(ScramError::OutOfOrder);
        }
        let text = as_text(msg)?;
        let (flag, rest) = split(text, "expected gs2 header")?;
        let (authzid, bare) = split(rest, "expected gs2 header")?;
        let cbind_input = self.expected_cbind_input(flag)?;
        if !authzid.is_empty() {
            return Err(Malformed("authorization identity not supported"));
        }
        if bare.starts_with("m=") {
            return Err(Malformed("mandatory extensions not supported"));
        }
        let mut fields = bare.split(',');
        // The user name is ignored: PostgreSQL authenticates the startup-packet user.
        attr(fields.next(), "n=", "expected n= user name")?;
        let client_nonce = attr(fields.next(), "r=", "expected r= nonce")?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Malformed("nonce must be printable ASCII"));
        }
        if fields.next().is_some() {
            return Err(Malformed("extensions not supported"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let salt = STANDARD.encode(&self.secret.salt);
        let server_first = format!("r={nonce},s={salt},i={}", self.secret.iterations);
        let reply = server_first.clone().into_bytes();
        self.state = State::ServerFirstSent { cbind_input, nonce, client_first_bare: bare.to_owned(), server_first };
        Ok(reply)
    }

    /// Checks the gs2 channel-binding flag; returns what c= must decode to in client-final.
    fn expected_cbind_input(&self, flag: &str) -> Result<Vec<u8>, ScramError> {
        let data: &[u8] = match (flag, self.plus) {
            ("n" | "y", true) => return Err(Malformed("-PLUS chosen without binding data")),
            // The client could bind but believes we cannot: someone stripped -PLUS from our offer.
            ("y", false) if self.channel_binding.is_some() => {
                return Err(ScramError::ChannelBinding("client thinks we cannot bind"));
            }
            ("n" | "y", false) => &[],
            (CB_TYPE_PREFIX, true) => self.channel_binding.as_deref().unwrap_or_default(),
            (_, false) if flag.starts_with("p=") => {
                return Err(Malformed("binding data sent with SCRAM-SHA-256"));
            }
            (_, true) if flag.starts_with("p=") => {
                return Err(Malformed("unsupported channel binding type"));
            }
            _ => return Err(Malformed("unexpected channel binding flag")),
        };
        Ok([flag.as_bytes(), b",,", data].concat())
    }

    /// Consumes client-final-message, returns server-final-message (`v=...`) if the proof is valid.
    pub fn handle_client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::ServerFirstSent { cbind_input, nonce, client_first_bare, server_first } =
            mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let text = as_text(msg)?;
        // The proof is last and base64 has no ',', so the last comma splits it off.
        let (without_proof, proof) = text.rsplit_once(',').ok_or(Malformed("expected p="))?;
        let proof = attr(Some(proof), "p=", "expected p= proof last")?;
        let mut fields = without_proof.split(',');
        let cbind = attr(fields.next(), "c=", "expected c= channel binding")?;
        let final_nonce = attr(fields.next(), "r=", "expected r= nonce")?;
        if fields.next().is_some() {
            return Err(Malformed("extensions not supported"));
        }
        let cbind = decode(cbind, "c= is not base64")?;
        if cbind != cbind_input {
            return Err(ScramError::ChannelBinding("c= does not match"));
        }
        if final_nonce != nonce {
            return Err(Malformed("nonce does not match"));
        }
        let proof = decode(proof, "p= is not base64")?;
        let proof: [u8; 32] = proof.try_into().map_err(|_| Malformed("proof not 32 bytes"))?;

        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac_sha256(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        if !ct_eq(&Sha256::digest(client_key), &self.secret.stored_key) {
            return Err(ScramError::InvalidProof);
        }
        self.client_key = Some(client_key);
        let verifier = hmac_sha256(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(verifier)).into_bytes())
    }

    /// The ClientKey recovered from a successful proof (for SCRAM pass-through to the server).
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }
}

/// Splits at the first ','.
fn split<'a>(s: &'a str, why: &'static str) -> Result<(&'a str, &'a str), ScramError> {
    s.split_once(',').ok_or(Malformed(why))
}

/// `field` without its `key` prefix, or `Malformed(why)`.
fn attr<'a>(field: Option<&'a str>, key: &str, why: &'static str) -> Result<&'a str, ScramError> {
    field.and_then(|f| f.strip_prefix(key)).ok_or(Malformed(why))
}

fn decode(b64: &str, why: &'static str) -> Result<Vec<u8>, ScramError> {
    STANDARD.decode(b64).map_err(|_| Malformed(why))
}

/// Bounds size and requires UTF-8 without NUL (PostgreSQL treats the message as a C string).
fn as_text(msg: &[u8]) -> Result<&str, ScramError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(Malformed("message exceeds 8 KiB"));
    }
    let text = std::str::from_utf8(msg).map_err(|_| Malformed("not UTF-8"))?;
    if text.contains('\0') {
        return Err(Malformed("NUL byte in message"));
    }
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::hi;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use std::sync::OnceLock;

    const CNONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SNONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_PROOF: &str = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const ZERO_PROOF: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const PLUS_FIRST: &str = "p=tls-server-end-point,,n=,r=abc";
    const PLUS: &str = SCRAM_SHA_256_PLUS;

    /// Derived once: PBKDF2 with 4096 iterations is slow in debug builds.
    fn rfc_secret() -> Arc<ScramSecret> {
        static SECRET: OnceLock<Arc<ScramSecret>> = OnceLock::new();
        let salt = || STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let init = || Arc::new(ScramSecret::derive(b"pencil", &salt(), 4096));
        Arc::clone(SECRET.get_or_init(init))
    }

    /// A server with the RFC 7677 secret and server nonce.
    fn server(mech: &str, cb: Option<Vec<u8>>) -> ScramServer {
        let mut s = ScramServer::new(rfc_secret(), mech, cb).unwrap();
        s.server_nonce = SNONCE.into();
        s
    }

    type Reply = Result<Vec<u8>, ScramError>;

    /// Feeds `msg` as client-first to a server offering binding data `cb`.
    fn first(mech: &str, cb: Option<Vec<u8>>, msg: impl AsRef<[u8]>) -> Reply {
        server(mech, cb).handle_client_first(msg.as_ref())
    }

    /// Feeds `msg` as client-final after the RFC 7677 client-first.
    fn fin(msg: impl AsRef<[u8]>) -> Reply {
        let mut s = server(SCRAM_SHA_256, None);
        s.handle_client_first(RFC_FIRST.as_bytes())?;
        s.handle_client_final(msg.as_ref())
    }

    fn assert_malformed(r: Reply) {
        assert!(matches!(r, Err(Malformed(_))), "{r:?}");
    }

    /// Runs the real client against our server (-PLUS when `cb` is given); returns server-final.
    fn run_client(secret: ScramSecret, password: &[u8], cb: Option<Vec<u8>>) -> Reply {
        let (mech, binding) = match cb.clone() {
            Some(data) => (PLUS, ChannelBinding::tls_server_end_point(data)),
            None => (SCRAM_SHA_256, ChannelBinding::unrequested()),
        };
        let mut client = ScramSha256::new(password, binding);
        let mut srv = ScramServer::new(Arc::new(secret), mech, cb).unwrap();
        let server_first = srv.handle_client_first(client.message())?;
        client.update(&server_first).unwrap();
        let server_final = srv.handle_client_final(client.message())?;
        client.finish(&server_final).unwrap();
        assert!(srv.client_key().is_some());
        Ok(server_final)
    }

    #[test]
    fn rfc7677_test_vector() {
        let mut s = server(SCRAM_SHA_256, None);
        let first = s.handle_client_first(RFC_FIRST.as_bytes()).unwrap();
        let expected = format!("r={NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        assert_eq!(first, expected.as_bytes());
        let msg = format!("c=biws,r={NONCE},p={RFC_PROOF}");
        let v = s.handle_client_final(msg.as_bytes()).unwrap();
        assert_eq!(v, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        let salted = hi(b"pencil", &rfc_secret().salt, 4096);
        assert_eq!(s.client_key(), Some(hmac_sha256(&salted, b"Client Key")));
    }

    #[test]
    fn real_client_with_derived_secret_succeeds() {
        run_client(ScramSecret::from_password("secret"), b"secret", None).unwrap();
    }

    #[test]
    fn real_client_with_parsed_secret_succeeds() {
        let text = postgres_protocol::password::scram_sha_256(b"secret");
        run_client(ScramSecret::parse(&text).unwrap(), b"secret", None).unwrap();
    }

    #[test]
    fn real_client_with_channel_binding_succeeds() {
        let secret = ScramSecret::from_password("secret");
        run_client(secret, b"secret", Some(vec![7; 32])).unwrap();
    }

    #[test]
    fn real_client_with_wrong_password_is_invalid_proof() {
        let secret = ScramSecret::from_password("secret");
        let err = run_client(secret, b"wrong", None).unwrap_err();
        assert_eq!(err, ScramError::InvalidProof);
        assert_eq!(err.sqlstate(), "28P01");
    }

    #[test]
    fn server_nonce_is_18_random_bytes_base64() {
        let a = ScramServer::new(rfc_secret(), SCRAM_SHA_256, None).unwrap();
        let b = ScramServer::new(rfc_secret(), SCRAM_SHA_256, None).unwrap();
        assert_eq!(STANDARD.decode(&a.server_nonce).unwrap().len(), 18);
        assert_ne!(a.server_nonce, b.server_nonce);
    }

    #[test]
    fn unknown_mechanism_and_plus_without_binding_are_rejected() {
        for mech in ["SCRAM-SHA-1", PLUS] {
            let err = ScramServer::new(rfc_secret(), mech, None).err();
            assert_eq!(err, Some(ScramError::UnsupportedMechanism));
        }
    }

    #[test]
    fn bad_gs2_headers_are_malformed() {
        for msg in ["x,,n=,r=a", "n,a=b,n=,r=a", "n", "n,", "p=x,,n=,r=a"] {
            assert_malformed(first(SCRAM_SHA_256, None, msg));
        }
    }

    #[test]
    fn missing_or_bad_client_nonce_is_malformed() {
        for msg in ["n,,n=u", "n,,n=u,r=", "n,,n=u,x=", "n,,r=a", "n,,n=,r=a b"] {
            assert_malformed(first(SCRAM_SHA_256, None, msg));
        }
    }

    #[test]
    fn extensions_are_rejected() {
        assert_malformed(first(SCRAM_SHA_256, None, "n,,m=ext,n=u,r=abc"));
        assert_malformed(first(SCRAM_SHA_256, None, "n,,n=u,r=abc,x=1"));
        assert_malformed(fin(format!("c=biws,r={NONCE},x=1,p={RFC_PROOF}")));
    }

    #[test]
    fn y_flag_when_binding_offered_is_downgrade() {
        let err = first(SCRAM_SHA_256, Some(vec![1; 32]), "y,,n=,r=abc").unwrap_err();
        assert!(matches!(err, ScramError::ChannelBinding(_)));
        assert_eq!(err.sqlstate(), "28000");
    }

    #[test]
    fn p_flag_with_plain_mechanism_or_n_flag_with_plus_is_malformed() {
        assert_malformed(first(SCRAM_SHA_256, Some(vec![1; 32]), PLUS_FIRST));
        assert_malformed(first(PLUS, Some(vec![1; 32]), "n,,n=,r=abc"));
    }

    #[test]
    fn plus_mechanism_checks_binding_data_in_final() {
        let mut s = server(PLUS, Some(vec![7; 32]));
        s.handle_client_first(PLUS_FIRST.as_bytes()).unwrap();
        let cbind = |byte| STANDARD.encode([b"p=tls-server-end-point,,".as_slice(), &[byte; 32]].concat());
        let msg = |byte| format!("c={},r=abc{SNONCE},p={ZERO_PROOF}", cbind(byte));
        let err = s.handle_client_final(msg(8).as_bytes()).unwrap_err();
        assert!(matches!(err, ScramError::ChannelBinding(_)));
    }

    #[test]
    fn wrong_nonce_in_final_is_malformed() {
        let r = fin(format!("c=biws,r={CNONCE}XX,p={RFC_PROOF}"));
        assert_eq!(r, Err(Malformed("nonce does not match")));
    }

    #[test]
    fn c_attribute_not_matching_header_is_rejected() {
        let r = fin(format!("c=eSws,r={NONCE},p={RFC_PROOF}"));
        assert!(matches!(r, Err(ScramError::ChannelBinding(_))));
    }

    #[test]
    fn bad_base64_is_malformed() {
        let r = fin(format!("c=b!ws,r={NONCE},p={RFC_PROOF}"));
        assert_eq!(r, Err(Malformed("c= is not base64")));
        let r = fin(format!("c=biws,r={NONCE},p=@@@@"));
        assert_eq!(r, Err(Malformed("p= is not base64")));
    }

    #[test]
    fn proof_of_wrong_length_is_malformed() {
        let short = STANDARD.encode([0; 31]);
        let r = fin(format!("c=biws,r={NONCE},p={short}"));
        assert_eq!(r, Err(Malformed("proof not 32 bytes")));
    }

    #[test]
    fn wrong_proof_is_invalid_and_yields_no_key() {
        let mut s = server(SCRAM_SHA_256, None);
        s.handle_client_first(RFC_FIRST.as_bytes()).unwrap();
        let msg = format!("c=biws,r={NONCE},p={ZERO_PROOF}");
        let r = s.handle_client_final(msg.as_bytes());
        assert_eq!((r, s.client_key()), (Err(ScramError::InvalidProof), None));
    }

    #[test]
    fn oversize_empty_nul_and_non_utf8_are_malformed() {
        let big = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_LEN));
        for msg in [big.as_bytes(), b"", b"n,,n=\xff,r=a", b"n,,n=\0,r=a"] {
            assert_malformed(first(SCRAM_SHA_256, None, msg));
            assert_malformed(fin(msg));
        }
    }

    #[test]
    fn messages_out_of_order_are_rejected() {
        let mut s = server(SCRAM_SHA_256, None);
        let r = s.handle_client_final(b"c=biws");
        assert_eq!(r, Err(ScramError::OutOfOrder));
        // A failed exchange stays failed.
        let r = s.handle_client_first(RFC_FIRST.as_bytes());
        assert_eq!(r, Err(ScramError::OutOfOrder));
        let mut s = server(SCRAM_SHA_256, None);
        s.handle_client_first(RFC_FIRST.as_bytes()).unwrap();
        let r = s.handle_client_first(RFC_FIRST.as_bytes());
        assert_eq!(r, Err(ScramError::OutOfOrder));
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let good_final = format!("c=biws,r={NONCE},p={RFC_PROOF}");
        let valid = [RFC_FIRST.as_bytes(), good_final.as_bytes()];
        // xorshift64: deterministic and dependency-free.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut buf: Vec<u8> = match valid.get(i % 3) {
                Some(v) => v.to_vec(),
                None => (0..next() % 96).map(|_| next() as u8).collect(),
            };
            // Corrupt a few bytes, half the time into the ',' separator.
            for _ in 0..next() % 4 {
                let pos = next() as usize % buf.len().max(1);
                let byte = if next() % 2 == 0 { b',' } else { next() as u8 };
                if let Some(b) = buf.get_mut(pos) {
                    *b = byte;
                }
            }
            let _ = first(SCRAM_SHA_256, None, &buf);
            let _ = fin(&buf);
        }
    }

    /// The server side's pass-through login, against this module's exchange.
    mod keys_client {
        use super::super::SCRAM_SHA_256;
        use crate::config::userlist::ScramSecret;
        use crate::server::passthrough::{KeysClient, KeysError};
        use std::sync::Arc;

        /// A verifier and its ClientKey, as a successful client login reveals it.
        fn keys_of(password: &str) -> (Arc<ScramSecret>, [u8; 32]) {
            let secret = Arc::new(ScramSecret::from_password(password));
            let mut server = super::ScramServer::new(secret.clone(), SCRAM_SHA_256, None).unwrap();
            let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
                password.as_bytes(),
                postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
            );
            let server_first = server.handle_client_first(client.message()).unwrap();
            client.update(&server_first).unwrap();
            server.handle_client_final(client.message()).unwrap();
            (secret, server.client_key().unwrap())
        }

        #[test]
        fn keys_client_logs_in_to_a_server_holding_the_same_verifier() {
            let (secret, client_key) = keys_of("pw");
            let mut server = super::ScramServer::new(secret.clone(), SCRAM_SHA_256, None).unwrap();
            let mut client = KeysClient::new(client_key, secret.server_key, None);
            let server_first = server.handle_client_first(&client.first()).unwrap();
            let client_final = client.handle_server_first(&server_first).unwrap();
            let server_final = server.handle_client_final(&client_final).unwrap();
            assert_eq!(client.handle_server_final(&server_final), Ok(()));
            assert_eq!(server.client_key(), Some(client_key));
        }

        #[test]
        fn keys_client_rejects_a_server_with_another_verifier() {
            let (secret, client_key) = keys_of("pw");
            let (other, _) = keys_of("pw");
            let mut server = super::ScramServer::new(other, SCRAM_SHA_256, None).unwrap();
            let mut client = KeysClient::new(client_key, secret.server_key, None);
            let server_first = server.handle_client_first(&client.first()).unwrap();
            let client_final = client.handle_server_first(&server_first).unwrap();
            assert!(server.handle_client_final(&client_final).is_err(), "another salt: the proof fails");
            assert_eq!(client.handle_server_final(b"v=AAAA"), Err(KeysError::BadServerSignature));
        }
    }
}
