#![allow(clippy::unwrap_used)]

use super::*;

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = format!("{name}\0{sql}\0").into_bytes();
    b.extend_from_slice(&[0, 0]);
    msg(b'P', &b)
}

fn bind(stmt: &str) -> Vec<u8> {
    let mut b = format!("\0{stmt}\0").into_bytes();
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

fn tags(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    let mut rest = bytes;
    while rest.len() >= 5 {
        out.push(rest[0]);
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = &rest[1 + len..];
    }
    out
}

/// Feeds client messages; returns what goes to the server.
fn client(p: &mut Prepared, server: &mut Statements, msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut sent = vec![];
    for m in msgs {
        let mut out = BytesMut::new();
        match p.on_client(m[0], m, &mut out, server, false) {
            Action::Forward => sent.extend_from_slice(m),
            Action::Replace => sent.extend_from_slice(&out),
            Action::Drop | Action::Stop => {}
        }
    }
    sent
}

/// Feeds server replies; returns what reaches the client (plus replies due up front).
fn server_replies(p: &mut Prepared, server: &mut Statements, msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut got = vec![];
    let mut due = BytesMut::new();
    if p.due(&mut due, TxnStatus::Idle) {
        got.extend_from_slice(&due);
    }
    for m in msgs {
        let mut out = BytesMut::new();
        match p.on_server(m[0], m, &mut out, server, TxnStatus::Idle) {
            Action::Forward => got.extend_from_slice(m),
            Action::Replace => got.extend_from_slice(&out),
            Action::Drop | Action::Stop => {}
        }
    }
    got
}

fn prepared() -> Prepared {
    Prepared::new(Arc::new(Registry::default()), 200)
}

#[test]
fn first_parse_is_renamed_and_its_reply_passes() {
    let (mut p, mut s) = (prepared(), Statements::default());
    let sent = client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"PS");
    assert!(String::from_utf8_lossy(&sent).contains("pgb_"), "renamed");
    assert!(!String::from_utf8_lossy(&sent).contains("s1\0"));
    let got = server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"1Z");
    assert!(p.is_idle());
}

