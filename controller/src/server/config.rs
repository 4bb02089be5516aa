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
    ) -> Result<pb::ApplyConfigResponse, ApiError> {
        if !layer.is_object() {
            return Err(ApiError::invalid("yaml", "a config layer must be a mapping"));
        }
        // The layer must be valid on its own, whatever it will be merged with.
        let mut warnings = Vec::new();
        match render(&[("layer", &layer)]) {
            Ok((_, w)) => warnings.extend(w),
            Err(e) => return Err(invalid(render_errors("", &e))),
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
            results.push(pb::MachineConfigResult {
                machine_id: m.id.to_string(),
                hostname: m.hostname.clone(),
                generation: g,
                changed,
                diff,
            });
            changes.push((m.id.clone(), changed, new));
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
        for ((id, changed, rendered), result) in changes.into_iter().zip(results.iter_mut()) {
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
                            m.config.layer = Some(l);
                        }
                        if changed {
                            m.config.generation += 1;
                            m.config.rendered = rendered.clone();
                            m.config.error.clear();
                            m.config.revisions.push(ConfigRevision {
                                generation: m.config.generation,
                                created_ms: now,
                                source,
                                rendered,
                                layer: m.config.layer.clone(),
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
        self.apply_layer(scope, layer, r.dry_run, source).await
    }

    /// `RollbackConfig`: restores the machine's own layer as of `to` (default: the generation
    /// before the current one) as a new generation.
    pub async fn rollback_config(&self, query: &str, to: u64) -> Result<pb::ApplyConfigResponse, ApiError> {
        let m = self.resolve(query)?;
        let to = if to == 0 { m.config.generation.saturating_sub(1) } else { to };
        let rev = m.config.revisions.iter().find(|r| r.generation == to).ok_or_else(|| {
            ApiError::NotFound(format!(
                "machine {} has no config generation {to} (history keeps the last {MAX_REVISIONS})",
                m.id
            ))
        })?;
        let layer = rev.layer.clone().unwrap_or_else(|| Value::Object(Default::default()));
        self.apply_layer(Scope::Machine(m.id.clone()), layer, false, format!("rollback to {to}")).await
    }

    /// The current generation for a machine's stream, if it has a config.
    pub(super) fn config_msg(m: &MachineRecord) -> Option<pb::ControllerMessage> {
        (m.config.generation > 0).then(|| pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Config(pb::ConfigUpdate {
                generation: m.config.generation,
                yaml: m.config.rendered.clone(),
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
                    if s.applied {
                        m.config.applied_generation = s.generation;
                    }
                    if s.generation == m.config.generation {
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
