//! The plain HTTP listener: health probes, Prometheus metrics and HTTP service discovery
//! (network boot endpoints join it later).

use std::collections::HashMap;
use std::io::Write;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use muster_machinery::metrics::Format;

use crate::fleet::Controller;

pub fn router(c: Controller) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/version", get(|| async { concat!(env!("CARGO_PKG_VERSION"), "\n") }))
        .route("/metrics", get(metrics))
        .route("/sd/prometheus", get(sd_prometheus))
        .with_state(c)
}

/// Ready when the store answers.
async fn readyz(State(c): State<Controller>) -> (StatusCode, String) {
    match c.store().list_tokens().await {
        Ok(_) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
    }
}

fn accepts(headers: &HeaderMap, name: header::HeaderName, what: &str) -> bool {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains(what))
}

/// A body, gzipped when the client accepts it.
pub fn maybe_gzip(headers: &HeaderMap, content_type: &'static str, body: String) -> Response {
    let mut resp = if accepts(headers, header::ACCEPT_ENCODING, "gzip") {
        let mut enc =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        match enc.write_all(body.as_bytes()).and_then(|()| enc.finish()) {
            Ok(gz) => {
                let mut r = gz.into_response();
                r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => body.into_response(),
        }
    } else {
        body.into_response()
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Prometheus exposition: OpenMetrics when the scraper asks for it, else text format 0.0.4.
async fn metrics(State(c): State<Controller>, headers: HeaderMap) -> Response {
    let format = if accepts(&headers, header::ACCEPT, "application/openmetrics-text") {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    };
    let fleet = c.fleet_snapshot();
    match c.metrics().render(&fleet, format) {
        Ok(text) => maybe_gzip(&headers, format.content_type(), text),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n").into_response(),
    }
}

/// Prometheus HTTP service discovery of the agents' own metrics endpoints, optionally filtered
/// by `cluster` and `role`.
async fn sd_prometheus(State(c): State<Controller>, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(bad) = q.keys().find(|k| !matches!(k.as_str(), "cluster" | "role")) {
        return (StatusCode::BAD_REQUEST, format!("unknown query parameter {bad:?}: use cluster and role\n"))
            .into_response();
    }
    let groups = c.sd_targets(q.get("cluster").map(String::as_str), q.get("role").map(String::as_str));
    match serde_json::to_string(&groups) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
