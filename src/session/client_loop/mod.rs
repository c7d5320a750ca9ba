//! The relay loop every pool mode runs once a client is logged in. A server is attached at
//! the client's first message: in session mode for good; in transaction mode to the
//! ReadyForQuery that ends the transaction; in statement mode to the end of each statement. Bytes
//! pass unchanged; only tags (and ReadyForQuery / ParameterStatus bodies) are read.

mod faults;
mod idle;
mod scan;
mod turn;
mod waits;

use super::SessionError;
use super::accounting::Accounting;
use super::hints::{self, Hints};
use super::listen::{self, Listens};
use super::params::ClientSettings;
use super::pending::Pending;
use super::pipe::{Action, Pipe};
use super::prepared::Prepared;
use super::probe::{self, Probe};
use super::sql;
use super::timers::{Held, Timers};
use crate::cancel::Registration;
use crate::clients::{Client, Pins, State as ClientState};
use crate::config::{Config, PoolMode};
use crate::error::{SqlState, chain};
use crate::net::ClientIo;
use crate::net::ClientStream;
use crate::notify::Event;
use crate::pool::{Defaults, Pool, Pooled, Release};
use crate::proto::build;
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, tag};
use crate::session::Shared;
use crate::stats::Counters;
use bytes::BytesMut;
use faults::cancel_query;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;

/// What a client is told when its `lastval()` or `currval()` is on a server another client
/// has used since.
const LASTVAL_ELSEWHERE: &str = "lastval() and currval() read the sequence state of a pooled server session, which has served another client since this client's last transaction; use INSERT ... RETURNING, or call it in the same transaction as nextval()";

/// Largest message accepted from a server while relaying (PostgreSQL's own limit is 1 GiB).
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// What a pool mode hands the client loop after login.
pub(super) struct Setup {
    /// The pool mode.
    pub mode: PoolMode,
    /// The client's pool.
    pub pool: Arc<Pool>,
    /// The pool's default settings.
    pub defaults: Arc<Defaults>,
    /// The client's settings, applied to each server it gets.
    pub settings: ClientSettings,
    /// The client's cancel key.
    pub registration: Registration,
    /// The server, if one is attached already.
    pub server: Option<Pooled>,
    /// Named prepared statement handling (transaction and statement mode).
    pub prepared: Option<Prepared>,
    /// LISTEN served by the broker (transaction and statement mode).
    pub listens: Option<Listens>,
    /// The client's entry in the registry (state, KILL).
    pub client: Arc<Client>,
}

/// A logged-in client and, when attached, its server.
pub(super) struct ClientLoop {
    /// The config this client runs under; refreshed at each new transaction (live reload).
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    /// The server answered at least one request for this client.
    served: bool,
    /// When the client finished logging in.
    logged_in: tokio::time::Instant,
    mode: PoolMode,
    pool: Arc<Pool>,
    defaults: Arc<Defaults>,
    settings: ClientSettings,
    registration: Registration,
    server: Option<Pooled>,
    up: Pipe,
    down: Pipe,
    pending: Pending,
    /// What the statements since the server was attached hinted at (see `hints`).
    hints: Hints,
    /// The hints of the client's prepared statements, for their executions.
    statements: hints::Statements,
    /// The last statement text read, so that a text sent again is not read again.
    recent: hints::Recent,
    /// Custom settings (`shared.tenant`) the client's statements set, which the probe must
    /// ask for by name.
    custom: Vec<String>,
    /// The server of the client's last transaction and its use number then: where its
    /// `lastval()` is, while nobody else has used it.
    last_server: Option<(u64, u64)>,
    /// A CancelRequest `query_timeout` sent to the attached server: until it has been
    /// delivered the server must not serve anyone else, whose query it could cancel.
    cancelling: Option<tokio::task::JoinHandle<()>>,
    timers: Timers,
    /// Named prepared statements across servers (transaction and statement mode).
    prepared: Option<Prepared>,
    /// LISTEN served by the broker (transaction and statement mode).
    listens: Option<Listens>,
    client: Arc<Client>,
    acct: Accounting,
}

impl Drop for ClientLoop {
    /// A client that leaves pinned (its server is closed with it) no longer counts against
    /// `max_pinned_clients`, whichever way its session ended.
    fn drop(&mut self) {
        self.set_pins(Pins::default());
    }
}

