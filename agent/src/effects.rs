//! Every change the agent makes to its node goes through [`Effects`]: one narrow interface, one
//! real Linux implementation ([`LinuxEffects`]). Files live under an injected root (tests pass a
//! temp dir); the hostname is set with `sethostname(2)` and written to `<root>/etc/hostname`;
//! sysctls are written to `/proc/sys` (per network namespace for `net.*`).
//!
//! Tests run the real implementation inside namespaces they create, never on the host.

use std::fs;
use std::io;
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

/// A node held in memory: for tests of everything above the effects, and for dry runs. It never
/// touches the machine it runs on. Unknown sysctls read as "0"; every owner resolves to 0:0.
#[derive(Debug, Default)]
pub struct MemoryEffects {
    pub hostname: std::sync::Mutex<String>,
    pub files: std::sync::Mutex<std::collections::BTreeMap<String, FileState>>,
    pub sysctls: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
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
        Ok(Some(locked(&self.sysctls).get(key).cloned().unwrap_or_else(|| "0".into())))
    }
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError> {
        locked(&self.sysctls).insert(key.into(), value.into());
        Ok(())
    }
}

/// Where files would go for `path` under `root` (for callers that report paths).
pub fn rooted(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}
