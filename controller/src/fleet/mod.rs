//! The fleet: the controller's domain core. Every rule about machines, tokens, roles, configs,
//! registrations and network boot lives in this module, behind [`Controller`]; the gRPC and HTTP
//! handlers (`crate::api`) only check callers, convert and call in.
//!
//! State that can be derived is derived: a machine's `ready`/`unreachable` comes from its last
//! heartbeat and heartbeat interval at the moment it is asked for, and identity warnings from
//! the whole fleet's inventory. Every write goes to the store first, then to the in-memory cache
//! that every read uses. Heartbeats update memory; a flusher writes them to the store in batches.

pub mod admission;
pub mod assign;
pub mod boot;
pub mod enroll;
mod error;
pub mod health;
pub mod install;
pub mod registration;
mod resolve;
pub mod rollout;
pub mod session;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_machinery::health::HealthSnapshot;
use muster_machinery::model::{is_placeholder_uuid, normalize_mac, MachineId, State};
use muster_proto::pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use error::{FleetError, Unadmitted};
use health::{Health, Thresholds};

use crate::metrics::{FleetSnapshot, MachineSample, Metrics};
use crate::pki::Pki;
use crate::store::{MachineRecord, MeteredStore, Registration, Store, StoreError, TokenRecord};

/// Heartbeat interval assumed for a machine that has not said its own.
pub const DEFAULT_HEARTBEAT_MS: u32 = 5_000;
/// A machine is `unreachable` after this many missed heartbeats.
pub const MISSED_HEARTBEATS: i64 = 3;

/// Controller settings beyond where it listens.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Lifetime of machine client certificates.
    pub machine_cert_ttl: Duration,
    /// Health model thresholds.
    pub thresholds: Thresholds,
    /// Enrollment limits and what counts as evidence of a MAC.
    pub admission: admission::AdmissionOptions,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            machine_cert_ttl: crate::pki::DEFAULT_MACHINE_CERT_TTL,
            thresholds: Thresholds::default(),
            admission: admission::AdmissionOptions::default(),
        }
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
    health: Option<HealthSnapshot>,
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
    enroll_rate: admission::RateLimiter,
    /// Node OS images for install to disk (set when network boot is served).
    images: std::sync::OnceLock<install::Images>,
}

/// Everything derived about one machine at one moment.
struct Derived {
    state: State,
    connected: bool,
    last_seen_ms: i64,
    heartbeat_ms: u32,
    health: Health,
}

/// A machine as operators see it: its record and what is derived about it now.
#[derive(Debug, Clone)]
pub struct MachineView {
    pub record: MachineRecord,
    pub state: State,
    pub connected: bool,
    /// 0 when never seen.
    pub last_seen_ms: i64,
    pub heartbeat_ms: u32,
    pub health: Health,
    /// Identity warnings and the controller's flag, for an operator's look.
    pub warnings: Vec<String>,
    /// The latest health snapshot the agent sent.
    pub snapshot: Option<HealthSnapshot>,
    /// host:port of the agent's `/metrics`, if it serves one.
    pub metrics_endpoint: Option<String>,
}

/// One target group of Prometheus HTTP service discovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SdTargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Carries the reason a store update's step declined out of the store's transaction: the step
/// returns [`StoreError::Aborted`] (the store rolls back) and the caller gets the step's own
/// [`FleetError`].
#[derive(Clone, Default)]
struct Decline(Arc<Mutex<Option<FleetError>>>);

impl Decline {
    /// Keeps `e` for [`Decline::result`]; what the step returns to the store.
    fn set(&self, e: FleetError) -> StoreError {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        StoreError::Aborted
    }

