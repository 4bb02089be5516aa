//! Layer merging: RFC 7386 JSON merge patch (objects merge key by key, `null` removes a key,
//! anything else replaces), except that lists of named things merge item by item on their key,
//! as Kubernetes' strategic merge does: `files` by `path`, `users`, `units` and
//! `kernelModules` by `name`, `network.interfaces` by `name` (else `mac`), an interface's
//! `vlans` by `id`. An item with `$patch: delete` removes the item with its key.

use serde_json::{Map, Value};

use super::{from_value, ConfigError, MachineConfig, API_VERSION, KIND};

/// The marker that deletes a named item: `- {path: /etc/motd, $patch: delete}`.
pub const PATCH: &str = "$patch";

/// The key of the named list at `path` (a list of field names from the document's root).
fn list_key(path: &[&str]) -> Option<&'static [&'static str]> {
    match path {
        ["files"] => Some(&["path"]),
        ["users"] | ["units"] | ["kernelModules"] => Some(&["name"]),
        ["network", "interfaces"] => Some(&["name", "mac"]),
        ["network", "interfaces", "*", "vlans"] => Some(&["id"]),
        _ => None,
    }
}

/// Applies `patch` to `target` (see the module's documentation).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    merge_at(target, patch, &mut Vec::new());
}

fn merge_at<'a>(target: &mut Value, patch: &'a Value, path: &mut Vec<&'a str>) {
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
                        path.push(k);
                        merge_at(t.entry(k.clone()).or_insert(Value::Null), v, path);
                        path.pop();
                    }
                }
            }
        }
        Value::Array(items) => match list_key(path) {
            Some(keys) => merge_named(target, items, keys, path),
            None => *target = patch.clone(),
        },
        other => *target = other.clone(),
    }
}

/// An item's identity in its named list: the first of `keys` it has.
fn identity<'a>(item: &'a Value, keys: &[&str]) -> Option<(String, &'a Value)> {
    keys.iter().find_map(|k| item.get(*k).filter(|v| !v.is_null()).map(|v| ((*k).to_owned(), v)))
}

fn merge_named<'a>(target: &mut Value, items: &'a [Value], keys: &[&str], path: &mut Vec<&'a str>) {
    let mut list: Vec<Value> = match target.take() {
        Value::Array(v) => v,
        _ => Vec::new(),
    };
    for item in items {
        let Some((k, id)) = identity(item, keys) else {
            // Without its key an item cannot be matched: it is added as it is (validation
            // names the missing field).
            list.push(item.clone());
            continue;
        };
        let existing = list.iter().position(|t| t.get(&k) == Some(id));
        let delete = item.get(PATCH).and_then(Value::as_str) == Some("delete");
        match (existing, delete) {
            (Some(i), true) => {
                list.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                path.push("*");
                merge_at(&mut list[i], item, path);
                path.pop();
            }
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                path.push("*");
                merge_at(&mut fresh, item, path);
                path.pop();
                list.push(fresh);
            }
        }
    }
    for t in &mut list {
        if let Value::Object(o) = t {
            o.remove(PATCH);
        }
    }
    *target = Value::Array(list);
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
