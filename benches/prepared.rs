//! Micro-benchmark of a client's Parse of a new named statement through the prepared-statement
//! layer (shared registry, client names, server-side names), then its Close, with 100 and
//! with 10,000 other statements live in the registry. The cost should not depend on how many
//! are live. Public API only.
//!
//! Run: `cargo bench --bench prepared` (add `-- --warm-up-time 1 --measurement-time 3` for a
//! quick pass).

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pgbroker::server::statements::Statements;
use pgbroker::session::pipe::Action;
use pgbroker::session::prepared::{Prepared, Registry};

/// `max_prepared_statements` default.
const MAX_ON_SERVER: usize = 200;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse of `name` with `sql` and no parameter types.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = format!("{name}\0{sql}\0").into_bytes();
    body.extend_from_slice(&[0, 0]);
    msg(b'P', &body)
}

fn close(name: &str) -> Vec<u8> {
    msg(b'C', format!("S{name}\0").as_bytes())
}

fn send(p: &mut Prepared, server: &mut Statements, m: &[u8], out: &mut BytesMut) -> Action {
    out.clear();
    p.on_client(m[0], m, out, server, false)
}

fn parse_with_live_statements(c: &mut Criterion) {
    let mut group = c.benchmark_group("prepared_parse");
    for live in [100usize, 10_000] {
        let registry = Arc::new(Registry::default());
        // Other clients' statements, live for the whole run.
        let mut holder = Prepared::new(registry.clone(), MAX_ON_SERVER);
        let (mut server, mut out) = (Statements::default(), BytesMut::new());
        for i in 0..live {
            send(&mut holder, &mut server, &parse(&format!("h{i}"), &format!("SELECT {i} AS held")), &mut out);
            holder.reset_in_flight();
        }
        let mut client = Prepared::new(registry, MAX_ON_SERVER);
        let mut n = 0u64;
        let closing = close("s");
        group.bench_function(BenchmarkId::new("new_statement", live), |b| {
            b.iter(|| {
                // A text no one has prepared yet: a registry miss, as when an app prepares
                // ad hoc queries.
                n += 1;
                let m = parse("s", &format!("SELECT {n} AS fresh"));
                black_box(send(&mut client, &mut server, &m, &mut out));
                black_box(send(&mut client, &mut server, &closing, &mut out));
                client.reset_in_flight();
            });
        });
        drop(holder);
    }
    group.finish();
}

criterion_group!(benches, parse_with_live_statements);
criterion_main!(benches);
