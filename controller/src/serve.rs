//! Start-up and shutdown: the data dir (initialised when empty), both listeners, the store, the
//! gRPC and HTTP services, network boot's UDP services, the heartbeat flusher.

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

use crate::api::{self, tls, MAX_ADMIN_MESSAGE, MAX_AGENT_MESSAGE};
use crate::fleet::{boot, Controller, ControllerOptions};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::pki::{self, DataDir, Pki};
use crate::store::{SqliteStore, StoreError};

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
            boot::routes(&controller, dir.root(), b, grpc_addr.port())
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
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(controller.clone(), grpc, tls, http_l, boot_routes, udp, shutdown_rx));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "controller serving");
    Ok(Running { ports, pin, controller, shutdown: Some(shutdown_tx), task })
}

/// Runs one of the network-boot UDP services until it ends, logging why if it fails.
fn spawn_service(
    what: &'static str,
    service: impl std::future::Future<Output = Result<(), muster_pxe::PxeError>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = service.await {
            tracing::error!(error = %e, "{what} stopped");
        }
    })
}

async fn serve(
    controller: Controller,
    grpc: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    http_l: TcpListener,
    boot_routes: Option<axum::Router>,
    udp: boot::Listeners,
    shutdown: oneshot::Receiver<()>,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();
    let mut udp_tasks = Vec::new();
    if let Some(p) = udp.proxy_dhcp {
        udp_tasks.push(spawn_service("proxy DHCP", p.serve(stop.clone().cancelled_owned())));
    }
    if let Some(t) = udp.tftp {
        udp_tasks.push(spawn_service("TFTP", t.serve(stop.clone().cancelled_owned())));
    }
    let incoming = tokio_stream::wrappers::ReceiverStream::new(tls::accept_loop(grpc, tls, stop.clone()));
    let agent =
        pb::agent_service_server::AgentServiceServer::new(api::agent::AgentApi::new(controller.clone()))
            .max_decoding_message_size(MAX_AGENT_MESSAGE);
    let admin =
        pb::admin_service_server::AdminServiceServer::new(api::admin::AdminApi::new(controller.clone()))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE);
    let grpc_stop = stop.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(RpcMetricsLayer(controller.metrics().clone()))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(agent)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned()),
    );
    let http_stop = stop.clone();
    let mut router = api::http::router(controller.clone());
    if let Some(b) = boot_routes {
        router = router.merge(b);
    }
    let http_task = tokio::spawn(async move {
        axum::serve(http_l, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
    });
    let flusher = {
        let c = controller.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => break,
                }
                if let Err(e) = c.flush_last_seen().await {
                    tracing::warn!(error = %e, "could not record heartbeats");
                }
            }
        })
    };
    let _ = shutdown.await;
    // Close agent streams so the gRPC server's graceful shutdown does not wait on them.
    controller.close_all_sessions(&Status::unavailable("controller is shutting down"));
    stop.cancel();
    let _ = flusher.await;
    for t in udp_tasks {
        let _ = t.await;
    }
    if let Err(e) = controller.flush_last_seen().await {
        tracing::warn!(error = %e, "could not record heartbeats at shutdown");
    }
    grpc_task.await.map_err(|e| ServeError::Runtime(e.to_string()))??;
    http_task
        .await
        .map_err(|e| ServeError::Runtime(e.to_string()))?
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    Ok(())
}
