//! Threat: a corrupt, truncated or attacker-influenced auth file (`"user" "secret"` lines, as
//! PgBouncer's userlist.txt). The file is re-read on every reload, so a panic takes the broker
//! down at the worst moment; misclassifying a secret (a malformed SCRAM verifier read as a
//! cleartext password, an empty password getting a verifier) weakens authentication; and a
//! secret showing up in `Debug` output ends up in logs.
//!
//! Input: UTF-8 text, at most 512 bytes and 3 lines: every cleartext password costs one
//! 4096-iteration PBKDF2, which would otherwise dominate the run.
//!
//! The body is `pgbroker::fuzzing::userlist`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/userlist/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::userlist(data));
