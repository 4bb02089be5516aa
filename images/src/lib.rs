//! Builds Muster's node images: a PXE bundle (Debian's generic kernel + an initramfs with
//! busybox, the network drivers, an init and the agent) and a BIOS-bootable ISO with the same
//! payload. `muster image pxe|iso` is the command. Depends only on `muster-machinery` (asset
//! names); no network code, no root.
//!
//! Reproducible: the same kernel package, busybox and agent give the same bytes (sorted cpio
//! entries, fixed mtimes, gzip without timestamps, a fixed ISO date). No root needed: the kernel
//! package is downloaded (`apt-get download`) and unpacked (`dpkg-deb`), never installed.

pub mod cpio;

pub mod deb;

pub mod os;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ring::digest;
use serde::{Deserialize, Serialize};

/// Drivers loaded by the init, in dependency order: virtio, VirtIO RNG (a VM's kernel has
/// entropy at once instead of seconds later, so the agent's key and first TLS handshake do not
/// wait; hardware with RDRAND needs nothing), the NICs (virtio, e1000), QEMU's fw_cfg in
/// sysfs (a VM's enrollment settings can come from it; elsewhere it does not load), then the
/// disks an install writes to: virtio-blk, NVMe, SATA (AHCI) with SCSI disks. A module whose
/// hardware is absent loads and idles, or fails to load; neither stops the boot.
pub const MODULES: &[(&str, &str)] = &[
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_pci_modern_dev", "drivers/virtio/virtio_pci_modern_dev.ko"),
    ("virtio_pci_legacy_dev", "drivers/virtio/virtio_pci_legacy_dev.ko"),
    ("virtio_pci", "drivers/virtio/virtio_pci.ko"),
    ("virtio_rng", "drivers/char/hw_random/virtio-rng.ko"),
    ("failover", "net/core/failover.ko"),
    ("net_failover", "drivers/net/net_failover.ko"),
    ("virtio_net", "drivers/net/virtio_net.ko"),
    ("e1000", "drivers/net/ethernet/intel/e1000/e1000.ko"),
    ("qemu_fw_cfg", "drivers/firmware/qemu_fw_cfg.ko"),
    ("virtio_blk", "drivers/block/virtio_blk.ko"),
    ("crct10dif_common", "crypto/crct10dif_common.ko"),
    ("crct10dif_generic", "crypto/crct10dif_generic.ko"),
    ("crc_t10dif", "lib/crc-t10dif.ko"),
    ("crc64", "lib/crc64.ko"),
    ("crc64_rocksoft", "lib/crc64-rocksoft.ko"),
    ("t10_pi", "block/t10-pi.ko"),
    ("nvme_core", "drivers/nvme/host/nvme-core.ko"),
    ("nvme", "drivers/nvme/host/nvme.ko"),
    ("scsi_common", "drivers/scsi/scsi_common.ko"),
    ("scsi_mod", "drivers/scsi/scsi_mod.ko"),
    ("libata", "drivers/ata/libata.ko"),
    ("libahci", "drivers/ata/libahci.ko"),
    ("ahci", "drivers/ata/ahci.ko"),
    ("sd_mod", "drivers/scsi/sd_mod.ko"),
];

/// The bundle's file names (the boot service serves these).
pub use muster_machinery::boot::{INITRD, KERNEL};
pub const MANIFEST: &str = "manifest.json";

