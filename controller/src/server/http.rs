//! The plain HTTP listener: health probes now; metrics, service discovery and network boot
//! endpoints join it later.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::Controller;

pub fn router(c: Controller) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/version", get(|| async { concat!(env!("CARGO_PKG_VERSION"), "\n") }))
        .with_state(c)
}

/// Ready when the store answers.
async fn readyz(State(c): State<Controller>) -> (StatusCode, String) {
    match c.store().list_tokens().await {
        Ok(_) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
    }
}
