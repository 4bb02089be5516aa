//! The agent-facing service: enrollment, certificate renewal and the long-lived stream.

use std::pin::Pin;
use std::time::SystemTime;

use futures::Stream;
use muster_proto::model::{MachineId, Role, State};
use muster_proto::pb;
use muster_proto::token::JoinToken;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::error::ApiError;
use super::{auth, Controller};
use crate::pki::unix_ms;
use crate::store::MachineRecord;

const MAX_STR: usize = 256;
const MAX_ITEMS: usize = 256;
const MIN_HEARTBEAT_MS: u32 = 100;
const MAX_HEARTBEAT_MS: u32 = 600_000;

pub struct AgentApi {
    c: Controller,
}

impl AgentApi {
    pub fn new(c: Controller) -> Self {
        Self { c }
    }
}

fn clip(s: &mut String) {
    if s.len() > MAX_STR {
        let mut end = MAX_STR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Bounds what a node says about itself: it is recorded and shown, never trusted.
fn sanitize(mut inv: pb::Inventory) -> pb::Inventory {
    for s in [
        &mut inv.hostname,
        &mut inv.cpu_model,
        &mut inv.kernel,
        &mut inv.os,
        &mut inv.agent_version,
        &mut inv.arch,
    ] {
        clip(s);
    }
    inv.disks.truncate(MAX_ITEMS);
    for d in &mut inv.disks {
        clip(&mut d.name);
        clip(&mut d.model);
    }
    inv.nics.truncate(MAX_ITEMS);
    for n in &mut inv.nics {
        clip(&mut n.name);
        clip(&mut n.mac);
        n.addresses.truncate(32);
        n.addresses.iter_mut().for_each(clip);
    }
    if let Some(s) = &mut inv.smbios {
        for f in [&mut s.uuid, &mut s.serial, &mut s.vendor, &mut s.product] {
            clip(f);
        }
    }
    inv
}

/// Bounds a health snapshot's lists and strings.
fn sanitize_health(mut h: pb::HealthSnapshot) -> pb::HealthSnapshot {
    h.filesystems.truncate(MAX_ITEMS);
    for f in &mut h.filesystems {
        clip(&mut f.mount_point);
        clip(&mut f.device);
        clip(&mut f.fs_type);
    }
    h.networks.truncate(MAX_ITEMS);
    h.networks.iter_mut().for_each(|n| clip(&mut n.interface));
    h.temperatures.truncate(MAX_ITEMS);
    h.temperatures.iter_mut().for_each(|t| clip(&mut t.sensor));
    h.services.truncate(MAX_ITEMS);
    for s in &mut h.services {
        clip(&mut s.name);
        clip(&mut s.detail);
    }
    h
}

/// Checks the machine behind a certificate may still talk to us.
fn admitted(c: &Controller, id: &MachineId) -> Result<MachineRecord, ApiError> {
    match c.machine(id) {
        None => Err(ApiError::PermissionDenied(format!(
            "machine {id} was deleted; enroll again with a new join token"
        ))),
        Some(m) if m.revoked => Err(ApiError::PermissionDenied(format!(
            "machine {id} was revoked; enroll again with a new join token"
        ))),
        Some(m) => Ok(m),
    }
}

type ControllerStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let req = req.into_inner();
        let token = JoinToken::parse(&req.token).map_err(|e| ApiError::invalid("token", e.to_string()))?;
        if req.csr_pem.is_empty() {
            return Err(ApiError::invalid("csr_pem", "a certificate signing request is required").into());
        }
        let inventory = sanitize(req.inventory.unwrap_or_default());
        let id = MachineId::from_random(self.c.random_bytes()?);
        let now = SystemTime::now();
        // Sign before touching the token, so a bad CSR never uses one up.
        let cert = match self.c.pki().sign_machine(&req.csr_pem, &id, now, self.c.inner.opts.machine_cert_ttl)
        {
            Ok(c) => c,
            Err(e) => {
                self.c.metrics().enrollment("rejected_csr");
                return Err(ApiError::from(e).into());
            }
        };
        let now_ms = unix_ms(now);
        let record = {
            let id = id.clone();
            let cert = cert.clone();
            let hostname = inventory.hostname.clone();
            move |t: &crate::store::TokenRecord, regs: &mut [crate::store::Registration]| {
                let mut m = MachineRecord {
                    id,
                    hostname,
                    // A boot token is public: its machines wait for an operator.
                    approved: t.auto_accept && !t.boot,
                    revoked: false,
                    role: Role::None,
                    cluster: String::new(),
                    labels: t.labels.clone(),
                    inventory,
                    enrolled_ms: now_ms,
                    last_seen_ms: now_ms,
                    heartbeat_ms: 0,
                    token_id: t.id.clone(),
                    cert_serial: cert.serial_hex.clone(),
                    cert_not_after_ms: unix_ms(cert.not_after),
                    config: Default::default(),
                    flag: String::new(),
                };
                super::registration::claim(&mut m, regs, now_ms);
                m
            }
        };
        let m = match self.c.enroll_machine(&token, now_ms, Box::new(record)).await {
            Ok(m) => m,
            Err(e) => {
                let result =
                    if matches!(e, crate::store::StoreError::Token(_)) { "rejected_token" } else { "error" };
                self.c.metrics().enrollment(result);
                tracing::info!(token = token.id(), error = %e, "enrollment refused");
                return Err(ApiError::from(e).into());
            }
        };
        if let Some(layer) = m.config.layer.clone() {
            // A registered machine's config: its first generation, sent when it connects.
            if let Err(e) = self
                .c
                .apply_layer(
                    crate::server::config::Scope::Machine(m.id.clone()),
                    layer,
                    false,
                    "registration".into(),
                    Some(crate::server::config::Mode::Auto),
                    0,
                )
                .await
            {
                tracing::warn!(machine = %m.id, error = %e, "the registered config was not applied");
            }
        }
        let state = if m.approved { State::Ready } else { State::Pending };
        self.c.metrics().enrollment(if m.approved { "accepted" } else { "pending" });
        tracing::info!(machine = %m.id, hostname = %m.hostname, token = token.id(), %state, "machine enrolled");
        Ok(Response::new(pb::EnrollResponse {
            machine_id: m.id.to_string(),
            certificate_pem: cert.pem,
            ca_certificate_pem: self.c.pki().ca_pem.clone(),
            state: pb::MachineState::from(state).into(),
        }))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let id = auth::require_machine(&req)?;
        admitted(&self.c, &id)?;
        let now = SystemTime::now();
        let cert = self
            .c
            .pki()
            .sign_machine(&req.get_ref().csr_pem, &id, now, self.c.inner.opts.machine_cert_ttl)
            .map_err(ApiError::from)?;
        let (serial, not_after) = (cert.serial_hex.clone(), unix_ms(cert.not_after));
        self.c
            .update_machine(
                &id,
                Box::new(move |m| {
                    if m.revoked {
                        return Err(crate::store::StoreError::Conflict("machine was revoked".into()));
                    }
                    m.cert_serial = serial;
                    m.cert_not_after_ms = not_after;
                    Ok(())
                }),
            )
            .await
            .map_err(ApiError::from)?;
        tracing::info!(machine = %id, "certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert.pem,
            ca_certificate_pem: self.c.pki().ca_pem.clone(),
        }))
    }

    type ConnectStream = ControllerStream;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let id = auth::require_machine(&req)?;
        let m = admitted(&self.c, &id)?;
        let peer_ip = req.remote_addr().map(|a| a.ip());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (conn_id, cancel) = self
            .c
            .register(&id, tx.clone(), peer_ip)
            .ok_or_else(|| ApiError::PermissionDenied(format!("machine {id} was deleted")))?;
        self.c.touch(&id, |_| {});
        let state = if m.approved { State::Ready } else { State::Pending };
        let welcome = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Welcome(pb::Welcome {
                machine_id: id.to_string(),
                state: pb::MachineState::from(state).into(),
            })),
        };
        // The channel is new and empty: these cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));
        let _ = tx.try_send(Ok(Controller::assignment_msg(&m)));
        if let Some(cfg) = Controller::config_msg(&m) {
            let _ = tx.try_send(Ok(cfg));
        }
        tracing::info!(machine = %id, conn = conn_id, "agent connected");

        let c = self.c.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = cancel.cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(hb)) })) => {
                        c.touch(&id, |l| {
                            if let Some(h) = hb.health {
                                l.health = Some(sanitize_health(h));
                            }
                        });
                        let ack = pb::ControllerMessage {
                            msg: Some(pb::controller_message::Msg::HeartbeatAck(pb::HeartbeatAck {
                                seq: hb.seq,
                                server_unix_ms: unix_ms(SystemTime::now()),
                            })),
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) })) => {
                        let hb = hello.heartbeat_interval_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS);
                        let port = u16::try_from(hello.metrics_port).unwrap_or(0);
                        c.touch(&id, |l| {
                            l.heartbeat_ms = hb;
                            l.metrics_port = port;
                        });
                        let inv = sanitize(hello.inventory.unwrap_or_default());
                        let r = c
                            .update_machine(
                                &id,
                                Box::new(move |m| {
                                    m.heartbeat_ms = hb;
                                    if !inv.hostname.is_empty() {
                                        m.hostname = inv.hostname.clone();
                                    }
                                    m.inventory = inv;
                                    Ok(())
                                }),
                            )
                            .await;
                        if let Err(e) = r {
                            tracing::warn!(machine = %id, error = %e, "could not record inventory");
                        }
                    }
                    Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::ConfigStatus(st)) })) => {
                        c.touch(&id, |_| {});
                        c.record_config_status(&id, st).await;
                    }
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("msg: empty agent message"))).await;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(machine = %id, error = %e, "agent stream error");
                        break;
                    }
                }
            }
            c.unregister(&id, conn_id);
            tracing::info!(machine = %id, conn = conn_id, "agent disconnected");
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_bounds_everything() {
        let inv = pb::Inventory {
            hostname: "é".repeat(400),
            nics: vec![pb::Nic { name: "x".repeat(1000), ..Default::default() }; 1000],
            ..Default::default()
        };
        let s = sanitize(inv);
        assert!(s.hostname.len() <= MAX_STR);
        assert_eq!(s.nics.len(), MAX_ITEMS);
        assert!(s.nics.iter().all(|n| n.name.len() == MAX_STR));
    }
}
