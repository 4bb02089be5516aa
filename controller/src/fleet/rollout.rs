//! Config layers, rendering and generations. A machine's config is its cluster's layer, then its
//! role's, then its own, merged (RFC 7386) and validated; every change of the rendered YAML is a
//! new generation, kept in the machine's history and pushed down its stream.

use std::time::Duration;

use muster_machinery::config::{parse_value, render, ConfigError, RenderError};
use muster_machinery::model::{MachineId, Role};
use muster_machinery::rollout::try_timeout;
use muster_machinery::{ApplyMode, ConfirmPolicy, GenerationState};
use muster_proto::pb;
use serde_json::Value;

use super::{Controller, FleetError};
use crate::store::{ConfigRevision, MachineRecord, ResourceRecord, MAX_REVISIONS};

/// Which layer a request sets. A machine's config merges, in order: its cluster's layer, its
/// role's, its role's in its cluster, its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Machine(MachineId),
    Cluster(String),
    Role(Role),
    /// A role's layer for one cluster only.
    ClusterRole {
        role: Role,
        cluster: String,
    },
}

impl Scope {
    /// A cluster's layer; the name is checked.
    pub fn cluster(name: &str) -> Result<Self, FleetError> {
        muster_machinery::model::validate_cluster_name(name)
            .map_err(|e| FleetError::invalid("target", e.to_string()))?;
        Ok(Scope::Cluster(name.to_owned()))
    }

    /// A role's layer (for one cluster when `cluster` is not empty); role and cluster are checked.
    pub fn role(name: &str, cluster: &str) -> Result<Self, FleetError> {
        let role = name.parse::<Role>().map_err(|e| FleetError::invalid("target", e.to_string()))?;
        if role == Role::None {
            return Err(FleetError::invalid("target", "a role layer needs a role: controlplane or worker"));
        }
        if cluster.is_empty() {
            return Ok(Scope::Role(role));
        }
        muster_machinery::model::validate_cluster_name(cluster)
            .map_err(|e| FleetError::invalid("cluster", e.to_string()))?;
        Ok(Scope::ClusterRole { role, cluster: cluster.to_owned() })
    }

    fn describe(&self) -> String {
        match self {
            Scope::Machine(_) => "machine layer".into(),
            Scope::Cluster(c) => format!("cluster {c}"),
            Scope::Role(r) => format!("role {r}"),
            Scope::ClusterRole { role, cluster } => format!("role {role} in cluster {cluster}"),
        }
    }

    /// The store key of a shared layer (`None` for a machine's own).
    pub fn key(&self) -> Option<String> {
        match self {
            Scope::Machine(_) => None,
            Scope::Cluster(c) => Some(format!("cluster/{c}")),
            Scope::Role(r) => Some(format!("role/{r}")),
            Scope::ClusterRole { role, cluster } => Some(format!("role/{role}@{cluster}")),
        }
    }

    /// Whether this layer is part of `m`'s config.
    fn covers(&self, m: &MachineRecord) -> bool {
        match self {
            Scope::Machine(id) => m.id == *id,
            Scope::Cluster(c) => m.cluster == *c,
            Scope::Role(r) => m.role == *r,
            Scope::ClusterRole { role, cluster } => m.role == *role && m.cluster == *cluster,
        }
    }
}

/// A shared layer as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerView {
    pub key: String,
    /// `None`: not set (never, or deleted).
    pub value: Option<Value>,
    pub revision: u64,
    /// The machines it is part of now.
    pub machines: Vec<MachineId>,
    pub history: Vec<crate::store::LayerRevision>,
}

/// Whether two rendered configs differ in their network section (such changes default to try
/// mode: a wrong address or route can cut the node off).
fn network_changed(old: &str, new: &str) -> bool {
    let network = |yaml: &str| {
        if yaml.trim().is_empty() {
            return None;
        }
        muster_machinery::config::parse(yaml).ok().and_then(|(c, _)| c.network)
    };
    network(old) != network(new)
}

fn invalid(errors: Vec<String>) -> FleetError {
    FleetError::invalid("yaml", format!("the config is not valid:\n{}", errors.join("\n")))
}

/// What applying a layer did (or, on a dry run, would do) to one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub machine_id: MachineId,
    pub hostname: String,
    /// The generation the machine has after the request (unchanged on dry runs and no-ops).
    pub generation: u64,
    pub changed: bool,
    /// Unified diff of the rendered YAML.
    pub diff: String,
    /// How the new generation is applied; `None` when unchanged.
    pub mode: Option<ApplyMode>,
    /// For a try: the confirmation window.
    pub try_timeout: Option<Duration>,
}

