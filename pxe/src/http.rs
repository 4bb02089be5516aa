//! The boot service's HTTP routes, to merge into the controller's router.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::assets::{parse_range, Assets};
use crate::script::{entry_script, error_script, machine_script, BootRequest};
use crate::BootPolicy;

#[derive(Clone)]
struct Boot {
    policy: Arc<dyn BootPolicy>,
    assets: Arc<Assets>,
}

const IPXE: &str = "text/plain; charset=utf-8";

/// `/boot/start.ipxe`, `/boot/machine.ipxe` and `/boot/assets/{name}`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` to have the client address logged
/// (it works without).
pub fn router(policy: Arc<dyn BootPolicy>, assets: Arc<Assets>) -> Router {
    Router::new()
        .route("/boot/start.ipxe", get(|| async { ([(header::CONTENT_TYPE, IPXE)], entry_script()) }))
        .route("/boot/machine.ipxe", get(machine))
        .route("/boot/assets/SHA256SUMS", get(sums))
        .route("/boot/assets/{name}", get(asset).head(asset))
        .with_state(Boot { policy, assets })
}

async fn machine(
    State(b): State<Boot>,
    ext: axum::http::Extensions,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let remote = ext.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip());
    let req = match BootRequest::from_query(&q, remote) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(?remote, error = %e, "bad boot request");
            return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, IPXE)], error_script(&e.to_string()))
                .into_response();
        }
    };
    // A policy failure still answers with a script (status 200): iPXE then shows the reason on
    // the machine's console instead of a bare HTTP error, and moves on to the next boot device.
    let script = match b.policy.decide(&req).await {
        Ok(action) => {
            tracing::info!(mac = ?req.mac.map(|m| m.to_string()), uuid = ?req.uuid, ?remote, ?action, "boot script");
            machine_script(&action)
        }
        Err(e) => {
            tracing::warn!(mac = ?req.mac.map(|m| m.to_string()), error = %e, "no boot decision");
            error_script(&format!("the controller could not decide: {e}"))
        }
    };
    ([(header::CONTENT_TYPE, IPXE)], script).into_response()
}

async fn sums(State(b): State<Boot>) -> Response {
    match b.assets.sha256sums().await {
        Ok(s) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("assets: {e}\n")).into_response(),
    }
}

async fn asset(
    State(b): State<Boot>,
    method: Method,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(a) = b.assets.read(&name).await else {
        return (StatusCode::NOT_FOUND, format!("no asset {name:?}\n")).into_response();
    };
    let len = a.bytes.len() as u64;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(h) => match parse_range(h, len) {
            Ok(r) => r,
            Err(()) => {
                let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        },
    };
    let (status, body, content_range) = match range {
        Some((s, e)) => {
            let (s, e) = (usize::try_from(s).unwrap_or(0), usize::try_from(e).unwrap_or(0));
            (StatusCode::PARTIAL_CONTENT, a.bytes[s..=e].to_vec(), Some(format!("bytes {s}-{e}/{len}")))
        }
        None => (StatusCode::OK, a.bytes, None),
    };
    let body_len = body.len();
    let mut r =
        if method == Method::HEAD { (status, ()).into_response() } else { (status, body).into_response() };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&body_len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", a.sha256)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&a.sha256) {
        h.insert("x-checksum-sha256", v);
    }
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    r
}