impl ClientLoop {
    /// A loop for a client; boxed, as `run` takes it by value (see `run`).
    pub fn new(shared: Arc<Shared>, setup: Setup) -> Box<ClientLoop> {
        let cfg = shared.config();
        let Setup { mode, pool, defaults, settings, registration, server, prepared, listens, client } = setup;
        if let Some(s) = &server {
            registration.slot.set(Some(s.cancel.clone()));
            client.set_state(ClientState::Active);
        }
        Box::new(ClientLoop {
            served: false,
            logged_in: tokio::time::Instant::now(),
            timers: Timers::new(&cfg.broker),
            up: Pipe::new(cfg.broker.max_packet_size)
                .hold_limit(cfg.broker.max_buffered_message, streamable(&prepared)),
            down: Pipe::new(MAX_SERVER_MESSAGE),
            cfg,
            shared,
            mode,
            pool,
            defaults,
            settings,
            registration,
            server,
            pending: Pending::default(),
            hints: Hints::NONE,
            statements: Default::default(),
            recent: Default::default(),
            custom: Vec::new(),
            last_server: None,
            cancelling: None,
            prepared,
            listens,
            client,
            acct: Accounting::default(),
        })
    }

    /// Relays until the client leaves or fails, then returns the server as its state allows.
    /// Takes the loop boxed: an async fn keeps its arguments besides what it moves out of
    /// them, so a loop passed by value would be held twice by the client's future.
    pub async fn run(mut self: Box<Self>, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        let result = loop {
            // Boxed: the relay loop's state is large, and a hibernating client frees it.
            match Box::pin(self.relay(io)).await {
                Ok(Exit::Hibernate) => {
                    if let Err(e) = self.hibernate(io).await {
                        break Err(e);
                    }
                }
                Ok(Exit::Done) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.finish();
        result
    }

    /// Checks out a server for the transaction the client just started and brings it to the
    /// client's settings.
    async fn attach(&mut self) -> Result<(), SessionError> {
        if let Some(cfg) = self.shared.config_if_changed(&self.cfg) {
            self.timers.set_limits(&cfg.broker);
            self.cfg = cfg;
        }
        if let Some((code, message)) = self.pin_refusal() {
            self.scan_client()?;
            return self.refuse_requests(code, &message);
        }
        if self.mode != PoolMode::Session && self.reads_lastval() {
            // lastval()/currval() belong to the session that ran the client's last
            // transaction: that server, untouched since, or an error, never another's value.
            match self.last_server.and_then(|(id, uses)| self.pool.try_checkout_again(id, uses)) {
                Some(server) => return self.attached(server).await,
                None => {
                    self.scan_client()?;
                    return self.refuse_requests(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, LASTVAL_ELSEWHERE);
                }
            }
        }
        let checkout = match self.pool.try_checkout() {
            Some(server) => {
                self.pool.record_metrics(|m| Accounting::waited(&self.pool.counters, m, None));
                Ok(server)
            }
            None => {
                let since = tokio::time::Instant::now();
                self.client.set_state(ClientState::Waiting);
                // Boxed: waiting or opening a server is large, and the loop lives as long as
                // the client.
                let r = Box::pin(self.pool.checkout(self.cfg.broker.query_wait_timeout)).await;
                self.pool.record_metrics(|m| Accounting::waited(&self.pool.counters, m, Some(since)));
                r
            }
        };
        let server = match checkout {
            Ok(s) => s,
            Err(e) => {
                self.client.set_state(ClientState::Idle);
                self.scan_client()?;
                return self.refuse_requests(e.sqlstate(), &chain(&e));
            }
        };
        self.attached(server).await
    }

    /// The error for requests about to start a transaction that would pin the client when
    /// that is refused: under `session_state = "error"`, or with `max_pinned_clients` of the
    /// pool pinned already. Statement texts are read only when a refusal is possible.
    fn pin_refusal(&self) -> Option<(SqlState, String)> {
        if self.mode == PoolMode::Session {
            return None;
        }
        let (error_mode, limit) = self.pool.pin_policy();
        if !error_mode && self.pool.pinned.load(Ordering::Relaxed) < limit {
            return None;
        }
        let pins = self.up.whole_messages().any(|(t, msg)| {
            hints::statement_text(t, msg.get(HEADER_LEN..).unwrap_or_default()).is_some_and(hints::surely_pins)
        });
        if !pins {
            return None;
        }
        let database = &self.pool.key().database;
        Some(if error_mode {
            (
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "session state that outlives a transaction (advisory locks, WITH HOLD cursors, temporary tables, PREPARE, LISTEN in a transaction block) is refused in transaction pooling for database \"{database}\" (session_state = \"error\")"
                ),
            )
        } else {
            (
                SqlState::CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "too many clients of pool {} keep a server for session state (max_pinned_clients = {limit}); release advisory locks, cursors and temporary tables sooner, or raise the limit",
                    self.pool.key()
                ),
            )
        })
    }

