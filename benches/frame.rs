//! Micro-benchmarks of the relay hot path: `Pipe` feeding, scanning and consuming realistic
//! message streams, plus startup-packet parsing. Public API only.
//!
//! Run: `cargo bench --bench frame` (add `-- --warm-up-time 1 --measurement-time 3` for a
//! quick pass).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgbroker::proto::startup::{self, Packet};
use pgbroker::session::pipe::{Action, Pipe};

/// `max_packet_size` default: the largest length field PostgreSQL accepts.
const MAX_LEN: usize = 0x3fff_ffff;
/// One socket read's worth of bytes, as the relay reads them.
const READ: usize = 8 * 1024;

/// A tagged message: tag, length (counting itself), body.
fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let len = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Repeats `unit` until the stream reaches `size` bytes (whole units only).
fn repeat_to(unit: &[u8], size: usize) -> Vec<u8> {
    let n = size.div_ceil(unit.len()).max(1);
    unit.repeat(n)
}

/// The server's reply to one `pgbench -S` query: RowDescription, DataRow, CommandComplete,
/// ReadyForQuery 'I'.
fn pgbench_reply() -> Vec<u8> {
    let mut out = Vec::new();
    // RowDescription: one int4 column "abalance" of pgbench_accounts.
    let mut body = 1i16.to_be_bytes().to_vec();
    cstr(&mut body, "abalance");
    body.extend_from_slice(&16_397i32.to_be_bytes()); // table oid
    body.extend_from_slice(&3i16.to_be_bytes()); // column number
    body.extend_from_slice(&23i32.to_be_bytes()); // int4
    body.extend_from_slice(&4i16.to_be_bytes()); // typlen
    body.extend_from_slice(&(-1i32).to_be_bytes()); // typmod
    body.extend_from_slice(&0i16.to_be_bytes()); // text format
    msg(&mut out, b'T', &body);
    // DataRow: one column, "-2817".
    let mut body = 1i16.to_be_bytes().to_vec();
    body.extend_from_slice(&5i32.to_be_bytes());
    body.extend_from_slice(b"-2817");
    msg(&mut out, b'D', &body);
    msg(&mut out, b'C', b"SELECT 1\0");
    msg(&mut out, b'Z', b"I");
    out
}

/// A client pipeline for one `pgbench -S -M extended` transaction on the unnamed statement.
fn client_extended() -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, "SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&23i32.to_be_bytes());
    msg(&mut out, b'P', &body);
    let mut body = Vec::new();
    cstr(&mut body, ""); // portal
    cstr(&mut body, ""); // statement
    body.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    body.extend_from_slice(&1i16.to_be_bytes()); // parameters
    body.extend_from_slice(&5i32.to_be_bytes());
    body.extend_from_slice(b"40213");
    body.extend_from_slice(&0i16.to_be_bytes()); // result formats
    msg(&mut out, b'B', &body);
    msg(&mut out, b'D', b"P\0");
    let mut body = Vec::new();
    cstr(&mut body, "");
    body.extend_from_slice(&0i32.to_be_bytes());
    msg(&mut out, b'E', &body);
    msg(&mut out, b'S', b"");
    out
}

/// A client's `pgbench -S -M simple` transaction: one Query message.
fn client_simple() -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = Vec::new();
    cstr(&mut body, "SELECT abalance FROM pgbench_accounts WHERE aid = 40213;");
    msg(&mut out, b'Q', &body);
    out
}

/// A client's `pgbench -S -M prepared` transaction after the first: Bind of the named
/// statement, Execute, Sync.
fn client_prepared() -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = Vec::new();
    cstr(&mut body, ""); // portal
    cstr(&mut body, "P0_1"); // statement
    body.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    body.extend_from_slice(&1i16.to_be_bytes()); // parameters
    body.extend_from_slice(&5i32.to_be_bytes());
    body.extend_from_slice(b"40213");
    body.extend_from_slice(&0i16.to_be_bytes()); // result formats
    msg(&mut out, b'B', &body);
    let mut body = Vec::new();
    cstr(&mut body, "");
    body.extend_from_slice(&0i32.to_be_bytes());
    msg(&mut out, b'E', &body);
    msg(&mut out, b'S', b"");
    out
}

/// DataRows of `row` bytes each (one bytea-like column), then CommandComplete and RFQ.
fn large_datarows(row: usize, rows: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let value = row - 5 - 2 - 4;
    let mut body = 1i16.to_be_bytes().to_vec();
    body.extend_from_slice(&i32::try_from(value).unwrap_or(i32::MAX).to_be_bytes());
    body.resize(body.len() + value, b'x');
    for _ in 0..rows {
        msg(&mut out, b'D', &body);
    }
    msg(&mut out, b'C', format!("SELECT {rows}\0").as_bytes());
    msg(&mut out, b'Z', b"I");
    out
}