#[test]
fn parse_of_a_statement_the_server_has_is_answered_by_the_broker_in_order() {
    let (mut a, mut s) = (prepared(), Statements::default());
    let reg = a.registry.clone();
    client(&mut a, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut a, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let mut b = Prepared::new(reg, 200);
    let sent = client(&mut b, &mut s, &[bind(""), parse("other", "SELECT 1"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"BS", "the Parse is not sent again");
    let got = server_replies(&mut b, &mut s, &[msg(b'2', b""), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"21Z", "ParseComplete after BindComplete, before ReadyForQuery");
}

#[test]
fn bind_on_a_server_lacking_the_statement_prepares_it_and_hides_the_reply() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let mut fresh = Statements::default();
    let sent = client(&mut p, &mut fresh, &[bind("s1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"PBES");
    let got = server_replies(
        &mut p,
        &mut fresh,
        &[msg(b'1', b""), msg(b'2', b""), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")],
    );
    assert_eq!(tags(&got), b"2CZ");
}

#[test]
fn close_is_answered_by_the_broker_and_the_name_forgotten() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[msg(b'C', b"Ss1\0"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"S");
    let got = server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"3Z");
    let sent = client(&mut p, &mut s, &[bind("s1")]);
    assert!(String::from_utf8_lossy(&sent).contains("s1\0"), "unknown names go to the server as they are");
}

#[test]
fn failed_injected_parse_reaches_the_client_and_is_forgotten() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT * FROM gone"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let mut fresh = Statements::default();
    client(&mut p, &mut fresh, &[bind("s1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")]);
    let got = server_replies(&mut p, &mut fresh, &[msg(b'E', b"SERROR\0C42P01\0\0"), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"EZ");
    assert!(fresh.is_empty(), "the failed statement is not recorded as prepared");
    assert!(p.is_idle());
}

#[test]
fn absorbed_replies_after_an_error_are_dropped_like_the_server_skips() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[bind("nope"), msg(b'C', b"Ss1\0"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"BS");
    let got = server_replies(&mut p, &mut s, &[msg(b'E', b"SERROR\0C26000\0\0"), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"EZ", "no CloseComplete for a skipped Close");
}

#[test]
fn deallocate_of_a_client_statement_is_answered_by_the_broker() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[msg(b'Q', b"DEALLOCATE s1;\0")]);
    assert!(sent.is_empty());
    let got = server_replies(&mut p, &mut s, &[]);
    assert_eq!(tags(&got), b"CZ");
}

#[test]
fn discard_all_forgets_every_statement() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    client(&mut p, &mut s, &[msg(b'Q', b"DISCARD ALL\0")]);
    server_replies(&mut p, &mut s, &[msg(b'C', b"DISCARD ALL\0"), msg(b'Z', b"I")]);
    assert!(s.is_empty());
    let sent = client(&mut p, &mut s, &[bind("s1")]);
    assert!(String::from_utf8_lossy(&sent).contains("s1\0"), "the client's name is gone too");
}

#[test]
fn eviction_past_the_limit_closes_the_oldest_and_hides_the_reply() {
    let mut p = Prepared::new(Arc::new(Registry::default()), 1);
    let mut s = Statements::default();
    client(&mut p, &mut s, &[parse("a", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[parse("b", "SELECT 2"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"CPS");
    let got = server_replies(&mut p, &mut s, &[msg(b'3', b""), msg(b'1', b""), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"1Z");
    assert_eq!(s.len(), 1);
}

fn error(code: &str) -> Vec<u8> {
    msg(b'E', format!("SERROR\0C{code}\0Mx\0\0").as_bytes())
}

#[test]
fn a_query_before_sync_skipped_after_an_extended_error_is_not_owed_a_reply() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[bind("nope"), msg(b'Q', b"SELECT 1\0"), msg(b'F', b""), msg(b'S', b"")]);
    assert_eq!(p.take_skipped(), 0, "not known until the error");
    server_replies(&mut p, &mut s, &[error("26000")]);
    assert_eq!(p.take_skipped(), 2);
    let got = server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"Z");
    assert!(p.is_idle());
}

#[test]
fn a_query_sent_while_the_server_skips_is_not_owed_a_reply() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[bind("nope"), msg(b'H', b"")]);
    server_replies(&mut p, &mut s, &[error("26000")]);
    client(&mut p, &mut s, &[msg(b'Q', b"SELECT 1\0"), msg(b'S', b"")]);
    assert_eq!(p.take_skipped(), 1);
    server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    assert!(p.is_idle());
}

#[test]
fn a_simple_query_error_skips_nothing() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[msg(b'Q', b"SELECT x\0"), msg(b'Q', b"SELECT 1\0")]);
    server_replies(&mut p, &mut s, &[error("42703"), msg(b'Z', b"I")]);
    assert_eq!(p.take_skipped(), 0);
}

#[test]
fn a_parse_of_a_live_name_becomes_a_failing_parse_whose_error_is_42p05() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[parse("s1", "SELECT 2"), bind("s1"), msg(b'S', b"")]);
    assert_eq!(tags(&sent), b"PBS");
    assert!(String::from_utf8_lossy(&sent).contains("pgbroker: Parse refused by the broker"));
    let got = server_replies(&mut p, &mut s, &[error("42601"), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"EZ");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("C42P05\0") && text.contains("prepared statement \"s1\" already exists"), "{text}");
    // The first statement is still the client's.
    let sent = client(&mut p, &mut s, &[bind("s1")]);
    assert!(String::from_utf8_lossy(&sent).contains("pgb_"));
    assert!(!p.client.is_empty());
}

#[test]
fn a_duplicate_parse_in_a_failed_transaction_gets_the_servers_error() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    client(&mut p, &mut s, &[parse("s1", "SELECT 2"), msg(b'S', b"")]);
    let got = server_replies(&mut p, &mut s, &[error("25P02"), msg(b'Z', b"E")]);
    assert!(String::from_utf8_lossy(&got).contains("C25P02\0"));
}

#[test]
fn a_failed_or_skipped_parse_leaves_no_name_behind() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("bad", "SELEC"), bind("nope"), parse("later", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[error("42601"), msg(b'Z', b"I")]);
    assert!(p.client.is_empty(), "PostgreSQL created neither");
    assert!(s.is_empty());
    let sent = client(&mut p, &mut s, &[parse("bad", "SELECT 1"), msg(b'S', b"")]);
    assert!(!String::from_utf8_lossy(&sent).contains("pgbroker:"), "not a duplicate");
}

