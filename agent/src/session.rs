//! One stream to the controller, until it ends: hello with the inventory, heartbeats with a
//! health snapshot (and their acks for RTT and clock offset), assignments and config generations
//! down, generation reports up, the inventory again when it changes, drift passes, and the
//! certificate renewal when it is due.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::{stopped, Agent, Stop};
use crate::backoff::Backoff;
use crate::client::{self, classify, CallError};
use crate::identity::{Assignment, Identity};
use crate::renewal::{now_unix_ms, renew_at_jittered, validity};
use crate::rollout::{GenerationReport, Update};

/// How a session ended.
pub(crate) enum SessionEnd {
    Shutdown,
    /// The agent ended it to reconnect at once (proof for a try's automatic confirmation).
    Reconnect,
    Lost(String),
    Revoked(String),
    Renewed,
}

/// How often the agent looks for inventory changes.
const INVENTORY_CHECK: Duration = Duration::from_secs(60);

/// Heartbeats sent and not acknowledged yet: sequence number, when, and our wall clock then.
type InFlight = VecDeque<(u64, Instant, i64)>;

fn lost_or_revoked(s: &tonic::Status) -> SessionEnd {
    match classify(s) {
        CallError::Revoked(m) => SessionEnd::Revoked(m),
        other => SessionEnd::Lost(other.to_string()),
    }
}

/// A report on the wire.
fn to_pb(r: GenerationReport) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::ConfigStatus(pb::ConfigStatus {
            generation: r.generation,
            resources: r
                .resources
                .into_iter()
                .map(|r| pb::ResourceStatus {
                    resource: r.resource,
                    outcome: pb::Outcome::from(r.outcome).into(),
                    detail: r.detail,
                })
                .collect(),
            error: r.error,
            state: pb::GenerationState::from(r.state).into(),
            current_generation: r.current_generation,
            reconnected: r.reconnected,
        })),
    }
}

/// A generation from the wire. A mode this agent does not know is an error (reported as a
/// failed generation), never a guess.
fn update_of(c: pb::ConfigUpdate) -> Result<Update, muster_proto::WireError> {
    Ok(Update {
        generation: c.generation,
        yaml: c.yaml,
        mode: muster_proto::convert::apply_mode(c.mode)?,
        try_timeout: (c.try_timeout_ms > 0).then(|| Duration::from_millis(c.try_timeout_ms)),
        confirmed: c.confirmed,
        confirm: muster_proto::convert::confirm_policy(c.confirm)?,
    })
}

