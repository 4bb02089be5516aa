//! Every change the agent makes to its node goes through [`Effects`]: one narrow interface, one
//! real Linux implementation ([`LinuxEffects`]). Files live under an injected root (tests pass a
//! temp dir); the hostname is set with `sethostname(2)` (the hostname reconciler writes
//! `/etc/hostname` as a file);
//! sysctls are written to `/proc/sys` (per network namespace for `net.*`); links, addresses and
//! routes go over rtnetlink (in the agent's network namespace); kernel modules are loaded with
//! `modprobe` and units driven with `systemctl`, but only by an agent that owns its node (root
//! `/`, not sharing the kernel as lab nodes do): anything else gets a clear "skipped" reason.
//!
//! Tests run the real implementation inside namespaces they create, never on the host.

mod disks;
mod linux;
mod memory;
mod netlink;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use disks::LinuxDisks;
pub use linux::LinuxEffects;
pub use memory::MemoryEffects;

/// A file as it is on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// An effect that failed, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct EffectError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

pub(crate) fn fail(what: impl Into<String>) -> impl FnOnce(io::Error) -> EffectError {
    let what = what.into();
    move |source| EffectError { what, source }
}

/// An address with its prefix length (an interface address or a route destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Addr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// A main-table route through one link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    pub to: Addr,
    pub via: Option<IpAddr>,
    pub metric: Option<u32>,
    /// Who added it (`rtm_protocol`): [`PROTO_KERNEL`], [`PROTO_BOOT`], [`PROTO_STATIC`] (Muster's
    /// own), DHCP clients' and routing daemons' numbers.
    pub protocol: u8,
}

/// Routes the kernel made itself (for an address's subnet); it remakes them with the address.
pub const PROTO_KERNEL: u8 = 2;
/// Routes added by hand or at boot (`ip route add`'s default).
pub const PROTO_BOOT: u8 = 3;
/// Routes Muster added.
pub const PROTO_STATIC: u8 = 4;

impl RouteState {
    /// Added by Muster; others (kernel, boot, DHCP) are never removed by a config.
    pub fn ours(&self) -> bool {
        self.protocol == PROTO_STATIC
    }
}

/// A network link as the kernel has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    /// Lower-case with colons; `None` for links without an Ethernet address.
    pub mac: Option<String>,
    pub mtu: u32,
    pub up: bool,
    pub addresses: Vec<Addr>,
    pub routes: Vec<RouteState>,
}

/// The node's links, with their addresses and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    pub links: Vec<LinkState>,
}

/// One change to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetChange {
    /// Sets the link up or down, and its MTU when given.
    SetLink {
        index: u32,
        up: bool,
        mtu: Option<u32>,
    },
    /// Deletes a link (a VLAN Muster created).
    DelLink {
        index: u32,
    },
    AddAddress {
        index: u32,
        addr: Addr,
    },
    DelAddress {
        index: u32,
        addr: Addr,
    },
    AddRoute {
        index: u32,
        route: RouteState,
    },
    DelRoute {
        index: u32,
        route: RouteState,
    },
    /// Creates VLAN `id` on link `parent`, named `name`, and sets it up.
    AddVlan {
        parent: u32,
        name: String,
        id: u16,
    },
}

impl fmt::Display for NetChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = |r: &RouteState| r.via.map(|v| format!(" via {v}")).unwrap_or_default();
        match self {
            NetChange::SetLink { index, up, mtu } => {
                write!(f, "set link #{index} {}", if *up { "up" } else { "down" })?;
                match mtu {
                    Some(m) => write!(f, ", mtu {m}"),
                    None => Ok(()),
                }
            }
            NetChange::DelLink { index } => write!(f, "delete link #{index}"),
            NetChange::AddAddress { addr, .. } => write!(f, "add address {addr}"),
            NetChange::DelAddress { addr, .. } => write!(f, "remove address {addr}"),
            NetChange::AddRoute { route, .. } => write!(f, "add route {}{}", route.to, via(route)),
            NetChange::DelRoute { route, .. } => write!(f, "remove route {}{}", route.to, via(route)),
            NetChange::AddVlan { name, id, .. } => write!(f, "create VLAN {id} as {name}"),
        }
    }
}

/// A systemd unit's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    pub enabled: bool,
    pub active: bool,
}

/// The node-changing operations the agent may perform.
pub trait Effects: Send + Sync {
    fn hostname(&self) -> Result<String, EffectError>;
    fn set_hostname(&self, name: &str) -> Result<(), EffectError>;
    /// The file at `path` (absolute, as in the config), if it exists.
    fn read_file(&self, path: &str) -> Result<Option<FileState>, EffectError>;
    /// Writes temp + fsync + rename with exactly `mode`, `uid` and `gid`.
    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), EffectError>;
    /// Removes the file at `path`; a missing file is not an error.
    fn remove_file(&self, path: &str) -> Result<(), EffectError>;
    /// Whether anything (file, directory, link) exists at `path`.
    fn exists(&self, path: &str) -> Result<bool, EffectError>;
    /// Removes the directory at `path` if it is empty; a non-empty or missing one stays.
    fn remove_empty_dir(&self, path: &str) -> Result<(), EffectError>;
    /// Resolves `user[:group]` (names or numbers) to ids.
    fn resolve_owner(&self, user: &str, group: Option<&str>) -> Result<(u32, u32), EffectError>;
    fn sysctl(&self, key: &str) -> Result<Option<String>, EffectError>;
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError>;
    /// Links with their addresses and routes.
    fn network(&self) -> Result<NetState, EffectError>;
    fn change_network(&self, change: &NetChange) -> Result<(), EffectError>;
    /// `Err(reason)` when this agent must not load kernel modules (it does not own the kernel).
    fn kernel_owned(&self) -> Result<(), String>;
    fn module_loaded(&self, name: &str) -> Result<bool, EffectError>;
    fn load_module(&self, name: &str, parameters: &[String]) -> Result<(), EffectError>;
    /// `modprobe -r NAME`.
    fn unload_module(&self, name: &str) -> Result<(), EffectError>;
    /// `Err(reason)` when units cannot be driven: systemd is not running this node.
    fn systemd(&self) -> Result<(), String>;
    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError>;
    /// `systemctl VERB [UNIT]` (`daemon-reload`, `enable`, `disable`, `start`, `stop`, `restart`).
    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError>;
}

/// Where files would go for `path` under `root` (for callers that report paths).
pub fn rooted(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}
