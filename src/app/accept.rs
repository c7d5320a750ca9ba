//! The accept loop: client limits at the door, one task per client, and a last sweep of the
//! accept queue when a graceful stop closes the listener.

use super::App;
use crate::error::SqlState;
use crate::proto::build::{self, Severity};
use crate::session;
use bytes::BytesMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

pub(super) async fn accept_loop(app: Arc<App>, listener: TcpListener, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = app.draining.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => admit(&app, stream, peer, &tracker),
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Connections already queued on the socket would be reset when it closes: take them in
    // (they get served their first transaction) rather than refuse them.
    while let Some(Ok((stream, peer))) = std::future::poll_fn(|cx| match listener.poll_accept(cx) {
        std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
    {
        admit(&app, stream, peer, &tracker);
    }
    // Closed before the drain counts clients: every connection the kernel handed this
    // socket is either admitted (and counted) by now or migrated to a successor.
    drop(listener);
    app.stopped_accepting.cancel();
    tracing::info!("stopped accepting clients");
}

fn admit(app: &Arc<App>, stream: TcpStream, peer: SocketAddr, tracker: &TaskTracker) {
    let cfg = app.config();
    crate::net::tune(&stream, cfg.broker.tcp_keepalive);
    // A few connections past the limit are let in for the admin console alone: an operator
    // can still look when the broker is full (the login refuses anyone else, 53300).
    let limit = cfg.broker.max_client_conn + ADMIN_RESERVE;
    // Past max_client_conn a newcomer would get one of the console's slots or none: a
    // connection slow to log in (maybe a slowloris holding the slots) makes room, and the
    // newcomer takes its place, the console's only if that one's was.
    let full = app.clients_open.load(Relaxed) >= cfg.broker.max_client_conn;
    let slot = match full.then(|| app.logging_in.evict_oldest()).flatten() {
        Some(admin_only) => Some((admin_only, ClientSlot::force(app))),
        None => ClientSlot::take(app, limit).map(|slot| (slot.1 >= cfg.broker.max_client_conn, slot)),
    };
    let Some((admin_only, slot)) = slot else {
        app.refusals.max_client_conn.fetch_add(1, Relaxed);
        tracing::warn!(%peer, "max_client_conn reached; refusing client");
        let msg = format!("no more connections allowed (max_client_conn = {})", cfg.broker.max_client_conn);
        tokio::spawn(refuse(stream, msg));
        return;
    };
    let host = crate::net::peer_key(peer.ip());
    let Ok(per_ip) = IpSlot::take(app, host, cfg.broker.max_client_conn_per_ip) else {
        app.refusals.max_client_conn_per_ip.fetch_add(1, Relaxed);
        tracing::warn!(%peer, "max_client_conn_per_ip reached; refusing client");
        let msg = format!(
            "too many connections from {host} (max_client_conn_per_ip = {})",
            cfg.broker.max_client_conn_per_ip
        );
        tokio::spawn(refuse(stream, msg));
        return;
    };
    let app = app.clone();
    tracker.spawn(async move {
        let stopping = app.clone();
        tokio::select! {
            _ = session::run(app, stream, peer, admin_only) => {}
            () = stopping.stopped.wait() => {}
        }
        drop((slot, per_ip));
    });
}

/// Connections accepted past `max_client_conn` for admin console logins only.
pub const ADMIN_RESERVE: usize = 3;

/// One client's count against `max_client_conn` (and how many were open before it);
/// released on drop.
struct ClientSlot(Arc<App>, usize);

impl ClientSlot {
    fn take(app: &Arc<App>, limit: usize) -> Option<ClientSlot> {
        let counted = app.clients_open.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1));
        counted.ok().map(|before| ClientSlot(app.clone(), before))
    }

    /// A slot past the limit, for a newcomer an evicted login made room for: counted over
    /// it until that login is gone (at most `logins::MAX_EVICTING` at once).
    fn force(app: &Arc<App>) -> ClientSlot {
        ClientSlot(app.clone(), app.clients_open.fetch_add(1, Relaxed))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients_open.fetch_sub(1, Relaxed);
    }
}

/// One client's count against `max_client_conn_per_ip`; released on drop.
struct IpSlot {
    app: Arc<App>,
    ip: IpAddr,
}

impl IpSlot {
    /// Counts a client from `ip` (`Ok(None)`: no limit, nothing counted); `Err` if that
    /// would exceed `limit`.
    fn take(app: &Arc<App>, ip: IpAddr, limit: usize) -> Result<Option<IpSlot>, ()> {
        if limit == 0 {
            return Ok(None);
        }
        let mut map = app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(());
        }
        *n += 1;
        Ok(Some(IpSlot { app: app.clone(), ip }))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, message: String) {
    let mut buf = BytesMut::new();
    build::error_response(&mut buf, Severity::Fatal, SqlState::TOO_MANY_CONNECTIONS, &message, None);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&buf).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