    /// Records why the client keeps its server, counting it in its pool's pinned clients.
    fn set_pins(&self, pins: Pins) {
        let before = self.client.pins();
        match (before.is_empty(), pins.is_empty()) {
            (true, false) => {
                self.pool.pinned.fetch_add(1, Ordering::Relaxed);
            }
            (false, true) => {
                self.pool.pinned.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.client.set_pins(pins);
    }

    /// True if the requests about to start a transaction call `lastval()` or `currval()`.
    /// The texts' hints are kept (`recent`) for the scan that relays them.
    fn reads_lastval(&mut self) -> bool {
        let (recent, statements) = (&mut self.recent, &self.statements);
        self.up.whole_messages().any(|(t, msg)| {
            let body = msg.get(HEADER_LEN..).unwrap_or_default();
            if t == tag::BIND {
                return !statements.is_empty()
                    && crate::proto::split_cstr(body)
                        .and_then(|(_, rest)| crate::proto::split_cstr(rest))
                        .is_some_and(|(name, _)| statements.bound(name).has(Hints::LASTVAL));
            }
            hints::statement_text(t, body)
                .is_some_and(|text| recent.hints(text).has(Hints::LASTVAL) && hints::reads_lastval(text))
        })
    }

    /// Brings a server just checked out to the client's settings and attaches it.
    async fn attached(&mut self, mut server: Pooled) -> Result<(), SessionError> {
        self.client.set_state(ClientState::Active);
        if let Some(plan) = self.settings.plan_sync(&server, self.defaults.all()) {
            // Boxed, as the other rare awaits here: the loop's future lives as long as the client.
            match Box::pin(server.query_row(&plan.sql)).await {
                Ok(Ok(row)) => {
                    let mut told = BytesMut::new();
                    for s in self.settings.apply_sync(&plan, &row, &mut server) {
                        build::parameter_status(&mut told, &s.name, &s.value);
                    }
                    self.down.insert(&told);
                }
                Ok(Err(e)) => {
                    // Only the client's setting was refused; the server is fine.
                    server.release = Release::Reuse;
                    return Err(SessionError::fatal(e.code, e.message));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.settings.mark_synced(&mut server);
        self.registration.slot.set(Some(server.cancel.clone()));
        // Bytes the server sent after the broker's own last query belong to the relay.
        let leftover = !server.rbuf.is_empty();
        if leftover {
            self.down.read_buf().extend_from_slice(&server.rbuf);
            server.rbuf.clear();
        }
        self.server = Some(server);
        if leftover {
            self.scan_server()?;
        }
        Ok(())
    }

    /// `LISTEN` / `UNLISTEN` alone, between transactions: answered by the broker, whose
    /// listener does the listening. True if it did.
    async fn answer_listen(&mut self) -> Result<bool, SessionError> {
        let Some(listens) = self.listens.as_mut() else { return Ok(false) };
        let cmd = {
            let mut msgs = self.up.whole_messages();
            match (msgs.next(), msgs.next()) {
                (Some((tag::QUERY, msg)), None) => sql::parse(msg.get(HEADER_LEN..).unwrap_or_default()),
                _ => None,
            }
        };
        let Some(cmd @ (sql::Command::Listen(_) | sql::Command::Unlisten(_))) = cmd else { return Ok(false) };
        self.up.scan(|_| true, |_, _, _| Action::Drop)?;
        let mut reply = BytesMut::new();
        Box::pin(listens.answer(&self.cfg, cmd, &mut reply)).await;
        self.down.insert(&reply);
        Ok(true)
    }

    /// The hub cut the client off (its notification queue overflowed): the replies already
    /// queued go out first, so the ErrorResponse is not spliced into a half-sent message, but
    /// only for as long as `LAST_MESSAGE_WAIT`; a client still not reading is just closed.
    async fn kicked(&mut self, io: &mut ClientIo<ClientStream>) -> SessionError {
        let message = format!(
            "too many notifications queued for this client (websocket.ws_send_queue = {}); read them faster",
            self.cfg.websocket.ws_send_queue
        );
        let mut out = BytesMut::new();
        build::error_response(&mut out, build::Severity::Fatal, SqlState::CONFIGURATION_LIMIT_EXCEEDED, &message, None);
        self.down.insert(&out);
        let flush = async {
            io.stream.write_all(self.down.ready()).await?;
            io.stream.flush().await?;
            io.stream.shutdown().await
        };
        let n = self.down.ready().len();
        match tokio::time::timeout(super::LAST_MESSAGE_WAIT, flush).await {
            Ok(Ok(())) => self.down.consume(n),
            Ok(Err(e)) => return SessionError::Io(e),
            Err(_) => {}
        }
        tracing::info!(reason = %message, "client disconnected");
        SessionError::Disconnected
    }

    /// Hands a notification to the client between transactions.
    fn deliver(&mut self, ev: &Event) {
        let mut out = BytesMut::new();
        listen::write_event(ev, &mut out);
        self.down.insert(&out);
    }

    /// Sends a batch again after the server found a cached plan stale (see `prepared`).
    fn replay(&mut self) {
        let (Some(p), Some(server)) = (self.prepared.as_mut(), self.server.as_deref_mut()) else { return };
        let Some(batch) = p.take_replay() else { return };
        tracing::info!("statement result changed under a cached plan; preparing it afresh and running the batch again");
        let mut to_server = BytesMut::new();
        let mut out = BytesMut::new();
        for (t, msg) in crate::proto::frame::messages(&batch) {
            let copy_in = self.pending.copy_in();
            self.pending.observe_client(t);
            let action = p.on_client(t, msg, &mut out, &mut server.statements, copy_in);
            for _ in 0..p.take_skipped() {
                self.pending.withdraw();
            }
            match action {
                Action::Forward => to_server.extend_from_slice(msg),
                Action::Replace => to_server.extend_from_slice(&out),
                Action::Drop | Action::Stop => {}
            }
            out.clear();
        }
        self.up.insert(&to_server);
    }

    /// Answers a batch of Parses and Closes (ending in Sync) without a server. True if
    /// it did (the bytes are consumed and the replies queued for the client).
    fn answer_alone(&mut self) -> Result<bool, SessionError> {
        let Some(p) = self.prepared.as_mut() else { return Ok(false) };
        if !p.can_answer_alone(self.up.whole_messages()) {
            return Ok(false);
        }
        let mut synced = false;
        let (statements, custom) = (&mut self.statements, &mut self.custom);
        self.up.scan(Prepared::needs_whole, |t, msg, _| {
            if synced {
                return Action::Stop;
            }
            synced = t == tag::SYNC;
            statements.observe_alone(t, msg.get(HEADER_LEN..).unwrap_or_default(), custom);
            p.answer_alone(t, msg);
            Action::Drop
        })?;
        let mut mine = BytesMut::new();
        p.due(&mut mine, TxnStatus::Idle);
        self.down.insert(&mine);
        Ok(true)
    }

    /// Gives the server back once the transaction is over and nothing more is owed, unless
    /// the client keeps it: in session mode, or while state that cannot move pins it.
    async fn detach_if_done(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        let Some(server) = self.server.as_ref() else { return Ok(()) };
        let over = self.mode != PoolMode::Session
            && self.pending.is_settled()
            && !self.pending.copy_in()
            && self.up.ready().is_empty()
            && !self.down.has_unscanned()
            && (self.mode == PoolMode::Statement || server.status == TxnStatus::Idle);
        if !over {
            return Ok(());
        }
        let pinned = !self.client.pins().is_empty();
        let hints = std::mem::take(&mut self.hints);
        if hints.has(Hints::SETTINGS | Hints::PIN) || (pinned && hints.has(Hints::RELEASE)) {
            self.probe(io).await?;
        }
        if !self.client.pins().is_empty() {
            return Ok(());
        }
        if let Some(p) = self.prepared.as_mut() {
            p.reset_in_flight();
        }
        self.release(Release::Reuse);
        Ok(())
    }

    /// Asks the server what the transaction left in its session: the settings follow the
    /// client, and state that cannot move pins the client to this server until it is gone.
    async fn probe(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        // The client's reply is complete: let it have it before this extra round trip.
        io.stream.write_all(self.down.ready()).await.map_err(SessionError::Io)?;
        io.stream.flush().await.map_err(SessionError::Io)?;
        let n = self.down.ready().len();
        self.down.consume(n);
        let Some(server) = self.server.as_mut() else { return Ok(()) };
        let mut names = self.settings.extras().to_vec();
        names.extend(self.custom.iter().filter(|c| !names.contains(c)).cloned().collect::<Vec<_>>());
        let mut result = Box::pin(server.query_rows(&probe::sql(&names, false))).await;
        if matches!(&result, Ok(Err(e)) if e.code == SqlState::QUERY_CANCELED) {
            // The client's own statement_timeout is shorter than the probe.
            result = Box::pin(server.query_rows(&probe::sql(&names, true))).await;
        }
        let found = match result {
            Ok(Ok(rows)) => Probe::from_rows(&rows),
            Ok(Err(e)) => {
                // Nothing known: the server cannot be handed to anyone else.
                tracing::warn!(error = %e.message, "cannot read the session state; closing the server after this client");
                server.release = Release::Close;
                return Err(SessionError::fatal(e.code, e.message));
            }
            Err(e) => return Err(self.server_lost(io, Some(std::io::Error::other(e))).await),
        };
        self.settings.apply_session(&found.settings, server, self.defaults.all());
        let before = self.client.pins();
        if found.pins != before {
            if found.pins.is_empty() {
                tracing::debug!(was = %before.names(), "client unpinned: its server goes back to the pool");
            } else {
                tracing::debug!(reason = %found.pins.names(), "client pinned to its server");
            }
            self.set_pins(found.pins);
        }
        Ok(())
    }

    fn release(&mut self, how: Release) {
        let cancelling = self.cancelling.take().is_some_and(|c| !c.is_finished());
        if let Some(mut server) = self.server.take() {
            self.last_server = Some((server.id, server.uses));
            server.release = if cancelling { Release::Close } else { how };
        }
        self.registration.slot.set(None);
        self.client.set_state(ClientState::Idle);
        let c = &self.pool.counters;
        Counters::add(&c.bytes_received, self.up.take_written());
        Counters::add(&c.bytes_sent, self.down.take_written());
    }

    /// On the way out: a server whose state is known goes back (rolled back if needed, and
    /// reset after a whole session), anything else is closed.
    fn finish(&mut self) {
        let clean = self.pending.is_settled() && self.up.ready().is_empty();
        if let Some(server) = self.server.as_deref().filter(|_| !clean && self.pending.sync_points > 0) {
            // The client left mid-request (mid-result, mid-COPY). Closing the socket alone
            // leaves a backend that is busy computing running until it next writes, holding a
            // connection the budget no longer counts: cancel the request too.
            tokio::spawn(cancel_query(server.cancel.clone()));
        }
        let pinned = !self.client.pins().is_empty();
        self.release(match (clean, self.mode) {
            (false, _) => Release::Close,
            // Locks, cursors and temporary tables must not outlive their client; closing is
            // sure whatever `server_reset_query` is.
            _ if pinned => Release::Close,
            (true, PoolMode::Session) => Release::Reset,
            (true, _) => Release::Reuse,
        });
        self.set_pins(Pins::default());
    }

    /// True when the server owes nothing and every request for it has been written.
    fn is_done(&self) -> bool {
        self.pending.is_settled() && self.up.ready().is_empty()
    }

    /// What the timers see: a server running or inside a transaction for this client.
    fn held(&self) -> Held {
        let s = self.server.as_deref()?;
        let keeps = self.mode == PoolMode::Session || !self.client.pins().is_empty();
        if keeps && s.status == TxnStatus::Idle && self.pending.is_settled() {
            return None;
        }
        Some((s.status, self.pending.sync_points))
    }
}

/// Client messages the loop asks whole but can stream when past `max_buffered_message`: a
/// Query (and a Parse, when statement names are not rewritten) is only read for tracked
/// settings, and a streamed one is taken to change them. A Parse that is rewritten, a Bind,
/// Describe, Close or Terminate cannot be.
fn streamable(prepared: &Option<Prepared>) -> fn(u8) -> bool {
    if prepared.is_some() { |t| t == tag::QUERY } else { |t| t == tag::QUERY || t == tag::PARSE }
}

/// Why the relay loop returned.
enum Exit {
    /// The client said goodbye.
    Done,
    /// The client has been quiet with nothing in flight: wait outside the loop.
    Hibernate,
}
