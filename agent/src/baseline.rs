//! What was on the node before Muster changed it, and putting it back.
//!
//! Every change the agent makes goes through [`Recording`], an [`Effects`] wrapper that, before
//! the first change to an object (the hostname, a file, a sysctl, a link, a module, a unit),
//! records the object as it was and saves the record (`baseline.json` in the state dir, 0600)
//! before the change is made, so a crash right after the change still knows what to restore.
//!
//! After a generation is applied, every recorded object that the generation no longer manages
//! is restored ([`Baseline::restore_unclaimed`]): a file dropped from the config gets its old
//! content, mode and owner back (or goes away if it was not there), a link its addresses, MTU,
//! up/down state and routes, a VLAN Muster made is deleted, a module Muster loaded is
//! unloaded, a unit goes back to its enabled/active state. A revert, a rollback and a rollback
//! to "before Muster" (an empty config) are all this one step. Restored objects leave the
//! record: a later change records them afresh.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::effects::{
    Addr, EffectError, Effects, FileState, LinkState, NetChange, NetState, RouteState, UnitState,
    PROTO_KERNEL,
};
use crate::identity::{write_atomic, StateError};

/// An object as it was before Muster first changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Prior {
    Hostname {
        name: String,
    },
    /// A file (`None`: it did not exist), and the directories its write created.
    File {
        state: Option<FileState>,
        created_dirs: Vec<String>,
    },
    /// A sysctl's value (`None`: the key did not exist).
    Sysctl {
        value: Option<String>,
    },
    /// A link as it was; `None`: it did not exist (a VLAN Muster made).
    Link {
        state: Option<LinkState>,
    },
    /// Whether the module was loaded.
    Module {
        loaded: bool,
    },
    Unit {
        state: UnitState,
    },
}

/// One recorded object: its key (`hostname`, `file:/etc/motd`, `sysctl:KEY`, `link:NAME`,
/// `module:NAME`, `unit:NAME`) and what it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub prior: Prior,
}

/// The record, oldest first, and where it is saved.
#[derive(Debug)]
pub struct Baseline {
    path: PathBuf,
    entries: Mutex<Vec<Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Baseline {
    /// The record saved in `state_dir` (empty if there is none; a corrupt one is reported and
    /// kept aside as `baseline.json.corrupt`, never silently dropped).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("baseline.json");
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "the baseline is corrupt; kept aside, starting a new one");
                    let _ = std::fs::rename(&path, path.with_extension("json.corrupt"));
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the baseline");
                Vec::new()
            }
        };
        Self { path, entries: Mutex::new(entries) }
    }

    /// A copy of the record.
    pub fn entries(&self) -> Vec<Entry> {
        lock(&self.entries).clone()
    }

    /// The recorded state of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Prior> {
        lock(&self.entries).iter().find(|e| e.key == key).map(|e| e.prior.clone())
    }

    fn save(&self, entries: &[Entry]) -> Result<(), StateError> {
        let json = serde_json::to_vec(entries).map_err(|e| StateError {
            action: "encoding",
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&self.path, &json, 0o600)
    }

    /// Records `key` as `prior` unless it is recorded already, and saves the record.
    fn record(
        &self,
        key: String,
        prior: impl FnOnce() -> Result<Prior, EffectError>,
    ) -> Result<(), EffectError> {
        let mut entries = lock(&self.entries);
        if entries.iter().any(|e| e.key == key) {
            return Ok(());
        }
        let prior = prior()?;
        entries.push(Entry { key: key.clone(), prior });
        self.save(&entries).map_err(|e| EffectError {
            what: format!("recording {key} before changing it"),
            source: io::Error::other(e.to_string()),
        })
    }

    fn forget(&self, keys: &BTreeSet<String>) -> Result<(), StateError> {
        let mut entries = lock(&self.entries);
        entries.retain(|e| !keys.contains(&e.key));
        self.save(&entries)
    }

    /// Restores every recorded object whose key is not in `claimed`, newest first, through
    /// `fx` (not recorded again). Returns `(key, result)` per object; restored ones leave the
    /// record, failed ones stay in it to be tried again.
    pub fn restore_unclaimed(
        &self,
        fx: &dyn Effects,
        claimed: &BTreeSet<String>,
    ) -> Vec<(String, Result<bool, String>)> {
        let todo: Vec<Entry> =
            self.entries().into_iter().rev().filter(|e| !claimed.contains(&e.key)).collect();
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        let mut reload_units = false;
        for e in &todo {
            let r = restore_one(fx, e);
            if r.is_ok() {
                done.insert(e.key.clone());
                reload_units |= e.key.starts_with("file:/etc/systemd/system/");
            }
            out.push((e.key.clone(), r));
        }
        if reload_units && fx.systemd().is_ok() {
            if let Err(e) = fx.systemctl("daemon-reload", None) {
                tracing::warn!(error = %e, "daemon-reload after restoring unit files failed");
            }
        }
        if !done.is_empty() {
            if let Err(e) = self.forget(&done) {
                tracing::warn!(error = %e, "could not save the baseline after restoring");
            }
        }
        out
    }
}

