//! Helpers of the end-to-end tests with real VMs: the PXE bundle and node OS image built once
//! per target dir, a controller serving network boot on loopback, QEMU's restricted user
//! networking toward it, waiting for a machine's state while watching the VM's console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::vm::{Net, Vm, GUEST_FWD_ADDR};
use crate::{bin, ControllerProc};

/// Ports the guest dials at 10.0.2.100.
pub const GUEST_HTTP: u16 = 80;
pub const GUEST_GRPC: u16 = 7443;
/// TCG is slow and CI machines are loaded: generous, but a failure on the console stops at once.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The PXE bundle, built once per target dir (a lock keeps parallel tests from racing).
pub fn pxe_bundle() -> Result<PathBuf> {
    let root = crate::bin_dir().join("muster-e2e");
    std::fs::create_dir_all(&root)?;
    let out = root.join("pxe");
    let lock = std::fs::File::create(root.join("build.lock"))?;
    let status = Command::new("flock")
        .arg(root.join("build.lock"))
        .arg(bin("muster")?)
        .args(["image", "pxe", "--quiet", "--agent"])
        .arg(crate::agent_bin()?)
        .arg("--out")
        .arg(&out)
        .status()
        .context("building the PXE bundle")?;
    drop(lock);
    if !status.success() {
        bail!("muster image pxe failed ({status})");
    }
    Ok(out)
}

/// A controller serving network boot on loopback, its certificate valid for the guests' view.
pub fn boot_controller(dir: &Path, bundle: &Path, ports: Option<(u16, u16)>) -> Result<ControllerProc> {
    controller_with(dir, Some(bundle), ports, &[])
}

/// A controller as [`boot_controller`] starts it, with or without boot assets, with more flags.
pub fn controller_with(
    dir: &Path,
    bundle: Option<&Path>,
    ports: Option<(u16, u16)>,
    more: &[&str],
) -> Result<ControllerProc> {
    let data = dir.join("controller");
    if !data.join("ca.crt").exists() {
        muster_lab::muster::init_controller(&data, &["--san", GUEST_FWD_ADDR])?;
    }
    let (grpc, http) = match ports {
        Some((g, h)) => (format!("127.0.0.1:{g}"), format!("127.0.0.1:{h}")),
        None => ("127.0.0.1:0".into(), "127.0.0.1:0".into()),
    };
    let url = format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}");
    let mut args: Vec<String> = Vec::new();
    if let Some(b) = bundle {
        args.extend(
            [
                "--boot-assets",
                &b.display().to_string(),
                "--boot-controller-url",
                &url,
                "--boot-kernel-args",
                "console=ttyS0 panic=-1",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    }
    // QEMU's user networking: every guest connects from loopback (see the top).
    args.extend(["--trust-reported-macs".to_owned(), "127.0.0.1/32".to_owned()]);
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(ControllerProc::start(&data, &grpc, &http, &args)?)
}

/// The node OS image (`muster image os`), built once per target dir from the agent under test
/// (its .deb made first); its root file system is cached there too.
pub fn os_image() -> Result<PathBuf> {
    let root = crate::bin_dir().join("muster-e2e");
    std::fs::create_dir_all(&root)?;
    let lock = root.join("os.lock");
    let deb = agent_deb(&root.join("debian"), Some(&lock))?;
    let out = root.join("os");
    build_os(&deb, &root.join("cache"), &out, Some(&lock))?;
    Ok(out)
}

/// `muster` run under `flock LOCK` when a lock is given (builds shared by parallel tests).
fn muster(lock: Option<&Path>) -> Result<Command> {
    let muster = bin("muster")?;
    Ok(match lock {
        Some(l) => {
            let mut c = Command::new("flock");
            c.arg(l).arg(muster);
            c
        }
        None => Command::new(muster),
    })
}

/// Builds the agent under test's Debian package into `dir`; its path.
pub fn agent_deb(dir: &Path, lock: Option<&Path>) -> Result<PathBuf> {
    let status = muster(lock)?
        .args(["image", "deb", "--agent"])
        .arg(crate::agent_bin()?)
        .arg("--out")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .context("building the agent's .deb")?;
    if !status.success() {
        bail!("muster image deb failed ({status})");
    }
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("muster-agent_")))
        .context("no muster-agent_*.deb was built")
}

/// `muster image os --quiet` from `deb`, with its root file system cached in `cache`.
pub fn build_os(deb: &Path, cache: &Path, out: &Path, lock: Option<&Path>) -> Result<()> {
    let status = muster(lock)?
        .args(["image", "os", "--quiet", "--agent-deb"])
        .arg(deb)
        .arg("--cache")
        .arg(cache)
        .arg("--out")
        .arg(out)
        .status()
        .context("building the node OS image")?;
    if !status.success() {
        bail!("muster image os failed ({status})");
    }
    Ok(())
}

/// A copy-on-write clone of a qcow2 image of `size` (a hypervisor's "clone from template").
pub fn clone_disk(base: &Path, clone: &Path, size: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(clone)
        .arg(size)
        .output()
        .context("qemu-img create (apt-get install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn user_net(ctl: &ControllerProc, boot: bool) -> Net {
    Net::User {
        bootfile: boot.then(|| format!("http://{GUEST_FWD_ADDR}/boot/start.ipxe")),
        forwards: vec![(GUEST_HTTP, ctl.ports.http.port()), (GUEST_GRPC, ctl.ports.grpc.port())],
    }
}

/// The machine with `mac`, once `ok` holds for it (checking the VM's console meanwhile).
pub fn wait_machine(
    ctl: &ControllerProc,
    vm: &mut Vm,
    mac: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = std::time::Instant::now();
    loop {
        vm.check()?;
        let found = ctl
            .machines()?
            .into_iter()
            .find(|m| m["macs"].as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some(mac))));
        if let Some(m) = found.filter(|m| ok(m)) {
            return Ok(m);
        }
        if start.elapsed() > BOOT_TIMEOUT {
            bail!(
                "VM {}: {what} not seen within {BOOT_TIMEOUT:?}; serial log at {}",
                vm.name,
                vm.serial_log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Keeps the temp dir (serial logs) when the test fails.
pub struct Keep(Option<tempfile::TempDir>);
impl Default for Keep {
    fn default() -> Self {
        Self::new()
    }
}

impl Keep {
    /// A new temp dir under the system's; panics (a test's setup failing) when none can be made.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self(Some(tempfile::Builder::new().prefix("muster-e2e-").tempdir().expect("a temp dir")))
    }
    pub fn path(&self) -> &Path {
        self.0.as_ref().map(|d| d.path()).unwrap_or(Path::new("/nonexistent"))
    }
}
impl Drop for Keep {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.0.take() {
                eprintln!("keeping serial logs in {}", d.keep().display());
            }
        }
    }
}

/// `text` without ANSI SGR sequences (`ESC [ ... m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