/// How a new generation is delivered: its mode (`None`: try when the network section changes,
/// else auto), the try window (`None`: the default) and how a try is confirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    pub mode: Option<ApplyMode>,
    pub try_window: Option<Duration>,
    pub confirm: ConfirmPolicy,
}

/// The rendered config of a machine Muster lets go of: nothing managed.
fn empty_config() -> Result<String, FleetError> {
    let cfg = muster_machinery::config::MachineConfig {
        api_version: muster_machinery::config::API_VERSION.into(),
        kind: muster_machinery::config::KIND.into(),
        ..Default::default()
    };
    cfg.to_yaml().map_err(|e| FleetError::Internal(format!("rendering the empty config: {e}")))
}

/// What applying a layer did, with the warnings of the configs involved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub results: Vec<ConfigChange>,
    pub warnings: Vec<String>,
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
    /// The shared layers of `m` in merge order (its cluster's, its role's, its role's in its
    /// cluster), with `change` standing in for the one being changed.
    async fn shared_layers(
        &self,
        m: &MachineRecord,
        change: Option<(&Scope, &Value)>,
    ) -> Result<Vec<(&'static str, Option<Value>)>, FleetError> {
        let mut scopes = Vec::new();
        if !m.cluster.is_empty() {
            scopes.push(("cluster", Scope::Cluster(m.cluster.clone())));
        }
        if m.role != Role::None {
            scopes.push(("role", Scope::Role(m.role)));
            if !m.cluster.is_empty() {
                scopes.push((
                    "role in cluster",
                    Scope::ClusterRole { role: m.role, cluster: m.cluster.clone() },
                ));
            }
        }
        let mut out = Vec::new();
        for (name, scope) in scopes {
            let value = match change {
                Some((c, v)) if *c == scope => Some(v.clone()),
                _ => match scope.key() {
                    Some(k) => self.store().get_layer(&k).await?.and_then(|r| r.value),
                    None => None,
                },
            };
            out.push((name, value));
        }
        Ok(out)
    }

    /// Renders `m` with `change` applied; `Ok(None)` when it has no layers at all.
    async fn render_for(
        &self,
        m: &MachineRecord,
        change: Option<(&Scope, &Value)>,
    ) -> Result<Result<Option<(String, Vec<String>)>, Vec<String>>, FleetError> {
        let own = match change {
            Some((Scope::Machine(id), v)) if *id == m.id => Some(v.clone()),
            // Let go of (`rollback --to 0`): nothing, until its own layer is set again.
            _ if m.config.released => return Ok(Ok(Some((empty_config()?, Vec::new())))),
            _ => m.config.layer.clone(),
        };
        let mut all = self.shared_layers(m, change).await?;
        all.push(("machine", own));
        let layers: Vec<(&'static str, &Value)> = all
            .iter()
            .filter_map(|(n, v)| v.as_ref().map(|v| (*n, v)))
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
        how: Delivery,
    ) -> Result<Applied, FleetError> {
        self.set_layer(scope, Some(layer), dry_run, source, how, true).await
    }

    /// Sets (or with `None` deletes) a layer and re-renders the machines it is part of. A
    /// shared layer no machine has yet is refused unless `allow_empty` (it is then saved for
    /// machines that join).
    pub async fn set_layer(
        &self,
        scope: Scope,
        layer: Option<Value>,
        dry_run: bool,
        source: String,
        how: Delivery,
        allow_empty: bool,
    ) -> Result<Applied, FleetError> {
        let deleting = layer.is_none();
        let layer = layer.unwrap_or_else(|| Value::Object(Default::default()));
        let Delivery { mode, try_window, confirm } = how;
        let try_window = try_timeout(try_window).map_err(|e| FleetError::invalid("timeout", e))?;
        let try_timeout_ms = u64::try_from(try_window.as_millis()).unwrap_or(u64::MAX);
        if !layer.is_object() {
            return Err(FleetError::invalid("yaml", "a config layer must be a mapping"));
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
        let affected: Vec<MachineRecord> =
            self.machines().into_iter().filter(|m| !m.revoked).filter(|m| scope.covers(m)).collect();
        if affected.is_empty() && !allow_empty && !deleting && scope.key().is_some() {
            return Err(FleetError::invalid(
                "target",
                format!(
                    "no machine has the {} layer yet; pass --allow-empty to save it for machines that join",
                    scope.describe()
                ),
            ));
        }
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
                ApplyMode::Try
            } else {
                ApplyMode::Auto
            });
            results.push(ConfigChange {
                machine_id: m.id.clone(),
                hostname: m.hostname.clone(),
                generation: g,
                changed,
                diff,
                mode: changed.then_some(mode),
                try_timeout: (changed && mode == ApplyMode::Try).then_some(try_window),
            });
            changes.push((m.id.clone(), changed, new, mode));
        }
        if dry_run {
            warnings.dedup();
            return Ok(Applied { results, warnings });
        }
        let now = muster_util::now_ms();
        if let Some(key) = scope.key() {
            self.store().put_layer(&key, (!deleting).then(|| layer.clone()), now).await?;
        }
        for ((id, changed, rendered, mode), result) in changes.into_iter().zip(results.iter_mut()) {
            let own = matches!(&scope, Scope::Machine(m) if *m == id).then(|| layer.clone());
            if !changed && own.is_none() {
                continue;
            }
            let source = source.clone();
            let updated = self
                .update_machine(&id, move |m| {
                    if let Some(l) = own {
                        let empty = l.as_object().is_some_and(|o| o.is_empty());
                        if deleting {
                            m.config.layer = None;
                        } else if !(empty && m.config.layer.is_none()) {
                            m.config.layer = Some(l);
                        }
                        m.config.released = false;
                    }
                    if changed {
                        m.config.generation += 1;
                        m.config.rendered = rendered.clone();
                        m.config.error.clear();
                        m.config.mode = mode;
                        m.config.try_timeout_ms = if mode == ApplyMode::Try { try_timeout_ms } else { 0 };
                        m.config.confirm = confirm;
                        m.config.confirmed = false;
                        m.config.state = GenerationState::Pending;
                        m.config.trying_since_ms = 0;
                        m.config.revisions.push(ConfigRevision {
                            generation: m.config.generation,
                            created_ms: now,
                            source,
                            rendered,
                            layer: m.config.layer.clone(),
                            mode,
                            state: GenerationState::Pending,
                        });
                        let excess = m.config.revisions.len().saturating_sub(MAX_REVISIONS);
                        m.config.revisions.drain(..excess);
                    }
                    Ok(())
                })
                .await?;
            result.generation = updated.config.generation;
            if changed {
                tracing::info!(machine = %id, generation = updated.config.generation, "new config generation");
                if let Some(msg) = config_msg(&updated) {
                    self.push(&id, msg);
                }
            }
        }
        warnings.dedup();
        Ok(Applied { results, warnings })
    }

    /// Renders a machine again after its role or cluster changed (their layers now apply).
    /// A machine let go of (`rollback --to 0`) stays so.
    pub async fn rerender(&self, m: &MachineRecord) -> Result<(), FleetError> {
        if m.config.released {
            return Ok(());
        }
        let layer = m.config.layer.clone().unwrap_or_else(|| Value::Object(Default::default()));
        self.apply_layer(
            Scope::Machine(m.id.clone()),
            layer,
            false,
            "assignment".into(),
            Delivery::default(),
        )
        .await?;
        Ok(())
    }

    /// Sets the layer `yaml` for `scope` (see [`Controller::set_layer`]).
    pub async fn apply_config(
        &self,
        scope: Scope,
        yaml: &str,
        dry_run: bool,
        how: Delivery,
        allow_empty: bool,
    ) -> Result<Applied, FleetError> {
        if yaml.len() > 1024 * 1024 {
            return Err(FleetError::invalid("yaml", "larger than 1 MiB"));
        }
        let layer = parse_value(yaml).map_err(|e| FleetError::invalid("yaml", e.to_string()))?;
        let source = scope.describe();
        self.set_layer(scope, Some(layer), dry_run, source, how, allow_empty).await
    }

    /// Deletes a layer (a machine's own, or a shared one) and re-renders its machines.
    pub async fn delete_layer(&self, scope: Scope, how: Delivery) -> Result<Applied, FleetError> {
        if let Some(key) = scope.key() {
            if self.store().get_layer(&key).await?.and_then(|r| r.value).is_none() {
                return Err(FleetError::NotFound(format!("there is no {} layer", scope.describe())));
            }
        }
        let source = format!("{} deleted", scope.describe());
        self.set_layer(scope, None, false, source, how, true).await
    }

    /// A shared layer with its history and the machines it is part of now.
    pub async fn layer(&self, scope: &Scope) -> Result<LayerView, FleetError> {
        let key = scope
            .key()
            .ok_or_else(|| FleetError::invalid("scope", "a machine's own layer is shown by `config get`"))?;
        let record = self.store().get_layer(&key).await?.unwrap_or_default();
        let machines =
            self.machines().into_iter().filter(|m| !m.revoked && scope.covers(m)).map(|m| m.id).collect();
        Ok(LayerView {
            key,
            revision: record.revisions.last().map_or(0, |r| r.revision),
            value: record.value,
            machines,
            history: record.revisions,
        })
    }

    /// `RollbackConfig`: restores the machine's own layer as of generation `to` (default: the
    /// one before the current) as a new generation. Generation 0 is the node as it was before
    /// Muster: the machine gets the empty config (its agent puts back everything Muster changed)
    /// and keeps it, whatever its layers say, until a config is applied to it again.
    pub async fn rollback_config(
        &self,
        query: &str,
        to: Option<u64>,
        how: Delivery,
    ) -> Result<Applied, FleetError> {
        let m = self.resolve(query)?;
        let to = to.unwrap_or(m.config.generation.saturating_sub(1));
        if to == 0 {
            return self.release(m, how).await;
        }
        let rev = m.config.revisions.iter().find(|r| r.generation == to).ok_or_else(|| {
            FleetError::NotFound(format!(
                "machine {} has no config generation {to} (history keeps the last {MAX_REVISIONS})",
                m.id
            ))
        })?;
        let layer = rev.layer.clone().unwrap_or_else(|| Value::Object(Default::default()));
        self.apply_layer(Scope::Machine(m.id.clone()), layer, false, format!("rollback to {to}"), how).await
    }

    /// Lets go of a machine: a new generation with the empty config.
    async fn release(&self, m: MachineRecord, how: Delivery) -> Result<Applied, FleetError> {
        let empty = empty_config()?;
        let g = m.config.generation;
        let changed = m.config.rendered != empty || !m.config.released;
        let mode = how.mode.unwrap_or(if network_changed(&m.config.rendered, &empty) {
            ApplyMode::Try
        } else {
            ApplyMode::Auto
        });
        let try_window = try_timeout(how.try_window).map_err(|e| FleetError::invalid("timeout", e))?;
        let diff = unified_diff(
            &m.config.rendered,
            &empty,
            &format!("generation {g}"),
            &format!("generation {}", g + 1),
        );
        let mut result = ConfigChange {
            machine_id: m.id.clone(),
            hostname: m.hostname.clone(),
            generation: g,
            changed,
            diff,
            mode: changed.then_some(mode),
            try_timeout: (changed && mode == ApplyMode::Try).then_some(try_window),
        };
        if !changed {
            return Ok(Applied { results: vec![result], warnings: Vec::new() });
        }
        let now = muster_util::now_ms();
        let try_timeout_ms = u64::try_from(try_window.as_millis()).unwrap_or(u64::MAX);
        let updated = self
            .update_machine(&m.id, move |m| {
                m.config.released = true;
                m.config.generation += 1;
                m.config.rendered = empty.clone();
                m.config.error.clear();
                m.config.mode = mode;
                m.config.try_timeout_ms = if mode == ApplyMode::Try { try_timeout_ms } else { 0 };
                m.config.confirm = how.confirm;
                m.config.confirmed = false;
                m.config.state = GenerationState::Pending;
                m.config.trying_since_ms = 0;
                m.config.revisions.push(ConfigRevision {
                    generation: m.config.generation,
                    created_ms: now,
                    source: "rollback to before Muster".into(),
                    rendered: empty,
                    layer: m.config.layer.clone(),
                    mode,
                    state: GenerationState::Pending,
                });
                let excess = m.config.revisions.len().saturating_sub(MAX_REVISIONS);
                m.config.revisions.drain(..excess);
                Ok(())
            })
            .await?;
        result.generation = updated.config.generation;
        tracing::info!(machine = %updated.id, generation = updated.config.generation, "released: back to before Muster");
        if let Some(msg) = config_msg(&updated) {
            self.push(&updated.id, msg);
        }
        Ok(Applied { results: vec![result], warnings: Vec::new() })
    }

    /// `ConfirmConfig`: the operator keeps the generation the agent is trying. The agent hears it
    /// over its stream, so a node that lost the controller cannot be confirmed, and reverts.
    pub async fn confirm_config(&self, query: &str) -> Result<MachineRecord, FleetError> {
        let m = self.resolve(query)?;
        let g = m.config.generation;
        let refuse = |reason: String| FleetError::ConfigState { id: m.id.clone(), reason };
        if m.config.mode != ApplyMode::Try {
            return Err(refuse(format!(
                "generation {g} was not applied in try mode (mode: {}); nothing to confirm",
                if g == 0 { "none" } else { m.config.mode.as_str() }
            )));
        }
        if m.config.confirmed {
            return Ok(m);
        }
        match m.config.state {
            GenerationState::Trying => {}
            GenerationState::Reverted => {
                return Err(refuse(format!(
                    "generation {g} was already reverted by the agent (not confirmed in time); \
                     apply it again to retry"
                )))
            }
            other => {
                return Err(refuse(format!(
                    "the agent has not reported trying generation {g} yet (state: {other}); \
                     it must be connected to be confirmed"
                )))
            }
        }
        if !self.is_connected(&m.id) {
            return Err(refuse(format!(
                "not connected: it cannot hear the confirmation and will revert generation {g}"
            )));
        }
        let updated = self
            .update_machine(&m.id, move |m| {
                if m.config.generation == g {
                    m.config.confirmed = true;
                }
                Ok(())
            })
            .await?;
        if updated.config.generation != g {
            return Err(FleetError::ConfigState {
                id: updated.id.clone(),
                reason: format!(
                    "generation {g} was replaced by {} meanwhile; nothing confirmed",
                    updated.config.generation
                ),
            });
        }
        tracing::info!(machine = %updated.id, generation = g, "try confirmed");
        if let Some(msg) = config_msg(&updated) {
            self.push(&updated.id, msg);
        }
        Ok(updated)
    }

    /// Records what an agent reported about a generation.
    /// A try with automatic confirmation is confirmed here, when its report comes over a
    /// connection the agent opened after applying it: the node still reaches the controller.
    pub async fn record_config_status(&self, id: &MachineId, s: Report) {
        let proof = s.reconnected && s.state == GenerationState::Trying;
        let r = self
            .update_machine(id, move |m| {
                if s.generation > m.config.generation {
                    return Ok(());
                }
                if proof
                    && s.generation == m.config.generation
                    && m.config.mode == ApplyMode::Try
                    && m.config.confirm == ConfirmPolicy::Auto
                    && !m.config.confirmed
                {
                    m.config.confirmed = true;
                }
                match s.state {
                    GenerationState::Reverted => m.config.applied_generation = s.current_generation,
                    GenerationState::Applied | GenerationState::Trying => {
                        m.config.applied_generation = s.generation;
                    }
                    GenerationState::Pending | GenerationState::Staged | GenerationState::Failed => {}
                }
                if let Some(rev) = m.config.revisions.iter_mut().find(|r| r.generation == s.generation) {
                    rev.state = s.state;
                }
                if s.generation == m.config.generation {
                    if s.state == GenerationState::Trying && m.config.state != GenerationState::Trying {
                        m.config.trying_since_ms = muster_util::now_ms();
                    }
                    m.config.state = s.state;
                    m.config.error = s.error.chars().take(1024).collect();
                    m.config.resources = s
                        .resources
                        .into_iter()
                        .take(1024)
                        .map(|r| ResourceRecord {
                            resource: r.resource.chars().take(256).collect(),
                            outcome: r.outcome,
                            detail: r.detail.chars().take(1024).collect(),
                        })
                        .collect();
                }
                Ok(())
            })
            .await;
        match r {
            Ok(m) if proof && m.config.confirmed && m.config.state == GenerationState::Trying => {
                tracing::info!(machine = %id, generation = m.config.generation, "try confirmed: the agent reconnected over it");
                if let Some(msg) = config_msg(&m) {
                    self.push(id, msg);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(machine = %id, error = %e, "could not record config status"),
        }
    }
}

/// What an agent reported about a generation (converted from the wire by the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub generation: u64,
    pub state: GenerationState,
    /// Sent over a connection the agent opened after applying the try (see
    /// [`ConfirmPolicy::Auto`]).
    pub reconnected: bool,
    pub current_generation: u64,
    pub error: String,
    pub resources: Vec<ResourceRecord>,
}

/// The current generation for a machine's stream, if it has a config and is approved: nothing
/// of a config (a cluster layer's secrets included) reaches a pending machine.
pub(super) fn config_msg(m: &MachineRecord) -> Option<pb::ControllerMessage> {
    (m.approved && m.config.generation > 0).then(|| pb::ControllerMessage {
        msg: Some(pb::controller_message::Msg::Config(pb::ConfigUpdate {
            generation: m.config.generation,
            yaml: m.config.rendered.clone(),
            mode: pb::ApplyMode::from(m.config.mode).into(),
            try_timeout_ms: m.config.try_timeout_ms,
            confirmed: m.config.confirmed,
            confirm: pb::ConfirmPolicy::from(m.config.confirm).into(),
        })),
    })
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
