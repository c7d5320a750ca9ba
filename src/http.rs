//! The HTTP listener on `broker.http_listen`: the WebSocket bridge, `/metrics`, `/health`
//! (and `/health/live`, `/health/ready`), and the status page at `/`.

use crate::app::App;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The status page, embedded in the binary (no CDN, no external assets).
const STATUS_PAGE: &str = include_str!("../assets/status.html");

/// The routes served on `http_listen`.
pub fn router(app: Arc<App>) -> Router {
    let ws_path = app.config().websocket.path.clone();
    Router::new()
        .route(&ws_path, get(crate::notify::ws::handler))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/", get(status_page))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.metrics.render(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let h = crate::health::assess(&app);
    let code = StatusCode::from_u16(h.status.http_code()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = serde_json::to_string(&h).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn live() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"alive"}"#).into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let (code, body) = match crate::health::ready(&app).await {
        Ok(()) => (StatusCode::OK, serde_json::json!({"status": "ready"})),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "not ready", "message": why})),
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

/// Serves `router` on `listener` until the broker stops.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let shutdown = app.shutdown.clone();
    let service = router(app).into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, service).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}
