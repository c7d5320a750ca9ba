//! Threat: a client making the relay buffer more than `broker.max_buffered_message` of one
//! message. The client loop must read some messages whole (Terminate, Query and Parse for
//! tracked settings, Bind/Describe/Close/Parse for prepared statements); past the hold limit a
//! streamable one (Query; Parse when names are not rewritten) must stream through byte-exact,
//! and any other must be refused from its header with the `max_buffered_message` error before
//! a byte of it is forwarded. A pipe that held more, forwarded a refused message's bytes,
//! lost or reordered a streamed one, stalled, or decided differently depending on how TCP
//! split the stream would let one client pin memory or desynchronise its server.
//!
//! Input: `[flags, classes, whole_sel, chunking, chunk sizes..., stream ops...]`; the ops build
//! messages sized around the hold limit and the 16 KiB streaming threshold (see
//! `build_stream`). The pipe is read only while it wants to, in reads no larger than the room
//! it offers, and written in full or halves; the output is checked against a reference walk of
//! the stream, for the fuzzer's read sizes and for reads as large as the buffer allows.
//!
//! The body is `pgbroker::fuzzing::message_scanner`, which `tests/fuzz_corpus.rs` also runs
//! over `corpus/message_scanner/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::message_scanner(data));
