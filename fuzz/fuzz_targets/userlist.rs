//! Threat: a corrupt, truncated or attacker-influenced auth file (`"user" "secret"` lines, as
//! PgBouncer's userlist.txt). The file is re-read on every reload, so a panic takes the broker
//! down at the worst moment; misclassifying a secret (a malformed SCRAM verifier read as a
//! cleartext password, an empty password getting a verifier) weakens authentication; and a
//! secret showing up in `Debug` output ends up in logs.
//!
//! Input: UTF-8 text, at most 512 bytes and 3 lines: every cleartext password costs one
//! 4096-iteration PBKDF2, which would otherwise dominate the run.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgbroker::auth::userlist::{Secret, Userlist};

const MAX_LEN: usize = 512;
const MAX_LINES: usize = 3;

/// `Debug` of a cleartext-password entry whose password appears nowhere in it.
fn reference_debug() -> &'static str {
    static DEBUG: OnceLock<String> = OnceLock::new();
    DEBUG.get_or_init(|| match Userlist::parse("\"u\" \"\x01\"") {
        Ok(list) => format!("{:?}", list.get("u")),
        Err(e) => panic!("reference userlist refused: {e}"),
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LEN {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    if lines > MAX_LINES {
        return;
    }
    let Ok(list) = Userlist::parse(text) else {
        return;
    };
    assert!(list.len() <= lines, "{} users from {lines} lines", list.len());
    assert_eq!(list.users().count(), list.len());
    for user in list.users() {
        let Some(entry) = list.get(user) else {
            panic!("listed user {user:?} has no entry");
        };
        match &entry.secret {
            Secret::Plain(p) if p.is_empty() => {
                assert!(entry.scram.is_none(), "empty password got a SCRAM verifier");
            }
            Secret::Plain(p) => {
                let scram = entry.scram.as_deref();
                assert_eq!(scram.map(|s| s.iterations), Some(4096));
                assert_eq!(entry.password(), Some(p.as_str()));
                let shown = format!("{:?}", Some(entry));
                if !reference_debug().contains(p.as_str()) {
                    assert!(!shown.contains(p.as_str()), "password leaked: {shown}");
                }
            }
            Secret::Md5(_) => {
                assert!(entry.scram.is_none(), "md5 secret got a SCRAM verifier");
                assert_eq!(entry.password(), None);
            }
            Secret::Scram(s) => {
                assert!(s.iterations > 0 && !s.salt.is_empty(), "degenerate verifier");
                assert_eq!(entry.scram.as_deref(), Some(s));
            }
        }
    }
});