const INIT: &str = include_str!("../rootfs/init");
const UDHCPC: &str = include_str!("../rootfs/udhcpc.script");
/// Bump when the image's layout or scripts change in a way inputs do not show.
const FORMAT: u32 = 1;
/// 2000-01-01T00:00:00Z: every file's mtime in the images.
const EPOCH: u32 = 946_684_800;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Input(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<Vec<u8>, Error> {
    run_input(cmd, None)
}

/// [`run`], with `input` on the command's standard input (else none).
fn run_input(cmd: &mut Command, input: Option<&[u8]>) -> Result<Vec<u8>, Error> {
    use std::process::Stdio;
    let desc = format!("{cmd:?}").replace('"', "");
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command { cmd: desc.clone(), detail: e.to_string() })?;
    if let (Some(data), Some(mut i)) = (input, child.stdin.take()) {
        i.write_all(data).map_err(io(format!("writing to {desc}")))?;
    }
    let out = child.wait_with_output().map_err(io(format!("waiting for {desc}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: desc,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(out.stdout)
}

fn sha256(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// Reports build steps (the CLI prints them; tests pass [`Quiet`]).
pub trait Progress {
    fn step(&mut self, n: usize, of: usize, what: &str);
}

/// Prints steps on stderr with elapsed time.
pub struct Stderr(pub Instant);
impl Progress for Stderr {
    fn step(&mut self, n: usize, of: usize, what: &str) {
        eprintln!("[{n}/{of}] {:>5.1}s  {what}", self.0.elapsed().as_secs_f64());
    }
}

pub struct Quiet;
impl Progress for Quiet {
    fn step(&mut self, _: usize, _: usize, _: &str) {}
}

/// What goes into a PXE bundle.
#[derive(Debug, Clone)]
pub struct PxeOptions {
    pub out: PathBuf,
    pub agent: PathBuf,
    pub cache: PathBuf,
    /// `None`: what `linux-image-amd64` depends on.
    pub kernel_package: Option<String>,
    pub busybox: PathBuf,
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kernel_package: String,
    pub kernel_version: String,
    pub kernel_deb_sha256: String,
    pub agent_sha256: String,
    pub busybox_sha256: String,
    /// Digest of every input: an equal one means the bundle is up to date.
    pub inputs: String,
    pub files: Vec<FileInfo>,
}

/// The kernel package's files, unpacked once per package into the cache.
struct Kernel {
    package: String,
    version: String,
    deb_sha256: String,
    vmlinuz: Vec<u8>,
    modules: Vec<(String, Vec<u8>)>,
}

fn kernel_package(explicit: Option<&str>) -> Result<String, Error> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    String::from_utf8_lossy(&out)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").map(|p| p.trim().to_owned()))
        .filter(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            Error::Input("cannot tell which kernel linux-image-amd64 depends on (run apt-get update?)".into())
        })
}

fn fetch_kernel(opts: &PxeOptions, progress: &mut dyn Progress, of: usize) -> Result<Kernel, Error> {
    let package = kernel_package(opts.kernel_package.as_deref())?;
    let dir = opts.cache.join("kernel");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let find = || -> Option<PathBuf> {
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .collect();
        debs.sort();
        debs.pop()
    };
    let deb = match find() {
        Some(d) => {
            progress.step(1, of, &format!("kernel: {package} (cached)"));
            d
        }
        None => {
            progress.step(1, of, &format!("kernel: downloading {package} (apt-get download, ~70 MB)"));
            run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&dir))?;
            find().ok_or_else(|| {
                Error::Input(format!("apt-get download {package} left no .deb in {}", dir.display()))
            })?
        }
    };
    let bytes = std::fs::read(&deb).map_err(io(format!("reading {}", deb.display())))?;
    let deb_sha256 = sha256(&bytes);
    drop(bytes);
    // Keyed by the package and the module list, so a new module is unpacked, not looked for.
    let wanted: String = MODULES.iter().map(|(_, p)| format!("{p}\n")).collect();
    let key = sha256(format!("{deb_sha256}\n{wanted}").as_bytes());
    let unpacked = dir.join(format!("unpacked-{}", &key[..16]));
    if !unpacked.join("done").exists() {
        progress.step(2, of, "kernel: unpacking vmlinuz and drivers");
        let tmp = dir.join(format!("unpacking-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let script = format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*' {}",
            deb.display(),
            tmp.display(),
            MODULES
                .iter()
                .map(|(_, p)| format!("'./lib/modules/*/kernel/{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        run(Command::new("sh").args(["-c", &script]))?;
        std::fs::write(tmp.join("done"), b"").map_err(io("marking the unpacked kernel"))?;
        let _ = std::fs::remove_dir_all(&unpacked);
        std::fs::rename(&tmp, &unpacked).map_err(io(format!("renaming into {}", unpacked.display())))?;
        // Older unpacks (another package or module list) are not used again.
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let old = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("unpacked-"));
            if old && p != unpacked {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    } else {
        progress.step(2, of, "kernel: unpacked (cached)");
    }
    let boot = unpacked.join("boot");
    let vmlinuz_path = std::fs::read_dir(&boot)
        .map_err(io(format!("reading {}", boot.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| Error::Input(format!("{package} has no /boot/vmlinuz-*")))?;
    let version = vmlinuz_path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let vmlinuz = std::fs::read(&vmlinuz_path).map_err(io(format!("reading {}", vmlinuz_path.display())))?;
    let moddir = unpacked.join("lib/modules").join(&version).join("kernel");
    let mut modules = Vec::new();
    for (name, rel) in MODULES {
        let p = moddir.join(rel);
        let data = std::fs::read(&p).map_err(io(format!("reading module {}", p.display())))?;
        modules.push(((*name).to_owned(), data));
    }
    Ok(Kernel { package, version, deb_sha256, vmlinuz, modules })
}

/// The shared libraries `ldd` lists for a dynamically linked binary (with the loader).
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd").arg(bin).output().map_err(io("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable")
        || text.contains("statically linked")
        || !out.status.success()
    {
        return Ok(Vec::new());
    }
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The agent as it goes into the image: stripped when `strip` is there (deterministic).
fn agent_bytes(agent: &Path, tmp: &Path) -> Result<Vec<u8>, Error> {
    let copy = tmp.join("muster-agent");
    std::fs::copy(agent, &copy).map_err(io(format!("reading the agent {}", agent.display())))?;
    if Command::new("strip").arg("--version").output().is_ok_and(|o| o.status.success()) {
        run(Command::new("strip").arg("--strip-all").arg(&copy))?;
    }
    std::fs::read(&copy).map_err(io("reading the stripped agent"))
}

/// The initramfs (gzip'd newc cpio), from its parts.
fn initramfs(
    kernel: &Kernel,
    busybox: &[u8],
    applets: &[String],
    agent: &[u8],
    libs: &[(PathBuf, Vec<u8>)],
) -> Result<Vec<u8>, Error> {
    use cpio::Entry;
    let mut entries: Vec<Entry> = Vec::new();
    let dir = |p: &str| Entry::Dir { path: p.into(), mode: 0o755 };
    let mut dirs: Vec<String> = [
        "/bin",
        "/dev",
        "/etc",
        "/etc/muster",
        "/lib",
        "/lib/modules",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/sbin",
        "/var",
        "/var/lib",
        "/var/lib/muster-agent",
        "/home",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (p, _) in libs {
        let mut a = p.parent();
        while let Some(d) = a {
            if d == Path::new("/") {
                break;
            }
            dirs.push(d.display().to_string());
            a = d.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    entries.extend(dirs.iter().map(|d| dir(d)));
    let file = |p: &str, mode: u32, data: Vec<u8>| Entry::File { path: p.into(), mode, data };
    entries.push(Entry::CharDev { path: "/dev/console".into(), mode: 0o600, major: 5, minor: 1 });
    entries.push(Entry::CharDev { path: "/dev/null".into(), mode: 0o666, major: 1, minor: 3 });
    entries.push(file("/init", 0o755, INIT.as_bytes().to_vec()));
    entries.push(file("/etc/udhcpc.script", 0o755, UDHCPC.as_bytes().to_vec()));
    entries.push(file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec()));
    entries.push(file("/etc/group", 0o644, b"root:x:0:\n".to_vec()));
    entries.push(file("/etc/shadow", 0o600, b"root:!:1::::::\n".to_vec()));
    entries.push(file("/etc/hostname", 0o644, b"muster\n".to_vec()));
    entries.push(file(
        "/etc/os-release",
        0o644,
        b"NAME=\"Muster node\"\nID=muster\nPRETTY_NAME=\"Muster node (initramfs)\"\n".to_vec(),
    ));
    let order: String = kernel.modules.iter().map(|(n, _)| format!("{n}\n")).collect();
    entries.push(file("/etc/muster/modules", 0o644, order.into_bytes()));
    for (name, data) in &kernel.modules {
        entries.push(file(&format!("/lib/modules/{name}.ko"), 0o644, data.clone()));
    }
    entries.push(file("/bin/busybox", 0o755, busybox.to_vec()));
    for a in applets {
        if a != "busybox" && !a.contains('/') && !a.is_empty() && a != "[[" && a != "[" {
            entries.push(Entry::Symlink { path: format!("/bin/{a}"), target: "busybox".into() });
        }
    }
    entries.push(file("/usr/bin/muster-agent", 0o755, agent.to_vec()));
    for (p, data) in libs {
        entries.push(file(&p.display().to_string(), 0o755, data.clone()));
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    entries.dedup_by(|a, b| a.path() == b.path());
    let mut raw = Vec::new();
    cpio::write(&mut raw, &entries, EPOCH).map_err(io("writing the initramfs"))?;
    gzip(&raw, 6, "the initramfs")
}

/// `data` gzip'd at `level` without a timestamp (the same input, the same bytes).
fn gzip(data: &[u8], level: u32, what: &str) -> Result<Vec<u8>, Error> {
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::new(level));
    gz.write_all(data).map_err(io(format!("compressing {what}")))?;
    gz.finish().map_err(io(format!("compressing {what}")))
}

/// Writes `data` to `path` (temp + rename).
fn write_file(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
}

/// Builds (or, when its inputs are unchanged, keeps) a PXE bundle in `opts.out`.
pub fn build_pxe(opts: &PxeOptions, progress: &mut dyn Progress) -> Result<Manifest, Error> {
    const STEPS: usize = 5;
    let agent_in = std::fs::read(&opts.agent).map_err(|e| {
        Error::Input(format!(
            "agent binary {}: {e} (build it with `cargo build --profile agent -p muster-agent`, or pass --agent)",
            opts.agent.display()
        ))
    })?;
    let busybox = std::fs::read(&opts.busybox).map_err(|e| {
        Error::Input(format!("{}: {e} (apt-get install busybox-static)", opts.busybox.display()))
    })?;
    let kernel = fetch_kernel(opts, progress, STEPS)?;
    let libs = shared_libs(&opts.agent)?;
    let mut lib_data = Vec::new();
    for l in &libs {
        lib_data.push((l.clone(), std::fs::read(l).map_err(io(format!("reading {}", l.display())))?));
    }
    let inputs = {
        let mut h = digest::Context::new(&digest::SHA256);
        h.update(
            format!("format {FORMAT}\n{}\n{}\n{}\n", kernel.deb_sha256, sha256(&agent_in), sha256(&busybox))
                .as_bytes(),
        );
        h.update(INIT.as_bytes());
        h.update(UDHCPC.as_bytes());
        for (name, _) in MODULES {
            h.update(format!("module {name}\n").as_bytes());
        }
        for (p, d) in &lib_data {
            h.update(format!("{} {}\n", p.display(), sha256(d)).as_bytes());
        }
        hex::encode(h.finish())
    };
    let manifest_path = opts.out.join(MANIFEST);
    if let Some(m) =
        std::fs::read(&manifest_path).ok().and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
    {
        let intact = m
            .files
            .iter()
            .all(|f| std::fs::read(opts.out.join(&f.name)).is_ok_and(|d| sha256(&d) == f.sha256));
        if m.inputs == inputs && intact {
            progress.step(STEPS, STEPS, &format!("up to date in {}", opts.out.display()));
            return Ok(m);
        }
    }
    progress.step(
        3,
        STEPS,
        &format!("initramfs: busybox, {} drivers, agent ({} libraries)", MODULES.len(), libs.len()),
    );
    let tmp = tempfile::tempdir().map_err(io("creating a temp dir"))?;
    let agent = agent_bytes(&opts.agent, tmp.path())?;
    let applets_out = run(Command::new(&opts.busybox).arg("--list"))?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&applets_out).lines().map(str::to_owned).collect();
    applets.sort();
    let initrd = initramfs(&kernel, &busybox, &applets, &agent, &lib_data)?;
    progress.step(
        4,
        STEPS,
        &format!(
            "writing {} (initramfs {:.1} MB, kernel {:.1} MB)",
            opts.out.display(),
            initrd.len() as f64 / 1e6,
            kernel.vmlinuz.len() as f64 / 1e6
        ),
    );
    std::fs::create_dir_all(&opts.out).map_err(io(format!("creating {}", opts.out.display())))?;
    write_file(&opts.out.join(KERNEL), &kernel.vmlinuz)?;
    write_file(&opts.out.join(INITRD), &initrd)?;
    let files = vec![
        FileInfo { name: INITRD.into(), size: initrd.len() as u64, sha256: sha256(&initrd) },
        FileInfo { name: KERNEL.into(), size: kernel.vmlinuz.len() as u64, sha256: sha256(&kernel.vmlinuz) },
    ];
    let sums: String = files.iter().map(|f| format!("{}  {}\n", f.sha256, f.name)).collect();
    write_file(&opts.out.join("SHA256SUMS"), sums.as_bytes())?;
    let m = Manifest {
        format: FORMAT,
        kernel_package: kernel.package,
        kernel_version: kernel.version,
        kernel_deb_sha256: kernel.deb_sha256,
        agent_sha256: sha256(&agent_in),
        busybox_sha256: sha256(&busybox),
        inputs,
        files,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::Input(e.to_string()))?;
    write_file(&manifest_path, &json)?;
    progress.step(STEPS, STEPS, &format!("done: {}", opts.out.display()));
    Ok(m)
}

/// What goes into an ISO.
#[derive(Debug, Clone)]
pub struct IsoOptions {
    pub pxe: PxeOptions,
    pub out: PathBuf,
    /// Kernel parameters (the ISO's only way to know its controller).
    pub cmdline: String,
}

/// Builds a BIOS-bootable (isolinux, hybrid) ISO with the PXE bundle's kernel and initramfs.
pub fn build_iso(opts: &IsoOptions, progress: &mut dyn Progress) -> Result<FileInfo, Error> {
    let m = build_pxe(&opts.pxe, progress)?;
    let stage = tempfile::tempdir().map_err(io("creating a temp dir"))?;
    let s = stage.path();
    for d in ["isolinux", "boot"] {
        std::fs::create_dir_all(s.join(d)).map_err(io("staging the ISO"))?;
    }
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(|_| ()).map_err(io(format!("copying {}", from.display())))
    };
    copy(Path::new("/usr/lib/ISOLINUX/isolinux.bin"), &s.join("isolinux/isolinux.bin"))
        .map_err(|e| Error::Input(format!("{e} (apt-get install isolinux syslinux-common)")))?;
    copy(Path::new("/usr/lib/syslinux/modules/bios/ldlinux.c32"), &s.join("isolinux/ldlinux.c32"))
        .map_err(|e| Error::Input(format!("{e} (apt-get install syslinux-common)")))?;
    copy(&opts.pxe.out.join(KERNEL), &s.join("boot/vmlinuz"))?;
    copy(&opts.pxe.out.join(INITRD), &s.join("boot/initrd.img"))?;
    if opts.cmdline.contains('\n') {
        return Err(Error::Input("--cmdline must be one line".into()));
    }
    let cfg = format!(
        "DEFAULT muster\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL muster\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {}\n",
        opts.cmdline.trim()
    );
    std::fs::write(s.join("isolinux/isolinux.cfg"), cfg).map_err(io("writing isolinux.cfg"))?;
    // Fixed dates on everything, so the same inputs give the same ISO.
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(EPOCH));
    for p in [
        "isolinux/isolinux.bin",
        "isolinux/ldlinux.c32",
        "isolinux/isolinux.cfg",
        "boot/vmlinuz",
        "boot/initrd.img",
        "isolinux",
        "boot",
        "",
    ] {
        let f = std::fs::File::open(s.join(p)).map_err(io(format!("opening {p}")))?;
        f.set_modified(when).map_err(io(format!("dating {p}")))?;
    }
    progress.step(5, 5, &format!("ISO: xorriso → {}", opts.out.display()));
    let tmp_out = opts.out.with_extension(format!("tmp-{}", std::process::id()));
    run(Command::new("xorriso")
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(&tmp_out)
        .args([
            "-V",
            "MUSTER",
            "-J",
            "-R",
            "-b",
            "isolinux/isolinux.bin",
            "-c",
            "isolinux/boot.cat",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "-isohybrid-mbr",
            "/usr/lib/ISOLINUX/isohdpfx.bin",
            "--modification-date=2000010100000000",
        ])
        .arg(s))
    .map_err(|e| match e {
        Error::Command { cmd, detail } => {
            Error::Command { cmd, detail: format!("{detail} (apt-get install xorriso)") }
        }
        other => other,
    })?;
    std::fs::rename(&tmp_out, &opts.out).map_err(io(format!("renaming to {}", opts.out.display())))?;
    let data = std::fs::read(&opts.out).map_err(io(format!("reading {}", opts.out.display())))?;
    let info = FileInfo {
        name: opts.out.file_name().and_then(|n| n.to_str()).unwrap_or("muster.iso").to_owned(),
        size: data.len() as u64,
        sha256: sha256(&data),
    };
    let _ = m;
    Ok(info)
}

/// The default cache: `$XDG_CACHE_HOME/muster`, else `~/.cache/muster`.
pub fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("muster")
}

/// The agent next to the running binary, preferring the size-optimised build (`target/agent/`).
pub fn default_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("../agent/muster-agent"), dir.join("muster-agent")].into_iter().find(|p| p.exists())
}

/// The agent's package beside this binary's target dir (`target/debian/`), built there when it
/// is missing.
fn default_agent_deb() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(io("finding this binary"))?;
    let target = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let debs = target.join("debian");
    let arch =
        String::from_utf8_lossy(&run(Command::new("dpkg").arg("--print-architecture"))?).trim().to_owned();
    let version = env!("CARGO_PKG_VERSION");
    let path = debs.join(format!("muster-agent_{version}_{arch}.deb"));
    if path.is_file() {
        return Ok(path);
    }
    let agent = default_agent()
        .ok_or_else(|| Error::Input(format!("{} is missing and there is no muster-agent binary to build it from: build it (`cargo build --profile agent -p muster-agent`) or pass --agent-deb", path.display())))?;
    eprintln!("building {} (muster image deb --agent {})", path.display(), agent.display());
    deb::build_debs(&deb::DebOptions {
        out: debs,
        agent,
        controller: PathBuf::new(),
        cli: PathBuf::new(),
        version: version.to_owned(),
        agent_only: true,
    })?;
    Ok(path)
}

/// `muster image …`.
#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a PXE bundle (vmlinuz, initramfs.img, manifest.json, SHA256SUMS) for
    /// `muster-controller serve --boot-assets DIR`. Kept as is when its inputs did not change.
    Pxe {
        #[command(flatten)]
        common: CommonArgs,
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Build the Debian packages muster-agent and muster-controller (with the muster CLI), with
    /// their systemd units, into DIR (`apt install ./DIR/muster-agent_*.deb`).
    Deb {
        /// Output directory.
        #[arg(long, value_name = "DIR", default_value = "target/debian")]
        out: PathBuf,
        /// The muster-agent binary [default: target/agent/muster-agent or muster-agent next to
        /// this binary]
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// The muster-controller binary [default: next to this binary]
        #[arg(long, value_name = "PATH")]
        controller: Option<PathBuf>,
        /// The muster CLI binary [default: this binary]
        #[arg(long, value_name = "PATH")]
        cli: Option<PathBuf>,
        /// Package version [default: the workspace's]
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
    /// Build the node OS: a Debian disk image (BIOS and UEFI) with systemd, the kernel's whole
    /// module tree, what a Kubernetes node needs, and the agent from its .deb, enabled. Writes
    /// muster-os.raw, muster-os.qcow2 (a VM template), muster-os.raw.gz (what machines install to
    /// disk), manifest.json and SHA256SUMS. Runs as root (mmdebstrap, in private namespaces;
    /// nothing is mounted on this machine). Packages come from this machine's apt sources; the
    /// root file system is cached and reused until its inputs change (or --refresh).
    ///
    /// With no baked settings, a node finds its controller from the kernel command line
    /// (muster.controller=…), QEMU's fw_cfg (opt/muster/controller, …) or an agent.env written
    /// later; --controller/--ca-hash/--boot-token write /etc/muster/agent.env into the image.
    Os {
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The agent's Debian package [default: target/debian/muster-agent_VERSION_ARCH.deb
        /// beside this binary's target dir, built when missing]
        #[arg(long, value_name = "FILE")]
        agent_deb: Option<PathBuf>,
        /// Where the root file system is cached [default: $XDG_CACHE_HOME/muster or ~/.cache/muster]
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Debian suite [default: this machine's release]
        #[arg(long, value_name = "NAME")]
        suite: Option<String>,
        /// apt sources to build from (deb822 .sources or one-line .list) [default: this machine's
        /// Debian entries for the suite]
        #[arg(long, value_name = "FILE")]
        sources: Option<PathBuf>,
        /// Bake the controller's URL into /etc/muster/agent.env.
        #[arg(long, value_name = "URL")]
        controller: Option<String>,
        /// Bake the controller CA's pin (sha256:…, from `muster-controller init`).
        #[arg(long, value_name = "PIN")]
        ca_hash: Option<String>,
        /// Bake a boot token (`muster token create --boot`): every machine from this image
        /// enrolls pending (or as its MAC's registration says), never straight into a role.
        #[arg(long, value_name = "TOKEN", env = "MUSTER_BOOT_TOKEN", hide_env_values = true)]
        boot_token: Option<String>,
        /// Build the root file system again (new package versions) even when one is cached.
        #[arg(long)]
        refresh: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Build a BIOS-bootable ISO (isolinux, also bootable from USB) with the same payload.
    Iso {
        #[command(flatten)]
        common: CommonArgs,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Kernel parameters, e.g. "console=ttyS0 muster.controller=https://ctl.lan:7443
        /// muster.ca_hash=sha256:… muster.token=…" (an ISO has no other way to find its controller).
        #[arg(long, value_name = "ARGS")]
        cmdline: String,
        /// Where the intermediate PXE bundle goes [default: CACHE/pxe-for-iso]
        #[arg(long, value_name = "DIR")]
        bundle: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// The muster-agent binary to bake in [default: target/agent/muster-agent or muster-agent
    /// next to this binary]
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Where downloaded kernel packages are kept [default: $XDG_CACHE_HOME/muster or ~/.cache/muster]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Kernel package [default: what linux-image-amd64 depends on]
    #[arg(long, value_name = "NAME")]
    pub kernel_package: Option<String>,
    /// busybox binary (static) [default: /bin/busybox]
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

impl CommonArgs {
    fn pxe(&self, out: PathBuf) -> Result<PxeOptions, Error> {
        let agent = match &self.agent {
            Some(a) => a.clone(),
            None => default_agent().ok_or_else(|| {
                Error::Input("no muster-agent next to this binary: build it (`cargo build --profile agent -p muster-agent`) or pass --agent".into())
            })?,
        };
        Ok(PxeOptions {
            out,
            agent,
            cache: self.cache.clone().unwrap_or_else(default_cache),
            kernel_package: self.kernel_package.clone(),
            busybox: self.busybox.clone(),
        })
    }
}

/// Runs `muster image …`; prints what it built.
pub fn run_command(cmd: ImageCommand) -> Result<(), Error> {
    let start = Instant::now();
    let (quiet, result) = match cmd {
        ImageCommand::Pxe { common, out } => {
            let opts = common.pxe(out)?;
            let mut progress: Box<dyn Progress> =
                if common.quiet { Box::new(Quiet) } else { Box::new(Stderr(start)) };
            let m = build_pxe(&opts, progress.as_mut())?;
            let mut text = format!("PXE bundle in {} (kernel {}):\n", opts.out.display(), m.kernel_version);
            for f in &m.files {
                text.push_str(&format!("  {:<16} {:>10} bytes  sha256 {}\n", f.name, f.size, f.sha256));
            }
            (common.quiet, text)
        }
        ImageCommand::Deb { out, agent, controller, cli, version } => {
            let exe = std::env::current_exe().map_err(io("finding this binary"))?;
            let beside = |name: &str| exe.with_file_name(name);
            let agent = match agent {
                Some(a) => a,
                None => default_agent().ok_or_else(|| {
                    Error::Input("no muster-agent next to this binary: build it or pass --agent".into())
                })?,
            };
            let opts = deb::DebOptions {
                out,
                agent,
                controller: controller.unwrap_or_else(|| beside("muster-controller")),
                cli: cli.unwrap_or(exe),
                version: version.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
                agent_only: false,
            };
            let built = deb::build_debs(&opts)?;
            let text: String = built
                .iter()
                .map(|b| format!("{} {:>10} bytes  {}\n", b.name, b.size, b.path.display()))
                .collect();
            (false, text)
        }
        ImageCommand::Os {
            out,
            agent_deb,
            cache,
            suite,
            sources,
            controller,
            ca_hash,
            boot_token,
            refresh,
            quiet,
        } => {
            let agent_deb = match agent_deb {
                Some(d) => d,
                None => default_agent_deb()?,
            };
            let opts = os::OsOptions {
                out: out.clone(),
                cache: cache.unwrap_or_else(default_cache),
                agent_deb,
                suite,
                sources,
                baked: os::Baked { controller, ca_hash, boot_token },
                refresh,
            };
            let mut progress: Box<dyn Progress> =
                if quiet { Box::new(Quiet) } else { Box::new(Stderr(start)) };
            let m = os::build_os(&opts, progress.as_mut())?;
            let mut text = format!(
                "node OS image in {} (Debian {}, kernel {}, {} packages):\n",
                out.display(),
                m.suite,
                m.kernel_version,
                m.packages.len()
            );
            for f in &m.files {
                text.push_str(&format!("  {:<16} {:>11} bytes  sha256 {}\n", f.name, f.size, f.sha256));
            }
            (quiet, text)
        }
        ImageCommand::Iso { common, out, cmdline, bundle } => {
            let cache = common.cache.clone().unwrap_or_else(default_cache);
            let pxe = common.pxe(bundle.unwrap_or_else(|| cache.join("pxe-for-iso")))?;
            let mut progress: Box<dyn Progress> =
                if common.quiet { Box::new(Quiet) } else { Box::new(Stderr(start)) };
            let info = build_iso(&IsoOptions { pxe, out: out.clone(), cmdline }, progress.as_mut())?;
            (common.quiet, format!("ISO {}: {} bytes, sha256 {}\n", out.display(), info.size, info.sha256))
        }
    };
    if !quiet {
        print!("{result}");
    }
    Ok(())
}