/// Puts one object back. `Ok(true)` when something was changed.
fn restore_one(fx: &dyn Effects, e: &Entry) -> Result<bool, String> {
    let t = |e: EffectError| e.to_string();
    let key = e.key.as_str();
    match &e.prior {
        Prior::Hostname { name } => {
            if fx.hostname().map_err(t)? == *name {
                return Ok(false);
            }
            fx.set_hostname(name).map_err(t)?;
            Ok(true)
        }
        Prior::File { state, created_dirs } => {
            let path = key.strip_prefix("file:").unwrap_or(key);
            let have = fx.read_file(path).map_err(t)?;
            let changed = match state {
                Some(want) if have.as_ref() != Some(want) => {
                    fx.write_file(path, &want.content, want.mode, want.uid, want.gid).map_err(t)?;
                    true
                }
                Some(_) => false,
                None if have.is_some() => {
                    fx.remove_file(path).map_err(t)?;
                    true
                }
                None => false,
            };
            // Deepest first: each only if empty (someone else may have put files there).
            for d in created_dirs.iter().rev() {
                fx.remove_empty_dir(d).map_err(t)?;
            }
            Ok(changed)
        }
        Prior::Sysctl { value } => {
            let k = key.strip_prefix("sysctl:").unwrap_or(key);
            match value {
                Some(v)
                    if fx
                        .sysctl(k)
                        .map_err(t)?
                        .is_some_and(|h| !h.split_whitespace().eq(v.split_whitespace())) =>
                {
                    fx.set_sysctl(k, v).map_err(t)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        Prior::Link { state } => {
            let name = key.strip_prefix("link:").unwrap_or(key);
            let before_changes = fx.network().map_err(t)?;
            let Some(have) = before_changes.links.iter().find(|l| l.name == name) else {
                return match state {
                    None => Ok(false),
                    Some(_) => Err(format!("link {name} is gone; it cannot be restored")),
                };
            };
            let Some(want) = state else {
                fx.change_network(&NetChange::DelLink { index: have.index }).map_err(t)?;
                return Ok(true);
            };
            // Link and addresses first; then the routes, against what the kernel left (an
            // address change takes the routes through it along).
            let index = have.index;
            let mut changed = false;
            for c in link_restore_changes(have, want) {
                tracing::info!(change = %c, link = name, "restoring");
                fx.change_network(&c).map_err(t)?;
                changed = true;
            }
            let net = fx.network().map_err(t)?;
            let now = net.links.iter().find(|l| l.index == index).ok_or(format!("link {name} went away"))?;
            for c in route_restore_changes(now, want) {
                tracing::info!(change = %c, link = name, "restoring");
                fx.change_network(&c).map_err(t)?;
                changed = true;
            }
            Ok(changed)
        }
        Prior::Module { loaded } => {
            let name = key.strip_prefix("module:").unwrap_or(key);
            if *loaded || !fx.module_loaded(name).map_err(t)? {
                return Ok(false);
            }
            fx.unload_module(name).map_err(t)?;
            Ok(true)
        }
        Prior::Unit { state } => {
            let name = key.strip_prefix("unit:").unwrap_or(key);
            if fx.systemd().is_err() {
                return Ok(false);
            }
            let have = fx.unit_state(name).map_err(t)?;
            let mut verbs = Vec::new();
            if have.active && !state.active {
                verbs.push("stop");
            }
            if have.enabled != state.enabled {
                verbs.push(if state.enabled { "enable" } else { "disable" });
            }
            if !have.active && state.active {
                verbs.push("start");
            }
            for v in &verbs {
                fx.systemctl(v, Some(name)).map_err(t)?;
            }
            Ok(!verbs.is_empty())
        }
    }
}

/// The changes that make `have` the link `want` was: up/down and MTU, exactly its addresses
/// (the kernel's own link-local and loopback ones aside). Routes follow ([`route_restore_changes`]).
pub(crate) fn link_restore_changes(have: &LinkState, want: &LinkState) -> Vec<NetChange> {
    let index = have.index;
    let mut out = Vec::new();
    let mtu = (have.mtu != want.mtu).then_some(want.mtu);
    if want.up && (!have.up || mtu.is_some()) {
        out.push(NetChange::SetLink { index, up: true, mtu });
    }
    for a in have.addresses.iter().filter(|a| !want.addresses.contains(a) && !kernel_managed(a)) {
        out.push(NetChange::DelAddress { index, addr: *a });
    }
    for a in want.addresses.iter().filter(|a| !have.addresses.contains(a) && !kernel_managed(a)) {
        out.push(NetChange::AddAddress { index, addr: *a });
    }
    if !want.up && (have.up || mtu.is_some()) {
        out.push(NetChange::SetLink { index, up: false, mtu });
    }
    out
}

/// The route changes that give `have` the routes `want` had: Muster's own ones it did not have
/// go, the others it had come back (the kernel remakes its own subnet routes with the addresses).
pub(crate) fn route_restore_changes(have: &LinkState, want: &LinkState) -> Vec<NetChange> {
    let index = have.index;
    let same = |x: &RouteState, y: &RouteState| x.to == y.to && x.via == y.via && x.metric == y.metric;
    let mut out = Vec::new();
    for r in have.routes.iter().filter(|r| r.ours() && !want.routes.iter().any(|w| same(r, w))) {
        out.push(NetChange::DelRoute { index, route: r.clone() });
    }
    if want.up {
        for r in want
            .routes
            .iter()
            .filter(|r| r.protocol != PROTO_KERNEL && !have.routes.iter().any(|h| same(h, r)))
        {
            out.push(NetChange::AddRoute { index, route: r.clone() });
        }
    }
    out
}

/// IPv6 link-local and loopback addresses belong to the kernel: never removed or added.
pub(crate) fn kernel_managed(a: &Addr) -> bool {
    match a.ip {
        std::net::IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80 || v.is_loopback(),
        std::net::IpAddr::V4(v) => v.is_loopback(),
    }
}

/// [`Effects`] that records each object in the baseline before changing it. Reads pass through.
pub struct Recording<'a> {
    pub fx: &'a dyn Effects,
    pub baseline: &'a Baseline,
}

impl Recording<'_> {
    fn link_key(&self, net: &NetState, index: u32) -> Option<(String, LinkState)> {
        net.links.iter().find(|l| l.index == index).map(|l| (format!("link:{}", l.name), l.clone()))
    }

    /// The ancestors of `path` (deepest last) that do not exist yet.
    fn missing_dirs(&self, path: &str) -> Result<Vec<String>, EffectError> {
        let mut out = Vec::new();
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| d != &Path::new("/") && !d.as_os_str().is_empty()) {
            let s = d.to_string_lossy().into_owned();
            if self.fx.exists(&s)? {
                break;
            }
            out.push(s);
            p = d.parent();
        }
        out.reverse();
        Ok(out)
    }
}

