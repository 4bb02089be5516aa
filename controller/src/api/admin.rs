//! The operator-facing service used by the `muster` CLI. Every call needs an admin certificate.
//! Thin: the caller and the request's shape are checked here, the fleet decides, and every
//! change is logged with who made it.

use std::time::Duration;

use muster_proto::{convert, pb};
use tonic::{Request, Response, Status};

use super::{auth, views, ApiError};
use crate::fleet::registration::NewRegistration;
use crate::fleet::rollout::{Delivery, Scope};
use crate::fleet::tokens::TokenSpec;
use crate::fleet::Controller;

pub struct AdminApi {
    c: Controller,
}

impl AdminApi {
    pub fn new(c: Controller) -> Self {
        Self { c }
    }

    fn machine(&self, id: &muster_machinery::MachineId) -> Result<pb::Machine, ApiError> {
        Ok(views::machine(&self.c.view_one(id)?))
    }

    /// The layer a request names.
    fn scope(&self, scope: i32, target: &str, cluster: &str) -> Result<Scope, ApiError> {
        Ok(match pb::ConfigScope::try_from(scope) {
            Ok(pb::ConfigScope::Machine) => Scope::Machine(self.c.resolve(target)?.id),
            Ok(pb::ConfigScope::Cluster) => Scope::cluster(target)?,
            Ok(pb::ConfigScope::Role) => Scope::role(target, cluster)?,
            Err(_) => return Err(ApiError::malformed("scope", format!("unknown scope {scope}"))),
        })
    }
}

/// ListMachines pages: the default and the largest size.
const DEFAULT_PAGE: usize = 500;
const MAX_PAGE: usize = 1000;

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

