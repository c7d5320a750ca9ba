//! `LISTEN` for SQL clients in transaction mode: the broker's per-database listener does the
//! listening, and the client gets its notifications whenever it holds no server.

use super::sql::Command;
use crate::config::Config;
use crate::error::SqlState;
use crate::notify::{Event, Subscription};
use crate::proto::build::{self, Severity};
use crate::proto::check_channel;
use crate::session::Shared;
use bytes::{BufMut, BytesMut};
use std::sync::Arc;

/// A pooled client's subscriptions, made on its first `LISTEN`.
pub(super) struct Listens {
    shared: Arc<Shared>,
    database: String,
    sub: Option<Subscription>,
}

impl Listens {
    /// No subscriptions yet for a client of `database`.
    pub fn new(shared: Arc<Shared>, database: String) -> Listens {
        Listens { shared, database, sub: None }
    }

    /// Runs `LISTEN`/`UNLISTEN` and writes the reply a server would give, ReadyForQuery
    /// included.
    pub async fn answer(&mut self, cfg: &Config, cmd: Command, out: &mut BytesMut) {
        let result = match cmd {
            Command::Listen(channel) => self.listen(cfg, channel).await.map(|()| "LISTEN"),
            Command::Unlisten(channel) => {
                if let Some(sub) = &self.sub {
                    sub.unsubscribe(channel.map(|c| vec![c]).as_deref());
                }
                Ok("UNLISTEN")
            }
            Command::Deallocate(_) => Err((SqlState::SYSTEM_ERROR, "not a LISTEN command".to_string())),
        };
        match result {
            Ok(tag) => build::command_complete(out, tag),
            Err((code, message)) => build::error_response(out, Severity::Error, code, &message, None),
        }
        build::ready_for_query(out, crate::proto::TxnStatus::Idle);
    }

    async fn listen(&mut self, cfg: &Config, channel: String) -> Result<(), (SqlState, String)> {
        check_channel(&channel).map_err(|why| (SqlState::INVALID_PARAMETER_VALUE, why.to_string()))?;
        if self.sub.is_none() {
            let hub = self
                .shared
                .bridge
                .hub(cfg, &self.database)
                .map_err(|e| (SqlState::FEATURE_NOT_SUPPORTED, e.to_string()))?;
            self.sub = Some(hub.register(cfg.websocket.ws_send_queue, false));
        }
        if let Some(sub) = &self.sub {
            let cap = cfg.websocket.max_channels_per_client;
            sub.subscribe(&[channel], cap, None)
                .await
                .map_err(|e| (SqlState::PROGRAM_LIMIT_EXCEEDED, e.to_string()))?;
        }
        Ok(())
    }

    /// The next event for the client; pending forever while it listens on nothing.
    ///
    /// # Cancel safety
    /// Cancel-safe: events stay queued.
    pub async fn next(&mut self) -> Option<Event> {
        match self.sub.as_mut() {
            Some(sub) => tokio::select! {
                ev = sub.rx.recv() => ev,
                _ = sub.kicked.cancelled() => None,
            },
            None => std::future::pending().await,
        }
    }

    /// Resolves (to `None`, as `next` does then) once the hub has cut the client off;
    /// pending forever while it listens on nothing.
    ///
    /// # Cancel safety
    /// Cancel-safe: takes no event.
    pub async fn kicked(&self) -> Option<Event> {
        match self.sub.as_ref() {
            Some(sub) => sub.kicked.cancelled().await,
            None => std::future::pending().await,
        }
        None
    }

    /// True while the client listens on something.
    pub fn is_active(&self) -> bool {
        self.sub.is_some()
    }
}

/// Writes an event the way PostgreSQL would: a NotificationResponse, or a notice after the
/// listener reconnected.
pub(super) fn write_event(ev: &Event, out: &mut BytesMut) {
    match ev {
        Event::Notify(n) => {
            out.put_u8(crate::proto::tag::NOTIFICATION);
            let len = 4 + 4 + n.channel.len() + 1 + n.payload.len() + 1;
            out.put_i32(len as i32);
            out.put_i32(n.pid);
            out.put_slice(n.channel.as_bytes());
            out.put_u8(0);
            out.put_slice(n.payload.as_bytes());
            out.put_u8(0);
        }
        Event::Resync(reason) => build::error_response(out, Severity::Notice, SqlState::WARNING, reason, None),
        // Snapshots are a WebSocket feature; a SQL client never asks for one.
        Event::Snapshot(_) => {}
    }
}
