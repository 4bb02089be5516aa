//! Whole disks and the power button: what install to disk and reset do to a node. One real
//! Linux implementation: disks from `/sys/block`, opened as `/dev/NAME`, the page cache
//! dropped before a read-back (`posix_fadvise(DONTNEED)` after `fsync`), reboot through systemd
//! when it runs the node, else `reboot(2)`. Tests root it in a temp dir (fake `sys/block`
//! entries, regular files as disks) and record the reboot instead of doing it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use muster_machinery::install::DiskInfo;

use super::{fail, EffectError};

/// How [`LinuxDisks::reboot`] reboots.
#[derive(Debug, Clone)]
enum Reboot {
    /// `systemctl reboot` when systemd runs the node, else `reboot(2)` (an initramfs's agent).
    Real,
    /// Counted (tests).
    Recorded(Arc<AtomicUsize>),
}

/// Disks under `sys_block` (`/sys/block`), device nodes under `dev` (`/dev`).
#[derive(Debug, Clone)]
pub struct LinuxDisks {
    sys_block: PathBuf,
    dev: PathBuf,
    reboot: Reboot,
}

impl Default for LinuxDisks {
    fn default() -> Self {
        Self { sys_block: "/sys/block".into(), dev: "/dev".into(), reboot: Reboot::Real }
    }
}

fn read_trim(p: &Path) -> String {
    fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default()
}

impl LinuxDisks {
    /// Disks in `root/sys/block`, device nodes in `root/dev`, reboots counted in `reboots`.
    pub fn rooted(root: &Path, reboots: Arc<AtomicUsize>) -> Self {
        Self { sys_block: root.join("sys/block"), dev: root.join("dev"), reboot: Reboot::Recorded(reboots) }
    }

    /// Whole disks: not loop, RAM, device-mapper or optical devices, and not empty.
    pub fn disks(&self) -> Result<Vec<DiskInfo>, EffectError> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.sys_block).map_err(fail(format!("reading {}", self.sys_block.display())))?;
        let mut names: Vec<String> =
            rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for name in names {
            if ["loop", "ram", "dm-", "sr", "zram", "md", "nbd"].iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let p = self.sys_block.join(&name);
            let sectors: u64 = read_trim(&p.join("size")).parse().unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            let mut serial = read_trim(&p.join("serial"));
            if serial.is_empty() {
                serial = read_trim(&p.join("device/serial"));
            }
            out.push(DiskInfo {
                size_bytes: sectors * 512,
                model: read_trim(&p.join("device/model")),
                serial,
                removable: read_trim(&p.join("removable")) == "1",
                name,
            });
        }
        Ok(out)
    }

    /// `/dev/NAME` for a disk name, or the disk a `/dev/...` path (a by-id link) resolves to.
    pub fn device(&self, name_or_path: &str) -> PathBuf {
        match name_or_path.strip_prefix("/dev/") {
            Some(rel) => self.dev.join(rel),
            None => self.dev.join(name_or_path),
        }
    }

    /// The disk name a `/dev/...` path resolves to (by-id and by-path links followed).
    pub fn resolve(&self, path: &str) -> Result<String, EffectError> {
        let real = fs::canonicalize(self.device(path)).map_err(fail(format!("resolving {path}")))?;
        real.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| EffectError {
            what: format!("resolving {path}"),
            source: io::Error::other("no file name"),
        })
    }

    /// Opens the disk for reading and writing.
    pub fn open(&self, name: &str) -> Result<File, EffectError> {
        let p = self.device(name);
        OpenOptions::new().read(true).write(true).open(&p).map_err(fail(format!("opening {}", p.display())))
    }

    /// Opens the disk for an install: exclusively, so a disk with a mounted (or otherwise held)
    /// partition is refused with EBUSY instead of being overwritten under a running system.
    pub fn open_exclusive(&self, name: &str) -> Result<File, EffectError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.device(name);
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(&p).map_err(|e| {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            fail(if busy {
                format!("opening {} (it is in use: a partition on it is mounted or held)", p.display())
            } else {
                format!("opening {}", p.display())
            })(e)
        })
    }

    /// Makes what was written durable and drops it from the page cache, so the next read comes
    /// from the disk.
    pub fn flush(&self, f: &File, what: &str) -> Result<(), EffectError> {
        f.sync_all().map_err(fail(format!("syncing {what}")))?;
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on an open descriptor we own; it only advises the page cache.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(EffectError {
                what: format!("dropping the cache of {what}"),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }

    /// Reboots the node (returns only in tests, or on failure).
    pub fn reboot(&self) -> Result<(), EffectError> {
        match &self.reboot {
            Reboot::Recorded(n) => {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Reboot::Real => {
                if Path::new("/run/systemd/system").exists() {
                    let out = std::process::Command::new("systemctl")
                        .arg("reboot")
                        .output()
                        .map_err(fail("running systemctl reboot"))?;
                    if out.status.success() {
                        return Ok(());
                    }
                    tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "systemctl reboot failed; rebooting directly");
                }
                // SAFETY: sync(2) and reboot(2) take no pointers.
                #[allow(unsafe_code)]
                let rc = unsafe {
                    libc::sync();
                    libc::reboot(libc::RB_AUTOBOOT)
                };
                Err(EffectError { what: "reboot(2)".into(), source: io::Error::from_raw_os_error(rc) })
            }
        }
    }
}
