//! Threat: a hostile or broken client on the listening socket. Before authentication, the
//! broker parses untagged startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) from anyone who can connect. A panic here lets an unauthenticated peer kill
//! its session task (or the process under `panic = "abort"`); a NUL smuggled into a parameter
//! would let a client inject extra key/value pairs into the StartupMessage the broker builds
//! for the server.
//!
//! Input: the 4-byte length prefix followed by the packet body, as read from the socket.
//!
//! The body is `pgbroker::fuzzing::decode_startup`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/decode_startup/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::decode_startup(data));
