//! The gRPC listener's TLS: our own rustls `ServerConfig` (client certificates optional at the
//! handshake, authorization per call), handshakes off the accept loop, and a stream of
//! established connections for tonic's `serve_with_incoming`.
//!
//! What a connection may hold ([`super::limits`]): it is admitted only under the listener's caps
//! (in all and per client address); it must finish the TLS handshake and send the HTTP/2
//! preface within the handshake timeout; and once no call is in progress on it for the idle
//! timeout it is closed ([`GrpcConn`], with [`ActivityLayer`] counting the calls).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use super::limits::{ConnLimiter, ConnPermit};
use crate::pki::Pki;

/// The client's first bytes on an HTTP/2 connection.
const H2_PREFACE_LEN: usize = 24;

/// Builds the server TLS config from the loaded PKI.
pub fn server_config(pki: &Pki) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(pki.ca_der.clone()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        // Enroll is called before the node has a certificate; every other call checks for one.
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> =
        pki.server_chain_der.iter().map(|d| CertificateDer::from(d.clone())).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key_der.clone()));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the accept loop needs besides the listener.
#[derive(Clone)]
pub struct Acceptor {
    pub config: Arc<ServerConfig>,
    pub limiter: Arc<ConnLimiter>,
    pub activity: Arc<ConnActivity>,
    /// Handshake plus HTTP/2 preface.
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Accepts TCP connections under the caps and completes TLS handshakes concurrently;
/// established connections come out of the returned channel. Failed or slow handshakes are
/// logged and dropped. The loop ends when `stop` is cancelled or the receiver is dropped (its
/// server died; a restarted one calls this again on the same listener).
pub fn accept_loop(
    listener: Arc<TcpListener>,
    acceptor: Acceptor,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<GrpcConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(1024);
    let tls = TlsAcceptor::from(acceptor.config.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                () = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "gRPC: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let permit = match acceptor.limiter.try_acquire(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    tracing::debug!(%peer, cap = why.as_str(), "gRPC: connection refused");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tls, acceptor, tx) = (tls.clone(), acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + acceptor.handshake_timeout;
                match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let conn = GrpcConn::new(stream, peer, permit, &acceptor, deadline);
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        acceptor
                            .limiter
                            .metrics()
                            .connection_timed_out(acceptor.limiter.listener(), "handshake");
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// Calls in progress on one connection, and since when there has been none.
#[derive(Debug)]
pub struct Activity {
    calls: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity { calls: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) }
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// When the connection turns idle-timed-out, if no call is in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) + idle)
    }
}

/// One call in progress, until its response body is done or dropped.
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// The open gRPC connections' [`Activity`], by the client's address (unique per connection).
#[derive(Debug, Default)]
pub struct ConnActivity(Mutex<HashMap<SocketAddr, Weak<Activity>>>);

impl ConnActivity {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Weak<Activity>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, peer: SocketAddr) -> Arc<Activity> {
        let a = Arc::new(Activity::new());
        self.lock().insert(peer, Arc::downgrade(&a));
        a
    }

    fn get(&self, peer: &SocketAddr) -> Option<Arc<Activity>> {
        self.lock().get(peer).and_then(Weak::upgrade)
    }
}

/// An established gRPC connection: the TLS stream, its place under the caps, and the deadlines
/// for the client's HTTP/2 preface and for idleness. Reading fails with `TimedOut` when one
/// passes, which makes the server close the connection.
pub struct GrpcConn {
    inner: TlsStream<TcpStream>,
    peer: SocketAddr,
    _permit: ConnPermit,
    limiter: Arc<ConnLimiter>,
    registry: Arc<ConnActivity>,
    activity: Arc<Activity>,
    /// Preface bytes still to come, and by when.
    preface_left: usize,
    preface_deadline: Instant,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl GrpcConn {
    fn new(
        inner: TlsStream<TcpStream>,
        peer: SocketAddr,
        permit: ConnPermit,
        a: &Acceptor,
        preface_deadline: Instant,
    ) -> Self {
        GrpcConn {
            inner,
            peer,
            _permit: permit,
            limiter: a.limiter.clone(),
            registry: a.activity.clone(),
            activity: a.activity.register(peer),
            preface_left: H2_PREFACE_LEN,
            preface_deadline,
            idle: a.idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(preface_deadline)),
            armed: None,
        }
    }

    /// With nothing to read: `Ready(Err)` once a deadline has passed, else `Pending` with the
    /// timer set for the next one.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let (due, phase) = if self.preface_left > 0 {
                (self.preface_deadline, "preface")
            } else {
                match self.activity.idle_deadline(self.idle) {
                    Some(d) => (d, "idle"),
                    // Calls in progress: look again later (a call's end wakes nothing here).
                    None => (Instant::now() + self.idle, "idle"),
                }
            };
            if due <= Instant::now() {
                self.limiter.metrics().connection_timed_out(self.limiter.listener(), phase);
                tracing::debug!(peer = %self.peer, phase, "gRPC connection timed out");
                let what = if phase == "preface" { "no HTTP/2 preface in time" } else { "idle" };
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what)));
            }
            if self.armed != Some(due) {
                self.timer.as_mut().reset(due);
                self.armed = Some(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for GrpcConn {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if map.get(&self.peer).is_some_and(|w| w.ptr_eq(&Arc::downgrade(&self.activity))) {
            map.remove(&self.peer);
        }
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.preface_left = this.preface_left.saturating_sub(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadlines(cx),
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for GrpcConn {
    // The same as the TLS stream's, so that `Request::peer_certs` finds the client certificate.
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A tower layer that marks a call in progress on its connection from its start until its
/// response body is done (for [`GrpcConn`]'s idle timeout).
#[derive(Clone)]
pub struct ActivityLayer(pub Arc<ConnActivity>);

impl<S> tower_layer::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ActivityService { inner, conns: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct ActivityService<S> {
    inner: S,
    conns: Arc<ConnActivity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for ActivityService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = http::Response<TrackedBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .and_then(|peer| self.conns.get(&peer))
            .map(|a| a.begin());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| TrackedBody { inner: body, _call: guard }))
        })
    }
}

/// A response body that keeps its call marked in progress while it lives.
pub struct TrackedBody<B> {
    inner: B,
    _call: Option<CallGuard>,
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
