//! The operator-facing service used by the `muster` CLI. Every call needs an admin certificate.

use std::time::{Duration, SystemTime};

use muster_proto::model::{validate_cluster_name, validate_label, Role};
use muster_proto::pb;
use muster_proto::token::{self, JoinToken};
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::{auth, role_arg, Controller};
use crate::pki::unix_ms;
use crate::store::{MachineRecord, StoreError, TokenRecord};

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Boot tokens live in boot scripts for a while and serve many machines.
const DEFAULT_BOOT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_BOOT_TOKEN_USES: u32 = 1000;
const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
const MAX_TOKEN_USES: u32 = 1_000_000;
const MAX_LABELS: usize = 64;

pub struct AdminApi {
    c: Controller,
}

impl AdminApi {
    pub fn new(c: Controller) -> Self {
        Self { c }
    }
}

fn token_view(t: &TokenRecord) -> pb::Token {
    pb::Token {
        id: t.id.clone(),
        created_unix_ms: t.created_ms,
        expires_unix_ms: t.expires_ms,
        uses_total: t.uses_total,
        uses_left: t.uses_left,
        labels: t.labels.clone().into_iter().collect(),
        auto_accept: t.auto_accept,
        revoked: t.revoked,
        description: t.description.clone(),
        boot: t.boot,
    }
}

impl AdminApi {
    fn one(&self, id: &muster_proto::model::MachineId) -> Result<pb::Machine, ApiError> {
        self.c
            .view(Some(std::slice::from_ref(id)))
            .pop()
            .ok_or_else(|| ApiError::NotFound(format!("machine {id} not found")))
    }
}

/// Turns a store rejection from inside an update closure back into the API error it was.
fn precondition(msg: String) -> StoreError {
    StoreError::Conflict(msg)
}

