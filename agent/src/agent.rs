//! The agent's loop: enroll if there is no identity ([`crate::enroll`]), then keep one stream
//! open ([`crate::session`]), reconnect with full-jitter backoff, and stop for good when
//! revoked. The config rollout ([`crate::rollout`]) runs beside it, connected or not.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::client;
use crate::discovery::DiscoveryError;
use crate::effects::Effects;
use crate::health::{Collector, Sources};
use crate::identity::{Assignment, Identity, StateDir, StateError};
use crate::renewal::validity;
use crate::rollout::Rollout;
use crate::session::SessionEnd;
use crate::settings::AgentConfig;

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
    /// When the current certificate is due for renewal, Unix seconds (0: not scheduled yet).
    pub renew_at: i64,
    /// Config generations received from the controller (each counted once handled).
    pub config_updates: u64,
    /// The generation being tried and not confirmed yet, if any.
    pub trying: Option<u64>,
    /// The running config's `serviceChecks` (checked besides the agent's --service-check ones).
    pub service_checks: Vec<String>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {id} was revoked by the controller ({reason}); restart the agent with a new join token to enroll again")]
    Revoked { id: String, reason: String },
    #[error(
        "no identity in {0} and no join token: pass --token, or set muster.token= on the kernel command line, opt/muster/token in QEMU's fw_cfg or MUSTER_TOKEN= in /etc/muster/agent.env"
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

impl AgentError {
    /// The agent's settings are missing or wrong: restarting it changes nothing until they are
    /// fixed (exit status 2, which the systemd unit does not restart on).
    pub fn is_settings(&self) -> bool {
        matches!(self, Self::NoToken(_) | Self::NoTrust | Self::CaFile { .. })
    }
}

/// The agent. Build with [`Agent::new`], then [`Agent::run`].
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) state: StateDir,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) collector: Arc<Mutex<Collector>>,
    pub(crate) metrics_port: u16,
    pub(crate) rollout: Rollout,
    pub(crate) installer: crate::install::Installer,
}

pub(crate) type Stop = watch::Receiver<bool>;

pub(crate) async fn stopped(stop: &mut Stop) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Sleeps `d`, or returns false early when asked to stop.
pub(crate) async fn sleep_or_stop(d: Duration, stop: &mut Stop) -> bool {
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
        let rollout = Rollout::new(None, &cfg.state_dir, cfg.boot_id_file.clone(), status.clone());
        (
            Self {
                cfg,
                state,
                status,
                collector,
                metrics_port: 0,
                rollout,
                installer: crate::install::Installer::new(None),
            },
            rx,
        )
    }

    /// Applies configs through `effects` (the binary passes the real Linux implementation).
    /// Without, configs are recorded and reported, never applied.
    pub fn with_effects(mut self, effects: Arc<dyn Effects>) -> Self {
        self.rollout = Rollout::new(
            Some(effects),
            &self.cfg.state_dir,
            self.cfg.boot_id_file.clone(),
            self.status.clone(),
        );
        self
    }

    /// Installs to and resets local disks when the controller says so (the binary passes the
    /// real disks when it owns its node). Without, such requests are refused.
    pub fn with_disks(mut self, disks: crate::effects::LinuxDisks) -> Self {
        self.installer = crate::install::Installer::new(Some(disks));
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
        let mut ident = match crate::enroll::usable_identity(&self.cfg, &self.state)? {
            Some(i) => i,
            None => match crate::enroll::enroll(&self.cfg, &self.state, &mut stop).await? {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        self.status.send_modify(|s| {
            s.machine_id = Some(ident.machine.machine_id.clone());
            s.assignment = ident.machine.assignment.clone();
            s.cert_not_after = validity(&ident.cert_pem).map_or(0, |v| v.1);
        });
        tracing::info!(
            machine = %ident.machine.machine_id,
            controller = %self.cfg.controller,
            "identity ready: machine {}, controller {}",
            ident.machine.machine_id,
            self.cfg.controller
        );
        self.rollout.converge_at_start();
        tokio::select! {
            r = self.connect_loop(&mut ident, &mut stop) => r,
            () = self.rollout.watch_tries() => Ok(()),
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
                    // A reset ends with the controller forgetting the machine: the reset's own
                    // thread reboots the node, and must not be cut short by this exit.
                    self.installer.forgotten();
                    self.installer.wait_idle().await;
                    let id = ident.machine.machine_id.clone();
                    tracing::error!(%reason, "machine {id} was revoked by the controller; restart with a new join token to enroll again");
                    self.state.wipe()?;
                    return Err(AgentError::Revoked { id, reason });
                }
                SessionEnd::Renewed | SessionEnd::Reconnect => {
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
}
