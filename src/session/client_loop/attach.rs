//! The server's attachment to a client: checked out at the client's first message (unless a
//! pin would be refused, or `lastval()` needs the last server), brought to the client's
//! settings, and given back when the transaction is over, after a probe of what it left in
//! the session; on the way out, returned, reset or closed as its state allows.

use super::faults::cancel_query;
use super::{ClientLoop, LASTVAL_ELSEWHERE};
use crate::clients::{Pins, State as ClientState};
use crate::config::PoolMode;
use crate::error::{SqlState, chain};
use crate::net::{ClientIo, ClientStream};
use crate::pool::{Pooled, Release};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{TxnStatus, build, tag};
use crate::server::{QueryError, ServerError};
use crate::session::SessionError;
use crate::session::accounting::Accounting;
use crate::session::hints::{self, Hints};
use crate::session::probe::{self, Probe};
use crate::stats::Counters;
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;

/// How many more times the broker runs its own query on a server when a `statement_timeout`
/// the server carries stopped it (57014) before that query could lift the timeout.
const STOPPED_TRIES: usize = 3;

/// Whether the server stopped the broker's query for its statement_timeout.
fn stopped<T>(result: &Result<Result<T, QueryError>, ServerError>) -> bool {
    matches!(result, Ok(Err(e)) if e.code == SqlState::QUERY_CANCELED)
}

impl ClientLoop {
    /// Checks out a server for the transaction the client just started and brings it to the
    /// client's settings.
    pub(super) async fn attach(&mut self) -> Result<(), SessionError> {
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
    pub(super) fn pin_refusal(&self) -> Option<(SqlState, String)> {
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
    pub(super) fn set_pins(&self, pins: Pins) {
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
    pub(super) fn reads_lastval(&mut self) -> bool {
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
    pub(super) async fn attached(&mut self, mut server: Pooled) -> Result<(), SessionError> {
        self.client.set_state(ClientState::Active);
        self.sync_settings(&mut server).await?;
        self.registration.slot.set(Some(server.cancel.clone()));
        self.server = Some(server);
        self.take_leftover()
    }

    /// Brings `server` to the client's settings, telling the client of a reported one whose
    /// value the server gave in another form.
    async fn sync_settings(&mut self, server: &mut Pooled) -> Result<(), SessionError> {
        if let Some(plan) = self.settings.plan_sync(server, self.defaults.all()) {
            // Boxed, as the other rare awaits here: the loop's future lives as long as the client.
            let mut result = Box::pin(server.query_row(&plan.sql)).await;
            // Another client's statement_timeout, still on the server, times the first RESET;
            // on a busy machine it can stop it, and then nothing was applied: try again.
            for _ in 0..STOPPED_TRIES {
                if !stopped(&result) {
                    break;
                }
                result = Box::pin(server.query_row(&plan.sql)).await;
            }
            match result {
                Ok(Ok(row)) => {
                    let mut told = BytesMut::new();
                    for s in self.settings.apply_sync(&plan, &row, server) {
                        build::parameter_status(&mut told, &s.name, &s.value);
                    }
                    self.down.insert(&told);
                }
                Ok(Err(e)) => {
                    // The client's setting was refused (or every try was stopped): the sync is one
                    // transaction, so nothing was applied and the server is fine.
                    server.release = Release::Reuse;
                    return Err(SessionError::fatal(e.code, e.message));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.settings.mark_synced(server);
        Ok(())
    }

    /// Relays the bytes the server sent after the broker's own last query: they belong to
    /// the client.
    fn take_leftover(&mut self) -> Result<(), SessionError> {
        let Some(server) = self.server.as_mut().filter(|s| !s.rbuf.is_empty()) else { return Ok(()) };
        self.down.read_buf().extend_from_slice(&server.rbuf);
        server.rbuf.clear();
        self.scan_server()
    }

    /// Every request answered, no COPY running, nothing of the client's waiting to be sent
    /// and nothing of the server's unread: the broker may use the server for its own query.
    fn nothing_owed(&self) -> bool {
        self.pending.is_settled() && !self.pending.copy_in() && self.up.ready().is_empty() && !self.down.has_unscanned()
    }

    /// Session mode: after a transaction that ran a `RESET` or `DISCARD`, a setting the client
    /// logged in with goes back to that value, as on a server of its own (the server's own
    /// login values are the pool's).
    async fn restore_login_settings(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        let Some(server) = self.server.as_ref() else { return Ok(()) };
        if !(self.reset && self.nothing_owed() && server.status == TxnStatus::Idle) {
            return Ok(());
        }
        self.reset = false;
        self.probe(io).await?;
        let Some(mut server) = self.server.take() else { return Ok(()) };
        let synced = self.sync_settings(&mut server).await;
        self.server = Some(server);
        synced?;
        self.take_leftover()
    }

    /// Gives the server back once the transaction is over and nothing more is owed, unless
    /// the client keeps it: in session mode, or while state that cannot move pins it.
    pub(super) async fn detach_if_done(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        if self.watch_resets {
            return self.restore_login_settings(io).await;
        }
        let Some(server) = self.server.as_ref() else { return Ok(()) };
        let over = self.mode != PoolMode::Session
            && self.nothing_owed()
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
    pub(super) async fn probe(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        // The client's reply is complete: let it have it before this extra round trip.
        io.stream.write_all(self.down.ready()).await.map_err(SessionError::Io)?;
        io.stream.flush().await.map_err(SessionError::Io)?;
        let n = self.down.ready().len();
        self.down.consume(n);
        let Some(server) = self.server.as_mut() else { return Ok(()) };
        let mut names = self.settings.extras().to_vec();
        names.extend(self.custom.iter().filter(|c| !names.contains(c)).cloned().collect::<Vec<_>>());
        let mut result = Box::pin(server.query_rows(&probe::sql(&names, false))).await;
        // The client's own statement_timeout is shorter than the probe: the untimed probe
        // lifts it, but its first statements still run under it and a busy machine can stop
        // those too. Each try starts clean: a stopped one leaves its transaction open.
        for _ in 0..STOPPED_TRIES {
            if !stopped(&result) {
                break;
            }
            if server.status != TxnStatus::Idle {
                result = Box::pin(server.query_rows("ROLLBACK")).await;
                if !matches!(result, Ok(Ok(_))) {
                    continue;
                }
            }
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
        let restored = self.settings.apply_session(&found.settings, server, self.defaults.all());
        if !restored.is_empty() {
            // The client saw the reset's ParameterStatus (the server's value): it may be sent
            // at any time, and now says the value the client's own session would have.
            let mut told = BytesMut::new();
            for s in &restored {
                build::parameter_status(&mut told, &s.name, &s.value);
            }
            io.stream.write_all(&told).await.map_err(SessionError::Io)?;
            io.stream.flush().await.map_err(SessionError::Io)?;
        }
        let before = self.client.pins();
        // In session mode the client keeps its server anyway.
        if found.pins != before && self.mode != PoolMode::Session {
            if found.pins.is_empty() {
                tracing::debug!(was = %before.names(), "client unpinned: its server goes back to the pool");
            } else {
                tracing::debug!(reason = %found.pins.names(), "client pinned to its server");
            }
            self.set_pins(found.pins);
        }
        Ok(())
    }

    pub(super) fn release(&mut self, how: Release) {
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
    pub(super) fn finish(&mut self) {
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
}