#[test]
fn a_skipped_close_then_parse_of_one_name_leaves_the_old_statement() {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let old = p.client.get(&b"s1"[..]).map(|e| e.name.clone());
    client(&mut p, &mut s, &[bind("nope"), msg(b'C', b"Ss1\0"), parse("s1", "SELECT 2"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[error("26000"), msg(b'Z', b"I")]);
    assert_eq!(p.client.get(&b"s1"[..]).map(|e| e.name.clone()), old);
}

#[test]
fn a_batch_answered_alone_is_refused_for_a_live_or_repeated_name() {
    let (mut p, mut s) = (prepared(), Statements::default());
    let batch = |msgs: &[Vec<u8>]| msgs.concat();
    let alone = |p: &Prepared, bytes: &[u8]| p.can_answer_alone(crate::proto::frame::messages(bytes));
    assert!(alone(&p, &batch(&[parse("a", "SELECT 1"), msg(b'S', b"")])));
    assert!(!alone(&p, &batch(&[parse("a", "SELECT 1"), parse("a", "SELECT 2"), msg(b'S', b"")])));
    assert!(alone(&p, &batch(&[parse("a", "SELECT 1"), msg(b'C', b"Sa\0"), parse("a", "SELECT 2"), msg(b'S', b"")])));
    client(&mut p, &mut s, &[parse("a", "SELECT 1"), msg(b'S', b"")]);
    assert!(!alone(&p, &batch(&[parse("a", "SELECT 1"), msg(b'S', b"")])));
    assert!(alone(&p, &batch(&[msg(b'C', b"Sa\0"), parse("a", "SELECT 1"), msg(b'S', b"")])));
}

#[test]
fn a_parse_past_the_clients_caps_fails_with_54000_and_skips_to_sync() {
    let limits = Limits { statements: 2, bytes: 1 << 20 };
    let (mut p, mut s) = (prepared().limit(limits), Statements::default());
    for name in ["s1", "s2"] {
        client(&mut p, &mut s, &[parse(name, "SELECT 1"), msg(b'S', b"")]);
        server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    }
    let held = p.client.bytes();
    let sent = client(&mut p, &mut s, &[parse("s3", "SELECT 3"), bind("s3"), msg(b'S', b"")]);
    assert!(String::from_utf8_lossy(&sent).contains("pgbroker: Parse refused by the broker"));
    let got = server_replies(&mut p, &mut s, &[error("42601"), msg(b'Z', b"I")]);
    assert_eq!(tags(&got), b"EZ");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("C54000\0") && text.contains("max_client_prepared_statements"), "{text}");
    assert_eq!((p.client.len(), p.client.bytes()), (2, held), "nothing more held");
    // Closing one makes room; a statement too long for the byte cap is refused alone.
    client(&mut p, &mut s, &[msg(b'C', b"Ss1\0"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    assert_eq!(p.client.len(), 1);
    let sent = client(&mut p, &mut s, &[parse("s3", "SELECT 3"), msg(b'S', b"")]);
    assert!(!String::from_utf8_lossy(&sent).contains("pgbroker:"));
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    client(&mut p, &mut s, &[msg(b'C', b"Ss3\0"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    let sent = client(&mut p, &mut s, &[parse("huge", &"x".repeat(1 << 20)), msg(b'S', b"")]);
    assert!(String::from_utf8_lossy(&sent).contains("pgbroker: Parse refused by the broker"));
    let got = server_replies(&mut p, &mut s, &[error("42601"), msg(b'Z', b"I")]);
    assert!(String::from_utf8_lossy(&got).contains("max_client_prepared_bytes"));
    client(&mut p, &mut s, &[msg(b'C', b"Ss2\0"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'Z', b"I")]);
    assert_eq!((p.client.len(), p.client.bytes()), (0, 0), "the count and bytes go back to nothing");
}

fn stale_plan() -> Vec<u8> {
    msg(b'E', b"SERROR\0C0A000\0Mcached plan must not change result type\0\0")
}

/// A batch on a named statement whose Bind the server finds stale; returns what reaches the
/// client and the batch to send again, if any.
fn stale_batch(query: &[u8]) -> (Vec<u8>, Option<BytesMut>) {
    let (mut p, mut s) = (prepared(), Statements::default());
    client(&mut p, &mut s, &[parse("s1", "SELECT 1"), msg(b'S', b"")]);
    server_replies(&mut p, &mut s, &[msg(b'1', b""), msg(b'Z', b"I")]);
    let execute = msg(b'E', b"\0\0\0\0\0");
    client(&mut p, &mut s, &[bind("s1"), execute, query.to_vec(), msg(b'S', b"")]);
    let got = server_replies(&mut p, &mut s, &[stale_plan(), msg(b'Z', b"I")]);
    (got, p.take_replay())
}

#[test]
fn a_batch_with_a_query_streamed_past_the_hold_limit_is_not_replayed() {
    let (got, replay) = stale_batch(&msg(b'Q', b"SELECT 2\0"));
    assert!(got.is_empty(), "the error is held back for the replay");
    assert_eq!(tags(&replay.unwrap()), b"BEQS");
    // Streamed, the Query reaches `on_client` as its header alone: sent again, the batch
    // would end there, without its Sync, and the client would wait for ever.
    let long = msg(b'Q', &vec![b' '; 100_000]);
    let (got, replay) = stale_batch(&long[..HEADER_LEN]);
    assert!(replay.is_none(), "a batch holding a streamed message replayed");
    assert_eq!(tags(&got), b"EZ", "the client gets the server's error");
}
