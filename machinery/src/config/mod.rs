//! The machine config model: what a node should look like. Pure: parsing, validation, layer
//! merging and rendering; no I/O.
//!
//! A config is a YAML document with `apiVersion: muster/v1alpha1` and `kind: MachineConfig`.
//! Unknown fields are errors. Validation returns every error at once, each with its field path
//! (`files[1].mode`), plus warnings: unknown fields (with a "did you mean" for a near miss) and
//! values of the wrong type are checked against the JSON Schema first and listed together with
//! the semantic errors (a bad hostname, an address that is not CIDR, ...).
//!
//! Layering: a cluster patch, a role patch and a machine patch are merged with RFC 7386 JSON merge
//! semantics (objects merge key by key, `null` deletes, lists and scalars replace) into one
//! rendered config per machine; see [`render`].

mod merge;
mod structure;
mod types;
mod validate;

pub use merge::{merge_patch, render, RenderError};
pub use types::*;
pub use validate::{validate, FieldError, FileMode, Hostname, IpCidr, Owner, Validation};

/// `apiVersion` of this model.
pub const API_VERSION: &str = "muster/v1alpha1";
/// `kind` of a machine config.
pub const KIND: &str = "MachineConfig";

/// Why a document is not a usable config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// Every field error (empty for a YAML syntax error).
    pub fn errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Yaml(_) => &[],
            ConfigError::Invalid(v) => v,
        }
    }
}

/// Parses YAML into a JSON value (the form layers are merged in). YAML 1.2 booleans only: `y`,
/// `no` or `on` stay strings instead of silently becoming true or false.
pub fn parse_value(yaml: &str) -> Result<serde_json::Value, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options::<serde_json::Value>(yaml, options)
        .map_err(|e| ConfigError::Yaml(e.to_string()))
}

/// Builds a typed config from a value and returns it with its warnings, or every error: the
/// structural ones (unknown fields, wrong types, missing required fields) and the semantic ones,
/// each with its path. A semantic error at the place of a structural one (or inside it) is left
/// out: it is the same mistake seen twice.
pub fn from_value(mut v: serde_json::Value) -> Result<(MachineConfig, Vec<String>), ConfigError> {
    let mut errors = structure::check(schema(), &mut v);
    let seen = |errors: &[FieldError], path: &str| errors.iter().any(|e| structure::covers(&e.path, path));
    match serde_path_to_error::deserialize::<_, MachineConfig>(v) {
        Ok(cfg) => {
            let Validation { errors: semantic, warnings } = validate(&cfg);
            for e in semantic {
                if !seen(&errors, &e.path) {
                    errors.push(e);
                }
            }
            if errors.is_empty() {
                Ok((cfg, warnings))
            } else {
                Err(ConfigError::Invalid(errors))
            }
        }
        Err(e) => {
            // The structural check repairs what it reports, so this is a case it does not know.
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            if !seen(&errors, &path) {
                errors.push(FieldError { path, message: e.into_inner().to_string() });
            }
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Parses and validates one YAML document.
pub fn parse(yaml: &str) -> Result<(MachineConfig, Vec<String>), ConfigError> {
    from_value(parse_value(yaml)?)
}

/// The JSON Schema of [`MachineConfig`], for editors. [`parse`] checks documents against this
/// same schema, so what an editor accepts and what Muster accepts cannot drift apart.
pub fn json_schema() -> serde_json::Value {
    schema().clone()
}

fn schema() -> &'static serde_json::Value {
    static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| serde_json::to_value(schemars::schema_for!(MachineConfig)).unwrap_or_default())
}

impl MachineConfig {
    /// Canonical YAML (fields in a fixed order, maps sorted): what diffs compare.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_saphyr::to_string(self).map_err(|e| ConfigError::Yaml(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
