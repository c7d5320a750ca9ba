//! What the client loop reads of the bytes it relays: client requests (Terminate, statements
//! that may change tracked settings, prepared statements) and server replies
//! (ReadyForQuery, ParameterStatus, errors). Everything else passes unread.

use super::ClientLoop;
use crate::config::PoolMode;
use crate::error::SqlState;
use crate::proto::build::{self, Severity};
use crate::proto::frame::{HEADER_LEN, messages};
use crate::proto::{TxnStatus, split_cstr, tag};
use crate::session::SessionError;
use crate::session::accounting;
use crate::session::hints::{Hints, Recent};
use crate::session::pipe::Action;
use crate::session::prepared::Prepared;
use bytes::BytesMut;

impl ClientLoop {
    /// Looks at client messages; true when the client said Terminate.
    pub(super) fn scan_client(&mut self) -> Result<bool, SessionError> {
        let pending = &mut self.pending;
        let hints = &mut self.hints;
        let statements = &mut self.statements;
        let custom = &mut self.custom;
        let recent = &mut self.recent;
        // In session mode the client keeps its server: nothing it does needs following.
        let inspect = self.mode != PoolMode::Session;
        let binds = inspect && !statements.is_empty();
        let mut prepared = self.prepared.as_mut().zip(self.server.as_deref_mut().map(|s| &mut s.statements));
        let track = prepared.is_some();
        let stopped = self.up.scan(
            |t| {
                t == tag::TERMINATE
                    || (inspect && (t == tag::QUERY || t == tag::PARSE))
                    || (binds && (t == tag::BIND || t == tag::CLOSE))
                    || (track && Prepared::needs_whole(t))
            },
            |t, msg, out| {
                if inspect {
                    let body = msg.get(HEADER_LEN..).unwrap_or_default();
                    match t {
                        // Streamed (huge) statements cannot be read: assume the worst.
                        tag::QUERY | tag::PARSE if body.is_empty() => *hints |= Hints::ALL,
                        tag::QUERY => *hints |= statement_hints(recent, body, custom),
                        tag::PARSE => {
                            if let Some((name, text)) = split_cstr(body) {
                                let found = statement_hints(recent, text, custom);
                                statements.parsed(name, found);
                                *hints |= found;
                            }
                        }
                        // Bind: portal name, then statement name.
                        tag::BIND if binds => {
                            if let Some((name, _)) = split_cstr(body).and_then(|(_, rest)| split_cstr(rest)) {
                                *hints |= statements.bound(name);
                            }
                        }
                        tag::CLOSE if binds => {
                            if let Some((&crate::proto::target::STATEMENT, rest)) = body.split_first()
                                && let Some((name, _)) = split_cstr(rest)
                            {
                                statements.closed(name);
                            }
                        }
                        _ => {}
                    }
                }
                let before = pending.sync_points;
                // Read before the message: a CopyDone is still taken while the COPY runs.
                let copy_in = pending.copy_in();
                let action = match (pending.observe_client(t), prepared.as_mut()) {
                    (Action::Forward, Some((p, statements))) => {
                        let action = p.on_client(t, msg, out, statements, copy_in);
                        // The server skips it (it is skipping to Sync after an error).
                        for _ in 0..p.take_skipped() {
                            pending.withdraw();
                        }
                        action
                    }
                    (action, _) => action,
                };
                // A request the broker answers itself (DEALLOCATE of a client's statement) is
                // owed nothing by the server.
                if pending.sync_points > before && action == Action::Drop {
                    pending.withdraw();
                }
                action
            },
        )?;
        self.acct.sent(self.pending.sync_points);
        // Replies the broker owes with nothing outstanding before them go out now.
        if let (Some(p), Some(server)) = (self.prepared.as_mut(), self.server.as_deref()) {
            let mut mine = BytesMut::new();
            if p.due(&mut mine, server.status) {
                self.down.insert(&mine);
            }
        }
        Ok(stopped)
    }

