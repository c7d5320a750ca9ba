//! The shape of the source: modules import only modules below them, the broker's parts keep
//! their state private, and the facts that were written in several places have one home.
//! Read from the source text (`use crate::` lines and `crate::` paths), as a reviewer would.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The file's text without comment lines (doc links name modules without importing them).
fn code(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module a file belongs to (`None` for the crate root and the binary).
fn top_module(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(SRC).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The top-level modules named after `crate::` in `text`, including each name of a
/// `crate::{a, b::c}` group.
fn imported(text: &str) -> BTreeSet<String> {
    let ident =
        |s: &str| s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// Module -> the modules it imports, with a file that does so.
fn import_graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for path in rust_files(Path::new(SRC)) {
        let Some(from) = top_module(&path) else { continue };
        let edges = graph.entry(from.clone()).or_default();
        for to in imported(&code(&path)) {
            if to != from {
                edges.entry(to).or_insert_with(|| path.clone());
            }
        }
    }
    graph
}

/// Groups of modules that import each other, directly or around a loop (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeMap<String, PathBuf>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeMap<String, PathBuf>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(w: &mut Walk<'g>, v: &'g str) {
        let n = w.index.len();
        w.index.insert(v, n);
        w.low.insert(v, n);
        w.stack.push(v);
        for to in w.graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let to = to.as_str();
            if !w.index.contains_key(to) {
                visit(w, to);
                let l = w.low[v].min(w.low[to]);
                w.low.insert(v, l);
            } else if w.stack.contains(&to) {
                let l = w.low[v].min(w.index[to]);
                w.low.insert(v, l);
            }
        }
        if w.low[v] == w.index[v] {
            let mut group = Vec::new();
            while let Some(m) = w.stack.pop() {
                group.push(m.to_string());
                if m == v {
                    break;
                }
            }
            if group.len() > 1 {
                w.found.push(group);
            }
        }
    }
    let mut w = Walk { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), found: Vec::new() };
    for v in graph.keys() {
        if !w.index.contains_key(v.as_str()) {
            visit(&mut w, v);
        }
    }
    w.found
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let text = "use crate::{a, b::{c, d}, e::F};\nlet x = crate::g::h();\nuse crate::{self as x};";
    assert_eq!(imported(text), ["a", "b", "e", "g"].map(String::from).into());
}

#[test]
fn top_level_modules_import_only_downward() {
    let graph = import_graph();
    assert!(graph.contains_key("session") && graph["session"].contains_key("pool"), "the reader found imports");
    let found = cycles(&graph);
    let graph = &graph;
    let explain: Vec<String> = found
        .iter()
        .flat_map(|group| {
            group.iter().flat_map(move |a| {
                group.iter().filter_map(move |b| {
                    graph[a].get(b).map(|file| format!("{a} -> {b} ({})", file.strip_prefix(SRC).unwrap().display()))
                })
            })
        })
        .collect();
    assert!(found.is_empty(), "modules that import each other: {found:?}\n{}", explain.join("\n"));
}

#[test]
fn the_layers_point_down_from_app_to_proto() {
    let graph = import_graph();
    let imports = |a: &str, b: &str| graph.get(a).is_some_and(|e| e.contains_key(b));
    for (upper, lower) in [("app", "session"), ("session", "pool"), ("pool", "server"), ("server", "proto")] {
        assert!(imports(upper, lower), "{upper} uses {lower}");
    }
    for (lower, upper) in [("proto", "server"), ("server", "pool"), ("pool", "session"), ("session", "app")] {
        assert!(!imports(lower, upper), "{lower} must not import {upper}");
    }
}

#[test]
fn the_broker_and_its_parts_have_no_public_fields() {
    let parts = [
        ("app/mod.rs", "pub struct App {"),
        ("admission/mod.rs", "pub struct Admission {"),
        ("registry.rs", "pub struct Registry {"),
        ("shutdown.rs", "pub struct Shutdown {"),
        ("notify/bridge.rs", "pub struct Bridge {"),
        ("fleet/mod.rs", "pub struct Fleet {"),
        ("session/shared.rs", "pub struct Shared {"),
        ("config/live.rs", "pub struct Live("),
    ];
    for (file, opening) in parts {
        let text = code(&Path::new(SRC).join(file));
        let start = text.find(opening).unwrap_or_else(|| panic!("{opening} in {file}"));
        let body = &text[start + opening.len()..];
        let body = &body[..body.find(['}', ';']).unwrap()];
        let public: Vec<&str> = body.lines().map(str::trim).filter(|l| l.starts_with("pub ")).collect();
        assert!(public.is_empty(), "{file}: public fields {public:?}");
    }
}

/// How many times `needle` occurs in the crate's code (comments left out).
fn occurrences(needle: &str) -> usize {
    rust_files(Path::new(SRC)).iter().map(|p| code(p).matches(needle).count()).sum()
}

#[test]
fn each_fact_has_one_home() {
    for (fact, needle) in [
        ("the listener pools' name suffix", "\" (listener)\""),
        ("the hand-over socket variable", "\"PGBROKER_HANDOVER_SOCKET\""),
        ("the max_client_conn refusal", "no more connections allowed"),
        ("the restart-only keys", "pub const RESTART_ONLY"),
        ("the console's database names", "database == \"pgbroker\""),
        ("the longest channel name", "pub const MAX_CHANNEL_LEN"),
        ("the ErrorResponse field reader", "pub fn error_field"),
    ] {
        assert_eq!(occurrences(needle), 1, "{fact} ({needle}) is written in one place");
    }
    for (gone, needle) in [
        ("server state compared as text", "== \"active\""),
        ("ReadyForQuery status as a raw byte", "ready_for_query(out, b'"),
        ("the unused error side", "enum Side"),
        ("stringly typed errors from reload, pause, hub, ready", "Result<(), String>"),
    ] {
        assert_eq!(occurrences(needle), 0, "{gone} ({needle}) is gone");
    }
}