    /// The store's result, with a declined step's own error in place of `Aborted`.
    fn result<T>(&self, r: Result<T, StoreError>) -> Result<T, FleetError> {
        match r {
            Ok(v) => Ok(v),
            Err(StoreError::Aborted) => {
                Err(self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().unwrap_or_else(
                    || FleetError::Internal("an update was declined without a reason".into()),
                ))
            }
            Err(e) => Err(FleetError::Store(e)),
        }
    }
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
                enroll_rate: admission::RateLimiter::default(),
                images: std::sync::OnceLock::new(),
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
        self.inner.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn random_bytes<const N: usize>(&self) -> Result<[u8; N], FleetError> {
        let mut b = [0u8; N];
        ring::rand::SecureRandom::fill(&self.inner.rng, &mut b)
            .map_err(|_| FleetError::Internal("no randomness available".into()))?;
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

    /// Caches a machine just enrolled.
    fn cache_new(&self, m: &MachineRecord) {
        self.live().entry(m.id.clone()).or_insert_with(|| Live::new(m.clone()));
    }

    /// Caches an updated machine. Two updates can finish in either order: the cache keeps the
    /// newer, and an update that finishes after the machine was deleted does not bring it back.
    fn cache(&self, m: &MachineRecord) {
        if let Some(l) = self.live().get_mut(&m.id) {
            if l.record.revision <= m.revision {
                l.record = m.clone();
            }
        }
    }

    /// Read-modify-write of one machine in the store, then in the cache. `f` may decline with
    /// the reason (nothing is written then).
    pub async fn update_machine(
        &self,
        id: &MachineId,
        f: impl FnOnce(&mut MachineRecord) -> Result<(), FleetError> + Send + 'static,
    ) -> Result<MachineRecord, FleetError> {
        let d = Decline::default();
        let inside = d.clone();
        let step = Box::new(move |m: &mut MachineRecord| {
            f(m).map_err(|e| inside.set(e))?;
            m.revision += 1;
            Ok(())
        });
        let m = d.result(self.inner.store.update_machine(id, step).await)?;
        self.cache(&m);
        Ok(m)
    }

    /// [`Self::update_machine`] with every registration in the same transaction (`f` may mark
    /// them claimed; changed ones are saved with the machine).
    pub async fn update_machine_with_registrations(
        &self,
        id: &MachineId,
        f: impl FnOnce(&mut MachineRecord, &mut [Registration]) -> Result<(), FleetError> + Send + 'static,
    ) -> Result<MachineRecord, FleetError> {
        let d = Decline::default();
        let inside = d.clone();
        let step = Box::new(move |m: &mut MachineRecord, regs: &mut [Registration]| {
            f(m, regs).map_err(|e| inside.set(e))?;
            m.revision += 1;
            Ok(())
        });
        let m = d.result(self.inner.store.update_machine_with_registrations(id, step).await)?;
        self.cache(&m);
        Ok(m)
    }

    /// Read-modify-write of one token in the store. `f` may decline with the reason.
    pub async fn update_token(
        &self,
        id: &str,
        f: impl FnOnce(&mut TokenRecord) -> Result<(), FleetError> + Send + 'static,
    ) -> Result<TokenRecord, FleetError> {
        let d = Decline::default();
        let inside = d.clone();
        let step = Box::new(move |t: &mut TokenRecord| f(t).map_err(|e| inside.set(e)));
        d.result(self.inner.store.update_token(id, step).await)
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
            health::config_problems(&m.config),
            &self.inner.opts.thresholds,
        );
        Derived { state, connected: l.session.is_some(), last_seen_ms: last_seen, heartbeat_ms: hb, health }
    }

    /// `ids` (all machines if `None`) as operators see them, by id: derived state, health and
    /// fleet-wide identity warnings.
    pub fn view(&self, ids: Option<&[MachineId]>) -> Vec<MachineView> {
        let now = muster_util::now_ms();
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
                MachineView {
                    record: m.clone(),
                    state: d.state,
                    connected: d.connected,
                    last_seen_ms: d.last_seen_ms,
                    heartbeat_ms: d.heartbeat_ms,
                    health: d.health,
                    warnings,
                    snapshot: l.health.clone(),
                    metrics_endpoint: metrics_endpoint(l),
                }
            })
            .collect()
    }

    /// One machine as operators see it.
    pub fn view_one(&self, id: &MachineId) -> Result<MachineView, FleetError> {
        self.view(Some(std::slice::from_ref(id)))
            .pop()
            .ok_or_else(|| FleetError::NotFound(format!("machine {id} not found")))
    }

    /// The fleet for one metrics scrape.
    pub fn fleet_snapshot(&self) -> FleetSnapshot {
        let now = muster_util::now_ms();
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
                    // A pending machine's own reports stay out of the series (a public boot
                    // token must not be able to add series by the thousand).
                    snapshot: l.health.clone().filter(|_| m.approved),
                    config_generation: m.config.generation,
                    config_applied: m.config.applied_generation,
                    config_failed: m
                        .config
                        .resources
                        .iter()
                        .filter(|r| r.outcome == muster_machinery::Outcome::Failed)
                        .count()
                        .max(usize::from(m.config.state == muster_machinery::GenerationState::Failed)),
                    config_drift: m
                        .config
                        .resources
                        .iter()
                        .filter(|_| m.approved)
                        .map(|r| (r.resource.clone(), r.outcome.is_drift()))
                        .collect(),
                }
            })
            .collect();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        FleetSnapshot { connected: live.values().filter(|l| l.session.is_some()).count(), machines }
    }

    /// Prometheus HTTP service discovery: one target group per ready machine serving metrics.
    pub fn sd_targets(&self, cluster: Option<&str>, role: Option<&str>) -> Vec<SdTargetGroup> {
        let now = muster_util::now_ms();
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
}

fn metrics_endpoint(l: &Live) -> Option<String> {
    let ip = l.peer_ip?;
    (l.metrics_port != 0).then(|| SocketAddr::new(ip, l.metrics_port).to_string())
}

fn smbios_uuid(m: &MachineRecord) -> String {
    m.inventory.smbios.as_ref().map(|s| s.uuid.to_ascii_lowercase()).unwrap_or_default()
}

/// A machine's MACs, normalised, sorted, once each.
pub fn macs(m: &MachineRecord) -> Vec<String> {
    let mut v: Vec<String> = m.inventory.nics.iter().filter_map(|n| normalize_mac(&n.mac)).collect();
    v.sort();
    v.dedup();
    v
}
