//! The controller process: shared fleet state, the gRPC services (agent and admin) on the TLS
//! listener, and the plain HTTP listener.
//!
//! State that can be derived is derived: a machine's `ready`/`unreachable` comes from its last
//! heartbeat and heartbeat interval at the moment it is asked for, and identity warnings from
//! the whole fleet's inventory. Heartbeats update memory; a flusher writes them to the store in
//! batches.

mod admin_api;
mod agent_api;
pub mod auth;
pub mod boot;
pub mod config;
pub mod error;
pub mod health;
mod http;
mod registration;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use muster_proto::model::{is_placeholder_uuid, normalize_mac, MachineId, Role, State};
use muster_proto::pb;
use muster_proto::pin::CaPin;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use muster_proto::token::JoinToken;

use crate::metrics::{FleetSnapshot, MachineSample, MeteredStore, Metrics, RpcMetricsLayer};
use crate::pki::{self, unix_ms, DataDir, Pki};
use crate::store::{BuildFn, MachineRecord, SqliteStore, Store, StoreError, UpdateFn};

pub use error::ApiError;
use health::{Health, Thresholds};

/// Heartbeat interval assumed for a machine that has not said its own.
pub const DEFAULT_HEARTBEAT_MS: u32 = 5_000;
/// A machine is `unreachable` after this many missed heartbeats.
pub const MISSED_HEARTBEATS: i64 = 3;
/// Largest gRPC message accepted from agents.
pub const MAX_AGENT_MESSAGE: usize = 256 * 1024;
/// Largest gRPC message accepted from admins.
pub const MAX_ADMIN_MESSAGE: usize = 4 * 1024 * 1024;
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Controller settings beyond where it listens.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Lifetime of machine client certificates.
    pub machine_cert_ttl: Duration,
    /// Health model thresholds.
    pub thresholds: Thresholds,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self { machine_cert_ttl: pki::DEFAULT_MACHINE_CERT_TTL, thresholds: Thresholds::default() }
    }
}

/// An open agent stream.
struct Session {
    conn_id: u64,
    tx: mpsc::Sender<Result<pb::ControllerMessage, Status>>,
    cancel: CancellationToken,
}

/// A machine as this controller holds it: the stored record (kept equal to the store's after
/// every write) and what is only known while the controller runs.
struct Live {
    record: MachineRecord,
    last_seen_ms: i64,
    heartbeat_ms: u32,
    dirty: bool,
    session: Option<Session>,
    health: Option<pb::HealthSnapshot>,
    peer_ip: Option<IpAddr>,
    metrics_port: u16,
}

impl Live {
    fn new(record: MachineRecord) -> Self {
        Self {
            last_seen_ms: record.last_seen_ms,
            heartbeat_ms: record.heartbeat_ms,
            record,
            dirty: false,
            session: None,
            health: None,
            peer_ip: None,
            metrics_port: 0,
        }
    }
}

/// The controller's shared state; cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    pki: Pki,
    opts: ControllerOptions,
    metrics: Arc<Metrics>,
    live: Mutex<HashMap<MachineId, Live>>,
    next_conn: std::sync::atomic::AtomicU64,
    rng: ring::rand::SystemRandom,
}

/// Everything derived about one machine at one moment.
struct Derived {
    state: State,
    connected: bool,
    last_seen_ms: i64,
    heartbeat_ms: u32,
    health: Health,
}