impl Effects for Recording<'_> {
    fn hostname(&self) -> Result<String, EffectError> {
        self.fx.hostname()
    }
    fn set_hostname(&self, name: &str) -> Result<(), EffectError> {
        self.baseline.record("hostname".into(), || Ok(Prior::Hostname { name: self.fx.hostname()? }))?;
        self.fx.set_hostname(name)
    }
    fn read_file(&self, path: &str) -> Result<Option<FileState>, EffectError> {
        self.fx.read_file(path)
    }
    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), EffectError> {
        self.baseline.record(format!("file:{path}"), || {
            Ok(Prior::File { state: self.fx.read_file(path)?, created_dirs: self.missing_dirs(path)? })
        })?;
        self.fx.write_file(path, content, mode, uid, gid)
    }
    fn remove_file(&self, path: &str) -> Result<(), EffectError> {
        self.baseline.record(format!("file:{path}"), || {
            Ok(Prior::File { state: self.fx.read_file(path)?, created_dirs: Vec::new() })
        })?;
        self.fx.remove_file(path)
    }
    fn exists(&self, path: &str) -> Result<bool, EffectError> {
        self.fx.exists(path)
    }
    fn remove_empty_dir(&self, path: &str) -> Result<(), EffectError> {
        self.fx.remove_empty_dir(path)
    }
    fn resolve_owner(&self, user: &str, group: Option<&str>) -> Result<(u32, u32), EffectError> {
        self.fx.resolve_owner(user, group)
    }
    fn sysctl(&self, key: &str) -> Result<Option<String>, EffectError> {
        self.fx.sysctl(key)
    }
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError> {
        self.baseline
            .record(format!("sysctl:{key}"), || Ok(Prior::Sysctl { value: self.fx.sysctl(key)? }))?;
        self.fx.set_sysctl(key, value)
    }
    fn network(&self) -> Result<NetState, EffectError> {
        self.fx.network()
    }
    fn change_network(&self, change: &NetChange) -> Result<(), EffectError> {
        match change {
            NetChange::AddVlan { name, .. } => {
                self.baseline.record(format!("link:{name}"), || Ok(Prior::Link { state: None }))?;
            }
            NetChange::SetLink { index, .. }
            | NetChange::DelLink { index }
            | NetChange::AddAddress { index, .. }
            | NetChange::DelAddress { index, .. }
            | NetChange::AddRoute { index, .. }
            | NetChange::DelRoute { index, .. } => {
                let net = self.fx.network()?;
                if let Some((key, state)) = self.link_key(&net, *index) {
                    self.baseline.record(key, || Ok(Prior::Link { state: Some(state) }))?;
                }
            }
        }
        self.fx.change_network(change)
    }
    fn kernel_owned(&self) -> Result<(), String> {
        self.fx.kernel_owned()
    }
    fn module_loaded(&self, name: &str) -> Result<bool, EffectError> {
        self.fx.module_loaded(name)
    }
    fn load_module(&self, name: &str, parameters: &[String]) -> Result<(), EffectError> {
        self.baseline.record(format!("module:{name}"), || {
            Ok(Prior::Module { loaded: self.fx.module_loaded(name)? })
        })?;
        self.fx.load_module(name, parameters)
    }
    fn unload_module(&self, name: &str) -> Result<(), EffectError> {
        self.baseline.record(format!("module:{name}"), || {
            Ok(Prior::Module { loaded: self.fx.module_loaded(name)? })
        })?;
        self.fx.unload_module(name)
    }
    fn systemd(&self) -> Result<(), String> {
        self.fx.systemd()
    }
    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError> {
        self.fx.unit_state(name)
    }
    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError> {
        if let (Some(u), "enable" | "disable" | "start" | "stop" | "restart") = (unit, verb) {
            self.baseline
                .record(format!("unit:{u}"), || Ok(Prior::Unit { state: self.fx.unit_state(u)? }))?;
        }
        self.fx.systemctl(verb, unit)
    }
}
