//! When the server fails the client: `query_timeout` (cancel, then close a silent server) and
//! a server connection that is lost or abandoned.

use super::ClientLoop;
use crate::error::SqlState;
use crate::net::{ClientIo, ClientStream};
use crate::pool::Release;
use crate::proto::build::{self, Severity};
use crate::session::SessionError;
use crate::session::timers::{Expired, QueryCheck};
use bytes::BytesMut;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

impl ClientLoop {
    /// The attached server owes the client an answer (`query_timeout` applies).
    pub(super) fn owed(&self) -> bool {
        self.server.is_some() && self.pending.sync_points > 0 && !self.pending.copy_in()
    }

    pub(super) async fn check_timers(&mut self, io: &mut ClientIo<ClientStream>) -> Result<(), SessionError> {
        if let Some(Expired { code, message }) = self.timers.expired(self.held()) {
            return Err(SessionError::fatal(code, message));
        }
        match self.timers.check_query(self.owed()) {
            QueryCheck::Fine => Ok(()),
            QueryCheck::Cancel => {
                if let Some(server) = self.server.as_deref() {
                    tracing::warn!(
                        server = server.id,
                        pid = server.cancel.pid,
                        query_timeout = ?self.cfg.broker.query_timeout,
                        "no answer from the server within query_timeout; cancelling the query"
                    );
                    self.cancelling = Some(tokio::spawn(cancel_query(server.cancel.clone())));
                }
                Ok(())
            }
            QueryCheck::Close(Expired { code, message }) => {
                let pid = self.server.as_deref().map(|s| s.cancel.pid);
                tracing::warn!(?pid, "server silent after a cancel request; closing it");
                self.abandon_server(io).await;
                Err(SessionError::fatal(code, message))
            }
        }
    }

    /// No server for the client's requests: answer each with the error and stay connected,
    /// as a server that refused them would. Requests not yet closed by a Sync cannot be
    /// answered cleanly, so then the client is disconnected.
    pub(super) fn refuse_requests(&mut self, code: SqlState, message: &str) -> Result<(), SessionError> {
        if self.pending.unsynced || self.up.in_message() || self.pending.sync_points == 0 {
            return Err(SessionError::fatal(code, message));
        }
        tracing::info!(error = %message, "no server for the client's request");
        let mut out = BytesMut::new();
        for _ in 0..self.pending.sync_points {
            build::error_response(&mut out, Severity::Error, code, message, None);
            build::ready_for_query(&mut out, crate::proto::TxnStatus::Idle);
        }
        self.up.discard_ready();
        self.pending.sync_points = 0;
        self.down.insert(&out);
        Ok(())
    }

    /// Passes on what the server did say, then closes it: it is never reused.
    async fn abandon_server(&mut self, io: &mut ClientIo<ClientStream>) {
        let _ = io.stream.write_all(self.down.ready()).await;
        let _ = io.stream.flush().await;
        self.down.clear();
        self.release(Release::Close);
        if let Some(p) = self.prepared.as_mut() {
            p.reset_in_flight();
        }
    }

    /// Passes on what the server said before dying, and tells the client.
    pub(super) async fn server_lost(
        &mut self,
        io: &mut ClientIo<ClientStream>,
        err: Option<std::io::Error>,
    ) -> SessionError {
        self.abandon_server(io).await;
        tracing::warn!(error = ?err, "server connection lost");
        SessionError::fatal(SqlState::CONNECTION_FAILURE, "server closed the connection unexpectedly")
    }
}

/// Sends a CancelRequest for whatever the server runs now.
pub(super) async fn cancel_query(target: Arc<crate::server::CancelTarget>) {
    crate::cancel::send(&target).await;
}
