//! The HTTP listener on `broker.http_listen`: the WebSocket bridge (and, later, metrics and
//! health).

use crate::app::App;
use axum::Router;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The routes served on `http_listen`.
pub fn router(app: Arc<App>) -> Router {
    let path = app.config().websocket.path.clone();
    Router::new().route(&path, get(crate::notify::ws::handler)).with_state(app)
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
