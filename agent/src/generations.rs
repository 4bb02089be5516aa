//! The config generations an agent keeps in its state dir, so a restarted or rebooted node
//! re-converges without the controller and a try survives an agent restart:
//!
//! - `config.json`: the generation the node runs (and the last one it reverted);
//! - `try.json`: a generation applied in try mode and not confirmed yet, with its deadline and
//!   the generation to go back to;
//! - `staged.json`: a generation to apply on the next boot, with the boot it arrived in.
//!
//! Every write is temp + fsync + rename (0600), so a kill at any point leaves the old or the new
//! file, never half of one.

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::{write_atomic, StateError};

/// The generation the node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    pub generation: u64,
    pub yaml: String,
    /// The newest generation this node tried and reverted (it is not tried again).
    #[serde(default)]
    pub reverted_generation: u64,
}

/// A generation applied in try mode, awaiting confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTry {
    pub generation: u64,
    /// Unix ms after which the agent reverts.
    pub deadline_unix_ms: i64,
    pub timeout_ms: u64,
    /// What to go back to (`None`: the node had no config before).
    pub previous: Option<SavedConfig>,
    /// Confirmed by the controller once the agent has reconnected over it.
    #[serde(default)]
    pub auto_confirm: bool,
}

/// A generation to apply on the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedConfig {
    pub generation: u64,
    pub yaml: String,
    /// The boot it was staged in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// The three files in a state dir.
#[derive(Debug, Clone)]
pub struct Generations {
    dir: PathBuf,
}

impl Generations {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A missing file is `None`; an unreadable or corrupt one is logged and treated as missing
    /// (the controller sends the config again on connect).
    fn load<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let path = self.path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read saved config state");
                return None;
            }
        };
        match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring corrupt saved config state");
                None
            }
        }
    }

    fn store<T: Serialize>(&self, name: &str, v: &T) -> Result<(), StateError> {
        let path = self.path(name);
        let json = serde_json::to_vec(v).map_err(|e| StateError {
            action: "encoding",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&path, &json, 0o600)
    }

    fn remove(&self, name: &str) -> Result<(), StateError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError { action: "removing", path, source }),
        }
    }

    pub fn current(&self) -> Option<SavedConfig> {
        self.load("config.json")
    }
    pub fn set_current(&self, c: &SavedConfig) -> Result<(), StateError> {
        self.store("config.json", c)
    }

    pub fn pending_try(&self) -> Option<PendingTry> {
        self.load("try.json")
    }
    pub fn set_pending_try(&self, t: &PendingTry) -> Result<(), StateError> {
        self.store("try.json", t)
    }
    pub fn clear_try(&self) -> Result<(), StateError> {
        self.remove("try.json")
    }

    pub fn staged(&self) -> Option<StagedConfig> {
        self.load("staged.json")
    }
    pub fn set_staged(&self, s: &StagedConfig) -> Result<(), StateError> {
        self.store("staged.json", s)
    }
    pub fn clear_staged(&self) -> Result<(), StateError> {
        self.remove("staged.json")
    }
}

/// This boot's id (a new one every boot), or "" when the file cannot be read.
pub fn boot_id(path: &Path) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generations::new(dir.path());
        assert_eq!(g.current(), None);
        let c = SavedConfig { generation: 3, yaml: "hostname: a\n".into(), reverted_generation: 2 };
        g.set_current(&c).unwrap();
        assert_eq!(g.current(), Some(c.clone()));
        let t = PendingTry {
            generation: 4,
            deadline_unix_ms: 9,
            timeout_ms: 60_000,
            previous: Some(c),
            auto_confirm: true,
        };
        g.set_pending_try(&t).unwrap();
        assert_eq!(g.pending_try(), Some(t));
        g.clear_try().unwrap();
        g.clear_try().unwrap();
        assert_eq!(g.pending_try(), None);
    }

    #[test]
    fn corrupt_files_read_as_missing_and_old_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("try.json"), b"{not json").unwrap();
        // config.json as written before reverted_generation existed.
        std::fs::write(dir.path().join("config.json"), br#"{"generation":1,"yaml":"x"}"#).unwrap();
        let g = Generations::new(dir.path());
        assert_eq!(g.pending_try(), None);
        assert_eq!(g.current().map(|c| (c.generation, c.reverted_generation)), Some((1, 0)));
    }
}
