//! Named prepared statements in transaction mode. A client's statement names map to
//! broker-owned server names derived from the statement's content, so one server-side
//! statement serves every client that lands there. Statements a server lacks are prepared
//! on the fly; replies the client did not ask for are hidden, and replies for messages the
//! broker answers itself are put in their place in the reply stream.

use super::pipe::Action;
use crate::error::SqlState;
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, build, split_cstr, tag};
use crate::server::statements::Statements;
use bytes::{BufMut, BytesMut};
use replay::{Batch, MAX_REPLAY};
use std::collections::VecDeque;
use std::sync::Arc;

/// A reply the server owes for a message sent to it, or one the broker owes itself.
#[derive(Debug)]
enum Expect {
    /// ParseComplete; `hide` for Parses the broker injected. `name` is the server-side name,
    /// forgotten again if the Parse fails or is skipped, as is the client's name (`undo`).
    Parse {
        name: Option<Arc<str>>,
        hide: bool,
        undo: Undo,
    },
    /// BindComplete. For a named statement, its definition and the version bound, in case
    /// the server reports the cached plan stale.
    Bind(Option<(Arc<StmtDef>, u32)>, bool),
    /// ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    DescribePortal,
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// CloseComplete; `evicted` for Closes the broker injected to evict a statement.
    Close {
        evicted: Option<Arc<str>>,
    },
    Sync,
    /// A simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
    /// The Parse that cannot succeed, sent in place of a client's Parse the broker refuses
    /// (see `refuse`): its error becomes this ErrorResponse.
    Refused(Box<[u8]>),
    /// Replies the broker makes itself once every earlier reply has passed, and how to take
    /// back what the message did to the client's names if the server skips it.
    Mine(Mine, Undo),
}

#[derive(Debug, Clone, Copy)]
enum Mine {
    ParseComplete,
    CloseComplete,
    /// `DEALLOCATE name` answered from the client's own map.
    Deallocate,
    /// ReadyForQuery for a Sync answered without a server.
    Ready,
}

/// A client's named statements and the replies in flight on its server.
pub struct Prepared {
    registry: Arc<Registry>,
    max_on_server: usize,
    client: Names,
    limits: Limits,
    expect: VecDeque<Expect>,
    /// The server reported an extended-protocol error and ignores messages until Sync.
    skipping: bool,
    /// Simple Queries and FunctionCalls the server skipped that way: no ReadyForQuery comes
    /// for them (see `take_skipped`).
    skipped: u32,
    /// The current batch, from its first Bind of a named statement, kept for one replay if
    /// the server finds the cached plan stale (a migration changed a table under it).
    batch: Batch,
    recorded: BytesMut,
    /// An Execute ran earlier in this batch: replaying would repeat it, so no replay.
    executed: bool,
    /// A stale-plan error held back from the client until the batch's ReadyForQuery.
    held_error: Option<BytesMut>,
    /// A batch to send again, taken by the client loop.
    replay: Option<BytesMut>,
    /// The batch in flight is a replay; it is not replayed again.
    replaying: bool,
}

impl Prepared {
    /// Statements for one client; servers keep at most `max_on_server` of them.
    pub fn new(registry: Arc<Registry>, max_on_server: usize) -> Prepared {
        Prepared {
            registry,
            max_on_server,
            client: Names::default(),
            limits: Limits::NONE,
            expect: VecDeque::new(),
            skipping: false,
            skipped: 0,
            batch: Batch::Off,
            recorded: BytesMut::new(),
            executed: false,
            held_error: None,
            replay: None,
            replaying: false,
        }
    }

    /// Caps the client's named statements (see `names`).
    pub fn limit(mut self, limits: Limits) -> Prepared {
        self.limits = limits;
        self
    }

    /// Tags whose whole message this module needs to read.
    pub fn needs_whole(t: u8) -> bool {
        matches!(t, tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE | tag::QUERY)
    }

