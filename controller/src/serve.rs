//! Start-up and shutdown: the data dir (initialised when empty), both listeners, the store, the
//! gRPC and HTTP services, network boot's UDP services, the heartbeat flusher. Every one of
//! these services runs supervised ([`crate::supervise`]): restarted with backoff if it dies,
//! shown in `/readyz` and `muster_service_up` meanwhile. Listeners and sockets are bound here,
//! once, and outlive any restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use muster_machinery::pin::CaPin;
use muster_proto::pb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::api::limits::{open_files_limit, ConnLimiter, NetLimits, ResolvedLimits};
use crate::api::{self, tls, MAX_ADMIN_MESSAGE, MAX_AGENT_MESSAGE};
use crate::fleet::{boot, Controller, ControllerOptions};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::pki::{self, DataDir, Pki};
use crate::store::{SqliteStore, StoreError};
use crate::supervise::{Backoff, Services};

const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Where the controller listens and keeps its data.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Extra server certificate names, used when the data dir is initialised.
    pub sans: Vec<String>,
    pub controller: ControllerOptions,
    /// Network boot, when served.
    pub boot: Option<boot::BootOptions>,
    /// Connection caps and timeouts of both listeners.
    pub net: NetLimits,
}

/// The bound addresses, as written to `ports.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub pid: u32,
}

/// A running controller.
pub struct Running {
    pub ports: Ports,
    pub pin: CaPin,
    pub controller: Controller,
    /// The supervised background services.
    pub services: Services,
    /// The caps and timeouts in force.
    pub limits: ResolvedLimits,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops serving and waits for the listeners to close.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.map_err(|e| ServeError::Runtime(e.to_string()))?
    }

    /// Waits until the server stops by itself (an error) or `shutdown` fires.
    pub async fn wait(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
        tokio::select! {
            r = &mut self.task => r.map_err(|e| ServeError::Runtime(e.to_string()))?,
            () = shutdown => self.stop().await,
        }
    }
}

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("{0}")]
    Runtime(String),
}

/// The endpoint URL local clients should use for a bound address.
pub fn local_endpoint(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "[::1]".to_string(),
        }
    } else {
        match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    format!("https://{ip}:{}", addr.port())
}

/// Binds both listeners, initialises the data dir if it is empty (its musterconfig points at
/// the bound gRPC address), opens the store, writes `ports.json`, and starts serving. An
/// existing musterconfig is left as `init` wrote it.
pub async fn start(opts: ServeOptions) -> Result<Running, ServeError> {
    let grpc = TcpListener::bind(opts.grpc_listen).await.map_err(|source| ServeError::Bind {
        what: "gRPC",
        addr: opts.grpc_listen,
        source,
    })?;
    let http_l = TcpListener::bind(opts.http_listen).await.map_err(|source| ServeError::Bind {
        what: "HTTP",
        addr: opts.http_listen,
        source,
    })?;
    let grpc_addr = grpc.local_addr().map_err(|source| ServeError::Bind {
        what: "gRPC",
        addr: opts.grpc_listen,
        source,
    })?;
    let http_addr = http_l.local_addr().map_err(|source| ServeError::Bind {
        what: "HTTP",
        addr: opts.http_listen,
        source,
    })?;
    let ports = Ports { grpc: grpc_addr, http: http_addr, pid: std::process::id() };

    let dir = DataDir::new(&opts.data_dir);
    // Keys, the state database and the boot token live here: only the controller reads it.
    muster_util::create_dir_private(dir.root())
        .map_err(|source| ServeError::Write { path: dir.root().to_owned(), source })?;
    if !dir.has_ca() {
        let out = pki::init(&dir, &opts.sans, &local_endpoint(grpc_addr))?;
        tracing::info!(dir = %dir.root().display(), pin = %out.pin, "initialised a new controller data dir");
    }
    let pki = Pki::load(&dir)?;
    let pin = pki.pin;
    let store = Arc::new(SqliteStore::open(&dir.state_db())?);
    let tls = tls::server_config(&pki)?;
    let ports_json = serde_json::to_vec_pretty(&ports).map_err(|e| ServeError::Runtime(e.to_string()))?;
    muster_util::write_atomic(&dir.ports(), &ports_json, 0o600)
        .map_err(|source| ServeError::Write { path: dir.ports(), source })?;

    let controller = Controller::new(store, pki, opts.controller.clone(), Arc::new(Metrics::new())).await?;
    let boot_routes = match &opts.boot {
        Some(b) => Some(
            boot::routes(&controller, dir.root(), b, grpc_addr.port(), http_addr.port())
                .await
                .map_err(|e| ServeError::Runtime(format!("network boot: {e}")))?,
        ),
        None => None,
    };
    let udp = match &opts.boot {
        Some(b) => boot::listeners(b, http_addr.port())
            .await
            .map_err(|e| ServeError::Runtime(format!("network boot: {e}")))?,
        None => boot::Listeners::default(),
    };
    let limits = opts.net.resolve(open_files_limit());
    tracing::info!(grpc = ?limits.grpc, http = ?limits.http, handshake_timeout = ?limits.handshake_timeout,
        grpc_idle_timeout = ?limits.grpc_idle_timeout, http_header_timeout = ?limits.http_header_timeout,
        "connection limits");
    let services = Services::new(controller.metrics().clone());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let listeners = Bound { grpc: Arc::new(grpc), tls, http: Arc::new(http_l), boot_routes, udp };
    let task =
        tokio::spawn(serve(controller.clone(), services.clone(), limits.clone(), listeners, shutdown_rx));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "controller serving");
    Ok(Running { ports, pin, controller, services, limits, shutdown: Some(shutdown_tx), task })
}

