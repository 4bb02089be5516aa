//! Config layers, rendering and generations. A machine's config is its cluster's layer, then its
//! role's, then its own, merged (RFC 7386) and validated; every change of the rendered YAML is a
//! new generation, kept in the machine's history and pushed down its stream.

use std::time::SystemTime;

use muster_proto::config::{parse_value, render, ConfigError, RenderError};
use muster_proto::model::{validate_cluster_name, MachineId, Role};
use muster_proto::pb;
use serde_json::Value;

use super::error::ApiError;
use super::Controller;
use crate::pki::unix_ms;
use crate::store::{ConfigRevision, MachineRecord, ResourceRecord, MAX_REVISIONS};

/// Which layer a request sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Machine(MachineId),
    Cluster(String),
    Role(Role),
}

impl Scope {
    fn describe(&self) -> String {
        match self {
            Scope::Machine(_) => "machine layer".into(),
            Scope::Cluster(c) => format!("cluster {c}"),
            Scope::Role(r) => format!("role {r}"),
        }
    }
}

/// How a generation reaches the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Applied now.
    Auto,
    /// Applied now; the agent reverts it unless it is confirmed over the stream in time.
    Try,
    /// Applied on the node's next boot.
    Staged,
}

/// Try mode's confirmation timeout when none is given.
pub const DEFAULT_TRY_TIMEOUT_MS: u64 = 60_000;

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Try => "try",
            Mode::Staged => "staged",
        }
    }

    /// `""` is no mode (the default policy decides).
    pub fn parse(s: &str) -> Result<Option<Mode>, ApiError> {
        match s {
            "" => Ok(None),
            "auto" => Ok(Some(Mode::Auto)),
            "try" => Ok(Some(Mode::Try)),
            "staged" => Ok(Some(Mode::Staged)),
            other => {
                Err(ApiError::invalid("mode", format!("unknown mode {other:?}: use auto, try or staged")))
            }
        }
    }

    fn to_pb(self) -> pb::ApplyMode {
        match self {
            Mode::Auto => pb::ApplyMode::Auto,
            Mode::Try => pb::ApplyMode::Try,
            Mode::Staged => pb::ApplyMode::Staged,
        }
    }
}

/// Whether two rendered configs differ in their network section (such changes default to try
/// mode: a wrong address or route can cut the node off).
fn network_changed(old: &str, new: &str) -> bool {
    let network = |yaml: &str| {
        if yaml.trim().is_empty() {
            return None;
        }
        muster_proto::config::parse(yaml).ok().and_then(|(c, _)| c.network)
    };
    network(old) != network(new)
}

/// Try timeouts between 1 s and 1 h.
fn try_timeout(ms: u64) -> Result<u64, ApiError> {
    match ms {
        0 => Ok(DEFAULT_TRY_TIMEOUT_MS),
        1_000..=3_600_000 => Ok(ms),
        _ => Err(ApiError::invalid("timeout", "the try timeout must be between 1s and 1h")),
    }
}

fn layer_key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

fn invalid(errors: Vec<String>) -> ApiError {
    ApiError::invalid("yaml", format!("the config is not valid:\n{}", errors.join("\n")))
}

fn render_errors(prefix: &str, e: &RenderError) -> Vec<String> {
    match &e.source {
        ConfigError::Yaml(m) => vec![format!("{prefix}{m}")],
        ConfigError::Invalid(errs) => errs.iter().map(|f| format!("{prefix}{f}")).collect(),
    }
}

/// A unified diff of two rendered configs.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_name, new_name)
        .to_string()
}

impl Controller {
    /// The shared layers for `m` (its cluster's and role's), with `scope`/`layer` standing in for
    /// the one being changed.
    async fn shared_layers(
        &self,
        m: &MachineRecord,
        change: Option<(&Scope, &Value)>,
    ) -> Result<(Option<Value>, Option<Value>), ApiError> {
        let cluster = match change {
            Some((Scope::Cluster(c), v)) if *c == m.cluster => Some(v.clone()),
            _ if m.cluster.is_empty() => None,
            _ => self.store().get_layer(&layer_key("cluster", &m.cluster)).await?,
        };
        let role = match change {
            Some((Scope::Role(r), v)) if *r == m.role => Some(v.clone()),
            _ if m.role == Role::None => None,
            _ => self.store().get_layer(&layer_key("role", m.role.as_str())).await?,
        };
        Ok((cluster, role))
    }