/// How a new generation is delivered, from the request's fields.
fn delivery(mode: Option<i32>, try_timeout_ms: u64, confirm: Option<i32>) -> Result<Delivery, ApiError> {
    Ok(Delivery {
        mode: convert::opt_apply_mode(mode)?,
        try_window: ms(try_timeout_ms),
        confirm: confirm.map(convert::confirm_policy).transpose()?.unwrap_or_default(),
    })
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let (tok, record) = self
            .c
            .mint_token(TokenSpec {
                ttl: ms(r.ttl_ms),
                uses: (r.uses > 0).then_some(r.uses),
                labels: r.labels.into_iter().collect(),
                pending: r.pending,
                description: r.description,
                boot: r.boot,
            })
            .await?;
        tracing::info!(token = %record.id, uses = record.uses_total, boot = record.boot, by = %admin, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: tok.to_string(),
            info: Some(views::token(&record)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        auth::require_admin(&req)?;
        let tokens = self.c.list_tokens().await?;
        Ok(Response::new(pb::ListTokensResponse { tokens: tokens.iter().map(views::token).collect() }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let admin = auth::require_admin(&req)?;
        let t = self.c.revoke_token(&req.get_ref().id).await?;
        tracing::info!(token = %t.id, by = %admin, "join token revoked");
        Ok(Response::new(views::token(&t)))
    }

    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        auth::require_admin(&req)?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let after = r.page_token;
        let mut page: Vec<pb::Machine> = self
            .c
            .view(None)
            .iter()
            .filter(|v| after.is_empty() || v.record.id.as_str() > after.as_str())
            .take(size + 1)
            .map(|v| pb::Machine { inventory: None, ..views::machine(v) })
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            page.last().map(|m| m.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListMachinesResponse { machines: page, next_page_token }))
    }

    async fn get_machine(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn assign(&self, req: Request<pb::AssignRequest>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let role = convert::role(r.role).map_err(ApiError::from)?;
        let m = self.c.assign(&r.query, role, &r.cluster, r.force).await?;
        tracing::info!(machine = %m.id, %role, cluster = %m.cluster, by = %admin, "machine assigned");
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn approve(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.approve(&req.get_ref().query).await?;
        tracing::info!(machine = %m.id, by = %admin, "machine approved");
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn revoke(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let (m, closed) = self.c.revoke(&req.get_ref().query).await?;
        tracing::info!(machine = %m.id, stream_closed = closed, by = %admin, "machine revoked");
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn install(&self, req: Request<pb::InstallRequest>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.get_ref();
        let m = self.c.install(&r.query, &r.image, &r.disk).await?;
        tracing::info!(machine = %m.id, image = %m.install.image, disk = %m.install.disk, by = %admin, "install to disk asked for");
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn reset(&self, req: Request<pb::ResetRequest>) -> Result<Response<pb::Machine>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.get_ref();
        let m = self.c.reset(&r.query, r.wipe).await?;
        tracing::info!(machine = %m.id, wipe = r.wipe, by = %admin, "reset asked for");
        Ok(Response::new(self.machine(&m.id)?))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        auth::require_admin(&req)?;
        let images = self
            .c
            .list_images()?
            .into_iter()
            .map(|i| pb::Image {
                name: i.name,
                size: i.size,
                sha256: i.sha256,
                raw_size: i.raw_size,
                raw_sha256: i.raw_sha256,
                added_unix_ms: i.added_ms,
            })
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn delete(&self, req: Request<pb::MachineRef>) -> Result<Response<pb::DeleteResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.delete(&req.get_ref().query).await?;
        tracing::info!(machine = %m.id, by = %admin, "machine deleted");
        Ok(Response::new(pb::DeleteResponse { id: m.id.to_string() }))
    }

    async fn apply_config(
        &self,
        req: Request<pb::ApplyConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let scope = self.scope(r.scope, &r.target, &r.cluster)?;
        let how = delivery(r.mode, r.try_timeout_ms, r.confirm)?;
        let out = self.c.apply_config(scope, &r.yaml, r.dry_run, how, r.allow_empty).await?;
        if !r.dry_run {
            tracing::info!(machines = out.results.len(), by = %admin, "config applied");
        }
        Ok(Response::new(views::applied(&out)))
    }

    async fn get_config(
        &self,
        req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        auth::require_admin(&req)?;
        let r = req.into_inner();
        let m = self.c.resolve(&r.query)?;
        Ok(Response::new(views::config(&m, r.rendered)?))
    }

    async fn config_history(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::ConfigHistoryResponse>, Status> {
        auth::require_admin(&req)?;
        let m = self.c.resolve(&req.get_ref().query)?;
        Ok(Response::new(views::history(&m)))
    }

    async fn rollback_config(
        &self,
        req: Request<pb::RollbackConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let how = delivery(r.mode, r.try_timeout_ms, r.confirm)?;
        let out = self.c.rollback_config(&r.query, r.to_generation, how).await?;
        tracing::info!(machine = %r.query, by = %admin, "config rolled back");
        Ok(Response::new(views::applied(&out)))
    }

    async fn confirm_config(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let m = self.c.confirm_config(&req.get_ref().query).await?;
        tracing::info!(machine = %m.id, by = %admin, "config confirmed");
        Ok(Response::new(views::config(&m, true)?))
    }

    async fn get_layer(&self, req: Request<pb::LayerRef>) -> Result<Response<pb::LayerResponse>, Status> {
        auth::require_admin(&req)?;
        let r = req.into_inner();
        let scope = self.scope(r.scope, &r.target, &r.cluster)?;
        Ok(Response::new(views::layer(&self.c.layer(&scope).await?)?))
    }

    async fn delete_layer(
        &self,
        req: Request<pb::LayerRef>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let admin = auth::require_admin(&req)?;
        let r = req.into_inner();
        let scope = self.scope(r.scope, &r.target, &r.cluster)?;
        let how = delivery(r.mode, r.try_timeout_ms, r.confirm)?;
        let out = self.c.delete_layer(scope, how).await?;
        tracing::info!(target = %r.target, machines = out.results.len(), by = %admin, "config layer deleted");
        Ok(Response::new(views::applied(&out)))
    }

    async fn register_machine(
        &self,
        req: Request<pb::RegisterMachineRequest>,
    ) -> Result<Response<pb::Registration>, Status> {
        let admin = auth::require_admin(&req)?;
        let req = req.into_inner();
        let r = req.registration.ok_or_else(|| ApiError::malformed("registration", "required"))?;
        let new = NewRegistration {
            role: convert::role(r.role).map_err(ApiError::from)?,
            mac: r.mac,
            uuid: r.uuid,
            hostname: r.hostname,
            cluster: r.cluster,
            yaml: r.yaml,
            boot_local: r.boot_local,
        };
        let reg = self.c.register_machine(new, req.force).await?;
        tracing::info!(mac = %reg.mac, hostname = %reg.hostname, by = %admin, "machine registered");
        Ok(Response::new(views::registration(&reg)))
    }

    async fn list_registrations(
        &self,
        req: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::ListRegistrationsResponse>, Status> {
        auth::require_admin(&req)?;
        let regs = self.c.list_registrations().await?;
        Ok(Response::new(pb::ListRegistrationsResponse {
            registrations: regs.iter().map(views::registration).collect(),
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
}
