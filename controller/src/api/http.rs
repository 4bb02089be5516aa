//! The plain HTTP listener: health probes, Prometheus metrics, HTTP service discovery and (merged
//! in by `serve`) network boot; and the server that runs it ([`serve`]): HTTP/1.1 on hyper with
//! the listener's caps, a request-head timeout (idle and slow-header connections), a head size
//! limit and a timeout for responses the client stopped reading ([`super::limits`]).

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use muster_machinery::metrics::Format;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::limits::{ConnLimiter, ConnPermit};
use crate::fleet::Controller;
use crate::supervise::Services;

/// How long responses in flight may take to finish when the controller stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct HttpState {
    controller: Controller,
    services: Services,
}

pub fn router(c: Controller, services: Services) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/version", get(|| async { concat!(env!("CARGO_PKG_VERSION"), "\n") }))
        .route("/metrics", get(metrics))
        .route("/sd/prometheus", get(sd_prometheus))
        .with_state(HttpState { controller: c, services })
}

/// Ready when the store answers and every background service runs; else 503 with one line
/// per problem (`service proxy-dhcp: down …`).
async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    if let Err(e) = s.controller.store().list_tokens().await {
        problems.push(format!("store: {e}"));
    }
    for d in s.services.down() {
        problems.push(format!(
            "service {}: down, restarting ({} restarts; last error: {})",
            d.name,
            d.restarts,
            d.last_error.as_deref().unwrap_or("none")
        ));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
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
async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let c = s.controller;
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
async fn sd_prometheus(State(s): State<HttpState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let c = s.controller;
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

/// What the HTTP server needs besides the listener and the routes.
#[derive(Clone)]
pub struct HttpServing {
    pub limiter: Arc<ConnLimiter>,
    /// From accepting (or the end of the last response) to a complete request head.
    pub header_timeout: Duration,
    /// A response write that makes no progress for this long ends the connection.
    pub write_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `router` on `listener` until `stop` is cancelled; responses in flight then get a few
/// seconds to finish. Accept errors (EMFILE) are logged and retried; the listener stays open
/// when this returns, so a supervisor can call it again.
pub async fn serve(listener: Arc<TcpListener>, router: Router, cfg: HttpServing, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => match a {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match cfg.limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, cap = why.as_str(), "HTTP: connection refused");
                continue;
            }
        };
        conns.spawn(serve_connection(tcp, peer, permit, router.clone(), cfg.clone(), stop.clone()));
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: ConnPermit,
    router: Router,
    cfg: HttpServing,
    stop: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(WriteStall::new(tcp, cfg.write_timeout, cfg.limiter.clone()));
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut r = router.clone();
        tower_service::Service::call(&mut r, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_header_size(cfg.max_header_bytes)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        if e.is_timeout() {
            cfg.limiter.metrics().connection_timed_out(cfg.limiter.listener(), "header");
        }
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
    drop(permit);
}

/// A TCP stream whose writes fail with `TimedOut` once one has made no progress for a while
/// (a client that stopped reading a response must not hold the connection forever).
struct WriteStall {
    inner: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    limiter: Arc<ConnLimiter>,
}

impl WriteStall {
    fn new(inner: TcpStream, timeout: Duration, limiter: Arc<ConnLimiter>) -> Self {
        WriteStall { inner, timeout, stalled: None, limiter }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, p: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if p.is_ready() {
            self.stalled = None;
            return p;
        }
        let timeout = self.timeout;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.limiter.metrics().connection_timed_out(self.limiter.listener(), "write");
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for WriteStall {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteStall {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
