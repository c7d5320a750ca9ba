//! Threat: either peer of the relay. After login, every byte from clients and servers goes
//! through `Pipe::scan`, which trusts nothing but a tag and a length field. A panic, an
//! over-long message let past `max_packet_size`, bytes approved that were never read (or
//! forwarded twice, or left behind when a message is dropped or replaced), or framing that
//! depends on how TCP happened to split the stream would let one peer crash the broker,
//! desynchronise the other side's protocol state, or smuggle messages past the tags the
//! broker inspects (ReadyForQuery, Terminate, ...).
//!
//! Input: `[flags, chunking, drop_tag, stop_tag, replace_tag, chunk sizes..., stream...]`; the
//! stream is fed to a `Pipe` in chunks of the given sizes (cycled), and what comes out is
//! checked against a model built from the callback's decisions.
//!
//! The body is `pgbroker::fuzzing::frame_scanner`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/frame_scanner/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::frame_scanner(data));
