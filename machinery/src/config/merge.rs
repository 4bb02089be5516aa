//! Layer merging with RFC 7386 JSON merge patch semantics.

use serde_json::{Map, Value};

use super::{from_value, ConfigError, MachineConfig, API_VERSION, KIND};

/// Applies `patch` to `target` (RFC 7386): objects merge key by key, `null` removes a key,
/// anything else (lists included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Why layers did not render into a valid config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rendering the {layer} layer: {source}")]
pub struct RenderError {
    /// Which layer made it invalid (`cluster`, `role`, `machine`, or `merged`).
    pub layer: &'static str,
    #[source]
    pub source: ConfigError,
}

/// Merges named layers in order (e.g. cluster, role, machine) over an empty config and returns
/// the rendered config with its warnings. Each layer must be an object.
pub fn render(layers: &[(&'static str, &Value)]) -> Result<(MachineConfig, Vec<String>), RenderError> {
    let mut doc = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND });
    for (name, layer) in layers {
        if !layer.is_object() {
            return Err(RenderError {
                layer: name,
                source: ConfigError::Invalid(vec![super::FieldError {
                    path: String::new(),
                    message: "a layer must be a mapping".into(),
                }]),
            });
        }
        merge_patch(&mut doc, layer);
    }
    from_value(doc).map_err(|source| RenderError { layer: "merged", source })
}
