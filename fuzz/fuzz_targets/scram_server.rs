//! Threat: an unauthenticated client during SASL login. SCRAM-SHA-256 messages are parsed
//! before the client has proved anything, from bytes it fully controls (gs2 header, nonce,
//! channel-binding data, base64 proof). A panic kills the login task; accepting a message the
//! grammar forbids, or a proof that does not match the secret, would be an authentication
//! bypass. The second half also keeps the exchange's state machine honest: a message after a
//! failure must be refused, never accepted.
//!
//! Input: first byte picks the split point and mode; the rest is client-first + client-final,
//! or (mode 1) only client-final after a fixed valid client-first `n,,n=,r=abc`.
//!
//! The body is `pgbroker::fuzzing::scram_server`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/scram_server/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::scram_server(data));