    /// True when no reply is outstanding.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty()
    }

    /// Handles one client message bound for `server`: rewrites statement names, prepares
    /// what the server lacks, answers Close and Parse itself where it can.
    pub fn on_client(
        &mut self,
        t: u8,
        msg: &[u8],
        out: &mut BytesMut,
        server: &mut Statements,
        copy_in: bool,
    ) -> Action {
        let body = msg.get(HEADER_LEN..).unwrap_or_default();
        if self.batch == Batch::Recording {
            self.recorded.extend_from_slice(msg);
            // A Query streamed past `max_buffered_message` comes as its header alone: a batch
            // holding one cannot be sent again (the replay would stop at it, before its Sync).
            let whole = crate::proto::frame::messages(msg).next().is_some_and(|(_, m)| m.len() == msg.len());
            if self.recorded.len() > MAX_REPLAY || !whole {
                self.batch = Batch::Off;
                self.recorded.clear();
            }
        }
        match t {
            tag::PARSE => self.parse(body, out, server),
            tag::BIND => self.bind(msg, body, out, server),
            tag::DESCRIBE => self.describe(body, out, server),
            tag::CLOSE => self.close(body),
            tag::EXECUTE => {
                self.executed |= self.batch == Batch::Off;
                self.expect(Expect::Execute)
            }
            // The server ignores Syncs while it takes COPY data.
            tag::SYNC if copy_in => Action::Forward,
            tag::SYNC => {
                self.skipping = false;
                self.executed = false;
                if self.batch == Batch::Recording {
                    self.batch = Batch::Complete;
                }
                self.expect.push_back(Expect::Sync);
                Action::Forward
            }
            tag::QUERY => self.query(body),
            tag::FUNCTION_CALL => self.expect(Expect::Query),
            _ => Action::Forward,
        }
    }

    /// The server sent CopyInResponse. For an Execute (not a simple Query), the Syncs the
    /// client sent after it get no reply: the server ignores them while it takes COPY data.
    pub fn on_copy_in(&mut self) {
        if matches!(self.expect.front(), Some(Expect::Execute)) {
            let mut first = true;
            self.expect.retain(|e| std::mem::take(&mut first) || !matches!(e, Expect::Sync));
        }
    }

    fn expect(&mut self, e: Expect) -> Action {
        if !self.skipping {
            self.expect.push_back(e);
        } else if matches!(e, Expect::Query) {
            self.skipped += 1;
        }
        Action::Forward
    }

    fn mine(&mut self, m: Mine, undo: Undo) -> Action {
        if !self.skipping {
            self.expect.push_back(Expect::Mine(m, undo));
        }
        Action::Drop
    }

    /// Simple Queries and FunctionCalls the server will not answer since the last call: it
    /// skipped them after an extended-protocol error, as it skips everything up to Sync.
    pub fn take_skipped(&mut self) -> u32 {
        std::mem::take(&mut self.skipped)
    }

    /// Writes a Parse of `name` (and a Close of the statement it evicts) unless the server
    /// has it. Returns true if it wrote anything.
    fn ensure(
        &mut self,
        name: &Arc<str>,
        def: &StmtDef,
        out: &mut BytesMut,
        server: &mut Statements,
        hide: bool,
    ) -> bool {
        if server.touch(name) || self.skipping {
            return false;
        }
        if let Some(victim) = server.insert(name.clone(), self.max_on_server) {
            write_message(out, tag::CLOSE, |b| {
                b.put_u8(crate::proto::target::STATEMENT);
                put_cstr(b, victim.as_bytes());
            });
            self.expect.push_back(Expect::Close { evicted: Some(victim) });
        }
        write_message(out, tag::PARSE, |b| {
            put_cstr(b, name.as_bytes());
            b.put_slice(&def.body);
        });
        self.expect.push_back(Expect::Parse { name: Some(name.clone()), hide, undo: Undo::Nothing });
        true
    }

    fn parse(&mut self, body: &[u8], out: &mut BytesMut, server: &mut Statements) -> Action {
        // The unnamed statement is replaced silently, as PostgreSQL does.
        let unnamed = Expect::Parse { name: None, hide: false, undo: Undo::Nothing };
        let Some((name, rest)) = split_cstr(body) else { return self.expect(unnamed) };
        if name.is_empty() {
            return self.expect(unnamed);
        }
        if self.skipping {
            // The server skips it: no reply, and no statement.
            return Action::Drop;
        }
        if self.client.contains_key(name) {
            let mut error = BytesMut::new();
            duplicate_error(&mut error, name);
            return self.refuse(&error, out);
        }
        if let Some(message) = self.over_limits(1, names::cost(name, rest.len())) {
            let mut error = BytesMut::new();
            build::error_response(&mut error, build::Severity::Error, SqlState::PROGRAM_LIMIT_EXCEEDED, &message, None);
            return self.refuse(&error, out);
        }
        let mut entry = Entry::new(self.registry.intern(rest));
        let server_name = entry.current().clone();
        let def = entry.def.clone();
        self.client.insert(name.into(), entry);
        let undo = Undo::Forget(name.into());
        if self.ensure(&server_name, &def, out, server, false) {
            if let Some(Expect::Parse { undo: u, .. }) = self.expect.back_mut() {
                *u = undo;
            }
            Action::Replace
        } else {
            // The server has it already: the client still gets its ParseComplete.
            self.mine(Mine::ParseComplete, undo)
        }
    }

    /// A Parse the broker refuses (a name the client has: 42P05, as PostgreSQL; past the
    /// client's caps: 54000). A failed Parse also aborts the transaction and skips the rest
    /// up to Sync: the server is made to do just that with a Parse that cannot succeed, and
    /// its error is swapped for `error` on the way back.
    fn refuse(&mut self, error: &[u8], out: &mut BytesMut) -> Action {
        write_message(out, tag::PARSE, |b| {
            // Named, so that the client's unnamed statement is left alone.
            put_cstr(b, b"pgb_refused");
            put_cstr(b, REFUSE_PROBE);
            b.put_u16(0);
        });
        self.expect.push_back(Expect::Refused(error.into()));
        Action::Replace
    }

    /// Why `more` new names holding `bytes` more would take the client past its caps, if
    /// they would. 54000 rather than 53400: a retry fails the same until the client closes
    /// statements, and PostgreSQL's class 53 reads as a shortage that may pass.
    fn over_limits(&self, more: usize, bytes: usize) -> Option<String> {
        let (count, held) = (self.client.len().saturating_add(more), self.client.bytes().saturating_add(bytes));
        if count > self.limits.statements {
            return Some(format!(
                "too many prepared statements for this client (broker.max_client_prepared_statements = {}); close some first",
                self.limits.statements
            ));
        }
        if held > self.limits.bytes {
            return Some(format!(
                "this client's prepared statements would hold {held} bytes, over broker.max_client_prepared_bytes ({}); close some first",
                self.limits.bytes
            ));
        }
        None
    }

    fn bind(&mut self, msg: &[u8], body: &[u8], out: &mut BytesMut, server: &mut Statements) -> Action {
        let named = split_cstr(body).and_then(|(portal, rest)| Some((portal, split_cstr(rest)?)));
        let Some((portal, (stmt, rest))) = named else { return self.expect(Expect::Bind(None, false)) };
        let Some(entry) = self.client.get_mut(stmt) else {
            // Unnamed, or unknown: the server gives the right answer (or error) itself.
            return self.expect(Expect::Bind(None, false));
        };
        let name = entry.current().clone();
        let (def, version) = (entry.def.clone(), entry.version);
        self.ensure(&name, &def, out, server, true);
        write_message(out, tag::BIND, |b| {
            put_cstr(b, portal);
            put_cstr(b, name.as_bytes());
            b.put_slice(rest);
        });
        // A batch that starts by binding a named statement can be replayed if the server finds
        // the cached plan stale: nothing in it has run yet.
        let first = self.batch == Batch::Off && !self.executed && !self.replaying;
        if first {
            self.batch = Batch::Recording;
            self.recorded.clear();
            self.recorded.extend_from_slice(msg);
        }
        self.expect(Expect::Bind(Some((def, version)), first));
        Action::Replace
    }

    fn describe(&mut self, body: &[u8], out: &mut BytesMut, server: &mut Statements) -> Action {
        let (kind, name) = (body.first().copied(), body.get(1..).and_then(split_cstr).map(|(n, _)| n));
        if kind != Some(crate::proto::target::STATEMENT) {
            return self.expect(Expect::DescribePortal);
        }
        let Some(entry) = name.and_then(|n| self.client.get_mut(n)) else {
            return self.expect(Expect::DescribeStatement);
        };
        let server_name = entry.current().clone();
        let def = entry.def.clone();
        self.ensure(&server_name, &def, out, server, true);
        write_message(out, tag::DESCRIBE, |b| {
            b.put_u8(crate::proto::target::STATEMENT);
            put_cstr(b, server_name.as_bytes());
        });
        self.expect(Expect::DescribeStatement);
        Action::Replace
    }

    fn close(&mut self, body: &[u8]) -> Action {
        let (kind, name) = (body.first().copied(), body.get(1..).and_then(split_cstr).map(|(n, _)| n));
        match (kind, name) {
            (Some(crate::proto::target::STATEMENT), Some(n)) if !n.is_empty() => {
                if self.skipping {
                    // The server skips it: the statement stays.
                    return Action::Drop;
                }
                // The client's name goes; the server keeps the statement for others.
                let undo = self.client.remove_entry(n).map_or(Undo::Nothing, |(k, e)| Undo::Restore(k, e));
                self.mine(Mine::CloseComplete, undo)
            }
            _ => self.expect(Expect::Close { evicted: None }),
        }
    }

    fn query(&mut self, body: &[u8]) -> Action {
        // `DEALLOCATE ALL` goes to the server, which drops everything; its reply clears our maps.
        // While the server skips to Sync, a Query is skipped too: it changes nothing.
        if let (false, Some(super::sql::Command::Deallocate(Some(name)))) = (self.skipping, super::sql::parse(body))
            && let Some((k, e)) = self.client.remove_entry(name.as_bytes())
        {
            return self.mine(Mine::Deallocate, Undo::Restore(k, e));
        }
        self.expect(Expect::Query)
    }

    /// Handles one server message: hides replies to the broker's own messages and puts the
    /// broker's replies in their place. `status` is the server's last transaction status.
    pub fn on_server(
        &mut self,
        t: u8,
        msg: &[u8],
        out: &mut BytesMut,
        server: &mut Statements,
        status: TxnStatus,
    ) -> Action {
        let mut hide = false;
        match t {
            tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS | tag::NOTIFICATION => return Action::Forward,
            tag::PARSE_COMPLETE => {
                if let Some(Expect::Parse { hide: h, .. }) = self.expect.front() {
                    hide = *h;
                    self.expect.pop_front();
                }
            }
            tag::CLOSE_COMPLETE => {
                if let Some(Expect::Close { evicted }) = self.expect.front() {
                    hide = evicted.is_some();
                    self.expect.pop_front();
                }
            }
            tag::BIND_COMPLETE => self.pop_if(|e| matches!(e, Expect::Bind(..))),
            tag::ROW_DESCRIPTION | tag::NO_DATA => {
                self.pop_if(|e| matches!(e, Expect::DescribeStatement | Expect::DescribePortal))
            }
            tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED => {
                self.pop_if(|e| matches!(e, Expect::Execute));
                let cmd = msg.get(HEADER_LEN..).unwrap_or_default();
                if cmd.starts_with(b"DISCARD ALL\0") || cmd.starts_with(b"DEALLOCATE ALL\0") {
                    server.clear();
                    self.client.clear();
                }
            }
            tag::ERROR_RESPONSE => {
                if let Some(Expect::Refused(error)) = self.expect.front() {
                    // Another error (25P02 in a failed transaction) is what PostgreSQL says too.
                    if super::accounting::error_code(msg) == Some(b"42601") {
                        out.put_slice(error);
                        hide = true;
                    }
                } else {
                    hide = self.hold_stale_plan_error(msg, status);
                }
                self.on_error(server);
            }
            tag::READY_FOR_QUERY => {
                self.on_ready(server);
                if let Some(error) = self.held_error.take() {
                    if self.expect.is_empty() {
                        // Nothing else in flight: run the batch again on the fresh statement.
                        self.replay = Some(std::mem::take(&mut self.recorded));
                        self.replaying = true;
                        hide = true;
                    } else {
                        // The client pipelined more: it gets the error after all, in its place.
                        out.put_slice(&error);
                        out.put_slice(msg);
                        self.due(out, status);
                        return Action::Replace;
                    }
                } else {
                    self.replaying = false;
                }
                self.batch = Batch::Off;
            }
            _ => {}
        }
        if self.due(out, status) {
            if !hide {
                // The server's message first, then the broker's own replies behind it.
                let mine = out.split();
                out.put_slice(msg);
                out.unsplit(mine);
            }
            return Action::Replace;
        }
        if !out.is_empty() {
            // The broker's own error in place of the server's.
            return Action::Replace;
        }
        if hide { Action::Drop } else { Action::Forward }
    }

    fn pop_if(&mut self, f: impl Fn(&Expect) -> bool) {
        if self.expect.front().is_some_and(f) {
            self.expect.pop_front();
        }
    }

    /// An error: in a simple Query, ReadyForQuery follows; in the extended protocol the server
    /// skips everything up to the next Sync, so those replies will never come.
    fn on_error(&mut self, server: &mut Statements) {
        if matches!(self.expect.front(), Some(Expect::Query)) {
            return;
        }
        let mut unrun = Vec::new();
        let mut synced = false;
        while let Some(e) = self.expect.front() {
            if matches!(e, Expect::Sync) {
                synced = true;
                break;
            }
            if matches!(e, Expect::Query) {
                self.skipped += 1;
            }
            unrun.extend(self.expect.pop_front());
        }
        self.skipping = !synced;
        // Last first: a Close then a Parse of one name is undone back to the old statement.
        for e in unrun.into_iter().rev() {
            self.forget_unrun(e, server);
        }
    }

    fn on_ready(&mut self, server: &mut Statements) {
        let mut unrun = Vec::new();
        while let Some(e) = self.expect.pop_front() {
            if matches!(e, Expect::Sync | Expect::Query) {
                break;
            }
            unrun.push(e);
        }
        for e in unrun.into_iter().rev() {
            self.forget_unrun(e, server);
        }
    }

    /// Writes the broker's own replies that are due (nothing from the server before them).
    /// Returns true if it wrote any.
    pub fn due(&mut self, out: &mut BytesMut, status: TxnStatus) -> bool {
        let mut wrote = false;
        while let Some(Expect::Mine(m, _)) = self.expect.front() {
            match m {
                Mine::ParseComplete => write_message(out, tag::PARSE_COMPLETE, |_| {}),
                Mine::CloseComplete => write_message(out, tag::CLOSE_COMPLETE, |_| {}),
                Mine::Deallocate => {
                    write_message(out, tag::COMMAND_COMPLETE, |b| put_cstr(b, b"DEALLOCATE"));
                    build::ready_for_query(out, status);
                }
                Mine::Ready => build::ready_for_query(out, crate::proto::TxnStatus::Idle),
            }
            self.expect.pop_front();
            wrote = true;
        }
        wrote
    }

    /// Forgets in-flight bookkeeping when the server goes away mid-request.
    pub fn reset_in_flight(&mut self) {
        self.expect.clear();
        self.skipping = false;
        self.skipped = 0;
        self.batch = Batch::Off;
        self.recorded.clear();
        self.executed = false;
        self.held_error = None;
        self.replay = None;
        self.replaying = false;
    }
}

/// Query text that fails to parse whatever the server holds (see `Prepared::refuse`).
const REFUSE_PROBE: &[u8] = b"pgbroker: Parse refused by the broker";

/// PostgreSQL's error for a Parse of a name in use.
fn duplicate_error(out: &mut BytesMut, name: &[u8]) {
    let text = format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name));
    build::error_response(out, build::Severity::Error, SqlState::DUPLICATE_PREPARED_STATEMENT, &text, None);
}

fn put_cstr(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

fn write_message(out: &mut BytesMut, t: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(t);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

mod alone;
mod names;
mod registry;
mod replay;
#[cfg(test)]
mod tests;
mod undo;

pub use names::Limits;
use names::Names;
pub use registry::Registry;
use registry::{Entry, StmtDef};
use undo::Undo;
