//! The node's identity on disk: `key.pem` (generated here, never sent anywhere), `cert.pem`,
//! `ca.pem` and `machine.json` (machine id, controller, last assignment). Private files are
//! 0600 in a 0700 directory, written temp + fsync + rename.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use muster_machinery::model::Role;
use muster_proto::pb;
use serde::{Deserialize, Serialize};

/// The role and cluster the controller gave this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Assignment {
    pub role: Role,
    pub cluster: String,
    pub labels: BTreeMap<String, String>,
    pub approved: bool,
}

impl From<pb::Assignment> for Assignment {
    fn from(a: pb::Assignment) -> Self {
        Self {
            role: muster_proto::convert::role(a.role).unwrap_or_default(),
            cluster: a.cluster,
            labels: a.labels.into_iter().collect(),
            approved: a.approved,
        }
    }
}

/// `machine.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFile {
    pub machine_id: String,
    pub controller: String,
    #[serde(default)]
    pub assignment: Option<Assignment>,
}

/// A complete identity.
#[derive(Clone)]
pub struct Identity {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub machine: MachineFile,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("machine", &self.machine).field("key_pem", &"<redacted>").finish()
    }
}

/// State dir errors name the file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct StateError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn key(&self) -> PathBuf {
        self.root.join("key.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.root.join("cert.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn machine(&self) -> PathBuf {
        self.root.join("machine.json")
    }

    /// Creates the directory (0700).
    pub fn create(&self) -> Result<(), StateError> {
        muster_util::create_dir_private(&self.root).map_err(|source| StateError {
            action: "creating",
            path: self.root.clone(),
            source,
        })
    }

    fn read(path: &Path) -> Result<Option<String>, StateError> {
        match fs::read_to_string(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError { action: "reading", path: path.to_owned(), source }),
        }
    }

    /// The saved CA, if any.
    pub fn load_ca(&self) -> Result<Option<String>, StateError> {
        Self::read(&self.ca())
    }

    /// The saved key, if any (kept across a failed enrollment).
    pub fn load_key(&self) -> Result<Option<String>, StateError> {
        Self::read(&self.key())
    }

    /// The full identity, if every part is there and readable.
    pub fn load(&self) -> Result<Option<Identity>, StateError> {
        let (Some(key_pem), Some(cert_pem), Some(ca_pem), Some(machine)) = (
            Self::read(&self.key())?,
            Self::read(&self.cert())?,
            Self::read(&self.ca())?,
            Self::read(&self.machine())?,
        ) else {
            return Ok(None);
        };
        let machine: MachineFile = serde_json::from_str(&machine).map_err(|e| StateError {
            action: "parsing",
            path: self.machine(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        Ok(Some(Identity { key_pem, cert_pem, ca_pem, machine }))
    }

    pub fn write_key(&self, pem: &str) -> Result<(), StateError> {
        write_atomic(&self.key(), pem.as_bytes(), 0o600)
    }
    pub fn write_cert(&self, pem: &str) -> Result<(), StateError> {
        write_atomic(&self.cert(), pem.as_bytes(), 0o600)
    }
    pub fn write_ca(&self, pem: &str) -> Result<(), StateError> {
        write_atomic(&self.ca(), pem.as_bytes(), 0o644)
    }
    pub fn write_machine(&self, m: &MachineFile) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(m).map_err(|e| StateError {
            action: "encoding",
            path: self.machine(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        write_atomic(&self.machine(), &json, 0o600)
    }

    /// Forgets the identity (after revocation): key, certificate and machine file.
    pub fn wipe(&self) -> Result<(), StateError> {
        for p in [self.cert(), self.key(), self.machine()] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError { action: "removing", path: p, source }),
            }
        }
        Ok(())
    }
}

/// Writes `data` to `path` atomically with `mode` (see [`muster_util::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    muster_util::write_atomic(path, data, mode).map_err(|source| StateError {
        action: "writing",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_modes_and_wipe() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::new(t.path().join("state"));
        s.create().unwrap();
        assert!(s.load().unwrap().is_none());
        s.write_key("KEY").unwrap();
        s.write_cert("CERT").unwrap();
        s.write_ca("CA").unwrap();
        assert!(s.load().unwrap().is_none(), "incomplete without machine.json");
        let m = MachineFile {
            machine_id: "0123456789abcdef".into(),
            controller: "https://x:1".into(),
            assignment: None,
        };
        s.write_machine(&m).unwrap();
        let id = s.load().unwrap().unwrap();
        assert_eq!((id.key_pem.as_str(), id.machine.machine_id.as_str()), ("KEY", "0123456789abcdef"));
        assert!(!format!("{id:?}").contains("KEY"));
        for (p, mode) in
            [(s.key(), 0o600), (s.cert(), 0o600), (s.machine(), 0o600), (s.root().to_owned(), 0o700)]
        {
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, mode, "{}", p.display());
        }
        s.wipe().unwrap();
        assert!(!s.key().exists() && !s.cert().exists() && s.ca().exists());
        s.wipe().unwrap();
    }

    #[test]
    fn corrupt_machine_file_is_an_error_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::new(t.path());
        for p in [s.key(), s.cert(), s.ca()] {
            fs::write(p, "x").unwrap();
        }
        fs::write(s.machine(), "{not json").unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("machine.json"), "{e}");
    }
}