/// Everything bound at start-up.
struct Bound {
    grpc: Arc<TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    http: Arc<TcpListener>,
    boot_routes: Option<axum::Router>,
    udp: boot::Listeners,
}

async fn serve(
    controller: Controller,
    services: Services,
    limits: ResolvedLimits,
    bound: Bound,
    shutdown: oneshot::Receiver<()>,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();
    let backoff = Backoff::default();
    let metrics = controller.metrics().clone();
    let mut tasks = Vec::new();

    if let Some(p) = bound.udp.proxy_dhcp {
        let p = Arc::new(p);
        let s = stop.clone();
        tasks.push(services.spawn("proxy-dhcp", stop.clone(), backoff, move || {
            let (p, s) = (p.clone(), s.clone());
            async move { p.serve(s.cancelled_owned()).await.map_err(|e| e.to_string()) }
        }));
    }
    if let Some(t) = bound.udp.tftp {
        let t = Arc::new(t);
        let s = stop.clone();
        tasks.push(services.spawn("tftp", stop.clone(), backoff, move || {
            let (t, s) = (t.clone(), s.clone());
            async move { t.serve(s.cancelled_owned()).await.map_err(|e| e.to_string()) }
        }));
    }

    let acceptor = tls::Acceptor {
        config: bound.tls,
        limiter: ConnLimiter::new("grpc", limits.grpc, metrics.clone()),
        activity: Arc::default(),
        handshake_timeout: limits.handshake_timeout,
        idle_timeout: limits.grpc_idle_timeout,
    };
    {
        let (c, s, listener) = (controller.clone(), stop.clone(), bound.grpc);
        let max_header = limits.grpc_max_header_bytes;
        tasks.push(services.spawn("grpc", stop.clone(), backoff, move || {
            let incoming = tokio_stream::wrappers::ReceiverStream::new(tls::accept_loop(
                listener.clone(),
                acceptor.clone(),
                s.clone(),
            ));
            let agent =
                pb::agent_service_server::AgentServiceServer::new(api::agent::AgentApi::new(c.clone()))
                    .max_decoding_message_size(MAX_AGENT_MESSAGE);
            let admin =
                pb::admin_service_server::AdminServiceServer::new(api::admin::AdminApi::new(c.clone()))
                    .max_decoding_message_size(MAX_ADMIN_MESSAGE);
            let server = tonic::transport::Server::builder()
                .layer(RpcMetricsLayer(c.metrics().clone()))
                .layer(tls::ActivityLayer(acceptor.activity.clone()))
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .http2_max_header_list_size(max_header)
                .add_service(agent)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, s.clone().cancelled_owned());
            async move { server.await.map_err(|e| e.to_string()) }
        }));
    }

    let mut router = api::http::router(controller.clone(), services.clone());
    if let Some(b) = bound.boot_routes {
        router = router.merge(b);
    }
    let http = api::http::HttpServing {
        limiter: ConnLimiter::new("http", limits.http, metrics.clone()),
        header_timeout: limits.http_header_timeout,
        write_timeout: limits.http_write_timeout,
        max_header_bytes: limits.http_max_header_bytes,
    };
    {
        let (s, listener) = (stop.clone(), bound.http);
        tasks.push(services.spawn("http", stop.clone(), backoff, move || {
            let fut = api::http::serve(listener.clone(), router.clone(), http.clone(), s.clone());
            async move {
                fut.await;
                Ok(())
            }
        }));
    }

    {
        let (c, s) = (controller.clone(), stop.clone());
        tasks.push(services.spawn("heartbeat-flush", stop.clone(), backoff, move || {
            let (c, stop) = (c.clone(), s.clone());
            async move {
                let mut tick = tokio::time::interval(FLUSH_INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.cancelled() => return Ok(()),
                    }
                    if let Err(e) = c.flush_last_seen().await {
                        tracing::warn!(error = %e, "could not record heartbeats");
                    }
                }
            }
        }));
    }

    let _ = shutdown.await;
    // Close agent streams so the gRPC server's graceful shutdown does not wait on them.
    controller.close_all_sessions(&Status::unavailable("controller is shutting down"));
    stop.cancel();
    for t in tasks {
        t.await.map_err(|e| ServeError::Runtime(e.to_string()))?;
    }
    if let Err(e) = controller.flush_last_seen().await {
        tracing::warn!(error = %e, "could not record heartbeats at shutdown");
    }
    Ok(())
}