impl Agent {
    /// One stream, until it ends.
    pub(crate) async fn session(
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
                Err(s) => return lost_or_revoked(&s),
            };
        self.status.send_modify(|s| s.connected = true);
        tracing::info!("connected to the controller");
        let mut outbox = self.rollout.outbox().await;
        let mut install_outbox = self.installer.outbox().await;
        if let Some(st) = self.installer.unconfirmed() {
            // Sent before any heartbeat of this stream: its acks then prove the controller has it.
            if tx
                .send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::InstallStatus(st)) })
                .await
                .is_err()
            {
                return SessionEnd::Lost("stream closed".into());
            }
        }
        // A try waiting for automatic confirmation: this new connection is the proof.
        if let Some(proof) = self.rollout.proof_of_reach() {
            tracing::info!(
                generation = proof.generation,
                "reconnected while trying a config: asking the controller to confirm it"
            );
            if tx.send(to_pb(proof)).await.is_err() {
                return SessionEnd::Lost("stream closed".into());
            }
        }

        let mut ticker = tokio::time::interval(self.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut sent = InFlight::new();
        let mut offset_ms = 0i64;
        let jitter = crate::backoff::random_fraction();
        let renew_wall =
            validity(&ident.cert_pem).map(|(nb, na)| renew_at_jittered(nb, na, now_unix_ms() / 1000, jitter));
        let mut renew_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let renew_in =
            |wall: i64| Duration::from_secs(u64::try_from(wall - now_unix_ms() / 1000).unwrap_or(0).max(1));
        let mut renew_deadline =
            tokio::time::Instant::now() + renew_wall.map_or(Duration::from_secs(3600), renew_in);
        self.status.send_modify(|s| s.renew_at = renew_wall.unwrap_or(0));
        let mut inventory_check = tokio::time::interval(INVENTORY_CHECK);
        inventory_check.tick().await;
        let mut drift_check = tokio::time::interval(self.cfg.drift_interval);
        drift_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        drift_check.tick().await;
        macro_rules! send {
            ($msg:expr) => {
                if tx.send($msg).await.is_err() {
                    return SessionEnd::Lost("stream closed".into());
                }
            };
        }
        loop {
            tokio::select! {
                () = stopped(stop) => return SessionEnd::Shutdown,
                Some(r) = outbox.recv() => send!(to_pb(r)),
                Some(st) = install_outbox.recv() => send!(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::InstallStatus(st)),
                }),
                _ = drift_check.tick() => {
                    if let Some(r) = self.rollout.drift_pass() {
                        send!(to_pb(r));
                    }
                }
                _ = inventory_check.tick() => {
                    // The full inventory goes up again only when it changed (a disk or NIC came or went).
                    let current = crate::inventory::collect(&self.cfg.hints);
                    if current != inventory {
                        tracing::info!("inventory changed; sending it again");
                        inventory = current;
                        send!(self.hello(&inventory));
                    }
                }
                _ = ticker.tick() => {
                    seq += 1;
                    let checks = self.status.borrow().service_checks.clone();
                    let health = self.collector.lock().map(|mut c| c.collect(offset_ms, &checks).into()).ok();
                    let wall = now_unix_ms();
                    sent.push_back((seq, Instant::now(), wall));
                    if sent.len() > 64 {
                        sent.pop_front();
                    }
                    send!(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, sent_unix_ms: wall, health })),
                    });
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
                            let hostname_changed = report.changed_hostname();
                            // A try just applied that confirms itself: reconnect over it.
                            let reconnect = report.state == muster_machinery::GenerationState::Trying
                                && self.rollout.proof_of_reach().is_some_and(|p| p.generation == report.generation);
                            send!(to_pb(report));
                            if reconnect {
                                tracing::info!("applied a config to try: reconnecting over it to prove the controller is still reachable");
                                return SessionEnd::Reconnect;
                            }
                            if hostname_changed {
                                // The controller shows the node's new name at once.
                                inventory = crate::inventory::collect(&self.cfg.hints);
                                send!(self.hello(&inventory));
                            }
                        }
                    }
                    Ok(None) => return SessionEnd::Lost("the controller closed the stream".into()),
                    Err(s) => return lost_or_revoked(&s),
                },
            }
        }
    }

    fn handle(
        &self,
        m: pb::ControllerMessage,
        sent: &mut InFlight,
        offset_ms: &mut i64,
        ident: &mut Identity,
    ) -> Option<GenerationReport> {
        match m.msg {
            Some(pb::controller_message::Msg::Config(c)) => {
                let generation = c.generation;
                let report = match update_of(c) {
                    Ok(u) => self.rollout.on_update(u),
                    Err(e) => GenerationReport {
                        generation,
                        state: muster_machinery::GenerationState::Failed,
                        current_generation: self.status.borrow().config_generation,
                        error: format!("this agent cannot read the update: {e}"),
                        resources: Vec::new(),
                        reconnected: false,
                    },
                };
                self.status.send_modify(|s| s.config_updates += 1);
                return Some(report);
            }
            Some(pb::controller_message::Msg::Welcome(w)) => {
                tracing::debug!(machine = %w.machine_id, "welcome");
            }
            Some(pb::controller_message::Msg::Assignment(a)) => {
                let a = Assignment::from(a);
                if ident.machine.assignment.as_ref() != Some(&a) {
                    tracing::info!(
                        role = %a.role,
                        cluster = %a.cluster,
                        approved = a.approved,
                        "assignment: role {} in cluster {} (approved: {})",
                        a.role,
                        a.cluster,
                        a.approved
                    );
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
            Some(pb::controller_message::Msg::Install(i)) => {
                let identity = muster_machinery::install::Identity {
                    machine_id: ident.machine.machine_id.clone(),
                    key_pem: ident.key_pem.clone(),
                    cert_pem: ident.cert_pem.clone(),
                    ca_pem: ident.ca_pem.clone(),
                    controller: self.cfg.controller.clone(),
                    ca_hash: self.cfg.ca_pin.as_ref().map(ToString::to_string).unwrap_or_default(),
                };
                self.installer.start_install(i, identity, self.status.subscribe());
            }
            Some(pb::controller_message::Msg::Reset(r)) => {
                self.installer.start_reset(r, self.state.clone(), self.status.subscribe());
            }
            None => {}
        }
        None
    }

    fn hello(&self, inventory: &pb::Inventory) -> pb::AgentMessage {
        let mut inventory = inventory.clone();
        if let Some(h) = self.rollout.hostname() {
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