    /// Looks at server messages: ReadyForQuery settles a request (and in statement mode
    /// refuses a transaction block), ParameterStatus follows the client's settings.
    pub(super) fn scan_server(&mut self) -> Result<(), SessionError> {
        let Some(server) = self.server.as_deref_mut() else { return Ok(()) };
        let pending = &mut self.pending;
        let settings = &mut self.settings;
        let prepared = &mut self.prepared;
        let statement = self.mode == PoolMode::Statement;
        let track = prepared.is_some();
        let counters = &self.pool.counters;
        let watch = self.watch_resets;
        let reset = &mut self.reset;
        let mut answered = 0;
        self.down
            .scan(
                |t| {
                    t == tag::READY_FOR_QUERY
                        || t == tag::PARAMETER_STATUS
                        || t == tag::ERROR_RESPONSE
                        || ((track || watch) && t == tag::COMMAND_COMPLETE)
                },
                |t, msg, out| {
                    let body = msg.get(HEADER_LEN..).unwrap_or_default();
                    let mut refuse = false;
                    match t {
                        tag::COPY_IN_RESPONSE => {
                            pending.on_copy_in();
                            if let Some(p) = prepared.as_mut() {
                                p.on_copy_in();
                            }
                        }
                        tag::ERROR_RESPONSE => {
                            if let Some(code) = accounting::error_code(msg) {
                                counters.error(code);
                            }
                        }
                        tag::READY_FOR_QUERY => {
                            answered += 1;
                            pending.on_ready();
                            server.status = TxnStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                            refuse = statement && server.status != TxnStatus::Idle;
                        }
                        // The command tags of `RESET` and `DISCARD`.
                        tag::COMMAND_COMPLETE
                            if watch && (body.starts_with(b"RESET") || body.starts_with(b"DISCARD")) =>
                        {
                            *reset = true;
                        }
                        tag::PARAMETER_STATUS => {
                            server.observe_parameter_status(body);
                            if let Some((name, value)) = crate::server::parse_parameter_status(body) {
                                settings.observe(name, value);
                            }
                        }
                        _ => {}
                    }
                    let action = match prepared.as_mut() {
                        Some(p) => {
                            let action = p.on_server(t, msg, out, &mut server.statements, server.status);
                            // An extended-protocol error: the server skips to Sync, and sends
                            // no ReadyForQuery for a Query or FunctionCall pipelined before it.
                            for _ in 0..p.take_skipped() {
                                pending.withdraw();
                            }
                            action
                        }
                        None => Action::Forward,
                    };
                    if !refuse {
                        return action;
                    }
                    // Statement mode: the ReadyForQuery becomes an error and an idle
                    // ReadyForQuery, in its place among what the client gets.
                    refuse_in_place(action, msg, out)
                },
            )
            .map_err(|e| {
                SessionError::fatal(SqlState::PROTOCOL_VIOLATION, format!("server sent a bad message: {e}"))
            })?;
        self.served |= answered > 0;
        let over = server.status == TxnStatus::Idle && self.pending.is_settled();
        let (acct, sync_points) = (&mut self.acct, self.pending.sync_points);
        self.pool.record_metrics(|m| acct.answered(counters, m, answered, sync_points, over));
        Ok(())
    }
}

/// The hints of a statement's text; custom settings it may set are added to `custom`.
fn statement_hints(recent: &mut Recent, text: &[u8], custom: &mut Vec<String>) -> Hints {
    let found = recent.hints(text);
    if found.has(Hints::SETTINGS) {
        crate::session::hints::custom_names(text, custom);
    }
    found
}

/// Statement mode: replaces the ReadyForQuery the client would get (`msg` itself, or the one
/// inside `out` when the prepared-statement layer rewrote the reply) by the refusal. A reply
/// hidden or rewritten without it (a batch about to be replayed) is left as it is: the
/// replay's own ReadyForQuery is refused when it comes.
fn refuse_in_place(action: Action, msg: &[u8], out: &mut BytesMut) -> Action {
    let at = match action {
        Action::Replace => {
            let mut offset = 0;
            let found = messages(out).find_map(|(t, m)| {
                let here = offset;
                offset += m.len();
                (t == tag::READY_FOR_QUERY).then_some((here, m.len()))
            });
            match found {
                Some(found) => found,
                None => return Action::Replace,
            }
        }
        Action::Forward => {
            out.clear();
            out.extend_from_slice(msg);
            (0, msg.len())
        }
        Action::Drop | Action::Stop => return action,
    };
    let (start, len) = at;
    let after = out.split_off(start + len);
    out.truncate(start);
    refuse_transaction(out);
    out.unsplit(after);
    Action::Replace
}

/// Statement mode: the statement opened a transaction block. The client gets an error and an
/// idle ReadyForQuery; the server is rolled back when it goes back to the pool.
fn refuse_transaction(out: &mut BytesMut) {
    build::error_response(
        out,
        Severity::Error,
        SqlState::FEATURE_NOT_SUPPORTED,
        "transaction blocks are not allowed in statement pooling mode",
        Some("pool_mode = \"statement\" runs each statement on its own; the transaction was rolled back"),
    );
    build::ready_for_query(out, crate::proto::TxnStatus::Idle);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(buf: &[u8]) -> Vec<u8> {
        messages(buf).map(|(t, _)| t).collect()
    }

    fn ready(status: u8) -> BytesMut {
        let mut b = BytesMut::new();
        build::ready_for_query(&mut b, crate::proto::TxnStatus::from_byte(status));
        b
    }

    fn error() -> BytesMut {
        let mut b = BytesMut::new();
        build::error_response(&mut b, Severity::Error, SqlState::PROTOCOL_VIOLATION, "x", None);
        b
    }

    #[test]
    fn a_forwarded_ready_for_query_becomes_the_refusal_and_an_idle_one() {
        let msg = ready(b'T');
        let mut out = BytesMut::new();
        assert_eq!(refuse_in_place(Action::Forward, &msg, &mut out), Action::Replace);
        assert_eq!(tags(&out), b"EZ");
        assert_eq!(out.last(), Some(&b'I'));
    }

    #[test]
    fn a_rewritten_reply_keeps_what_surrounds_its_ready_for_query() {
        let msg = ready(b'T');
        let mut out = error();
        out.extend_from_slice(&msg);
        out.extend_from_slice(b"1\0\0\0\x04"); // ParseComplete owed behind it
        assert_eq!(refuse_in_place(Action::Replace, &msg, &mut out), Action::Replace);
        assert_eq!(tags(&out), b"EEZ1");
    }

    #[test]
    fn a_reply_rewritten_without_its_ready_for_query_is_left_alone() {
        let msg = ready(b'T');
        let mut out = BytesMut::from(&b"1\0\0\0\x04"[..]); // shorter than the message
        assert_eq!(refuse_in_place(Action::Replace, &msg, &mut out), Action::Replace);
        assert_eq!(&out[..], b"1\0\0\0\x04");
        assert_eq!(refuse_in_place(Action::Drop, &msg, &mut out), Action::Drop);
    }
}
