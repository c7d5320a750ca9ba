//! PgBouncer-format auth file (`"user" "secret"` per line) and the secrets it holds.
//! Secrets never appear in `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest as _;

use crate::crypto::{hi, hmac_sha256};

/// Why a `SCRAM-SHA-256$...` secret could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The secret does not follow `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    #[error("malformed SCRAM-SHA-256 secret: {0}")]
    Scram(&'static str),
}

/// Why an auth file could not be loaded; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserlistError {
    /// The line is not `"user" "secret" ...`.
    #[error("auth file line {line}: expected {expected}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What the parser was looking for.
        expected: &'static str,
    },
    /// The secret looks like a SCRAM secret but is malformed.
    #[error("auth file line {line}: {source}")]
    Secret {
        /// 1-based line number.
        line: usize,
        /// The underlying secret error.
        source: SecretError,
    },
}

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it in `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt used with the password.
    pub salt: Vec<u8>,
    /// SHA-256(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

impl ScramSecret {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).
    pub fn parse(s: &str) -> Result<ScramSecret, SecretError> {
        let bad = SecretError::Scram;
        let rest = s.strip_prefix(SCRAM_PREFIX).ok_or(bad("missing prefix"))?;
        let (iter_salt, keys) = cut(rest, '$', "expected '$' before the keys")?;
        let (iterations, salt) = cut(iter_salt, ':', "expected <iterations>:<salt>")?;
        let (stored_key, server_key) = cut(keys, ':', "expected <StoredKey>:<ServerKey>")?;
        let iterations = match iterations.parse::<u32>() {
            Ok(0) | Err(_) => return Err(bad("iteration count must be a positive integer")),
            Ok(n) => n,
        };
        let salt = STANDARD.decode(salt).map_err(|_| bad("salt is not base64"))?;
        if salt.is_empty() {
            return Err(bad("salt is empty"));
        }
        Ok(ScramSecret { iterations, salt, stored_key: decode_key(stored_key)?, server_key: decode_key(server_key)? })
    }

    /// Derives a secret as PostgreSQL does: SASLprep, random 16-byte salt, 4096 iterations.
    pub fn from_password(password: &str) -> ScramSecret {
        let encoded = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramSecret::parse(&encoded)
            .expect("postgres_protocol::password::scram_sha_256 always emits a well-formed secret")
    }

    /// Derives a secret from raw password bytes with the given salt (no SASLprep).
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = hi(password, salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha2::Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }
}

fn cut<'a>(s: &'a str, sep: char, why: &'static str) -> Result<(&'a str, &'a str), SecretError> {
    s.split_once(sep).ok_or(SecretError::Scram(why))
}

fn decode_key(b64: &str) -> Result<[u8; 32], SecretError> {
    let bytes = STANDARD.decode(b64).map_err(|_| SecretError::Scram("key is not base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| SecretError::Scram("key is not 32 bytes"))
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys let an attacker pose as the server, or as the client given a sniffed exchange.
        f.debug_struct("ScramSecret").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

/// A user's secret from the auth file.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// Cleartext password.
    Plain(String),
    /// md5(password || username), as PostgreSQL stores `md5...` passwords.
    Md5([u8; 16]),
    /// SCRAM-SHA-256 verifier.
    Scram(ScramSecret),
}

impl Secret {
    /// Classifies a secret string: `md5` + 32 lowercase hex, `SCRAM-SHA-256$...`, or cleartext.
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        if let Some(md5) = parse_md5_secret(s) {
            return Ok(Secret::Md5(md5));
        }
        if s.starts_with(SCRAM_PREFIX) {
            return ScramSecret::parse(s).map(Secret::Scram);
        }
        Ok(Secret::Plain(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            Secret::Scram(s) => write!(f, "Secret::Scram({s:?})"),
        }
    }
}

/// One auth-file user: the secret as written plus a SCRAM verifier when one is possible.
#[derive(Debug, Clone)]
pub struct UserEntry {
    /// The secret from the file.
    pub secret: Secret,
    /// SCRAM verifier: parsed for SCRAM secrets, derived once for cleartext ones, None for md5.
    pub scram: Option<Arc<ScramSecret>>,
}

impl UserEntry {
    /// Builds an entry, deriving the SCRAM verifier of a cleartext password (costs one PBKDF2).
    pub fn new(secret: Secret) -> UserEntry {
        let scram = match &secret {
            // An empty password must never authenticate, so offer no verifier for it.
            Secret::Plain(p) if p.is_empty() => None,
            Secret::Plain(p) => Some(Arc::new(ScramSecret::from_password(p))),
            Secret::Scram(s) => Some(Arc::new(s.clone())),
            Secret::Md5(_) => None,
        };
        UserEntry { secret, scram }
    }

    /// The cleartext password, if the file holds one.
    pub fn password(&self) -> Option<&str> {
        match &self.secret {
            Secret::Plain(p) => Some(p),
            _ => None,
        }
    }
}

/// Parsed auth file: user name to entry.
#[derive(Debug, Clone, Default)]
pub struct Userlist {
    users: HashMap<String, UserEntry>,
    /// Fewer than half the users have a SCRAM secret: under `auth.type = "md5"` most get an
    /// md5 challenge, and so do unknown users.
    mostly_md5: bool,
}

impl Userlist {
    /// Parses an auth file; on duplicate users the last line wins, as in PgBouncer.
    pub fn parse(text: &str) -> Result<Userlist, UserlistError> {
        let mut secrets = HashMap::new();
        for (idx, line) in text.lines().enumerate() {
            let line_no = idx + 1;
            if let Some((user, secret)) = parse_line(line, line_no)? {
                let secret =
                    Secret::parse(&secret).map_err(|source| UserlistError::Secret { line: line_no, source })?;
                secrets.insert(user, secret);
            }
        }
        // Derive SCRAM verifiers only after de-duplication: PBKDF2 is deliberately slow.
        let scram = secrets.values().filter(|s| matches!(s, Secret::Scram(_))).count();
        let mostly_md5 = !secrets.is_empty() && scram * 2 < secrets.len();
        let users = secrets.into_iter().map(|(user, secret)| (user, UserEntry::new(secret))).collect();
        Ok(Userlist { users, mostly_md5 })
    }

    /// The entry for `user`, if listed.
    pub fn get(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when an md5 rule should challenge an unknown user with md5 rather than SCRAM,
    /// as most listed users are (with no list, PostgreSQL's default of SCRAM).
    pub fn unknown_users_get_md5(&self) -> bool {
        self.mostly_md5
    }

    /// True when no user is listed.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Listed user names, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

/// One line of the file for `user` and `secret`, quoted as `parse_line` reads it back.
pub fn line(user: &str, secret: &str) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
    format!("{} {}\n", quote(user), quote(secret))
}

/// Returns `None` for blank and comment lines.
fn parse_line(line: &str, line_no: usize) -> Result<Option<(String, String)>, UserlistError> {
    let syntax = |expected| UserlistError::Syntax { line: line_no, expected };
    let rest = line.trim_start();
    if rest.is_empty() || rest.starts_with(';') || rest.starts_with('#') {
        return Ok(None);
    }
    let rest = rest.strip_prefix('"').ok_or(syntax("'\"' opening the user name"))?;
    let (user, rest) = read_quoted(rest).ok_or(syntax("'\"' closing the user name"))?;
    let rest = rest.trim_start().strip_prefix('"').ok_or(syntax("'\"' opening the secret after the user name"))?;
    // Anything after the secret is ignored, as PgBouncer does.
    let (secret, _) = read_quoted(rest).ok_or(syntax("'\"' closing the secret"))?;
    Ok(Some((user, secret)))
}

/// Reads up to the closing quote (`""` is a literal quote); returns the value and the rest.
fn read_quoted(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut rest = s;
    loop {
        let (chunk, after) = rest.split_once('"')?;
        value.push_str(chunk);
        match after.strip_prefix('"') {
            Some(after_doubled) => {
                value.push('"');
                rest = after_doubled;
            }
            None => return Some((value, after)),
        }
    }
}

/// The 16 bytes of an `md5` + 32 hex secret; lowercase only, as PostgreSQL's get_password_type().
pub(crate) fn parse_md5_secret(s: &str) -> Option<[u8; 16]> {
    let hex = s.strip_prefix("md5")?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let hi = hex_digit(*pair.first()?)?;
        let lo = hex_digit(*pair.get(1)?)?;
        *byte = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn a_written_line_reads_back_with_quotes_in_it() {
        let written = line("a\"b", "p\"w d");
        assert_eq!(written, "\"a\"\"b\" \"p\"\"w d\"\n");
        assert_eq!(parse_line(written.trim_end(), 1).unwrap(), Some(("a\"b".into(), "p\"w d".into())));
    }

    use super::*;

    /// RFC 7677's example verifier: password "pencil".
    const SCRAM: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
        WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn doubled_quotes_unescape() {
        let list = Userlist::parse(r#""a""b" "p""w""""#).unwrap();
        assert_eq!(list.get("a\"b").unwrap().password(), Some("p\"w\""));
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let list = Userlist::parse("; c1\n  # c2\n\n   \n\"u\" \"p\"\n").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.users().collect::<Vec<_>>(), ["u"]);
    }

    #[test]
    fn extra_fields_are_ignored() {
        let list = Userlist::parse("\"u\"\t\"p\" \"extra\" whatever").unwrap();
        assert_eq!(list.get("u").unwrap().password(), Some("p"));
    }

    #[test]
    fn last_duplicate_wins() {
        let list = Userlist::parse("\"u\" \"one\"\n\"u\" \"two\"\n").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.get("u").unwrap().password(), Some("two"));
    }

    #[test]
    fn md5_secret_is_detected() {
        let list = Userlist::parse("\"u\" \"md50123456789abcdef0123456789abcdef\"").unwrap();
        let entry = list.get("u").unwrap();
        let half = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        let expected: [u8; 16] = [half, half].concat().try_into().unwrap();
        assert_eq!(entry.secret, Secret::Md5(expected));
        assert!(entry.scram.is_none());
    }

    #[test]
    fn md5_lookalikes_are_plain() {
        for s in ["md5abc", "md50123456789ABCDEF0123456789ABCDEF", "md5"] {
            assert_eq!(Secret::parse(s).unwrap(), Secret::Plain(s.into()));
        }
    }

    #[test]
    fn scram_secret_is_detected() {
        let list = Userlist::parse(&format!("\"u\" \"{SCRAM}\"")).unwrap();
        let entry = list.get("u").unwrap();
        let Secret::Scram(s) = &entry.secret else {
            panic!("not scram: {:?}", entry.secret);
        };
        assert_eq!(*s, ScramSecret::derive(b"pencil", &s.salt, 4096));
        assert_eq!(STANDARD.encode(&s.salt), "W22ZaJ0SNY7soEsUEjb6gQ==");
        assert_eq!(entry.scram.as_deref(), Some(s));
    }

    #[test]
    fn malformed_scram_secret_is_an_error_not_plain() {
        let bad = [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==",
            "SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
            "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
        ];
        for s in bad {
            let err = Userlist::parse(&format!("#\n\"u\" \"{s}\"")).unwrap_err();
            assert!(matches!(err, UserlistError::Secret { line: 2, .. }), "{s}: {err}");
        }
    }

    #[test]
    fn plain_password_gets_scram_verifier() {
        let list = Userlist::parse("\"u\" \"pw\"").unwrap();
        let scram = list.get("u").unwrap().scram.as_deref().unwrap();
        assert_eq!(scram.iterations, 4096);
        assert_eq!(*scram, ScramSecret::derive(b"pw", &scram.salt, 4096));
    }

    #[test]
    fn from_password_applies_saslprep() {
        // SASLprep maps U+00A0 (no-break space) to an ASCII space.
        let s = ScramSecret::from_password("p\u{a0}w");
        assert_eq!(ScramSecret::derive(b"p w", &s.salt, s.iterations), s);
    }

    #[test]
    fn malformed_lines_name_line_and_expectation() {
        let cases = [
            ("u \"p\"", "'\"' opening the user name"),
            ("\"u\" \"p", "'\"' closing the secret"),
            ("\"u", "'\"' closing the user name"),
            ("\"u\"", "'\"' opening the secret after the user name"),
            ("\"u\" p", "'\"' opening the secret after the user name"),
        ];
        for (line, expected) in cases {
            let err = Userlist::parse(&format!("\"ok\" \"x\"\n;\n{line}")).unwrap_err();
            assert_eq!(err, UserlistError::Syntax { line: 3, expected }, "{line}");
            assert!(err.to_string().starts_with("auth file line 3: expected"));
        }
    }

    #[test]
    fn debug_does_not_leak_secrets() {
        let text = format!("\"a\" \"hunter2\"\n\"b\" \"md5{}\"\n\"c\" \"{SCRAM}\"", "ab".repeat(16));
        let list = Userlist::parse(&text).unwrap();
        let dbg = format!("{list:?}");
        for leak in ["hunter2", "abab", "171", "W22ZaJ", "WG5d8", "wfPLw"] {
            assert!(!dbg.contains(leak), "{leak} in {dbg}");
        }
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn empty_plain_password_has_no_verifier() {
        let list = Userlist::parse("\"u\" \"\"").unwrap();
        assert!(list.get("u").unwrap().scram.is_none());
        assert!(!list.is_empty());
    }

    #[test]
    fn unknown_users_get_md5_only_where_most_listed_users_do() {
        let md5 = format!("md5{}", "ab".repeat(16));
        let mostly_md5 = format!("\"a\" \"pw\"\n\"b\" \"{md5}\"\n\"c\" \"{SCRAM}\"");
        assert!(Userlist::parse(&mostly_md5).unwrap().unknown_users_get_md5());
        let mostly_scram = format!("\"a\" \"{SCRAM}\"\n\"b\" \"{SCRAM}\"\n\"c\" \"pw\"");
        assert!(!Userlist::parse(&mostly_scram).unwrap().unknown_users_get_md5());
        assert!(!Userlist::default().unknown_users_get_md5(), "no list: PostgreSQL's default, SCRAM");
    }
}
