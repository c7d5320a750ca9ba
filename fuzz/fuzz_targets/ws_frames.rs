//! Threat: a hostile WebSocket client of the LISTEN/NOTIFY bridge, below the JSON: the raw
//! frames it sends after the upgrade. The bridge's stack (hyper, axum's `WebSocketUpgrade`
//! with `notify::ws::limits`, tungstenite) must refuse a frame announced over
//! `MAX_CLIENT_MESSAGE` (64 KiB) from its header rather than buffer it, never yield a message
//! over the limit however it is fragmented, refuse unmasked client frames and the other
//! protocol violations, and answer pings without masking its own frames. A panic, or a
//! message yielded that a reference reading of RFC 6455 does not expect, would let one client
//! crash or bloat the bridge or smuggle frames past its checks.
//!
//! Input: the client's byte stream after the handshake, written over an in-memory duplex to
//! the server stack; text messages go through `notify::command::parse` and the bridge's JSON
//! replies (no hub: database channels answer `unavailable`). Each input builds its own
//! current-thread runtime, so runs are independent.
//!
//! The body is `pgbroker::fuzzing::ws_frames`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/ws_frames/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::ws_frames(data));
