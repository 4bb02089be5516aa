//! The agent-facing service: enrollment, certificate renewal and the long-lived stream. Thin:
//! the caller's certificate kind and the request's shape are checked here; the fleet decides.

use std::pin::Pin;

use futures::Stream;
use muster_machinery::token::JoinToken;
use muster_proto::pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{auth, ApiError};
use crate::fleet::rollout::Report;
use crate::fleet::Controller;
use crate::store::ResourceRecord;

pub struct AgentApi {
    c: Controller,
}

impl AgentApi {
    pub fn new(c: Controller) -> Self {
        Self { c }
    }
}

type ControllerStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

/// A generation report from the wire.
fn report(s: pb::ConfigStatus) -> Result<Report, ApiError> {
    Ok(Report {
        generation: s.generation,
        state: muster_proto::convert::generation_state(s.state)?,
        reconnected: s.reconnected,
        current_generation: s.current_generation,
        error: s.error,
        resources: s
            .resources
            .into_iter()
            .map(|r| {
                Ok(ResourceRecord {
                    resource: r.resource,
                    outcome: muster_proto::convert::outcome(r.outcome)?,
                    detail: r.detail,
                })
            })
            .collect::<Result<_, ApiError>>()?,
    })
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        let token = JoinToken::parse(&req.token).map_err(|e| ApiError::malformed("token", e.to_string()))?;
        let e = self.c.enroll(&token, &req.csr_pem, req.inventory.unwrap_or_default(), peer).await?;
        Ok(Response::new(pb::EnrollResponse {
            machine_id: e.machine.id.to_string(),
            certificate_pem: e.cert.pem,
            ca_certificate_pem: self.c.pki().ca_pem.clone(),
            state: pb::MachineState::from(e.state).into(),
        }))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let id = auth::require_machine(&req)?;
        let cert = self.c.renew(&id, &req.get_ref().csr_pem).await?;
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
        let peer_ip = req.remote_addr().map(|a| a.ip());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let opened = self.c.open_session(&id, tx.clone(), peer_ip)?;
        let c = self.c.clone();
        tokio::spawn(async move {
            use pb::agent_message::Msg;
            loop {
                let msg = tokio::select! {
                    () = opened.cancel.cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(pb::AgentMessage { msg: Some(Msg::Heartbeat(hb)) })) => {
                        c.on_heartbeat(&id, hb.health.map(Into::into));
                        let ack = pb::ControllerMessage {
                            msg: Some(pb::controller_message::Msg::HeartbeatAck(pb::HeartbeatAck {
                                seq: hb.seq,
                                server_unix_ms: muster_util::now_ms(),
                            })),
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(pb::AgentMessage { msg: Some(Msg::Hello(hello)) })) => {
                        c.on_hello(&id, hello).await
                    }
                    Ok(Some(pb::AgentMessage { msg: Some(Msg::ConfigStatus(st)) })) => {
                        c.on_heartbeat(&id, None);
                        match report(st) {
                            Ok(r) => c.record_config_status(&id, r).await,
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                break;
                            }
                        }
                    }
                    Ok(Some(pb::AgentMessage { msg: Some(Msg::InstallStatus(st)) })) => {
                        c.on_heartbeat(&id, None);
                        if let Err(e) = c.on_install_status(&id, st).await {
                            tracing::warn!(machine = %id, error = %e, "install status refused");
                        }
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
            c.close_stream(&id, opened.conn_id);
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}
