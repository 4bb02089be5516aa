//! The real Linux implementation of [`Effects`].

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{fail, netlink, EffectError, Effects, FileState, NetChange, NetState, UnitState};

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
        Ok(())
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

    fn remove_file(&self, path: &str) -> Result<(), EffectError> {
        match fs::remove_file(self.under_root(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(fail(format!("removing {path}"))(e)),
            _ => Ok(()),
        }
    }

    fn exists(&self, path: &str) -> Result<bool, EffectError> {
        match fs::symlink_metadata(self.under_root(path)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(fail(format!("looking at {path}"))(e)),
        }
    }

    fn remove_empty_dir(&self, path: &str) -> Result<(), EffectError> {
        match fs::remove_dir(self.under_root(path)) {
            Ok(()) => Ok(()),
            // Not empty (someone else's files are in it), or gone already: it stays as it is.
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty)
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) =>
            {
                Ok(())
            }
            Err(e) => Err(fail(format!("removing the directory {path}"))(e)),
        }
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
        netlink::snapshot().map_err(fail("reading links, addresses and routes (netlink)"))
    }

    fn change_network(&self, change: &NetChange) -> Result<(), EffectError> {
        netlink::apply(change).map_err(fail(change.to_string()))
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

    fn unload_module(&self, name: &str) -> Result<(), EffectError> {
        self.kernel_owned().map_err(|e| EffectError {
            what: format!("unloading module {name}"),
            source: io::Error::other(e),
        })?;
        run("modprobe", &["-r", name])
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
