//! Every change the agent makes to its node goes through [`Effects`]: one narrow interface, one
//! real Linux implementation ([`LinuxEffects`]). Files live under an injected root (tests pass a
//! temp dir); the hostname is set with `sethostname(2)` and written to `<root>/etc/hostname`;
//! sysctls are written to `/proc/sys` (per network namespace for `net.*`); links, addresses and
//! routes go over rtnetlink (in the agent's network namespace); kernel modules are loaded with
//! `modprobe` and units driven with `systemctl`, but only by an agent that owns its node (root
//! `/`, not sharing the kernel as lab nodes do): anything else gets a clear "skipped" reason.
//!
//! Tests run the real implementation inside namespaces they create, never on the host.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file as it is on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// An effect that failed, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct EffectError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

fn fail(what: impl Into<String>) -> impl FnOnce(io::Error) -> EffectError {
    let what = what.into();
    move |source| EffectError { what, source }
}

/// An address with its prefix length (an interface address or a route destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    pub to: Addr,
    pub via: Option<IpAddr>,
    pub metric: Option<u32>,
    /// Added by Muster (protocol `static`); others (kernel, boot, DHCP) are never removed.
    pub ours: bool,
}

/// A network link as the kernel has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Sets the link up, and its MTU when given.
    SetLink {
        index: u32,
        up: bool,
        mtu: Option<u32>,
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
            NetChange::SetLink { index, mtu: Some(m), .. } => write!(f, "set link #{index} up, mtu {m}"),
            NetChange::SetLink { index, .. } => write!(f, "set link #{index} up"),
            NetChange::AddAddress { addr, .. } => write!(f, "add address {addr}"),
            NetChange::DelAddress { addr, .. } => write!(f, "remove address {addr}"),
            NetChange::AddRoute { route, .. } => write!(f, "add route {}{}", route.to, via(route)),
            NetChange::DelRoute { route, .. } => write!(f, "remove route {}{}", route.to, via(route)),
            NetChange::AddVlan { name, id, .. } => write!(f, "create VLAN {id} as {name}"),
        }
    }
}

/// A systemd unit's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// `Err(reason)` when units cannot be driven: systemd is not running this node.
    fn systemd(&self) -> Result<(), String>;
    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError>;
    /// `systemctl VERB [UNIT]` (`daemon-reload`, `enable`, `disable`, `start`, `stop`, `restart`).
    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError>;
}

/// The real Linux implementation.
#[derive(Debug, Clone)]
pub struct LinuxEffects {
    root: PathBuf,
    proc_sys: PathBuf,
    namespaced_sysctls_only: bool,
}

impl LinuxEffects {
    /// Files (and `/etc/hostname`, `/etc/passwd`, `/etc/group`) under `root`; sysctls in `/proc/sys`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), proc_sys: PathBuf::from("/proc/sys"), namespaced_sysctls_only: false }
    }

    /// Refuse sysctls that are not per network namespace (everything but `net.*`): for agents
    /// that share a kernel with others, as in `muster lab`.
    pub fn namespaced_sysctls_only(mut self) -> Self {
        self.namespaced_sysctls_only = true;
        self
    }

    fn under_root(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn sysctl_path(&self, key: &str) -> PathBuf {
        self.proc_sys.join(key.replace('.', "/"))
    }

    fn lookup(&self, file: &str, name: &str, id_field: usize) -> Option<u32> {
        let text = fs::read_to_string(self.under_root(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(id_field)?.parse().ok()).flatten()
        })
    }
}

impl Effects for LinuxEffects {
    fn hostname(&self) -> Result<String, EffectError> {
        fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .map_err(fail("reading the hostname"))
    }

