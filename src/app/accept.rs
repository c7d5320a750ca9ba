//! The accept loop: client limits at the door, one task per client, and a last sweep of the
//! accept queue when a graceful stop closes the listener.

use super::App;
use crate::error::SqlState;
use crate::proto::build::{self, Severity};
use crate::session;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

pub(super) async fn accept_loop(app: Arc<App>, listener: TcpListener, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown().drain_begun() => break,
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
    app.shutdown().stop_accepting();
    tracing::info!("stopped accepting clients");
}

/// Lets a client in under the limits, or refuses it with the reason.
fn admit(app: &Arc<App>, stream: TcpStream, peer: SocketAddr, tracker: &TaskTracker) {
    let cfg = app.config();
    crate::net::tune(&stream, cfg.broker.tcp_keepalive);
    let admitted = match app.admission().admit(&cfg, peer) {
        Ok(a) => a,
        Err(refused) => {
            tokio::spawn(refuse(stream, refused.to_string()));
            return;
        }
    };
    let shared = app.session().clone();
    let shutdown = app.shutdown().clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = session::run(shared, stream, peer, admitted.admin_only) => {}
            () = shutdown.stopped_flag() => {}
        }
        drop(admitted);
    });
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
