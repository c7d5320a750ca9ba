//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`: hand-made seeds, minimised
//! crash regressions and a few inputs picked from fuzzing runs) through the same code the
//! cargo-fuzz targets run (`pgbroker::fuzzing`), so a plain `cargo test` on stable Rust
//! guards every input the fuzzer once needed, without cargo-fuzz or nightly.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// Runs `target` over every file of `fuzz/corpus/<name>/` and fails naming each input that
/// panicked (an invariant the fuzz target asserts broke, or the code under test panicked).
fn replay(name: &str, target: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect(),
        Err(e) => panic!("cannot read corpus {}: {e}", dir.display()),
    };
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for path in &files {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        };
        if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {name} inputs panicked (messages above): {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn startup_packet_corpus_replays_clean() {
    replay("decode_startup", pgbroker::fuzzing::decode_startup);
}

#[test]
fn relay_frame_scanner_corpus_replays_clean() {
    replay("frame_scanner", pgbroker::fuzzing::frame_scanner);
}

#[test]
fn scram_exchange_corpus_replays_clean() {
    replay("scram_server", pgbroker::fuzzing::scram_server);
}

#[test]
fn auth_file_corpus_replays_clean() {
    replay("userlist", pgbroker::fuzzing::userlist);
}

#[test]
fn config_file_corpus_replays_clean() {
    replay("config", pgbroker::fuzzing::config);
}

#[test]
fn websocket_command_corpus_replays_clean() {
    replay("ws_json", pgbroker::fuzzing::ws_json);
}

#[test]
fn capped_message_scanner_corpus_replays_clean() {
    replay("message_scanner", pgbroker::fuzzing::message_scanner);
}

#[test]
fn websocket_frame_corpus_replays_clean() {
    replay("ws_frames", pgbroker::fuzzing::ws_frames);
}