    fn set_hostname(&self, name: &str) -> Result<(), EffectError> {
        // SAFETY: sethostname reads exactly `len` bytes from a valid buffer we own.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            return Err(EffectError {
                what: format!("sethostname({name})"),
                source: io::Error::last_os_error(),
            });
        }
        let etc = self.under_root("/etc");
        fs::create_dir_all(&etc).map_err(fail(format!("creating {}", etc.display())))?;
        muster_util::write_atomic(&etc.join("hostname"), format!("{name}\n").as_bytes(), 0o644)
            .map_err(fail("writing /etc/hostname"))
    }

    fn read_file(&self, path: &str) -> Result<Option<FileState>, EffectError> {
        let p = self.under_root(path);
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(format!("reading {path}"))(e)),
        };
        if meta.file_type().is_symlink() {
            // A managed path that is a symlink differs from any content: the write replaces the
            // link itself (rename), never its target.
            return Ok(Some(FileState { content: Vec::new(), mode: 0, uid: u32::MAX, gid: u32::MAX }));
        }
        if !meta.is_file() {
            return Err(EffectError {
                what: format!("reading {path}"),
                source: io::Error::other("exists and is not a regular file"),
            });
        }
        let content = fs::read(&p).map_err(fail(format!("reading {path}")))?;
        Ok(Some(FileState {
            content,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }))
    }

    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), EffectError> {
        let p = self.under_root(path);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).map_err(fail(format!("creating the directory of {path}")))?;
        }
        // Owner first on the temp file would need our own temp handling; write, then chown and
        // chmod the final file: the content is never visible half-written.
        muster_util::write_atomic(&p, content, mode).map_err(fail(format!("writing {path}")))?;
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(fail(format!("chown {path}")))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(fail(format!("chmod {path}")))
    }

    fn resolve_owner(&self, user: &str, group: Option<&str>) -> Result<(u32, u32), EffectError> {
        let unknown = |kind: &str, n: &str| EffectError {
            what: format!("resolving {kind} {n}"),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no {kind} {n:?} in the node's /etc/{kind_file}",
                    kind_file = if kind == "user" { "passwd" } else { "group" }
                ),
            ),
        };
        let uid = match user.parse::<u32>() {
            Ok(n) => n,
            Err(_) if user == "root" => 0,
            Err(_) => self.lookup("/etc/passwd", user, 2).ok_or_else(|| unknown("user", user))?,
        };
        let gid = match group {
            None => match user.parse::<u32>() {
                Ok(n) => n,
                Err(_) if user == "root" => 0,
                Err(_) => self.lookup("/etc/passwd", user, 3).ok_or_else(|| unknown("user", user))?,
            },
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) if g == "root" => 0,
                Err(_) => self.lookup("/etc/group", g, 2).ok_or_else(|| unknown("group", g))?,
            },
        };
        Ok((uid, gid))
    }

    fn network(&self) -> Result<NetState, EffectError> {
        crate::netlink::snapshot().map_err(fail("reading links, addresses and routes (netlink)"))
    }

    fn change_network(&self, change: &NetChange) -> Result<(), EffectError> {
        crate::netlink::apply(change).map_err(fail(change.to_string()))
    }

    fn kernel_owned(&self) -> Result<(), String> {
        if self.namespaced_sysctls_only {
            Err("this agent shares its kernel with others (lab); modules are not loaded".into())
        } else if self.root != Path::new("/") {
            Err(format!(
                "this agent manages a subtree ({}), not the whole node; modules are not loaded",
                self.root.display()
            ))
        } else {
            Ok(())
        }
    }

    fn module_loaded(&self, name: &str) -> Result<bool, EffectError> {
        Ok(Path::new("/sys/module").join(name.replace('-', "_")).exists())
    }

    fn load_module(&self, name: &str, parameters: &[String]) -> Result<(), EffectError> {
        self.kernel_owned().map_err(|e| EffectError {
            what: format!("loading module {name}"),
            source: io::Error::other(e),
        })?;
        run("modprobe", &[&[name], &parameters.iter().map(String::as_str).collect::<Vec<_>>()[..]].concat())
    }

    fn systemd(&self) -> Result<(), String> {
        self.kernel_owned()
            .map_err(|_| "systemd not present (this agent does not own its node)".to_owned())?;
        if Path::new("/run/systemd/system").is_dir() {
            Ok(())
        } else {
            Err("systemd not present".into())
        }
    }

    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError> {
        let ok = |verb: &str| {
            std::process::Command::new("systemctl")
                .args(["--quiet", verb, name])
                .status()
                .map(|s| s.success())
                .map_err(fail(format!("systemctl {verb} {name}")))
        };
        Ok(UnitState { enabled: ok("is-enabled")?, active: ok("is-active")? })
    }

    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError> {
        self.systemd()
            .map_err(|e| EffectError { what: format!("systemctl {verb}"), source: io::Error::other(e) })?;
        match unit {
            Some(u) => run("systemctl", &[verb, u]),
            None => run("systemctl", &[verb]),
        }
    }

    fn sysctl(&self, key: &str) -> Result<Option<String>, EffectError> {
        match fs::read_to_string(self.sysctl_path(key)) {
            Ok(v) => Ok(Some(v.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(fail(format!("reading sysctl {key}"))(e)),
        }
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError> {
        if self.namespaced_sysctls_only && !key.starts_with("net.") {
            return Err(EffectError {
                what: format!("setting sysctl {key}"),
                source: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "only net.* sysctls are per network namespace; this agent shares its kernel (lab) and refuses others",
                ),
            });
        }
        fs::write(self.sysctl_path(key), value.as_bytes())
            .map_err(fail(format!("setting sysctl {key}={value}")))
    }
}

/// Runs a command; a non-zero exit is an error carrying its stderr.
fn run(cmd: &str, args: &[&str]) -> Result<(), EffectError> {
    let what = format!("{cmd} {}", args.join(" "));
    let out = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(fail(what.clone()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(EffectError {
            what,
            source: io::Error::other(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        })
    }
}

/// A node held in memory: for tests of everything above the effects, and for dry runs. It never
/// touches the machine it runs on. Unknown sysctls read as "0" (or as absent, with
/// `strict_sysctls`); every owner resolves to 0:0.
#[derive(Debug, Default)]
pub struct MemoryEffects {
    pub hostname: std::sync::Mutex<String>,
    pub files: std::sync::Mutex<std::collections::BTreeMap<String, FileState>>,
    pub sysctls: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    pub net: std::sync::Mutex<NetState>,
    pub modules: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub units: std::sync::Mutex<std::collections::BTreeMap<String, UnitState>>,
    /// `systemctl` calls, in order.
    pub systemctl_calls: std::sync::Mutex<Vec<String>>,
    /// Sysctls not set before read as absent, as on a kernel without them.
    pub strict_sysctls: bool,
}

fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Effects for MemoryEffects {
    fn hostname(&self) -> Result<String, EffectError> {
        Ok(locked(&self.hostname).clone())
    }
    fn set_hostname(&self, name: &str) -> Result<(), EffectError> {
        *locked(&self.hostname) = name.into();
        Ok(())
    }
    fn read_file(&self, path: &str) -> Result<Option<FileState>, EffectError> {
        Ok(locked(&self.files).get(path).cloned())
    }
    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), EffectError> {
        locked(&self.files).insert(path.into(), FileState { content: content.into(), mode, uid, gid });
        Ok(())
    }
    fn resolve_owner(&self, user: &str, group: Option<&str>) -> Result<(u32, u32), EffectError> {
        let id = |s: &str| s.parse().unwrap_or(0);
        Ok((id(user), group.map_or(id(user), id)))
    }
    fn sysctl(&self, key: &str) -> Result<Option<String>, EffectError> {
        let have = locked(&self.sysctls).get(key).cloned();
        Ok(if self.strict_sysctls { have } else { Some(have.unwrap_or_else(|| "0".into())) })
    }
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError> {
        locked(&self.sysctls).insert(key.into(), value.into());
        Ok(())
    }
    fn network(&self) -> Result<NetState, EffectError> {
        Ok(locked(&self.net).clone())
    }
    fn change_network(&self, change: &NetChange) -> Result<(), EffectError> {
        let mut net = locked(&self.net);
        let missing = || EffectError {
            what: change.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such link"),
        };
        let idx = match change {
            NetChange::SetLink { index, .. }
            | NetChange::AddAddress { index, .. }
            | NetChange::DelAddress { index, .. }
            | NetChange::AddRoute { index, .. }
            | NetChange::DelRoute { index, .. } => *index,
            NetChange::AddVlan { parent, name, .. } => {
                if !net.links.iter().any(|l| l.index == *parent) {
                    return Err(missing());
                }
                let index = net.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
                net.links.push(LinkState {
                    index,
                    name: name.clone(),
                    mtu: 1500,
                    up: true,
                    ..LinkState::default()
                });
                return Ok(());
            }
        };
        let link = net.links.iter_mut().find(|l| l.index == idx).ok_or_else(missing)?;
        match change {
            NetChange::SetLink { up, mtu, .. } => {
                link.up = *up;
                if let Some(m) = mtu {
                    link.mtu = *m;
                }
            }
            NetChange::AddAddress { addr, .. } => link.addresses.push(*addr),
            NetChange::DelAddress { addr, .. } => link.addresses.retain(|a| a != addr),
            NetChange::AddRoute { route, .. } => link.routes.push(RouteState { ours: true, ..route.clone() }),
            NetChange::DelRoute { route, .. } => {
                link.routes.retain(|r| r.to != route.to || r.via != route.via)
            }
            NetChange::AddVlan { .. } => {}
        }
        Ok(())
    }
    fn kernel_owned(&self) -> Result<(), String> {
        Ok(())
    }
    fn module_loaded(&self, name: &str) -> Result<bool, EffectError> {
        Ok(locked(&self.modules).contains(name))
    }
    fn load_module(&self, name: &str, _: &[String]) -> Result<(), EffectError> {
        locked(&self.modules).insert(name.into());
        Ok(())
    }
    fn systemd(&self) -> Result<(), String> {
        Ok(())
    }
    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError> {
        Ok(locked(&self.units).get(name).copied().unwrap_or_default())
    }
    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError> {
        locked(&self.systemctl_calls).push(format!("{verb} {}", unit.unwrap_or("")).trim_end().to_owned());
        if let Some(u) = unit {
            let mut units = locked(&self.units);
            let st = units.entry(u.into()).or_default();
            match verb {
                "enable" => st.enabled = true,
                "disable" => st.enabled = false,
                "start" | "restart" => st.active = true,
                "stop" => st.active = false,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Where files would go for `path` under `root` (for callers that report paths).
pub fn rooted(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}
