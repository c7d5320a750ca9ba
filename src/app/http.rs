//! The HTTP listener on `broker.http_listen`: the WebSocket bridge, `/metrics`, `/health`
//! (and `/health/live`, `/health/ready`), and the status page at `/`.

use crate::app::App;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// The status page, embedded in the binary (no CDN, no external assets).
const STATUS_PAGE: &str = include_str!("../../assets/status.html");

/// The routes served on `http_listen`.
pub fn router(app: Arc<App>) -> Router {
    let ws_path = app.config().websocket.path.clone();
    Router::new()
        .route(&ws_path, get(crate::notify::ws::handler).with_state(app.bridge().clone()))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/", get(status_page))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = super::scrape::render(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let h = super::health::assess(&app);
    let code = StatusCode::from_u16(h.status.http_code()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = serde_json::to_string(&h).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn live() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"alive"}"#).into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let (code, body) = match super::health::ready(&app).await {
        Ok(()) => (StatusCode::OK, serde_json::json!({"status": "ready"})),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "message": crate::error::chain(&why)}),
        ),
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The page, pointed at this broker's bridge (its path, and the first database, since the
/// bridge needs one even for the broker's own channels).
async fn status_page(State(app): State<Arc<App>>) -> Response {
    let cfg = app.config();
    // Prefer a database the bridge can listen on (one with a configured login).
    let db = cfg
        .databases
        .iter()
        .find(|(_, d)| d.user.is_some())
        .or_else(|| cfg.databases.iter().next())
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let ws = format!("{}?database={}", cfg.websocket.path, percent_encode(&db));
    let page = STATUS_PAGE.replace("{{WS_PATH}}", &ws);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Largest HTTP request head (request line and headers) read from a client: a longer one is
/// answered 431 and the connection closed, so a client pins at most this much.
pub const MAX_HTTP_HEAD: usize = 64 * 1024;

/// Serves `router` on `listener` until the broker stops.
///
/// Connections are served one task each by hyper with a header-read timeout
/// (`http_header_timeout`) and a head size cap ([`MAX_HTTP_HEAD`]). At most
/// `max_http_connections` are open at once, upgraded WebSockets included: one over the cap is
/// closed as soon as it is accepted, before a byte of it is read, so idle or slow clients
/// cannot take the descriptors the PostgreSQL listener and `/health` need.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let cfg = app.config();
    let limits = Limits { header_timeout: cfg.broker.http_header_timeout };
    let permits = Arc::new(Semaphore::new(cfg.broker.max_http_connections));
    let router = router(app.clone());
    let shutdown = app.shutdown().stop_token();
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "max_http_connections reached: connection closed");
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY a WebSocket message written while the previous one is still
        // unacknowledged waits for the client's delayed ACK (up to 40 ms on Linux).
        crate::net::tune(&stream, false);
        let io = TokioIo::new(Capped { io: stream, _permit: permit });
        conns.spawn(connection(io, peer, router.clone(), limits, shutdown.clone()));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Per-connection settings, read once at start (restart required).
#[derive(Clone, Copy)]
struct Limits {
    header_timeout: Duration,
}

/// One HTTP/1.1 connection until it closes or is upgraded; on shutdown, in-flight requests
/// finish and keep-alive ends.
async fn connection(
    io: TokioIo<Capped<TcpStream>>,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        // What `into_make_service_with_connect_info` would add: the WebSocket handler needs it.
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        tower_service::Service::call(&mut router, req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout((!limits.header_timeout.is_zero()).then_some(limits.header_timeout))
        .max_buf_size(MAX_HTTP_HEAD)
        .max_header_size(MAX_HTTP_HEAD);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// A connection holding one of the `max_http_connections` permits until it is dropped, also
/// after an upgrade to WebSocket (hyper hands this same I/O object to the upgrade).
struct Capped<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Capped<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Capped<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
