//! Threat: a broken or hostile config file (hand-edited, templated from untrusted values, or
//! swapped under a running broker before SIGHUP). `Config::parse` is the only gate between
//! that text and the process: it must turn every input into either a validated `Config` or a
//! `ConfigError` naming the problem, and never panic (a panic on reload would take down a
//! broker that was serving fine with the old config), overflow on durations and sizes, or
//! loop on pathological TOML.
//!
//! Input: UTF-8 text of at most 4 KiB, parsed with no path and an empty environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbroker::config::Config;

const MAX_LEN: usize = 4096;

/// `Config::parse` reads `auth.file`. Inputs naming an absolute path or leaving the fuzz
/// directory are skipped so the fuzzer cannot make it read /dev/zero, a FIFO, or the
/// developer's files; relative paths (resolved in the fuzz directory) are still exercised.
fn reads_outside(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(file) = table.get("auth").and_then(|a| a.get("file")).and_then(|f| f.as_str()) else {
        return false;
    };
    let path = std::path::Path::new(file);
    path.has_root()
        || path.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::Prefix(_)))
        || file.contains(['\0', '~'])
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LEN {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if reads_outside(text) {
        return;
    }
    if let Ok(config) = Config::parse(text, None, &|_| None) {
        // Rendering the validated settings (what `pgbroker check` prints) must not panic either.
        let _ = config.describe();
    }
});