fn map_update(e: StoreError, code: fn(String) -> ApiError) -> ApiError {
    match e {
        StoreError::Conflict(msg) => code(msg),
        other => ApiError::Store(other),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let ttl = if r.ttl_ms == 0 { DEFAULT_TOKEN_TTL } else { Duration::from_millis(r.ttl_ms) };
        if ttl > MAX_TOKEN_TTL {
            return Err(ApiError::invalid("ttl", "at most 366 days").into());
        }
        let ttl = if r.boot && r.ttl_ms == 0 { DEFAULT_BOOT_TOKEN_TTL } else { ttl };
        let uses = match (r.uses, r.boot) {
            (0, true) => DEFAULT_BOOT_TOKEN_USES,
            (0, false) => 1,
            (n, _) => n,
        };
        if uses > MAX_TOKEN_USES {
            return Err(ApiError::invalid("uses", format!("at most {MAX_TOKEN_USES}")).into());
        }
        if r.labels.len() > MAX_LABELS {
            return Err(ApiError::invalid("labels", format!("at most {MAX_LABELS}")).into());
        }
        for (k, v) in &r.labels {
            validate_label(k, v).map_err(|e| ApiError::invalid("labels", e.to_string()))?;
        }
        if r.description.len() > 256 {
            return Err(ApiError::invalid("description", "at most 256 bytes").into());
        }
        let bytes: [u8; token::ID_LEN + token::SECRET_LEN] = self.c.random_bytes()?;
        let tok =
            JoinToken::from_random(&bytes).ok_or_else(|| ApiError::Internal("token generation".into()))?;
        let now = unix_ms(SystemTime::now());
        let record = TokenRecord {
            id: tok.id().to_owned(),
            digest: tok.digest().to_vec(),
            created_ms: now,
            expires_ms: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            uses_total: uses,
            uses_left: uses,
            labels: r.labels.into_iter().collect(),
            auto_accept: !r.pending && !r.boot,
            revoked: false,
            description: r.description,
            boot: r.boot,
        };
        self.c.store().insert_token(record.clone()).await.map_err(ApiError::from)?;
        tracing::info!(token = %record.id, uses, ?ttl, by = %admin, "join token created");
        Ok(Response::new(pb::CreateTokenResponse { token: tok.to_string(), info: Some(token_view(&record)) }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        auth::require_admin(&req)?;
        let tokens = self.c.store().list_tokens().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListTokensResponse { tokens: tokens.iter().map(token_view).collect() }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let admin = auth::require_admin(&req)?;
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "a token id is required").into());
        }
        let t = self
            .c
            .store()
            .update_token(
                &id,
                Box::new(|t| {
                    if t.revoked {
                        return Err(precondition(format!("token {} is already revoked", t.id)));
                    }
                    t.revoked = true;
                    Ok(())
                }),
            )
            .await
            .map_err(|e| map_update(e, ApiError::AlreadyExists))?;
        tracing::info!(token = %t.id, by = %admin, "join token revoked");
        Ok(Response::new(token_view(&t)))
    }

    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        auth::require_admin(&req)?;
        Ok(Response::new(pb::ListMachinesResponse { machines: self.c.view(None) }))
    }

    async fn get_machine(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        Ok(Response::new(self.one(&m.id)?))
    }

    async fn assign(&self, req: Request<pb::AssignRequest>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let role = role_arg(r.role)?;
        if role == Role::None {
            return Err(ApiError::invalid("role", "required: controlplane or worker").into());
        }
        validate_cluster_name(&r.cluster).map_err(|e| ApiError::invalid("cluster", e.to_string()))?;
        let m = self.c.resolve(&r.query)?;
        let (cluster, force) = (r.cluster.clone(), r.force);
        let updated = self
            .c
            .update_machine(
                &m.id,
                Box::new(move |m| {
                    if m.revoked {
                        return Err(precondition(format!("machine {} is revoked", m.id)));
                    }
                    if m.role == role && m.cluster == cluster {
                        return Err(precondition(format!(
                            "machine {} already has role {role} in cluster {cluster}",
                            m.id
                        )));
                    }
                    if m.role != Role::None && !force {
                        return Err(precondition(format!(
                            "machine {} already has role {} in cluster {}; pass --force to reassign it",
                            m.id, m.role, m.cluster
                        )));
                    }
                    m.role = role;
                    m.cluster = cluster;
                    Ok(())
                }),
            )
            .await
            .map_err(|e| map_update(e, ApiError::FailedPrecondition))?;
        self.c.push(&updated.id, Controller::assignment_msg(&updated));
        tracing::info!(machine = %updated.id, %role, cluster = %updated.cluster, by = %admin, "machine assigned");
        // Its cluster's and role's config layers now apply to it.
        self.c.rerender(&updated).await?;
        Ok(Response::new(self.one(&updated.id)?))
    }

    async fn approve(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        let updated = self
            .c
            .update_machine(
                &m.id,
                Box::new(|m| {
                    if m.revoked {
                        return Err(precondition(format!("machine {} is revoked", m.id)));
                    }
                    if m.approved {
                        return Err(precondition(format!("machine {} is already approved", m.id)));
                    }
                    m.approved = true;
                    // The operator looked at it.
                    m.flag.clear();
                    Ok(())
                }),
            )
            .await
            .map_err(|e| map_update(e, ApiError::FailedPrecondition))?;
        self.c.push(&updated.id, Controller::assignment_msg(&updated));
        tracing::info!(machine = %updated.id, by = %admin, "machine approved");
        Ok(Response::new(self.one(&updated.id)?))
    }

    async fn revoke(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        let updated = self
            .c
            .update_machine(
                &m.id,
                Box::new(|m| {
                    if m.revoked {
                        return Err(precondition(format!("machine {} is already revoked", m.id)));
                    }
                    m.revoked = true;
                    Ok(())
                }),
            )
            .await
            .map_err(|e| map_update(e, ApiError::FailedPrecondition))?;
        let closed = self.c.close_session(
            &updated.id,
            Status::permission_denied(format!(
                "machine {} was revoked; enroll again with a new join token",
                updated.id
            )),
        );
        tracing::info!(machine = %updated.id, stream_closed = closed, by = %admin, "machine revoked");
        Ok(Response::new(self.one(&updated.id)?))
    }

    async fn delete(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::DeleteResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        self.c
            .delete_machine(
                &m.id,
                Status::permission_denied(format!(
                    "machine {} was deleted; enroll again with a new join token",
                    m.id
                )),
            )
            .await
            .map_err(ApiError::from)?;
        tracing::info!(machine = %m.id, by = %admin, "machine deleted");
        Ok(Response::new(pb::DeleteResponse { id: m.id.to_string() }))
    }

    async fn apply_config(
        &self,
        req: Request<pb::ApplyConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let dry = r.dry_run;
        let out = self.c.apply_config(r).await?;
        if !dry {
            tracing::info!(machines = out.results.len(), by = %admin, "config applied");
        }
        Ok(Response::new(out))
    }

    async fn get_config(
        &self,
        req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        auth::require_admin(&req)?;
        let r = req.into_inner();
        let m = self.c.resolve(&r.query)?;
        Ok(Response::new(config_response(&m, r.rendered)?))
    }

    async fn register_machine(
        &self,
        req: Request<pb::RegisterMachineRequest>,
    ) -> Result<Response<pb::Registration>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = self.c.register_machine(req.into_inner()).await?;
        tracing::info!(mac = %r.mac, hostname = %r.hostname, by = %admin, "machine registered");
        Ok(Response::new(super::registration::to_pb(&r)))
    }

    async fn list_registrations(
        &self,
        req: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::ListRegistrationsResponse>, Status> {
        auth::require_admin(&req)?;
        let regs = self.c.store().list_registrations().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListRegistrationsResponse {
            registrations: regs.iter().map(super::registration::to_pb).collect(),
        }))
    }

    async fn delete_registration(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let mac = self.c.delete_registration(&req.get_ref().query).await?;
        tracing::info!(%mac, by = %admin, "registration deleted");
        Ok(Response::new(pb::DeleteResponse { id: mac }))
    }

    async fn confirm_config(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.confirm_config(&req.get_ref().query).await?;
        tracing::info!(machine = %m.id, by = %admin, "config confirmed");
        Ok(Response::new(config_response(&m, true)?))
    }

    async fn config_history(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::ConfigHistoryResponse>, Status> {
        auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        Ok(Response::new(pb::ConfigHistoryResponse {
            revisions: m
                .config
                .revisions
                .iter()
                .rev()
                .map(|r| pb::ConfigRevision {
                    generation: r.generation,
                    created_unix_ms: r.created_ms,
                    source: r.source.clone(),
                    yaml: r.rendered.clone(),
                    mode: r.mode.clone(),
                    state: if r.state.is_empty() { "pending".into() } else { r.state.clone() },
                })
                .collect(),
            applied_generation: m.config.applied_generation,
        }))
    }

    async fn rollback_config(
        &self,
        req: Request<pb::RollbackConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let mode = crate::server::config::Mode::parse(&r.mode)?;
        let out = self.c.rollback_config(&r.query, r.to_generation, mode, r.try_timeout_ms).await?;
        tracing::info!(machine = %r.query, by = %admin, "config rolled back");
        Ok(Response::new(out))
    }
}

