//! Threat: a broken or hostile config file (hand-edited, templated from untrusted values, or
//! swapped under a running broker before SIGHUP). `Config::parse` is the only gate between
//! that text and the process: it must turn every input into either a validated `Config` or a
//! `ConfigError` naming the problem, and never panic (a panic on reload would take down a
//! broker that was serving fine with the old config), overflow on durations and sizes, or
//! loop on pathological TOML.
//!
//! Input: UTF-8 text of at most 4 KiB, parsed with no path and an empty environment. Inputs
//! whose `auth.file` is absolute or leaves the current directory are skipped, since
//! `Config::parse` reads that file.
//!
//! The body is `pgbroker::fuzzing::config`, which `tests/fuzz_corpus.rs` also runs over
//! `corpus/config/` in a plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgbroker::fuzzing::config(data));
