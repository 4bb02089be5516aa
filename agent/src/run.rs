//! The agent's loop: enroll if there is no identity, then keep one stream open (hello,
//! heartbeats with a health snapshot, assignments down), reconnect with full-jitter backoff,
//! renew the certificate at ~70 % of its lifetime, and stop for good when revoked.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::client::{self, classify, CallError};
use crate::discovery::{self, DiscoveryError};
use crate::generations::{boot_id, Generations, PendingTry, SavedConfig, StagedConfig};
use crate::health::{Collector, Sources};
use crate::identity::{Assignment, Identity, MachineFile, StateDir, StateError};
use crate::settings::AgentConfig;

/// A TLS connection to the controller, verified against the pinned CA.
type PinnedConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// What the agent is doing, for callers and the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    pub machine_id: Option<String>,
    pub connected: bool,
    pub assignment: Option<Assignment>,
    pub last_rtt: Option<Duration>,
    pub heartbeats_acked: u64,
    pub reconnects: u64,
    /// The config generation last applied (0: none).
    pub config_generation: u64,
    pub clock_offset_ms: i64,
    /// Unix seconds; 0 when unknown.
    pub cert_not_after: i64,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {id} was revoked by the controller ({reason}); restart the agent with a new join token to enroll again")]
    Revoked { id: String, reason: String },
    #[error(
        "no identity in {0} and no join token: pass --token (or muster.token= on the kernel command line)"
    )]
    NoToken(String),
    #[error("refusing to enroll: no CA pin and no CA file, so the controller cannot be authenticated; pass --ca-hash sha256:... (printed by `muster-controller init`) or --ca-file")]
    NoTrust,
    #[error("CA file {path}: {problem}")]
    CaFile { path: String, problem: String },
    #[error("enrollment refused by the controller: {0}")]
    Enroll(String),
    #[error("the machine certificate expired at {0} and there is no join token to enroll again")]
    Expired(String),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("state dir: {0}")]
    State(#[from] StateError),
    #[error("key generation: {0}")]
    Key(String),
}

/// The agent. Build with [`Agent::new`], then [`Agent::run`].
pub struct Agent {
    cfg: AgentConfig,
    state: StateDir,
    status: watch::Sender<AgentStatus>,
    collector: Arc<Mutex<Collector>>,
    metrics_port: u16,
    /// How configs reach the node; `None`: configs are recorded and reported, not applied.
    effects: Option<Arc<dyn crate::effects::Effects>>,
    /// The hostname the applied config set (reported instead of a hint).
    config_hostname: Mutex<Option<String>>,
    /// Resources the last drift pass found off (to report only changes).
    last_drift: Mutex<Vec<(String, String)>>,
    /// The generations in the state dir (running, trying, staged).
    generations: Generations,
    /// Wakes the try watcher when a try starts or ends.
    try_changed: Notify,
    /// Config reports made while no stream may be open (a revert): sent by the next session.
    outbox_tx: mpsc::UnboundedSender<pb::ConfigStatus>,
    outbox_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<pb::ConfigStatus>>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A cert's validity in Unix seconds.
fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let (_, p) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).ok()?;
    Some((c.validity().not_before.timestamp(), c.validity().not_after.timestamp()))
}

/// When to renew a certificate valid from `nb` to `na` (Unix seconds): at 70 % of its lifetime,
/// never earlier than one second from `now`.
pub fn renew_at(nb: i64, na: i64, now: i64) -> i64 {
    renew_at_jittered(nb, na, now, 0.0)
}

/// [`renew_at`], moved earlier by `jitter` (0..1) times 5 % of the lifetime, so that machines
/// enrolled together do not all renew in the same second. Never earlier than one second from
/// `now`.
pub fn renew_at_jittered(nb: i64, na: i64, now: i64, jitter: f64) -> i64 {
    let life = (na - nb).max(0);
    let early = (life as f64 * 0.05 * jitter.clamp(0.0, 1.0)) as i64;
    (nb + life * 7 / 10 - early).max(now + 1)
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    Revoked(String),
    Renewed,
}

type Stop = watch::Receiver<bool>;

/// How often the agent looks for inventory changes.
const INVENTORY_CHECK: Duration = Duration::from_secs(60);