/// A machine's config as the CLI shows it: its own layer or the rendered YAML, and where the
/// current generation stands.
fn config_response(m: &MachineRecord, rendered: bool) -> Result<pb::GetConfigResponse, ApiError> {
    let yaml = if rendered {
        m.config.rendered.clone()
    } else {
        match &m.config.layer {
            Some(l) => serde_saphyr::to_string(l).map_err(|e| ApiError::Internal(e.to_string()))?,
            None => String::new(),
        }
    };
    Ok(pb::GetConfigResponse {
        machine_id: m.id.to_string(),
        yaml,
        generation: m.config.generation,
        applied_generation: m.config.applied_generation,
        resources: m
            .config
            .resources
            .iter()
            .map(|r| pb::ResourceStatus {
                resource: r.resource.clone(),
                outcome: r.outcome.clone(),
                detail: r.detail.clone(),
            })
            .collect(),
        error: m.config.error.clone(),
        mode: m.config.mode.clone(),
        state: if m.config.state.is_empty() && m.config.generation > 0 {
            "pending".into()
        } else {
            m.config.state.clone()
        },
        confirmed: m.config.confirmed,
        try_deadline_unix_ms: if m.config.state == "trying" && !m.config.confirmed {
            m.config.trying_since_ms + i64::try_from(m.config.try_timeout_ms).unwrap_or(0)
        } else {
            0
        },
    })
}
