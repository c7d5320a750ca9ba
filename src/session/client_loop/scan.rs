//! What the client loop reads of the bytes it relays: client requests (Terminate, statements
//! that may change tracked settings, prepared statements) and server replies
//! (ReadyForQuery, ParameterStatus, errors). Everything else passes unread.

use super::ClientLoop;
use crate::config::PoolMode;
use crate::error::SqlState;
use crate::proto::build::{self, Severity};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, tag};
use crate::session::SessionError;
use crate::session::accounting;
use crate::session::pipe::Action;
use crate::session::prepared::Prepared;
use bytes::BytesMut;

impl ClientLoop {
    /// Looks at client messages; true when the client said Terminate.
    pub(super) fn scan_client(&mut self) -> Result<bool, SessionError> {
        let pending = &mut self.pending;
        let settings = &self.settings;
        let recheck = &mut self.recheck;
        let copy_in = &mut self.copy_in;
        let inspect = !settings.extras().is_empty();
        let mut prepared = self.prepared.as_mut().zip(self.server.as_deref_mut().map(|s| &mut s.statements));
        let track = prepared.is_some();
        let stopped = self.up.scan(
            |t| {
                t == tag::TERMINATE
                    || (inspect && (t == tag::QUERY || t == tag::PARSE))
                    || (track && Prepared::needs_whole(t))
            },
            |t, msg, out| {
                if inspect && (t == tag::QUERY || t == tag::PARSE) {
                    // Streamed (huge) statements cannot be read: assume the worst.
                    let body = msg.get(HEADER_LEN..).unwrap_or_default();
                    *recheck |= body.is_empty() || settings.may_change_extras(body);
                }
                if t == tag::COPY_DONE || t == tag::COPY_FAIL {
                    *copy_in = false;
                }
                match (pending.observe_client(t), prepared.as_mut()) {
                    (Action::Forward, Some((p, statements))) => p.on_client(t, msg, out, statements),
                    (action, _) => action,
                }
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
        let copy_in = &mut self.copy_in;
        let statement = self.mode == PoolMode::Statement;
        let track = prepared.is_some();
        let counters = &self.pool.counters;
        let mut answered = 0;
        self.down
            .scan(
                |t| {
                    t == tag::READY_FOR_QUERY
                        || t == tag::PARAMETER_STATUS
                        || t == tag::ERROR_RESPONSE
                        || (track && t == b'C')
                },
                |t, msg, out| {
                    let body = msg.get(HEADER_LEN..).unwrap_or_default();
                    let mut refuse = false;
                    match t {
                        COPY_IN_RESPONSE => *copy_in = true,
                        tag::ERROR_RESPONSE => {
                            if let Some(code) = accounting::error_code(msg) {
                                counters.error(code);
                            }
                        }
                        tag::READY_FOR_QUERY => {
                            *copy_in = false;
                            answered += 1;
                            pending.sync_points = pending.sync_points.saturating_sub(1);
                            server.status = TxnStatus::from_byte(body.first().copied().unwrap_or(b'T'));
                            refuse = statement && server.status != TxnStatus::Idle;
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
                        Some(p) => p.on_server(t, msg, out, &mut server.statements, server.status),
                        None => Action::Forward,
                    };
                    if !refuse {
                        return action;
                    }
                    // Statement mode: the ReadyForQuery (first in `out` when replaced) becomes
                    // an error and an idle ReadyForQuery.
                    let mine = if action == Action::Replace { out.split_off(msg.len()) } else { BytesMut::new() };
                    out.clear();
                    refuse_transaction(out);
                    out.unsplit(mine);
                    Action::Replace
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

/// CopyInResponse: the server waits for the client's COPY data.
const COPY_IN_RESPONSE: u8 = b'G';

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
    build::ready_for_query(out, b'I');
}