impl Controller {
    /// A controller over `store`, with its machine cache loaded from it.
    pub async fn new(
        store: Arc<dyn Store>,
        pki: Pki,
        opts: ControllerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let store: Arc<dyn Store> = Arc::new(MeteredStore::new(store, metrics.clone()));
        let machines = store.list_machines().await?;
        let live = machines.into_iter().map(|m| (m.id.clone(), Live::new(m))).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                pki,
                opts,
                metrics,
                live: Mutex::new(live),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                rng: ring::rand::SystemRandom::new(),
            }),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn pki(&self) -> &Pki {
        &self.inner.pki
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<MachineId, Live>> {
        // A poisoned map only means a panic elsewhere mid-update of plain data; keep serving.
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn random_bytes<const N: usize>(&self) -> Result<[u8; N], ApiError> {
        let mut b = [0u8; N];
        ring::rand::SecureRandom::fill(&self.inner.rng, &mut b)
            .map_err(|_| ApiError::Internal("no randomness available".into()))?;
        Ok(b)
    }

    /// The cached record of `id`.
    pub fn machine(&self, id: &MachineId) -> Option<MachineRecord> {
        self.live().get(id).map(|l| l.record.clone())
    }

    /// Every cached record, by id.
    pub fn machines(&self) -> Vec<MachineRecord> {
        let mut v: Vec<MachineRecord> = self.live().values().map(|l| l.record.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn cache(&self, m: &MachineRecord) {
        let mut live = self.live();
        match live.get_mut(&m.id) {
            Some(l) => l.record = m.clone(),
            None => {
                live.insert(m.id.clone(), Live::new(m.clone()));
            }
        }
    }

    /// Enrolls through the store and caches the new machine.
    async fn enroll_machine(
        &self,
        token: &JoinToken,
        now_ms: i64,
        build: BuildFn,
    ) -> Result<MachineRecord, StoreError> {
        let m = self.inner.store.enroll(token, now_ms, build).await?;
        self.cache(&m);
        Ok(m)
    }

    /// Read-modify-write of one machine in the store, then in the cache.
    pub async fn update_machine(
        &self,
        id: &MachineId,
        f: UpdateFn<MachineRecord>,
    ) -> Result<MachineRecord, StoreError> {
        let m = self.inner.store.update_machine(id, f).await?;
        self.cache(&m);
        Ok(m)
    }

    /// Deletes a machine from the store and the cache, closing its stream.
    async fn delete_machine(&self, id: &MachineId, status: Status) -> Result<(), StoreError> {
        self.inner.store.delete_machine(id).await?;
        self.close_session(id, status);
        self.live().remove(id);
        Ok(())
    }

    /// Records a sign of life, and what a hello or heartbeat says.
    fn touch(&self, id: &MachineId, update: impl FnOnce(&mut Live)) {
        let now = unix_ms(SystemTime::now());
        if let Some(l) = self.live().get_mut(id) {
            l.last_seen_ms = now;
            l.dirty = true;
            update(l);
        }
    }

    /// Registers a new session for `id`, replacing (and so ending) an older one. `None` if the
    /// machine is gone.
    fn register(
        &self,
        id: &MachineId,
        tx: mpsc::Sender<Result<pb::ControllerMessage, Status>>,
        peer_ip: Option<IpAddr>,
    ) -> Option<(u64, CancellationToken)> {
        let conn_id = self.inner.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let mut live = self.live();
        let l = live.get_mut(id)?;
        l.peer_ip = peer_ip;
        if let Some(old) = l.session.replace(Session { conn_id, tx, cancel: cancel.clone() }) {
            old.cancel.cancel();
        }
        Some((conn_id, cancel))
    }

    fn unregister(&self, id: &MachineId, conn_id: u64) {
        let mut live = self.live();
        if let Some(l) = live.get_mut(id) {
            if l.session.as_ref().is_some_and(|s| s.conn_id == conn_id) {
                l.session = None;
            }
        }
    }

    /// Ends a machine's open stream with `status` (revocation, deletion). Returns whether one was open.
    fn close_session(&self, id: &MachineId, status: Status) -> bool {
        let session = self.live().get_mut(id).and_then(|l| l.session.take());
        match session {
            Some(s) => {
                // try_send: the session's queue may be full of acks; cancelling ends it regardless.
                let _ = s.tx.try_send(Err(status));
                s.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Pushes a message to a machine's open stream, if any.
    /// Whether the machine's agent has its stream open now.
    pub fn is_connected(&self, id: &MachineId) -> bool {
        self.live().get(id).is_some_and(|l| l.session.is_some())
    }

    fn push(&self, id: &MachineId, msg: pb::ControllerMessage) {
        let tx = self.live().get(id).and_then(|l| l.session.as_ref().map(|s| s.tx.clone()));
        if let Some(tx) = tx {
            if tx.try_send(Ok(msg)).is_err() {
                tracing::warn!(machine = %id, "agent stream is backed up; the update will be resent on reconnect");
            }
        }
    }

    /// Writes heartbeat times gathered in memory to the store.
    pub async fn flush_last_seen(&self) -> Result<(), StoreError> {
        let batch: Vec<(MachineId, i64)> = {
            let mut live = self.live();
            live.iter_mut()
                .filter(|(_, l)| l.dirty)
                .map(|(id, l)| {
                    l.dirty = false;
                    l.record.last_seen_ms = l.last_seen_ms;
                    (id.clone(), l.last_seen_ms)
                })
                .collect()
        };
        self.inner.store.record_last_seen(batch).await
    }

    fn derive(&self, l: &Live, now_ms: i64) -> Derived {
        let m = &l.record;
        let last_seen = l.last_seen_ms.max(m.last_seen_ms);
        let hb =
            [l.heartbeat_ms, m.heartbeat_ms].into_iter().find(|h| *h > 0).unwrap_or(DEFAULT_HEARTBEAT_MS);
        let state = if m.revoked {
            State::Revoked
        } else if !m.approved {
            State::Pending
        } else if last_seen > 0 && now_ms - last_seen <= MISSED_HEARTBEATS * i64::from(hb) {
            State::Ready
        } else {
            State::Unreachable
        };
        let health = health::evaluate(
            state,
            l.health.as_ref(),
            m.cert_not_after_ms,
            last_seen,
            now_ms,
            &self.inner.opts.thresholds,
        );
        Derived { state, connected: l.session.is_some(), last_seen_ms: last_seen, heartbeat_ms: hb, health }
    }

    /// The API view of `ids` (all machines if `None`), with derived state, health and
    /// fleet-wide identity warnings.
    pub fn view(&self, ids: Option<&[MachineId]>) -> Vec<pb::Machine> {
        let now = unix_ms(SystemTime::now());
        let live = self.live();
        let mut by_uuid: HashMap<String, Vec<&MachineId>> = HashMap::new();
        for l in live.values().filter(|l| !l.record.revoked) {
            let uuid = smbios_uuid(&l.record);
            if !uuid.is_empty() && !is_placeholder_uuid(&uuid) {
                by_uuid.entry(uuid).or_default().push(&l.record.id);
            }
        }
        let mut selected: Vec<&Live> = match ids {
            Some(ids) => ids.iter().filter_map(|id| live.get(id)).collect(),
            None => live.values().collect(),
        };
        selected.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        selected
            .into_iter()
            .map(|l| {
                let m = &l.record;
                let d = self.derive(l, now);
                let uuid = smbios_uuid(m);
                let mut warnings = Vec::new();
                if !m.flag.is_empty() {
                    warnings.push(m.flag.clone());
                }
                if is_placeholder_uuid(&uuid) {
                    warnings.push(format!(
                        "SMBIOS UUID {uuid} is a firmware placeholder; it does not identify this machine"
                    ));
                }
                if let Some(others) = by_uuid.get(&uuid).filter(|v| v.len() > 1) {
                    let others: Vec<&str> =
                        others.iter().filter(|o| ***o != m.id).map(|o| o.as_str()).collect();
                    warnings.push(format!(
                        "SMBIOS UUID {uuid} is also reported by machine(s) {}",
                        others.join(", ")
                    ));
                }
                let smbios = m.inventory.smbios.clone().unwrap_or_default();
                pb::Machine {
                    id: m.id.to_string(),
                    hostname: m.hostname.clone(),
                    state: pb::MachineState::from(d.state).into(),
                    role: pb::Role::from(m.role).into(),
                    cluster: m.cluster.clone(),
                    uuid,
                    serial: smbios.serial,
                    macs: macs(m),
                    labels: m.labels.clone().into_iter().collect(),
                    last_seen_unix_ms: d.last_seen_ms,
                    warnings,
                    enrolled_unix_ms: m.enrolled_ms,
                    inventory: Some(m.inventory.clone()),
                    cert_serial: m.cert_serial.clone(),
                    cert_not_after_unix_ms: m.cert_not_after_ms,
                    connected: d.connected,
                    heartbeat_interval_ms: d.heartbeat_ms,
                    token_id: m.token_id.clone(),
                    health: d.health.status.to_string(),
                    health_reasons: d.health.reasons,
                    health_snapshot: l.health.clone(),
                    metrics_endpoint: metrics_endpoint(l).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The fleet for one metrics scrape.
    pub fn fleet_snapshot(&self) -> FleetSnapshot {
        let now = unix_ms(SystemTime::now());
        let live = self.live();
        let mut machines: Vec<MachineSample> = live
            .values()
            .map(|l| {
                let d = self.derive(l, now);
                let m = &l.record;
                MachineSample {
                    id: m.id.to_string(),
                    hostname: m.hostname.clone(),
                    cluster: m.cluster.clone(),
                    role: m.role.to_string(),
                    state: d.state.as_str(),
                    health: d.health.status,
                    up: d.state == State::Ready,
                    last_seen_ms: d.last_seen_ms,
                    cert_not_after_ms: m.cert_not_after_ms,
                    uuid: smbios_uuid(m),
                    kernel: m.inventory.kernel.clone(),
                    os: m.inventory.os.clone(),
                    agent_version: m.inventory.agent_version.clone(),
                    snapshot: l.health.clone(),
                    config_generation: m.config.generation,
                    config_applied: m.config.applied_generation,
                    config_drift: m
                        .config
                        .resources
                        .iter()
                        .map(|r| (r.resource.clone(), matches!(r.outcome.as_str(), "drifted" | "corrected")))
                        .collect(),
                }
            })
            .collect();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        FleetSnapshot { connected: live.values().filter(|l| l.session.is_some()).count(), machines }
    }

    /// Prometheus HTTP service discovery: one target group per ready machine serving metrics.
    pub fn sd_targets(&self, cluster: Option<&str>, role: Option<&str>) -> Vec<SdTargetGroup> {
        let now = unix_ms(SystemTime::now());
        let live = self.live();
        let mut out: Vec<SdTargetGroup> = live
            .values()
            .filter(|l| cluster.is_none_or(|c| l.record.cluster == c))
            .filter(|l| role.is_none_or(|r| l.record.role.as_str() == r))
            .filter(|l| self.derive(l, now).state == State::Ready)
            .filter_map(|l| {
                let target = metrics_endpoint(l)?;
                let m = &l.record;
                let labels = BTreeMap::from([
                    ("machine".to_owned(), m.id.to_string()),
                    ("hostname".to_owned(), m.hostname.clone()),
                    ("cluster".to_owned(), m.cluster.clone()),
                    ("role".to_owned(), m.role.to_string()),
                ]);
                Some(SdTargetGroup { targets: vec![target], labels })
            })
            .collect();
        out.sort_by(|a, b| a.labels.get("machine").cmp(&b.labels.get("machine")));
        out
    }

    /// Finds the one machine `query` names: id, unique id prefix, hostname or MAC.
    pub fn resolve(&self, query: &str) -> Result<MachineRecord, ApiError> {
        let q = query.trim();
        if q.is_empty() {
            return Err(ApiError::invalid("query", "a machine id, id prefix, hostname or MAC is required"));
        }
        if let Ok(id) = q.parse::<MachineId>() {
            if let Some(m) = self.machine(&id) {
                return Ok(m);
            }
        }
        let all = self.machines();
        let lower = q.to_ascii_lowercase();
        let mac = normalize_mac(q);
        type Matcher<'a> = Box<dyn Fn(&MachineRecord) -> bool + 'a>;
        let matchers: [(&str, Matcher<'_>); 3] = [
            ("id prefix", Box::new(|m: &MachineRecord| m.id.as_str().starts_with(&lower))),
            ("hostname", Box::new(|m: &MachineRecord| m.hostname.eq_ignore_ascii_case(q))),
            ("MAC", Box::new(|m: &MachineRecord| mac.as_ref().is_some_and(|mac| macs(m).contains(mac)))),
        ];
        for (what, f) in matchers {
            let found: Vec<&MachineRecord> = all.iter().filter(|m| f(m)).collect();
            match found.len() {
                0 => continue,
                1 => return Ok(found[0].clone()),
                n => {
                    let ids: Vec<&str> = found.iter().take(5).map(|m| m.id.as_str()).collect();
                    return Err(ApiError::invalid(
                        "query",
                        format!(
                            "{q:?} is ambiguous: {n} machines match by {what} ({}); use the full id",
                            ids.join(", ")
                        ),
                    ));
                }
            }
        }
        Err(ApiError::NotFound(format!("no machine matches {q:?} (by id, id prefix, hostname or MAC)")))
    }

    fn assignment_msg(m: &MachineRecord) -> pb::ControllerMessage {
        pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Assignment(pb::Assignment {
                role: pb::Role::from(m.role).into(),
                cluster: m.cluster.clone(),
                labels: m.labels.clone().into_iter().collect(),
                approved: m.approved,
            })),
        }
    }
}

/// One target group of Prometheus HTTP service discovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SdTargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

fn metrics_endpoint(l: &Live) -> Option<String> {
    let ip = l.peer_ip?;
    (l.metrics_port != 0).then(|| SocketAddr::new(ip, l.metrics_port).to_string())
}

fn smbios_uuid(m: &MachineRecord) -> String {
    m.inventory.smbios.as_ref().map(|s| s.uuid.to_ascii_lowercase()).unwrap_or_default()
}

fn macs(m: &MachineRecord) -> Vec<String> {
    let mut v: Vec<String> = m.inventory.nics.iter().filter_map(|n| normalize_mac(&n.mac)).collect();
    v.sort();
    v.dedup();
    v
}

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

/// Initialises the data dir if it is empty, opens the store, binds both listeners, writes
/// `ports.json` and the musterconfig endpoint, and starts serving.
pub async fn start(opts: ServeOptions) -> Result<Running, ServeError> {
    let dir = DataDir::new(&opts.data_dir);
    if !dir.has_ca() {
        let out = pki::init(&dir, &opts.sans, &local_endpoint(opts.grpc_listen))?;
        tracing::info!(dir = %dir.root().display(), pin = %out.pin, "initialised a new controller data dir");
    }
    let pki = Pki::load(&dir)?;
    let pin = pki.pin;
    let store = Arc::new(SqliteStore::open(&dir.state_db())?);
    let tls = tls::server_config(&pki)?;

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

    pki::set_musterconfig_endpoint(&dir, &local_endpoint(grpc_addr))?;
    let ports_json = serde_json::to_vec_pretty(&ports).map_err(|e| ServeError::Runtime(e.to_string()))?;
    muster_util::write_atomic(&dir.ports(), &ports_json, 0o644)
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
        pb::agent_service_server::AgentServiceServer::new(agent_api::AgentApi::new(controller.clone()))
            .max_decoding_message_size(MAX_AGENT_MESSAGE);
    let admin =
        pb::admin_service_server::AdminServiceServer::new(admin_api::AdminApi::new(controller.clone()))
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
    let mut router = http::router(controller.clone());
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
    let ids: Vec<MachineId> = controller.live().keys().cloned().collect();
    for id in ids {
        controller.close_session(&id, Status::unavailable("controller is shutting down"));
    }
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

/// A role as given on the wire, for the API's argument checks.
pub(crate) fn role_arg(v: i32) -> Result<Role, ApiError> {
    Role::from_wire(v).map_err(|e| ApiError::invalid("role", e.to_string()))
}