async fn stopped(stop: &mut Stop) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Sleeps `d`, or returns false early when asked to stop.
async fn sleep_or_stop(d: Duration, stop: &mut Stop) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stopped(stop) => false,
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> (Self, watch::Receiver<AgentStatus>) {
        let (status, rx) = watch::channel(AgentStatus::default());
        let state = StateDir::new(&cfg.state_dir);
        let collector = Arc::new(Mutex::new(Collector::new(Sources::default(), Vec::new())));
        let generations = Generations::new(&cfg.state_dir);
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        (
            Self {
                cfg,
                state,
                status,
                collector,
                metrics_port: 0,
                effects: None,
                config_hostname: Mutex::new(None),
                last_drift: Mutex::new(Vec::new()),
                generations,
                try_changed: Notify::new(),
                outbox_tx,
                outbox_rx: tokio::sync::Mutex::new(outbox_rx),
            },
            rx,
        )
    }

    /// Applies configs through `effects` (the binary passes the real Linux implementation).
    pub fn with_effects(mut self, effects: Arc<dyn crate::effects::Effects>) -> Self {
        self.effects = Some(effects);
        self
    }

    /// Units or processes reported as service checks.
    pub fn with_service_checks(self, services: Vec<String>) -> Self {
        if let Ok(mut c) = self.collector.lock() {
            *c = Collector::new(Sources::default(), services);
        }
        self
    }

    /// The port of this agent's `/metrics`, told to the controller for service discovery.
    pub fn with_metrics_port(mut self, port: u16) -> Self {
        self.metrics_port = port;
        self
    }

    /// The health collector, shared with the metrics endpoint.
    pub fn collector(&self) -> Arc<Mutex<Collector>> {
        self.collector.clone()
    }

    /// A status receiver besides the one [`Agent::new`] returned.
    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` completes (Ok) or the machine is revoked or cannot enroll (Err).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), AgentError> {
        let (stop_tx, mut stop) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        self.state.create()?;
        tracing::debug!(state = %self.state.root().display(), "agent running");
        let mut ident = match self.usable_identity()? {
            Some(i) => i,
            None => match self.enroll(&mut stop).await? {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        self.status.send_modify(|s| {
            s.machine_id = Some(ident.machine.machine_id.clone());
            s.assignment = ident.machine.assignment.clone();
            s.cert_not_after = validity(&ident.cert_pem).map_or(0, |v| v.1);
        });
        tracing::info!(machine = %ident.machine.machine_id, controller = %self.cfg.controller, "identity ready");
        self.converge_at_start();
        tokio::select! {
            r = self.connect_loop(&mut ident, &mut stop) => r,
            () = self.watch_tries() => Ok(()),
        }
    }

    /// Converges to the last config the node was given, without waiting for the controller: a
    /// generation staged for the next boot if this is a new boot, else the running one.
    fn converge_at_start(&self) {
        if let Some(st) = self.generations.staged() {
            let now = boot_id(&self.cfg.boot_id_file);
            if !now.is_empty() && now != st.boot_id {
                tracing::info!(generation = st.generation, "new boot: applying the staged config");
                let reverted = self.generations.current().map_or(0, |c| c.reverted_generation);
                let saved =
                    SavedConfig { generation: st.generation, yaml: st.yaml, reverted_generation: reverted };
                let report = self.apply_and_save(&saved, "applied");
                if let Err(e) = self.generations.clear_staged() {
                    tracing::warn!(error = %e, "could not clear the staged config");
                }
                let _ = self.outbox_tx.send(report);
                return;
            }
        }
        if let Some(saved) = self.generations.current() {
            let _ = self.apply_config(&saved);
        }
    }

    /// Reverts a try when its deadline passes unconfirmed; runs for the agent's whole life,
    /// connected or not (a try that cut the node off must still come back).
    async fn watch_tries(&self) {
        loop {
            let changed = self.try_changed.notified();
            let Some(t) = self.generations.pending_try() else {
                changed.await;
                continue;
            };
            let left = u64::try_from(t.deadline_unix_ms - now_unix_ms()).unwrap_or(0);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(left)) => {
                    if self.generations.pending_try().is_some_and(|p| p.generation == t.generation) {
                        let report = self.revert(&t);
                        let _ = self.outbox_tx.send(report);
                    }
                }
                () = changed => {}
            }
        }
    }

    /// Goes back from an unconfirmed try to the generation before it.
    fn revert(&self, t: &PendingTry) -> pb::ConfigStatus {
        let secs = t.timeout_ms / 1000;
        let (current, resources) = match &t.previous {
            Some(prev) => {
                tracing::warn!(
                    generation = t.generation,
                    back_to = prev.generation,
                    "try not confirmed within {secs}s: reverting"
                );
                let prev = SavedConfig { reverted_generation: t.generation, ..prev.clone() };
                let report = self.apply_and_save(&prev, "applied");
                (prev.generation, report.resources)
            }
            None => {
                tracing::warn!(
                    generation = t.generation,
                    "try not confirmed within {secs}s and there is no earlier config to go back to"
                );
                (0, Vec::new())
            }
        };
        if let Err(e) = self.generations.clear_try() {
            tracing::warn!(error = %e, "could not clear the try");
        }
        if t.previous.is_none() {
            self.status.send_modify(|s| s.config_generation = 0);
        }
        pb::ConfigStatus {
            generation: t.generation,
            applied: false,
            resources,
            error: format!("not confirmed within {secs}s: reverted to generation {current}"),
            state: "reverted".into(),
            current_generation: current,
        }
    }

    async fn connect_loop(&self, ident: &mut Identity, stop: &mut Stop) -> Result<(), AgentError> {
        let mut backoff = Backoff::reconnect();
        loop {
            let started = Instant::now();
            let end = match client::mtls_channel(
                &self.cfg.controller,
                &ident.ca_pem,
                &ident.cert_pem,
                &ident.key_pem,
            )
            .await
            {
                Ok(ch) => self.session(ch, ident, stop).await,
                Err(e) => SessionEnd::Lost(e.to_string()),
            };
            self.status.send_modify(|s| s.connected = false);
            match end {
                SessionEnd::Shutdown => {
                    tracing::info!("stopping");
                    return Ok(());
                }
                SessionEnd::Revoked(reason) => {
                    let id = ident.machine.machine_id.clone();
                    tracing::error!(%reason, "machine {id} was revoked by the controller; restart with a new join token to enroll again");
                    self.state.wipe()?;
                    return Err(AgentError::Revoked { id, reason });
                }
                SessionEnd::Renewed => {
                    backoff.reset();
                    continue;
                }
                SessionEnd::Lost(reason) => {
                    if started.elapsed() >= self.cfg.heartbeat * 2 {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%reason, retry_in = ?delay, "connection to the controller lost");
                    self.status.send_modify(|s| s.reconnects += 1);
                    if !sleep_or_stop(delay, stop).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The saved identity, unless missing, or expired while a token can replace it.
    fn usable_identity(&self) -> Result<Option<Identity>, AgentError> {
        let Some(ident) = self.state.load()? else { return Ok(None) };
        if let Some((_, na)) = validity(&ident.cert_pem) {
            if na <= now_unix_ms() / 1000 {
                let when =
                    humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(na.max(0) as u64)).to_string();
                if self.cfg.token.is_none() {
                    return Err(AgentError::Expired(when));
                }
                tracing::warn!(expired = %when, "machine certificate expired; enrolling again with the join token");
                self.state.wipe()?;
                return Ok(None);
            }
        }
        Ok(Some(ident))
    }

    /// The CA to trust for enrollment: a CA file (checked against the pin if both are given),
    /// else the one the pin finds, with the connection that found it.
    async fn trusted_ca(&self, stop: &mut Stop) -> Result<Option<(String, Option<PinnedConn>)>, AgentError> {
        if let Some(path) = &self.cfg.ca_file {
            let pem = std::fs::read_to_string(path).map_err(|e| AgentError::CaFile {
                path: path.display().to_string(),
                problem: e.to_string(),
            })?;
            let pin = muster_proto::pin::CaPin::of_cert_pem(&pem).map_err(|e| AgentError::CaFile {
                path: path.display().to_string(),
                problem: e.to_string(),
            })?;
            if let Some(want) = self.cfg.ca_pin {
                if want != pin {
                    return Err(AgentError::CaFile {
                        path: path.display().to_string(),
                        problem: format!("its pin is {pin}, not the --ca-hash {want}"),
                    });
                }
            }
            return Ok(Some((pem, None)));
        }
        let Some(pin) = self.cfg.ca_pin else {
            // The CA an earlier enrollment verified (kept after a revocation) still authenticates
            // the controller; the join token alone cannot.
            return match self.state.load_ca()? {
                Some(pem) => {
                    tracing::info!(path = %self.state.ca().display(), "trusting the CA saved by an earlier enrollment");
                    Ok(Some((pem, None)))
                }
                None => Err(AgentError::NoTrust),
            };
        };
        let mut backoff = Backoff::reconnect();
        loop {
            match discovery::connect_pinned(&self.cfg.controller, &pin).await {
                Ok((pem, conn)) => return Ok(Some((pem, Some(conn)))),
                Err(e @ (DiscoveryError::Connect { .. } | DiscoveryError::Handshake { .. })) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "controller not reachable yet");
                    if !sleep_or_stop(delay, stop).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Enrolls with the join token. `None` if asked to stop first.
    async fn enroll(&self, stop: &mut Stop) -> Result<Option<Identity>, AgentError> {
        let token = self
            .cfg
            .token
            .clone()
            .ok_or_else(|| AgentError::NoToken(self.state.root().display().to_string()))?;
        let Some((ca_pem, mut conn)) = self.trusted_ca(stop).await? else { return Ok(None) };
        tracing::debug!("controller CA trusted");
        let key_pem = match self.state.load_key()? {
            Some(k) => k,
            None => {
                let key = client::generate_key().map_err(|e| AgentError::Key(e.to_string()))?;
                let pem = key.serialize_pem();
                self.state.write_key(&pem)?;
                pem
            }
        };
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| AgentError::Key(e.to_string()))?;
        let csr = client::csr_pem(&key).map_err(|e| AgentError::Key(e.to_string()))?;
        let inventory = crate::inventory::collect(&self.cfg.hints);
        tracing::debug!("key, CSR and inventory ready; enrolling");
        let mut backoff = Backoff::reconnect();
        let resp = loop {
            let url = &self.cfg.controller;
            let attempt = match conn.take() {
                // The connection discovery verified: one handshake fewer.
                Some(stream) => match client::enroll_over(stream, url, &token, &csr, inventory.clone()).await
                {
                    Err(CallError::Retry(msg)) => {
                        tracing::debug!(error = %msg, "enrolling over the discovery connection failed; using a new one");
                        client::enroll_once(url, &ca_pem, &token, &csr, inventory.clone()).await
                    }
                    other => other,
                },
                None => client::enroll_once(url, &ca_pem, &token, &csr, inventory.clone()).await,
            };
            match attempt {
                Ok(r) => break r,
                Err(CallError::Retry(msg)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %msg, retry_in = ?delay, "enrollment did not go through; retrying");
                    if !sleep_or_stop(delay, stop).await {
                        return Ok(None);
                    }
                }
                Err(CallError::Final(msg) | CallError::Revoked(msg)) => return Err(AgentError::Enroll(msg)),
            }
        };
        let machine = MachineFile {
            machine_id: resp.machine_id.clone(),
            controller: self.cfg.controller.clone(),
            assignment: None,
        };
        self.state.write_ca(&ca_pem)?;
        self.state.write_cert(&resp.certificate_pem)?;
        self.state.write_machine(&machine)?;
        let state = muster_proto::State::from_wire(resp.state).map_or("unknown", |s| s.as_str());
        tracing::info!(machine = %resp.machine_id, %state, "enrolled");
        Ok(Some(Identity { key_pem, cert_pem: resp.certificate_pem, ca_pem, machine }))
    }

    /// One stream, until it ends.
    async fn session(
        &self,
        channel: tonic::transport::Channel,
        ident: &mut Identity,
        stop: &mut Stop,
    ) -> SessionEnd {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let mut inventory = crate::inventory::collect(&self.cfg.hints);
        if tx.send(self.hello(&inventory)).await.is_err() {
            return SessionEnd::Lost("stream closed".into());
        }
        let mut inbound =
            match AgentServiceClient::new(channel.clone()).connect(ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    return match classify(&s) {
                        CallError::Revoked(m) => SessionEnd::Revoked(m),
                        other => SessionEnd::Lost(other.to_string()),
                    };
                }
            };
        self.status.send_modify(|s| s.connected = true);
        tracing::info!("connected to the controller");
        let mut outbox = self.outbox_rx.lock().await;

        let mut ticker = tokio::time::interval(self.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut sent: VecDeque<(u64, Instant, i64)> = VecDeque::new();
        let mut offset_ms = 0i64;
        let jitter = crate::backoff::random_fraction();
        let renew_wall =
            validity(&ident.cert_pem).map(|(nb, na)| renew_at_jittered(nb, na, now_unix_ms() / 1000, jitter));
        let mut renew_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let renew_in =
            |wall: i64| Duration::from_secs(u64::try_from(wall - now_unix_ms() / 1000).unwrap_or(0).max(1));
        let mut renew_deadline =
            tokio::time::Instant::now() + renew_wall.map_or(Duration::from_secs(3600), renew_in);
        let mut inventory_check = tokio::time::interval(INVENTORY_CHECK);
        inventory_check.tick().await;
        let mut drift_check = tokio::time::interval(self.cfg.drift_interval);
        drift_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        drift_check.tick().await;
        loop {
            tokio::select! {
                () = stopped(stop) => return SessionEnd::Shutdown,
                Some(st) = outbox.recv() => {
                    let msg = pb::AgentMessage { msg: Some(pb::agent_message::Msg::ConfigStatus(st)) };
                    if tx.send(msg).await.is_err() {
                        return SessionEnd::Lost("stream closed".into());
                    }
                }
                _ = drift_check.tick() => {
                    if let Some(st) = self.drift_pass() {
                        let msg = pb::AgentMessage { msg: Some(pb::agent_message::Msg::ConfigStatus(st)) };
                        if tx.send(msg).await.is_err() {
                            return SessionEnd::Lost("stream closed".into());
                        }
                    }
                }
                _ = inventory_check.tick() => {
                    // The full inventory goes up again only when it changed (a disk or NIC came or went).
                    let current = crate::inventory::collect(&self.cfg.hints);
                    if current != inventory {
                        tracing::info!("inventory changed; sending it again");
                        inventory = current;
                        if tx.send(self.hello(&inventory)).await.is_err() {
                            return SessionEnd::Lost("stream closed".into());
                        }
                    }
                }
                _ = ticker.tick() => {
                    seq += 1;
                    let health = self.collector.lock().map(|mut c| c.collect(offset_ms)).ok();
                    let wall = now_unix_ms();
                    sent.push_back((seq, Instant::now(), wall));
                    if sent.len() > 64 {
                        sent.pop_front();
                    }
                    let hb = pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, sent_unix_ms: wall, health })),
                    };
                    if tx.send(hb).await.is_err() {
                        return SessionEnd::Lost("stream closed".into());
                    }
                }
                () = tokio::time::sleep_until(renew_deadline) => {
                    match self.renew(channel.clone(), ident).await {
                        Ok(()) => return SessionEnd::Renewed,
                        Err(CallError::Revoked(m)) => return SessionEnd::Revoked(m),
                        Err(e) => {
                            let delay = renew_backoff.next_delay().max(Duration::from_secs(1));
                            tracing::warn!(error = %e, retry_in = ?delay, "certificate renewal failed");
                            renew_deadline = tokio::time::Instant::now() + delay;
                        }
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(report) = self.handle(m, &mut sent, &mut offset_ms, ident) {
                            let hostname_changed = report.resources.iter().any(|r| r.resource == "hostname" && r.outcome == "applied");
                            let msg = pb::AgentMessage { msg: Some(pb::agent_message::Msg::ConfigStatus(report)) };
                            if tx.send(msg).await.is_err() {
                                return SessionEnd::Lost("stream closed".into());
                            }
                            if hostname_changed {
                                // The controller shows the node's new name at once.
                                inventory = crate::inventory::collect(&self.cfg.hints);
                                if tx.send(self.hello(&inventory)).await.is_err() {
                                    return SessionEnd::Lost("stream closed".into());
                                }
                            }
                        }
                    }
                    Ok(None) => return SessionEnd::Lost("the controller closed the stream".into()),
                    Err(s) => return match classify(&s) {
                        CallError::Revoked(m) => SessionEnd::Revoked(m),
                        other => SessionEnd::Lost(other.to_string()),
                    },
                },
            }
        }
    }

    fn handle(
        &self,
        m: pb::ControllerMessage,
        sent: &mut VecDeque<(u64, Instant, i64)>,
        offset_ms: &mut i64,
        ident: &mut Identity,
    ) -> Option<pb::ConfigStatus> {
        match m.msg {
            Some(pb::controller_message::Msg::Config(c)) => return Some(self.on_config(c)),
            Some(pb::controller_message::Msg::Welcome(w)) => {
                tracing::debug!(machine = %w.machine_id, "welcome");
            }
            Some(pb::controller_message::Msg::Assignment(a)) => {
                let a = Assignment::from(a);
                if ident.machine.assignment.as_ref() != Some(&a) {
                    tracing::info!(role = %a.role, cluster = %a.cluster, approved = a.approved, "assignment");
                    ident.machine.assignment = Some(a.clone());
                    if let Err(e) = self.state.write_machine(&ident.machine) {
                        tracing::warn!(error = %e, "could not save the assignment");
                    }
                }
                self.status.send_modify(|s| s.assignment = Some(a));
            }
            Some(pb::controller_message::Msg::HeartbeatAck(ack)) => {
                if let Some(pos) = sent.iter().position(|(s, _, _)| *s == ack.seq) {
                    let (_, at, wall) = sent[pos];
                    sent.drain(..=pos);
                    let rtt = at.elapsed();
                    // Our clock at the moment the controller stamped the ack, minus its clock.
                    *offset_ms = wall + i64::try_from(rtt.as_millis() / 2).unwrap_or(0) - ack.server_unix_ms;
                    let off = *offset_ms;
                    self.status.send_modify(|s| {
                        s.last_rtt = Some(rtt);
                        s.heartbeats_acked += 1;
                        s.clock_offset_ms = off;
                    });
                }
            }
            None => {}
        }
        None
    }

    /// Checks the node against the applied config: corrects drift, or with `drift: report`
    /// only reports it. A status goes up only when the set of drifted resources changes.
    fn drift_pass(&self) -> Option<pb::ConfigStatus> {
        let fx = self.effects.as_ref()?;
        let saved = self.generations.current()?;
        if self.status.borrow().config_generation != saved.generation {
            return None;
        }
        let (cfg, _) = muster_proto::config::parse(&saved.yaml).ok()?;
        let report_only = cfg.drift == Some(muster_proto::config::DriftPolicy::Report);
        let mut report = crate::reconcile::reconcile(&cfg, fx.as_ref(), report_only);
        for r in &mut report.resources {
            if r.outcome == crate::reconcile::Outcome::Applied {
                r.outcome = crate::reconcile::Outcome::Corrected;
            }
        }
        let off: Vec<(String, String)> = report
            .resources
            .iter()
            .filter(|r| {
                !matches!(
                    r.outcome,
                    crate::reconcile::Outcome::Unchanged | crate::reconcile::Outcome::Skipped(_)
                )
            })
            .map(|r| (r.resource.clone(), format!("{:?}", r.outcome)))
            .collect();
        {
            let mut last = self.last_drift.lock().ok()?;
            if *last == off {
                return None;
            }
            *last = off.clone();
        }
        if !off.is_empty() {
            tracing::warn!(drifted = ?off.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), report_only, "the node drifted from its config");
        }
        Some(self.status_of(saved.generation, report))
    }

    fn status_of(&self, generation: u64, report: crate::reconcile::Report) -> pb::ConfigStatus {
        let applied = !report.failed()
            && !report.resources.iter().any(|r| r.outcome == crate::reconcile::Outcome::Drifted);
        let trying = self.generations.pending_try().is_some_and(|t| t.generation == generation);
        pb::ConfigStatus {
            generation,
            applied,
            state: match (trying, applied) {
                (true, _) => "trying",
                (false, true) => "applied",
                (false, false) => "failed",
            }
            .into(),
            current_generation: generation,
            resources: report
                .resources
                .into_iter()
                .map(|r| {
                    let (outcome, detail) = match r.outcome {
                        crate::reconcile::Outcome::Unchanged => ("unchanged", String::new()),
                        crate::reconcile::Outcome::Applied => ("applied", String::new()),
                        crate::reconcile::Outcome::Drifted => ("drifted", String::new()),
                        crate::reconcile::Outcome::Corrected => ("corrected", String::new()),
                        crate::reconcile::Outcome::Skipped(why) => ("skipped", why),
                        crate::reconcile::Outcome::Failed(e) => ("failed", e),
                    };
                    pb::ResourceStatus { resource: r.resource, outcome: outcome.into(), detail }
                })
                .collect(),
            error: String::new(),
        }
    }

    /// A generation from the controller, by its mode.
    fn on_config(&self, c: pb::ConfigUpdate) -> pb::ConfigStatus {
        let mode = pb::ApplyMode::try_from(c.mode).unwrap_or(pb::ApplyMode::Auto);
        let current = self.generations.current();
        let running = current.as_ref().map_or(0, |s| s.generation);
        let reverted = current.as_ref().map_or(0, |s| s.reverted_generation);
        let new = SavedConfig { generation: c.generation, yaml: c.yaml, reverted_generation: reverted };
        if let Err(e) = muster_proto::config::parse(&new.yaml) {
            // Nothing is applied or saved; the node keeps what it runs.
            tracing::warn!(generation = c.generation, error = %e, "invalid config not applied");
            return pb::ConfigStatus {
                generation: c.generation,
                applied: false,
                resources: Vec::new(),
                error: format!("invalid config: {e}"),
                state: "failed".into(),
                current_generation: running,
            };
        }
        match mode {
            pb::ApplyMode::Try => {
                if c.generation == reverted {
                    // Tried and reverted already: not again (apply a new generation to retry).
                    return pb::ConfigStatus {
                        generation: c.generation,
                        applied: false,
                        resources: Vec::new(),
                        error: format!(
                            "reverted earlier (not confirmed in time); running generation {running}"
                        ),
                        state: "reverted".into(),
                        current_generation: running,
                    };
                }
                let pending = self.generations.pending_try().filter(|t| t.generation == c.generation);
                if pending.is_some() || running == c.generation {
                    if c.confirmed && pending.is_some() {
                        tracing::info!(generation = c.generation, "try confirmed");
                        if let Err(e) = self.generations.clear_try() {
                            tracing::warn!(error = %e, "could not clear the try");
                        }
                        self.try_changed.notify_one();
                    }
                    return self.apply_config(&new);
                }
                if c.confirmed {
                    // Confirmed before this agent ever tried it (it was away): keep it.
                    return self.apply_and_save(&new, "applied");
                }
                let timeout_ms = if c.try_timeout_ms == 0 { 60_000 } else { c.try_timeout_ms };
                let t = PendingTry {
                    generation: c.generation,
                    deadline_unix_ms: now_unix_ms() + i64::try_from(timeout_ms).unwrap_or(i64::MAX),
                    timeout_ms,
                    previous: current.filter(|s| s.generation > 0),
                };
                if let Err(e) = self.generations.set_pending_try(&t) {
                    tracing::warn!(error = %e, "could not save the try; applying it would risk no revert");
                    return pb::ConfigStatus {
                        generation: c.generation,
                        applied: false,
                        resources: Vec::new(),
                        error: format!("cannot save the try state: {e}"),
                        state: "failed".into(),
                        current_generation: running,
                    };
                }
                tracing::info!(
                    generation = c.generation,
                    timeout_ms,
                    "trying a config: reverts unless confirmed"
                );
                self.try_changed.notify_one();
                self.apply_and_save(&new, "trying")
            }
            pb::ApplyMode::Staged if running != c.generation => {
                let st = StagedConfig {
                    generation: c.generation,
                    yaml: new.yaml,
                    boot_id: boot_id(&self.cfg.boot_id_file),
                };
                let (state, error) = match self.generations.set_staged(&st) {
                    Ok(()) => {
                        tracing::info!(generation = c.generation, "config staged for the next boot");
                        ("staged", String::new())
                    }
                    Err(e) => ("failed", format!("cannot stage: {e}")),
                };
                pb::ConfigStatus {
                    generation: c.generation,
                    applied: false,
                    resources: Vec::new(),
                    error,
                    state: state.into(),
                    current_generation: running,
                }
            }
            _ => {
                // Auto (or a staged generation this boot already runs): now. A newer generation
                // ends any try or staging that came before it.
                if self.generations.pending_try().is_some_and(|t| t.generation < c.generation) {
                    if let Err(e) = self.generations.clear_try() {
                        tracing::warn!(error = %e, "could not clear the try");
                    }
                    self.try_changed.notify_one();
                }
                if self.generations.staged().is_some_and(|s| s.generation <= c.generation) {
                    if let Err(e) = self.generations.clear_staged() {
                        tracing::warn!(error = %e, "could not clear the staged config");
                    }
                }
                self.apply_and_save(&new, "applied")
            }
        }
    }

    /// Saves `saved` as the running generation, then applies it.
    fn apply_and_save(&self, saved: &SavedConfig, state: &str) -> pb::ConfigStatus {
        if let Err(e) = self.generations.set_current(saved) {
            tracing::warn!(error = %e, "could not save the config");
        }
        let mut st = self.apply_config(saved);
        if st.error.is_empty() && state == "trying" {
            st.state = state.into();
        }
        st
    }

    /// Validates and applies one generation through the effects; the report for the controller.
    fn apply_config(&self, saved: &SavedConfig) -> pb::ConfigStatus {
        let fail = |error: String| {
            tracing::warn!(generation = saved.generation, %error, "config not applied");
            pb::ConfigStatus {
                generation: saved.generation,
                applied: false,
                resources: Vec::new(),
                error,
                state: "failed".into(),
                current_generation: self.status.borrow().config_generation,
            }
        };
        let cfg = match muster_proto::config::parse(&saved.yaml) {
            Ok((cfg, _)) => cfg,
            Err(e) => return fail(format!("invalid config: {e}")),
        };
        let Some(fx) = &self.effects else {
            return fail("this agent does not apply configs (started with --no-apply-config)".into());
        };
        // A new generation is applied whatever its drift policy; `drift: report` governs the
        // periodic drift passes, not this.
        let report = crate::reconcile::reconcile(&cfg, fx.as_ref(), false);
        let applied = !report.failed();
        if applied {
            self.status.send_modify(|s| s.config_generation = saved.generation);
        }
        if let Ok(mut d) = self.last_drift.lock() {
            d.clear();
        }
        if let (Some(h), Ok(mut slot)) = (&cfg.hostname, self.config_hostname.lock()) {
            *slot = Some(h.clone());
        }
        tracing::info!(generation = saved.generation, writes = report.writes, applied, "config reconciled");
        self.status_of(saved.generation, report)
    }

    fn hello(&self, inventory: &pb::Inventory) -> pb::AgentMessage {
        let mut inventory = inventory.clone();
        if let Some(h) = self.config_hostname.lock().ok().and_then(|h| h.clone()) {
            inventory.hostname = h;
        }
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                inventory: Some(inventory),
                heartbeat_interval_ms: u32::try_from(self.cfg.heartbeat.as_millis()).unwrap_or(u32::MAX),
                metrics_port: u32::from(self.metrics_port),
            })),
        }
    }

    /// Renews the certificate with a new CSR for the same key.
    async fn renew(&self, channel: tonic::transport::Channel, ident: &mut Identity) -> Result<(), CallError> {
        let key = rcgen::KeyPair::from_pem(&ident.key_pem).map_err(|e| CallError::Final(e.to_string()))?;
        let csr = client::csr_pem(&key).map_err(|e| CallError::Final(e.to_string()))?;
        let r = client::renew(channel, &csr).await?;
        self.state.write_cert(&r.certificate_pem).map_err(|e| CallError::Retry(e.to_string()))?;
        ident.cert_pem = r.certificate_pem;
        let na = validity(&ident.cert_pem).map_or(0, |v| v.1);
        self.status.send_modify(|s| s.cert_not_after = na);
        tracing::info!("certificate renewed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_seventy_percent_never_in_the_past() {
        assert_eq!(renew_at(0, 1000, 0), 700);
        assert_eq!(renew_at(1000, 87_400, 1000), 1000 + 86_400 * 7 / 10);
        assert_eq!(renew_at(0, 1000, 900), 901, "overdue: renew now");
        assert_eq!(renew_at(0, 0, 50), 51, "no lifetime: renew now");
    }

    #[test]
    fn renewal_jitter_only_moves_it_a_little_earlier() {
        assert_eq!(renew_at_jittered(0, 1000, 0, 1.0), 650);
        assert_eq!(renew_at_jittered(0, 1000, 0, 0.5), 675);
        assert_eq!(renew_at_jittered(0, 1000, 0, 7.0), 650, "clamped");
        assert_eq!(renew_at_jittered(0, 1000, 0, -1.0), 700, "clamped");
        assert_eq!(renew_at_jittered(0, 1000, 680, 1.0), 681, "never in the past");
        for _ in 0..100 {
            let at = renew_at_jittered(0, 86_400, 0, crate::backoff::random_fraction());
            assert!((86_400 * 65 / 100..=86_400 * 7 / 10).contains(&at), "{at}");
        }
    }
}
