//! Domain types shared by every Muster component, converted from the wire types at the edge.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A machine's role in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No role yet.
    #[default]
    None,
    Controlplane,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "",
            Role::Controlplane => "controlplane",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected controlplane or worker")]
pub struct RoleError(pub String);

impl FromStr for Role {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "controlplane" | "control-plane" | "cp" => Ok(Role::Controlplane),
            "worker" => Ok(Role::Worker),
            _ => Err(RoleError(s.to_owned())),
        }
    }
}

/// A machine's lifecycle state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Enrolled, waiting for `muster approve`.
    Pending,
    /// Approved and heard from within the last 3 heartbeats.
    Ready,
    /// Approved, but silent for 3 heartbeats or more.
    Unreachable,
    /// Its certificate was revoked; it must re-enroll with a new token.
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Ready => "ready",
            State::Unreachable => "unreachable",
            State::Revoked => "revoked",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The controller-assigned machine id: 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MachineId(String);

/// A string that is not a machine id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid machine id {0:?}: expected 16 lowercase hex digits")]
pub struct MachineIdError(pub String);

impl MachineId {
    pub const LEN: usize = 16;

    /// From 8 random bytes.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        Self(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MachineId {
    type Err = MachineIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == Self::LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(s.to_owned()))
        } else {
            Err(MachineIdError(s.to_owned()))
        }
    }
}

impl TryFrom<String> for MachineId {
    type Error = MachineIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MachineId> for String {
    fn from(m: MachineId) -> Self {
        m.0
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Labels: keys as Kubernetes label keys (optional DNS prefix + `/` + name of at most 63
/// characters), values of at most 63 characters of `[A-Za-z0-9._-]`.
pub type Labels = BTreeMap<String, String>;

/// A label that does not follow the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?} must be key=value")]
    Shape(String),
    #[error("label key {0:?} is invalid: use [prefix/]name with name of 1-63 characters [A-Za-z0-9._-], starting and ending alphanumeric")]
    Key(String),
    #[error("label value {0:?} is invalid: use at most 63 characters [A-Za-z0-9._-], starting and ending alphanumeric")]
    Value(String),
}

fn label_segment_ok(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Checks one key and value.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|p| label_segment_ok(p, false) && !p.contains('_'));
            if !prefix_ok {
                return Err(LabelError::Key(key.to_owned()));
            }
            name
        }
        None => key,
    };
    if !label_segment_ok(name, false) {
        return Err(LabelError::Key(key.to_owned()));
    }
    if !label_segment_ok(value, true) {
        return Err(LabelError::Value(value.to_owned()));
    }
    Ok(())
}

/// Parses `key=value` as given on a command line.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s.split_once('=').ok_or_else(|| LabelError::Shape(s.to_owned()))?;
    validate_label(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

/// A cluster name: a DNS label (1-63 of `[a-z0-9-]`, alphanumeric at both ends).
pub fn validate_cluster_name(s: &str) -> Result<(), ClusterNameError> {
    let b = s.as_bytes();
    let ok = !s.is_empty()
        && s.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ClusterNameError(s.to_owned()))
    }
}

/// A string that is not a cluster name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cluster name {0:?}: use 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
)]
pub struct ClusterNameError(pub String);

/// Normalises a MAC address to lowercase colon form, or `None` if it is not one.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hexdigits: String = s.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
    if hexdigits.len() != 12 || !hexdigits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let lower = hexdigits.to_ascii_lowercase();
    let parts: Vec<&str> = (0..6).map(|i| &lower[i * 2..i * 2 + 2]).collect();
    Some(parts.join(":"))
}

/// Whether an SMBIOS UUID is a placeholder that firmware vendors ship (all zeros or all F).
pub fn is_placeholder_uuid(uuid: &str) -> bool {
    let digits: Vec<char> = uuid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    !digits.is_empty()
        && (digits.iter().all(|c| *c == '0') || digits.iter().all(|c| c.eq_ignore_ascii_case(&'f')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print() {
        assert_eq!("controlplane".parse::<Role>().unwrap(), Role::Controlplane);
        assert_eq!("Worker".parse::<Role>().unwrap(), Role::Worker);
        assert!("master".parse::<Role>().is_err());
    }

    #[test]
    fn machine_ids() {
        let id = MachineId::from_random([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        assert_eq!(id.as_str(), "deadbeef00010203");
        assert_eq!(id.as_str().parse::<MachineId>().unwrap(), id);
        assert!("DEADBEEF00010203".parse::<MachineId>().is_err());
        assert!("deadbeef".parse::<MachineId>().is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("rack=r1").unwrap(), ("rack".into(), "r1".into()));
        assert_eq!(parse_label("muster.dev/zone=").unwrap(), ("muster.dev/zone".into(), "".into()));
        assert!(matches!(parse_label("rack"), Err(LabelError::Shape(_))));
        assert!(matches!(parse_label("-rack=x"), Err(LabelError::Key(_))));
        assert!(matches!(parse_label("/rack=x"), Err(LabelError::Key(_))));
        assert!(matches!(parse_label("rack=a b"), Err(LabelError::Value(_))));
        assert!(matches!(parse_label(&format!("k={}", "a".repeat(64))), Err(LabelError::Value(_))));
    }

    #[test]
    fn cluster_names() {
        assert!(validate_cluster_name("homelab-1").is_ok());
        for bad in ["", "-a", "a-", "Home", "a_b", &"a".repeat(64)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(normalize_mac("52:54:00:AB:cd:01").as_deref(), Some("52:54:00:ab:cd:01"));
        assert_eq!(normalize_mac("52-54-00-ab-cd-01").as_deref(), Some("52:54:00:ab:cd:01"));
        assert_eq!(normalize_mac("5254.00ab.cd01").as_deref(), Some("52:54:00:ab:cd:01"));
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("zz:54:00:ab:cd:01"), None);
    }

    #[test]
    fn placeholder_uuids() {
        assert!(is_placeholder_uuid("00000000-0000-0000-0000-000000000000"));
        assert!(is_placeholder_uuid("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"));
        assert!(!is_placeholder_uuid("4c4c4544-0031-3510-8052-b4c04f4e4b32"));
        assert!(!is_placeholder_uuid(""));
    }
}