    /// Renders `m` with `change` applied; `Ok(None)` when it has no layers at all.
    async fn render_for(
        &self,
        m: &MachineRecord,
        change: Option<(&Scope, &Value)>,
    ) -> Result<Result<Option<(String, Vec<String>)>, Vec<String>>, ApiError> {
        let (cluster, role) = self.shared_layers(m, change).await?;
        let own = match change {
            Some((Scope::Machine(id), v)) if *id == m.id => Some(v.clone()),
            _ => m.config.layer.clone(),
        };
        let layers: Vec<(&'static str, &Value)> =
            [("cluster", cluster.as_ref()), ("role", role.as_ref()), ("machine", own.as_ref())]
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, v)))
                .filter(|(_, v)| !v.as_object().is_some_and(|o| o.is_empty()))
                .collect();
        if layers.is_empty() {
            return Ok(Ok(None));
        }
        Ok(match render(&layers) {
            Ok((cfg, warnings)) => match cfg.to_yaml() {
                Ok(y) => Ok(Some((y, warnings))),
                Err(e) => Err(vec![format!("machine {}: {e}", m.id)]),
            },
            Err(e) => Err(render_errors(&format!("machine {} ({}): ", m.id, m.hostname), &e)),
        })
    }

    /// Sets a layer and re-renders the machines it affects (or, with `dry_run`, only diffs).
    pub async fn apply_layer(
        &self,
        scope: Scope,
        layer: Value,
        dry_run: bool,
        source: String,
        mode: Option<Mode>,
        try_timeout_ms: u64,
    ) -> Result<pb::ApplyConfigResponse, ApiError> {
        let try_timeout_ms = try_timeout(try_timeout_ms)?;
        if !layer.is_object() {
            return Err(ApiError::invalid("yaml", "a config layer must be a mapping"));
        }
        // The layer must be valid on its own, whatever it will be merged with.
        let mut warnings = Vec::new();
        let empty = layer.as_object().is_some_and(|o| o.is_empty());
        if !empty {
            match render(&[("layer", &layer)]) {
                Ok((_, w)) => warnings.extend(w),
                Err(e) => return Err(invalid(render_errors("", &e))),
            }
        }
        let affected: Vec<MachineRecord> = self
            .machines()
            .into_iter()
            .filter(|m| !m.revoked)
            .filter(|m| match &scope {
                Scope::Machine(id) => m.id == *id,
                Scope::Cluster(c) => m.cluster == *c,
                Scope::Role(r) => m.role == *r,
            })
            .collect();
        let mut planned = Vec::new();
        let mut errors = Vec::new();
        for m in &affected {
            match self.render_for(m, Some((&scope, &layer))).await? {
                Ok(r) => planned.push((m, r)),
                Err(e) => errors.extend(e),
            }
        }
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        let mut results = Vec::new();
        let mut changes = Vec::new();
        for (m, r) in planned {
            let (new, w) = r.unwrap_or_default();
            warnings.extend(w);
            let changed = new != m.config.rendered;
            let g = m.config.generation;
            let diff = if changed {
                unified_diff(
                    &m.config.rendered,
                    &new,
                    &format!("generation {g}"),
                    &format!("generation {}", g + 1),
                )
            } else {
                String::new()
            };
            let mode = mode.unwrap_or(if network_changed(&m.config.rendered, &new) {
                Mode::Try
            } else {
                Mode::Auto
            });
            results.push(pb::MachineConfigResult {
                machine_id: m.id.to_string(),
                hostname: m.hostname.clone(),
                generation: g,
                changed,
                diff,
                mode: if changed { mode.as_str().into() } else { String::new() },
                try_timeout_ms: if changed && mode == Mode::Try { try_timeout_ms } else { 0 },
            });
            changes.push((m.id.clone(), changed, new, mode));
        }
        if dry_run {
            warnings.dedup();
            return Ok(pb::ApplyConfigResponse { results, warnings });
        }
        match &scope {
            Scope::Cluster(c) => {
                self.store().put_layer(&layer_key("cluster", c), Some(layer.clone())).await?
            }
            Scope::Role(r) => {
                self.store().put_layer(&layer_key("role", r.as_str()), Some(layer.clone())).await?
            }
            Scope::Machine(_) => {}
        }
        let now = unix_ms(SystemTime::now());
        for ((id, changed, rendered, mode), result) in changes.into_iter().zip(results.iter_mut()) {
            let own = matches!(&scope, Scope::Machine(m) if *m == id).then(|| layer.clone());
            if !changed && own.is_none() {
                continue;
            }
            let source = source.clone();
            let updated = self
                .update_machine(
                    &id,
                    Box::new(move |m| {
                        if let Some(l) = own {
                            let empty = l.as_object().is_some_and(|o| o.is_empty());
                            if !(empty && m.config.layer.is_none()) {
                                m.config.layer = Some(l);
                            }
                        }
                        if changed {
                            m.config.generation += 1;
                            m.config.rendered = rendered.clone();
                            m.config.error.clear();
                            m.config.mode = mode.as_str().into();
                            m.config.try_timeout_ms = if mode == Mode::Try { try_timeout_ms } else { 0 };
                            m.config.confirmed = false;
                            m.config.state.clear();
                            m.config.trying_since_ms = 0;
                            m.config.revisions.push(ConfigRevision {
                                generation: m.config.generation,
                                created_ms: now,
                                source,
                                rendered,
                                layer: m.config.layer.clone(),
                                mode: mode.as_str().into(),
                                state: String::new(),
                            });
                            let excess = m.config.revisions.len().saturating_sub(MAX_REVISIONS);
                            m.config.revisions.drain(..excess);
                        }
                        Ok(())
                    }),
                )
                .await?;
            result.generation = updated.config.generation;
            if changed {
                tracing::info!(machine = %id, generation = updated.config.generation, "new config generation");
                if let Some(msg) = Self::config_msg(&updated) {
                    self.push(&id, msg);
                }
            }
        }
        warnings.dedup();
        Ok(pb::ApplyConfigResponse { results, warnings })
    }

    /// Renders a machine again after its role or cluster changed (their layers now apply).
    pub async fn rerender(&self, m: &MachineRecord) -> Result<(), ApiError> {
        let layer = m.config.layer.clone().unwrap_or_else(|| Value::Object(Default::default()));
        self.apply_layer(Scope::Machine(m.id.clone()), layer, false, "assignment".into(), None, 0).await?;
        Ok(())
    }

    /// `ApplyConfig`: parses the request and applies its layer.
    pub async fn apply_config(&self, r: pb::ApplyConfigRequest) -> Result<pb::ApplyConfigResponse, ApiError> {
        let scope = match pb::ConfigScope::try_from(r.scope) {
            Ok(pb::ConfigScope::Machine) => Scope::Machine(self.resolve(&r.target)?.id),
            Ok(pb::ConfigScope::Cluster) => {
                validate_cluster_name(&r.target).map_err(|e| ApiError::invalid("target", e.to_string()))?;
                Scope::Cluster(r.target)
            }
            Ok(pb::ConfigScope::Role) => {
                let role: Role = r.target.parse().map_err(|e: muster_proto::model::RoleError| {
                    ApiError::invalid("target", e.to_string())
                })?;
                Scope::Role(role)
            }
            Err(_) => return Err(ApiError::invalid("scope", format!("unknown scope {}", r.scope))),
        };
        if r.yaml.len() > 1024 * 1024 {
            return Err(ApiError::invalid("yaml", "larger than 1 MiB"));
        }
        let layer = parse_value(&r.yaml).map_err(|e| ApiError::invalid("yaml", e.to_string()))?;
        let source = scope.describe();
        let mode = Mode::parse(&r.mode)?;
        self.apply_layer(scope, layer, r.dry_run, source, mode, r.try_timeout_ms).await
    }

    /// `RollbackConfig`: restores the machine's own layer as of `to` (default: the generation
    /// before the current one) as a new generation.
    pub async fn rollback_config(
        &self,
        query: &str,
        to: u64,
        mode: Option<Mode>,
        try_timeout_ms: u64,
    ) -> Result<pb::ApplyConfigResponse, ApiError> {
        let m = self.resolve(query)?;
        let to = if to == 0 { m.config.generation.saturating_sub(1) } else { to };
        let rev = m.config.revisions.iter().find(|r| r.generation == to).ok_or_else(|| {
            ApiError::NotFound(format!(
                "machine {} has no config generation {to} (history keeps the last {MAX_REVISIONS})",
                m.id
            ))
        })?;
        let layer = rev.layer.clone().unwrap_or_else(|| Value::Object(Default::default()));
        self.apply_layer(
            Scope::Machine(m.id.clone()),
            layer,
            false,
            format!("rollback to {to}"),
            mode,
            try_timeout_ms,
        )
        .await
    }

    /// `ConfirmConfig`: the operator keeps the generation the agent is trying. The agent hears it
    /// over its stream, so a node that lost the controller cannot be confirmed, and reverts.
    pub async fn confirm_config(&self, query: &str) -> Result<MachineRecord, ApiError> {
        let m = self.resolve(query)?;
        let g = m.config.generation;
        if m.config.mode != Mode::Try.as_str() {
            return Err(ApiError::FailedPrecondition(format!(
                "machine {}: generation {g} was not applied in try mode (mode: {}); nothing to confirm",
                m.id,
                if m.config.mode.is_empty() { "none" } else { &m.config.mode }
            )));
        }
        if m.config.confirmed {
            return Ok(m);
        }
        match m.config.state.as_str() {
            "trying" => {}
            "reverted" => {
                return Err(ApiError::FailedPrecondition(format!(
                    "machine {}: generation {g} was already reverted by the agent (not confirmed in time); \
                     apply it again to retry",
                    m.id
                )))
            }
            other => {
                return Err(ApiError::FailedPrecondition(format!(
                    "machine {}: the agent has not reported trying generation {g} yet (state: {}); \
                     it must be connected to be confirmed",
                    m.id,
                    if other.is_empty() { "pending" } else { other }
                )))
            }
        }
        if !self.is_connected(&m.id) {
            return Err(ApiError::FailedPrecondition(format!(
                "machine {} is not connected: it cannot hear the confirmation and will revert generation {g}",
                m.id
            )));
        }
        let updated = self
            .update_machine(
                &m.id,
                Box::new(move |m| {
                    if m.config.generation == g {
                        m.config.confirmed = true;
                    }
                    Ok(())
                }),
            )
            .await?;
        if updated.config.generation != g {
            return Err(ApiError::FailedPrecondition(format!(
                "generation {g} was replaced by {} meanwhile; nothing confirmed",
                updated.config.generation
            )));
        }
        tracing::info!(machine = %updated.id, generation = g, "try confirmed");
        if let Some(msg) = Self::config_msg(&updated) {
            self.push(&updated.id, msg);
        }
        Ok(updated)
    }

    /// The current generation for a machine's stream, if it has a config.
    pub(super) fn config_msg(m: &MachineRecord) -> Option<pb::ControllerMessage> {
        let mode = Mode::parse(&m.config.mode).ok().flatten().unwrap_or(Mode::Auto);
        (m.config.generation > 0).then(|| pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Config(pb::ConfigUpdate {
                generation: m.config.generation,
                yaml: m.config.rendered.clone(),
                mode: mode.to_pb().into(),
                try_timeout_ms: m.config.try_timeout_ms,
                confirmed: m.config.confirmed,
            })),
        })
    }

    /// Records what an agent reported about a generation.
    pub(super) async fn record_config_status(&self, id: &MachineId, s: pb::ConfigStatus) {
        let r = self
            .update_machine(
                id,
                Box::new(move |m| {
                    if s.generation > m.config.generation {
                        return Ok(());
                    }
                    let state = match s.state.as_str() {
                        "" if s.applied => "applied",
                        "" => "failed",
                        st => st,
                    };
                    if state == "reverted" {
                        m.config.applied_generation = s.current_generation;
                    } else if s.applied && state != "staged" {
                        m.config.applied_generation = s.generation;
                    }
                    if let Some(rev) = m.config.revisions.iter_mut().find(|r| r.generation == s.generation) {
                        rev.state = state.chars().take(32).collect();
                    }
                    if s.generation == m.config.generation {
                        if state == "trying" && m.config.state != "trying" {
                            m.config.trying_since_ms = unix_ms(SystemTime::now());
                        }
                        m.config.state = state.chars().take(32).collect();
                        m.config.error = s.error.chars().take(1024).collect();
                        m.config.resources = s
                            .resources
                            .into_iter()
                            .take(1024)
                            .map(|r| ResourceRecord {
                                resource: r.resource.chars().take(256).collect(),
                                outcome: r.outcome.chars().take(32).collect(),
                                detail: r.detail.chars().take(1024).collect(),
                            })
                            .collect();
                    }
                    Ok(())
                }),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(machine = %id, error = %e, "could not record config status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_are_unified() {
        let d = unified_diff("hostname: a\n", "hostname: b\n", "generation 1", "generation 2");
        assert!(d.starts_with("--- generation 1\n+++ generation 2\n"), "{d}");
        assert!(d.contains("-hostname: a\n+hostname: b\n"), "{d}");
    }
}
