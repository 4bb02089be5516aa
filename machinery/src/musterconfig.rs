//! The CLI's config file (`musterconfig`), written by `muster-controller init`.
//!
//! ```yaml
//! apiVersion: muster/v1alpha1
//! kind: MusterConfig
//! endpoints: ["https://127.0.0.1:7443"]
//! ca: |
//!   -----BEGIN CERTIFICATE-----
//! cert: |
//!   -----BEGIN CERTIFICATE-----
//! key: |
//!   -----BEGIN PRIVATE KEY-----
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "muster/v1alpha1";
pub const KIND: &str = "MusterConfig";

/// The CLI's connection settings and admin credentials. `Debug` hides the key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MusterConfig {
    pub api_version: String,
    pub kind: String,
    /// Controller gRPC endpoints, tried in order.
    pub endpoints: Vec<String>,
    /// The controller CA certificate (PEM).
    pub ca: String,
    /// The admin client certificate (PEM).
    pub cert: String,
    /// The admin client private key (PKCS#8 PEM).
    pub key: String,
}

/// Why a musterconfig is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MusterConfigError {
    #[error("not a valid musterconfig: {0}")]
    Parse(String),
    #[error("field {field}: {problem}")]
    Field { field: &'static str, problem: String },
}

impl MusterConfig {
    pub fn new(endpoints: Vec<String>, ca: String, cert: String, key: String) -> Self {
        Self { api_version: API_VERSION.into(), kind: KIND.into(), endpoints, ca, cert, key }
    }

    /// Parses and checks a musterconfig document.
    pub fn from_yaml(s: &str) -> Result<Self, MusterConfigError> {
        let c: Self = serde_saphyr::from_str(s).map_err(|e| MusterConfigError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn to_yaml(&self) -> Result<String, MusterConfigError> {
        serde_saphyr::to_string(self).map_err(|e| MusterConfigError::Parse(e.to_string()))
    }

    fn validate(&self) -> Result<(), MusterConfigError> {
        let field = |field, problem: &str| Err(MusterConfigError::Field { field, problem: problem.into() });
        if self.api_version != API_VERSION {
            return field("apiVersion", &format!("expected {API_VERSION}, got {:?}", self.api_version));
        }
        if self.kind != KIND {
            return field("kind", &format!("expected {KIND}, got {:?}", self.kind));
        }
        if self.endpoints.is_empty() {
            return field("endpoints", "at least one endpoint is required");
        }
        if let Some(bad) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return field("endpoints", &format!("{bad:?} must start with https://"));
        }
        for (name, v, marker) in [
            ("ca", &self.ca, "CERTIFICATE"),
            ("cert", &self.cert, "CERTIFICATE"),
            ("key", &self.key, "PRIVATE KEY"),
        ] {
            if !v.contains(&format!("-----BEGIN {marker}-----")) {
                return field(name, &format!("expected a PEM {marker}"));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for MusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MusterConfig")
            .field("endpoints", &self.endpoints)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MusterConfig {
        MusterConfig::new(
            vec!["https://127.0.0.1:7443".into()],
            "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n".into(),
            "-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n".into(),
            "-----BEGIN PRIVATE KEY-----\nC\n-----END PRIVATE KEY-----\n".into(),
        )
    }

    #[test]
    fn round_trips_through_yaml() {
        let c = sample();
        let y = c.to_yaml().unwrap();
        assert!(y.contains("apiVersion: muster/v1alpha1"), "{y}");
        assert_eq!(MusterConfig::from_yaml(&y).unwrap(), c);
    }

    #[test]
    fn names_the_bad_field() {
        let mut c = sample();
        c.endpoints = vec!["http://x".into()];
        let err = MusterConfig::from_yaml(&c.to_yaml().unwrap()).unwrap_err().to_string();
        assert!(err.contains("endpoints"), "{err}");
        let err = MusterConfig::from_yaml("apiVersion: x\nbogus: 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus") || err.contains("unknown"), "{err}");
    }

    #[test]
    fn debug_hides_key() {
        assert!(!format!("{:?}", sample()).contains("PRIVATE"));
    }
}
