//! The fleet's records as the admin API shows them.

use muster_machinery::GenerationState;
use muster_proto::pb;

use crate::fleet::rollout::{Applied, ConfigChange, LayerView};
use crate::fleet::MachineView;
use crate::store::{MachineRecord, Registration, TokenRecord};

use super::ApiError;

pub fn machine(v: &MachineView) -> pb::Machine {
    let m = &v.record;
    let smbios = m.inventory.smbios.clone().unwrap_or_default();
    pb::Machine {
        id: m.id.to_string(),
        hostname: m.hostname.clone(),
        state: pb::MachineState::from(v.state).into(),
        role: pb::Role::from(m.role).into(),
        cluster: m.cluster.clone(),
        uuid: smbios.uuid.to_ascii_lowercase(),
        serial: smbios.serial,
        macs: crate::fleet::macs(m),
        labels: m.labels.clone().into_iter().collect(),
        last_seen_unix_ms: v.last_seen_ms,
        warnings: v.warnings.clone(),
        enrolled_unix_ms: m.enrolled_ms,
        inventory: Some(m.inventory.clone()),
        cert_serial: m.cert_serial.clone(),
        cert_not_after_unix_ms: m.cert_not_after_ms,
        connected: v.connected,
        heartbeat_interval_ms: v.heartbeat_ms,
        token_id: m.token_id.clone(),
        health: v.health.status.to_string(),
        health_reasons: v.health.reasons.clone(),
        health_snapshot: v.snapshot.clone().map(Into::into),
        metrics_endpoint: v.metrics_endpoint.clone().unwrap_or_default(),
        config_generation: m.config.generation,
        config_applied_generation: m.config.applied_generation,
        config_state: pb::GenerationState::from(m.config.state).into(),
        config_failures: m
            .config
            .resources
            .iter()
            .filter(|r| r.outcome == muster_machinery::Outcome::Failed)
            .map(|r| pb::ResourceStatus {
                resource: r.resource.clone(),
                outcome: pb::Outcome::from(r.outcome).into(),
                detail: r.detail.clone(),
            })
            .collect(),
        config_error: m.config.error.clone(),
        install_state: m.install.state.as_str().to_owned(),
        install_image: m.install.image.clone(),
        install_disk: if m.install.device.is_empty() {
            m.install.disk.clone()
        } else {
            m.install.device.clone()
        },
        install_error: m.install.error.clone(),
        install_download_ms: m.install.download_ms,
        install_write_ms: m.install.write_ms,
        install_verify_ms: m.install.verify_ms,
    }
}

pub fn token(t: &TokenRecord) -> pb::Token {
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

pub fn registration(r: &Registration) -> pb::Registration {
    pb::Registration {
        mac: r.mac.clone(),
        uuid: r.uuid.clone(),
        hostname: r.hostname.clone(),
        role: pb::Role::from(r.role).into(),
        cluster: r.cluster.clone(),
        yaml: r.layer.as_ref().and_then(|l| serde_saphyr::to_string(l).ok()).unwrap_or_default(),
        boot_local: r.boot_local,
        created_unix_ms: r.created_ms,
        claimed_by: r.claimed_by.clone(),
        claimed_unix_ms: r.claimed_ms,
    }
}

fn change(c: &ConfigChange) -> pb::MachineConfigResult {
    pb::MachineConfigResult {
        machine_id: c.machine_id.to_string(),
        hostname: c.hostname.clone(),
        generation: c.generation,
        changed: c.changed,
        diff: c.diff.clone(),
        mode: c.mode.map(|m| pb::ApplyMode::from(m).into()),
        try_timeout_ms: c.try_timeout.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

pub fn applied(a: &Applied) -> pb::ApplyConfigResponse {
    pb::ApplyConfigResponse { results: a.results.iter().map(change).collect(), warnings: a.warnings.clone() }
}

/// A machine's config: its own layer or the rendered YAML, and where the current generation
/// stands.
pub fn config(m: &MachineRecord, rendered: bool) -> Result<pb::GetConfigResponse, ApiError> {
    let yaml = if rendered {
        m.config.rendered.clone()
    } else {
        match &m.config.layer {
            Some(l) => serde_saphyr::to_string(l)
                .map_err(|e| crate::fleet::FleetError::Internal(format!("rendering the layer: {e}")))?,
            None => String::new(),
        }
    };
    let trying = m.config.state == GenerationState::Trying && !m.config.confirmed;
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
                outcome: pb::Outcome::from(r.outcome).into(),
                detail: r.detail.clone(),
            })
            .collect(),
        error: m.config.error.clone(),
        mode: pb::ApplyMode::from(m.config.mode).into(),
        state: pb::GenerationState::from(m.config.state).into(),
        confirmed: m.config.confirmed,
        confirm: pb::ConfirmPolicy::from(m.config.confirm).into(),
        try_deadline_unix_ms: if trying {
            m.config.trying_since_ms + i64::try_from(m.config.try_timeout_ms).unwrap_or(0)
        } else {
            0
        },
    })
}

fn yaml_of(v: &serde_json::Value) -> Result<String, ApiError> {
    Ok(serde_saphyr::to_string(v)
        .map_err(|e| crate::fleet::FleetError::Internal(format!("rendering a layer: {e}")))?)
}

pub fn layer(l: &LayerView) -> Result<pb::LayerResponse, ApiError> {
    Ok(pb::LayerResponse {
        key: l.key.clone(),
        yaml: l.value.as_ref().map(yaml_of).transpose()?.unwrap_or_default(),
        revision: l.revision,
        machines: l.machines.iter().map(ToString::to_string).collect(),
        revisions: l
            .history
            .iter()
            .rev()
            .map(|r| {
                Ok(pb::LayerRevision {
                    revision: r.revision,
                    created_unix_ms: r.created_ms,
                    yaml: r.value.as_ref().map(yaml_of).transpose()?.unwrap_or_default(),
                    deleted: r.value.is_none(),
                })
            })
            .collect::<Result<_, ApiError>>()?,
    })
}

pub fn history(m: &MachineRecord) -> pb::ConfigHistoryResponse {
    pb::ConfigHistoryResponse {
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
                mode: pb::ApplyMode::from(r.mode).into(),
                state: pb::GenerationState::from(r.state).into(),
            })
            .collect(),
        applied_generation: m.config.applied_generation,
    }
}
