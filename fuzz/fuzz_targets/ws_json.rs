//! Threat: a hostile WebSocket client of the LISTEN/NOTIFY bridge. After the upgrade, every
//! text frame it sends (`{"type":"subscribe","channels":[...]}`, `unsubscribe`, `ping`) is
//! parsed and checked by `notify::command::parse` before anything reaches the hub. A panic
//! kills the connection's task; a channel let through that is empty, over 63 bytes or holds a
//! NUL would make the listener LISTEN on a truncated or different name (and a name that does
//! not quote back to itself would inject SQL into the listener's `LISTEN "..."`); an unknown
//! `$pgbroker.` channel, or a channel outside the patterns of the client's bearer token,
//! accepted would bypass the token's restriction; and an error reply that is not the promised
//! JSON object breaks well-behaved clients.
//!
//! Input: one text frame (non-UTF-8 inputs are skipped: the WebSocket layer refuses them),
//! parsed with no token, a token allowing `orders.*`, `*.audit` and `$pgbroker.events`, and a
//! token allowing nothing. A token may only take channels away, never change anything else.
//!
//! The body is `pgbroker::fuzzing::ws_json`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/ws_json/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::ws_json(data));
