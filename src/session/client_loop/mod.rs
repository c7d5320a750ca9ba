//! The relay loop every pool mode runs once a client is logged in. A server is attached at
//! the client's first message: in session mode for good; in transaction mode to the
//! ReadyForQuery that ends the transaction; in statement mode to the end of each statement. Bytes
//! pass unchanged; only tags (and ReadyForQuery / ParameterStatus bodies) are read.
//!
//! Where each behaviour lives: the loop's turns and what wakes it (`turn`, `waits`); what it
//! reads of the bytes (`scan`); the server's attachment, from checkout to giving it back
//! (`attach`); timeouts and lost servers (`faults`); hibernation between transactions
//! (`idle`); and here, the loop's state and the answers it gives without a server.

mod attach;
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
use super::sql;
use super::timers::{Held, Timers};
use crate::cancel::Registration;
use crate::clients::{Client, Pins, State as ClientState};
use crate::config::{Config, PoolMode};
use crate::error::SqlState;
use crate::net::{ClientIo, ClientStream};
use crate::notify::Event;
use crate::pool::{Defaults, Pool, Pooled};
use crate::proto::build;
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, tag};
use crate::session::Shared;
use bytes::BytesMut;
use std::sync::Arc;
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
    /// Session mode, for a client that logged in with settings of its own: the server's
    /// replies are read for a `RESET` or `DISCARD` (see `restore_login_settings`).
    watch_resets: bool,
    /// One was seen since the settings were last put back.
    reset: bool,
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
        let watch_resets = mode == PoolMode::Session && settings.has_own_login_values(defaults.all());
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
            watch_resets,
            reset: false,
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