/// A StartupMessage body (after the length prefix) as libpq/psql sends it.
fn startup_body() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "bench"),
        ("database", "bench"),
        ("application_name", "pgbench"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("extra_float_digits", "2"),
    ] {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    body
}

/// Checks a stream is forwarded whole before timing it.
fn check(stream: &[u8], whole: impl Fn(u8) -> bool + Copy) {
    let n = relay(&mut Pipe::new(MAX_LEN), stream, READ, whole, |_, _, _| Action::Forward);
    assert_eq!(n, stream.len(), "stream not forwarded whole");
}

/// Feeds `stream` in `read`-sized pieces, scanning and writing out after each as the relay
/// does. Returns the bytes forwarded.
#[inline]
fn relay(
    pipe: &mut Pipe,
    stream: &[u8],
    read: usize,
    whole: impl Fn(u8) -> bool + Copy,
    mut on: impl FnMut(u8, &[u8], &mut BytesMut) -> Action,
) -> usize {
    let mut written = 0;
    for chunk in stream.chunks(read) {
        pipe.read_buf().extend_from_slice(black_box(chunk));
        match pipe.scan(whole, &mut on) {
            Ok(false) => {}
            other => panic!("unexpected scan outcome {other:?}"),
        }
        let n = pipe.ready().len();
        black_box(pipe.ready());
        pipe.consume(n);
        written += n;
    }
    written
}

fn scan_pgbench_reply(c: &mut Criterion) {
    let stream = repeat_to(&pgbench_reply(), READ);
    check(&stream, |t| t == b'Z' || t == b'S');
    let mut g = c.benchmark_group("scan_pgbench_reply");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function(BenchmarkId::from_parameter(stream.len()), |b| {
        let mut pipe = Pipe::new(MAX_LEN);
        b.iter(|| {
            let mut idle = 0usize;
            let n = relay(
                &mut pipe,
                &stream,
                READ,
                |t| t == b'Z' || t == b'S',
                |t, m, _| {
                    if t == b'Z' && m.get(5) == Some(&b'I') {
                        idle += 1;
                    }
                    Action::Forward
                },
            );
            black_box((n, idle))
        });
    });
    g.finish();
}

fn scan_client_extended(c: &mut Criterion) {
    scan_client(c, "scan_client_extended", &client_extended());
}

fn scan_client_simple(c: &mut Criterion) {
    scan_client(c, "scan_client_simple", &client_simple());
}

fn scan_client_prepared(c: &mut Criterion) {
    scan_client(c, "scan_client_prepared", &client_prepared());
}

/// Client-side decoding and forwarding: whole messages found, Sync/Query counted (the
/// transaction-mode relay's decision points), bytes forwarded untouched.
fn scan_client(c: &mut Criterion, name: &str, unit: &[u8]) {
    let stream = repeat_to(unit, READ);
    check(&stream, |t| t == b'X');
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function(BenchmarkId::from_parameter(stream.len()), |b| {
        let mut pipe = Pipe::new(MAX_LEN);
        b.iter(|| {
            let mut syncs = 0usize;
            let n = relay(
                &mut pipe,
                &stream,
                READ,
                |t| t == b'X',
                |t, _, _| {
                    match t {
                        b'X' => return Action::Stop,
                        b'S' | b'Q' => syncs += 1,
                        _ => {}
                    }
                    Action::Forward
                },
            );
            black_box((n, syncs))
        });
    });
    g.finish();
}

fn scan_large_datarows(c: &mut Criterion) {
    let stream = large_datarows(64 * 1024, 16);
    check(&stream, |t| t == b'Z' || t == b'S');
    let mut g = c.benchmark_group("scan_large_datarows");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function(BenchmarkId::from_parameter(stream.len()), |b| {
        let mut pipe = Pipe::new(MAX_LEN);
        b.iter(|| {
            let mut headers = 0usize;
            let n = relay(
                &mut pipe,
                &stream,
                READ,
                |t| t == b'Z' || t == b'S',
                |_, m, _| {
                    headers += m.len();
                    Action::Forward
                },
            );
            black_box((n, headers))
        });
    });
    g.finish();
}

fn startup_parse(c: &mut Criterion) {
    let body = startup_body();
    let mut g = c.benchmark_group("startup_parse");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function(BenchmarkId::from_parameter(body.len()), |b| {
        b.iter(|| match startup::parse(black_box(&body)) {
            Ok(Packet::Startup(s)) => black_box(s),
            other => panic!("not a StartupMessage: {other:?}"),
        });
    });
    g.finish();
}

criterion_group!(
    benches,
    scan_pgbench_reply,
    scan_client_simple,
    scan_client_extended,
    scan_client_prepared,
    scan_large_datarows,
    startup_parse
);
criterion_main!(benches);
