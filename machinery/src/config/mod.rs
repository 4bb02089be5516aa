//! The machine config model: what a node should look like. Pure: parsing, validation, layer
//! merging and rendering; no I/O.
//!
//! A config is a YAML document with `apiVersion: muster/v1alpha1` and `kind: MachineConfig`.
//! Unknown fields are errors. Validation returns every error at once, each with its field path
//! (`files[1].mode`), plus warnings. Structural errors (a wrong type, an unknown field) stop
//! parsing at the first one, which is reported with its path too.
//!
//! Layering: a cluster patch, a role patch and a machine patch are merged with RFC 7386 JSON merge
//! semantics (objects merge key by key, `null` deletes, lists and scalars replace) into one
//! rendered config per machine; see [`render`].

mod merge;
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

/// Builds a typed config from a value: structure first (the first structural error, with its
/// path), then every validation error. Returns the config with its warnings.
pub fn from_value(v: serde_json::Value) -> Result<(MachineConfig, Vec<String>), ConfigError> {
    let cfg: MachineConfig = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::Invalid(vec![FieldError { path, message: e.into_inner().to_string() }])
    })?;
    let Validation { errors, warnings } = validate(&cfg);
    if errors.is_empty() {
        Ok((cfg, warnings))
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// Parses and validates one YAML document.
pub fn parse(yaml: &str) -> Result<(MachineConfig, Vec<String>), ConfigError> {
    from_value(parse_value(yaml)?)
}

/// The JSON Schema of [`MachineConfig`], for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(MachineConfig)).unwrap_or_default()
}

impl MachineConfig {
    /// Canonical YAML (fields in a fixed order, maps sorted): what diffs compare.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_saphyr::to_string(self).map_err(|e| ConfigError::Yaml(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
