//! The node OS: a bootable Debian disk image (`muster image os`), built from Debian's packages
//! with `mmdebstrap`, with systemd, the Debian kernel and its whole module tree, what a
//! Kubernetes node needs from the OS, and the agent installed from Muster's own `.deb`.
//!
//! Layout (GPT, the same on every image, so the installer and first boot know it):
//!
//! | # | name              | size    | what                                                    |
//! |---|-------------------|---------|---------------------------------------------------------|
//! | 1 | `ESP`             | 256 MiB | FAT32, mounted at `/boot`: kernels, initrds, systemd-boot (UEFI), syslinux (BIOS, via gptmbr and the legacy-bootable attribute) |
//! | 2 | `muster-identity` | 1 MiB   | empty; the installer writes the machine's identity here  |
//! | 3 | `root`            | grows   | ext4, `/` with `/var`; grown to the end of its disk at every boot (`muster-growroot`) |
//!
//! No swap, no cloud-init, root's password locked, no SSH server (a machine config adds users
//! and keys). The network comes up by DHCP on every Ethernet link (systemd-networkd) until a
//! machine config says otherwise; journald forwards to the console.
//!
//! Nothing is mounted or attached on the building machine: mmdebstrap runs in private mount,
//! PID, UTS and IPC namespaces, the file systems are made from directories (`mke2fs -d`,
//! `mcopy`), the partition table by `sfdisk` on the image file.
//!
//! Reproducible: the same package versions give the same root file system (mmdebstrap's
//! tarball, `rootfs_sha256` in the manifest) and the same disk image, every date clamped to
//! 2000-01-01 (`SOURCE_DATE_EPOCH`). For the ext4 file system that needs e2fsprogs 1.47.1 or
//! later (bookworm-backports on bookworm): bookworm's own `mke2fs -d` copies each inode's
//! change time from the unpacked tree, the time of the build; the build says so when it runs
//! with such an mke2fs.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::{io, run, run_input, Error, FileInfo, Progress, EPOCH};

/// Bump when the image's layout or node files change in a way inputs do not show.
const FORMAT: u32 = 2;

/// The packages on top of Debian's `minbase` variant.
pub const PACKAGES: &[&str] = &[
    // systemd as init, with udev, D-Bus (the kubelet's systemd cgroup driver talks to it),
    // networkd (DHCP until a config says otherwise), resolved and timesyncd.
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "systemd-resolved",
    "systemd-timesyncd",
    // The kernel with its module tree, an initramfs that finds the root file system anywhere.
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "kmod",
    // The UEFI boot loader's binary (copied to the ESP; nothing installs it on the builder).
    "systemd-boot-efi",
    // What kubeadm's preflight checks and k3s look for on a node.
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "ebtables",
    "ethtool",
    "socat",
    "ca-certificates",
    "util-linux",
    "mount",
    "procps",
    // Growing the root partition and file system at boot.
    "fdisk",
    "e2fsprogs",
    "less",
];

pub use muster_machinery::install::layout;

/// The image's file names in the output directory.
pub const RAW: &str = "muster-os.raw";
pub const QCOW2: &str = "muster-os.qcow2";
/// The raw image, gzip'd: what the controller serves to machines that install to disk.
pub const RAW_GZ: &str = "muster-os.raw.gz";

/// Enrollment settings written into the image's `/etc/muster/agent.env` (each optional).
#[derive(Debug, Clone, Default)]
pub struct Baked {
    pub controller: Option<String>,
    pub ca_hash: Option<String>,
    /// A boot token: it only ever creates pending machines (or registered ones, by MAC).
    pub boot_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct OsOptions {
    pub out: PathBuf,
    pub cache: PathBuf,
    /// The agent's Debian package.
    pub agent_deb: PathBuf,
    /// Debian suite [default: this machine's release].
    pub suite: Option<String>,
    /// An apt sources file (deb822 `.sources` or one-line `.list`) [default: this machine's
    /// Debian entries for the suite].
    pub sources: Option<PathBuf>,
    pub baked: Baked,
    /// Build the root file system again even when a cached one matches (new package versions).
    pub refresh: bool,
}

/// `manifest.json` of a node OS image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsManifest {
    pub format: u32,
    pub suite: String,
    pub kernel_version: String,
    /// Package → version, as installed.
    pub packages: BTreeMap<String, String>,
    pub agent_deb_sha256: String,
    /// The root file system as mmdebstrap made it (reproducible for the same package versions).
    pub rootfs_sha256: String,
    pub baked_controller: Option<String>,
    pub baked_ca_hash: Option<String>,
    pub baked_boot_token: bool,
    /// Digest of every input: an equal one means the image is up to date.
    pub inputs: String,
    /// The raw image's size and digest (what the installer checks on the disk it wrote).
    pub files: Vec<FileInfo>,
}

/// SHA-256 and size of a file, read in 1 MiB chunks.
pub fn file_digest(path: &Path) -> Result<(u64, String), Error> {
    let f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    muster_machinery::install::sha256_of(f).map_err(io(format!("reading {}", path.display())))
}

/// The release this machine runs (`VERSION_CODENAME` of /etc/os-release).
fn host_suite() -> Result<String, Error> {
    let text = std::fs::read_to_string("/etc/os-release").map_err(io("reading /etc/os-release"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::Input("/etc/os-release names no VERSION_CODENAME: pass --suite".into()))
}

/// One apt source, as deb822 knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

impl Source {
    fn deb822(&self) -> String {
        let mut s = format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\n",
            self.uris.join(" "),
            self.suites.join(" "),
            self.components.join(" ")
        );
        if let Some(k) = &self.signed_by {
            s.push_str(&format!("Signed-By: {k}\n"));
        }
        s
    }
}

/// The `deb` entries of a deb822 `.sources` text (`Enabled: no` ones left out).
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // A continuation line (multi-line Signed-By keys are kept as they are).
                if let Some(k) = &last {
                    if let Some(v) = fields.get_mut(k) {
                        v.push('\n');
                        v.push_str(line);
                    }
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_owned());
                last = Some(k);
            }
        }
        let words = |k: &str| -> Vec<String> {
            fields.get(k).map(|v| v.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
        };
        if !words("types").iter().any(|t| t == "deb") || fields.get("enabled").is_some_and(|e| e == "no") {
            continue;
        }
        let src = Source {
            uris: words("uris"),
            suites: words("suites"),
            components: words("components"),
            signed_by: fields.get("signed-by").cloned(),
        };
        if !src.uris.is_empty() && !src.suites.is_empty() {
            out.push(src);
        }
    }
    out
}

/// The `deb` lines of a one-line `sources.list` text.
pub fn parse_list(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else { continue };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, tail)) = opts.split_once(']') else { continue };
            for o in opts.split_whitespace() {
                if let Some(v) = o.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_owned());
                }
            }
            rest = tail.trim();
        }
        let mut w = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (w.next(), w.next()) else { continue };
        out.push(Source {
            uris: vec![uri.to_owned()],
            suites: vec![suite.to_owned()],
            components: w.map(str::to_owned).collect(),
            signed_by,
        });
    }
    out
}

/// This machine's Debian sources for `suite` (its `-updates`, `-security` and `-backports`
/// too), as one deb822 text: the image is built from the mirror this machine already uses.
pub fn machine_sources(suite: &str) -> Result<String, Error> {
    let mut all = Vec::new();
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => all.extend(parse_deb822(&text)),
            Some("list") => all.extend(parse_list(&text)),
            _ if f.ends_with("sources.list") => all.extend(parse_list(&text)),
            _ => {}
        }
    }
    let text = select_sources(all, suite);
    if text.is_empty() {
        return Err(Error::Input(format!(
            "this machine's apt configuration has no `deb` source for {suite}: pass --sources FILE"
        )));
    }
    Ok(text)
}

/// The entries of `all` that serve `suite` (or `suite-*`), with only those suites kept.
pub fn select_sources(all: Vec<Source>, suite: &str) -> String {
    let ours = |s: &str| s == suite || s.strip_prefix(suite).is_some_and(|r| r.starts_with('-'));
    let mut text = String::new();
    for mut src in all {
        src.suites.retain(|s| ours(s));
        if src.suites.is_empty() || src.components.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&src.deb822());
    }
    text
}

fn need_root() -> Result<(), Error> {
    let out = run(Command::new("id").arg("-u"))?;
    if String::from_utf8_lossy(&out).trim() != "0" {
        return Err(Error::Input(
            "muster image os runs as root: mmdebstrap installs the packages in a chroot (in private \
             namespaces; nothing is mounted on this machine)"
                .into(),
        ));
    }
    Ok(())
}

fn need(tool: &str, package: &str) -> Result<(), Error> {
    let found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if found {
        Ok(())
    } else {
        Err(Error::Input(format!("{tool} is missing: apt-get install {package}")))
    }
}

/// Builds the root file system tarball with mmdebstrap, or finds it in the cache.
fn rootfs(
    o: &OsOptions,
    suite: &str,
    sources: &str,
    deb_sha: &str,
    progress: &mut dyn Progress,
) -> Result<(PathBuf, String), Error> {
    let dir = o.cache.join("os");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let key = crate::sha256(
        format!("{FORMAT}\n{suite}\n{}\n{ESSENTIAL_HOOK}\n{sources}\n{deb_sha}\n", PACKAGES.join(","))
            .as_bytes(),
    );
    let tar = dir.join(format!("rootfs-{}.tar", &key[..16]));
    if tar.is_file() && !o.refresh {
        progress.step(2, STEPS, &format!("root file system: cached ({})", tar.display()));
        return Ok((tar, key));
    }
    progress.step(
        2,
        STEPS,
        &format!("root file system: mmdebstrap {suite} ({} packages + the agent; ~1-2 min)", PACKAGES.len()),
    );
    let sources_file = dir.join(format!("sources-{}.sources", &key[..16]));
    std::fs::write(&sources_file, sources).map_err(io("writing the sources file"))?;
    // dpkg inside the chroot opens the .deb at the same path: a world-readable copy in the cache.
    let deb = dir.join(format!("muster-agent-{}.deb", &deb_sha[..16]));
    std::fs::copy(&o.agent_deb, &deb).map_err(io(format!("copying {}", o.agent_deb.display())))?;
    let tmp = dir.join(format!("rootfs-{}.tar.tmp-{}", &key[..16], std::process::id()));
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--uts", "--ipc", "--pid", "--fork", "--propagation", "private", "mmdebstrap"])
        .args(["--mode=root", "--variant=minbase", "--format=tar", "--quiet"])
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string());
    for p in ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*"] {
        cmd.arg(format!("--dpkgopt=path-exclude={p}"));
    }
    cmd.arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg(format!("--essential-hook={ESSENTIAL_HOOK}"))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--include={}", deb.display()))
        .arg("--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount")
        .arg("--customize-hook=chroot \"$1\" passwd --lock root >/dev/null")
        .arg(suite)
        .arg(&tmp)
        .arg(&sources_file);
    let r = run(&mut cmd);
    let _ = std::fs::remove_file(&deb);
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &tar).map_err(io(format!("renaming to {}", tar.display())))?;
    // Older root file systems are not used again.
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let p = e.path();
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if (n.starts_with("rootfs-") || n.starts_with("sources-")) && !n.contains(&key[..16]) {
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok((tar, key))
}

/// Written before any package is unpacked: the initramfs has every storage and network driver
/// (`MODULES=most`: the image boots on any hardware) and is zstd-compressed.
const ESSENTIAL_HOOK: &str = "mkdir -p \"$1/etc/initramfs-tools/conf.d\" && \
     printf 'MODULES=most\\nCOMPRESS=zstd\\n' > \"$1/etc/initramfs-tools/conf.d/muster.conf\"";

const STEPS: usize = 7;

/// The kernel command line of the image's boot loaders.
fn cmdline() -> String {
    format!(
        "root=PARTUUID={} ro rootwait console=tty0 console=ttyS0,115200n8",
        layout::ROOT_GUID.to_ascii_lowercase()
    )
}

/// Files the node OS gets on top of its packages: (path, mode, contents).
fn node_files(baked: &Baked) -> Result<Vec<(&'static str, u32, String)>, Error> {
    let esp = layout::ESP_GUID.to_ascii_lowercase();
    let root = layout::ROOT_GUID.to_ascii_lowercase();
    let mut files = vec![
        (
            "etc/fstab",
            0o644,
            format!(
                "# Muster node OS. The root partition grows to its disk at boot (muster-growroot).\n\
                 PARTUUID={root} / ext4 defaults,errors=remount-ro 0 1\n\
                 # The ESP holds the kernels and initrds (FAT: `quiet` lets dpkg set modes on it).\n\
                 PARTUUID={esp} /boot vfat umask=0077,quiet,shortname=mixed 0 2\n"
            ),
        ),
        ("etc/hostname", 0o644, "localhost\n".to_owned()),
        ("etc/machine-id", 0o444, String::new()),
        (
            "etc/systemd/network/80-muster-dhcp.network",
            0o644,
            "# Muster: DHCP on every Ethernet link until a machine config sets addresses.\n\
             [Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nUseHostname=no\n"
                .to_owned(),
        ),
        (
            "etc/systemd/journald.conf.d/muster-console.conf",
            0o644,
            "# Muster: the journal on the console too (serial consoles of VMs and BMCs).\n\
             [Journal]\nForwardToConsole=yes\nMaxLevelConsole=info\n"
                .to_owned(),
        ),
        ("etc/systemd/system/muster-growroot.service", 0o644, GROWROOT_UNIT.to_owned()),
        ("usr/lib/muster/growroot", 0o755, GROWROOT.to_owned()),
        ("etc/kernel/postinst.d/zz-muster-boot", 0o755, KERNEL_HOOK.to_owned()),
        ("etc/initramfs/post-update.d/zz-muster-boot", 0o755, KERNEL_HOOK.to_owned()),
    ];
    let mut env = String::new();
    for (key, value) in [
        ("MUSTER_CONTROLLER", &baked.controller),
        ("MUSTER_CA_HASH", &baked.ca_hash),
        ("MUSTER_TOKEN", &baked.boot_token),
    ] {
        if let Some(v) = value {
            if v.is_empty()
                || v.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == '#')
            {
                return Err(Error::Input(format!(
                    "{key}: {v:?} cannot go into agent.env (empty, or spaces, quotes, # or backslashes)"
                )));
            }
            env.push_str(&format!("{key}={v}\n"));
        }
    }
    if !env.is_empty() {
        files.push((
            "etc/muster/agent.env",
            0o600,
            format!("# Baked in by `muster image os`. Kernel arguments and fw_cfg come first.\n{env}"),
        ));
    }
    Ok(files)
}

const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

const GROWROOT_UNIT: &str = "\
[Unit]
Description=Grow the root partition and file system to the end of the disk
DefaultDependencies=no
After=systemd-remount-fs.service
Before=local-fs.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/muster/growroot

[Install]
WantedBy=local-fs.target
";

const GROWROOT: &str = r#"#!/bin/sh
# Grows the root partition (the disk's last) to the end of its disk, then its ext4 file system,
# online. A clone with a bigger disk, or an image written to a bigger disk, gets all of it. The
# partition table is written only when there is room to grow into.
set -eu
src=$(findmnt -no SOURCE /)
name=$(basename "$src")
part=$(cat "/sys/class/block/$name/partition")
diskname=$(lsblk -no PKNAME "$src" | head -n1)
disk=/dev/$diskname
start=$(cat "/sys/class/block/$name/start")
size=$(cat "/sys/class/block/$name/size")
total=$(cat "/sys/class/block/$diskname/size")
before=$(blockdev --getsize64 "$src")
# More than 1 MiB past the partition's end (the backup GPT takes 33 sectors).
if [ $((total - start - size)) -gt 2048 ]; then
    # The backup GPT goes to the disk's end first (it sits at the image's end).
    sfdisk --quiet --relocate gpt-bak-std "$disk" 2>/dev/null || true
    echo ", +" | sfdisk --quiet --no-reread --no-tell-kernel -N "$part" "$disk" 2>/dev/null || true
    partx -u -n "$part" "$disk" 2>/dev/null || true
fi
after=$(blockdev --getsize64 "$src")
resize2fs "$src" >/dev/null 2>&1 || true
if [ "$after" -gt "$before" ]; then
    echo "muster-growroot: grew $src from $before to $after bytes"
else
    echo "muster-growroot: $src already fills its disk ($after bytes)"
fi
"#;

const KERNEL_HOOK: &str = r#"#!/bin/sh
# Muster: points both boot loaders (systemd-boot, syslinux) at the newest kernel in /boot.
set -e
v=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1)
[ -n "$v" ] || exit 0
v=${v#/boot/vmlinuz-}
[ -e "/boot/initrd.img-$v" ] || exit 0
for f in /boot/loader/entries/muster.conf; do
    [ -f "$f" ] && sed -i "s|^linux .*|linux /vmlinuz-$v|; s|^initrd .*|initrd /initrd.img-$v|" "$f"
done
f=/boot/syslinux/syslinux.cfg
[ -f "$f" ] && sed -i "s|LINUX .*|LINUX /vmlinuz-$v|; s|INITRD .*|INITRD /initrd.img-$v|" "$f"
exit 0
"#;

/// Installed packages and versions from a dpkg status file.
pub fn installed_packages(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.insert(n, v);
        }
    }
    out
}

/// Copies `src` into `dst` at `offset`, leaving all-zero MiBs as holes.
fn copy_into(src: &Path, dst: &mut std::fs::File, offset: u64) -> Result<(), Error> {
    let mut f = std::fs::File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let mut k = 0;
        while k < buf.len() {
            let n = f.read(&mut buf[k..]).map_err(io(format!("reading {}", src.display())))?;
            if n == 0 {
                break;
            }
            k += n;
        }
        if k == 0 {
            break;
        }
        if buf[..k].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at)).map_err(io("seeking in the image"))?;
            dst.write_all(&buf[..k]).map_err(io("writing the image"))?;
        }
        at += k as u64;
    }
    Ok(())
}

/// Builds (or, when its inputs are unchanged, keeps) the node OS image in `o.out`.
pub fn build_os(o: &OsOptions, progress: &mut dyn Progress) -> Result<OsManifest, Error> {
    need_root()?;
    for (tool, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        ("unshare", "util-linux"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
        ("syslinux", "syslinux"),
        ("qemu-img", "qemu-utils"),
        ("systemctl", "systemd"),
    ] {
        need(tool, pkg)?;
    }
    let gptmbr = Path::new("/usr/lib/syslinux/mbr/gptmbr.bin");
    if !gptmbr.is_file() {
        return Err(Error::Input(format!(
            "{} is missing: apt-get install syslinux-common",
            gptmbr.display()
        )));
    }
    let suite = match &o.suite {
        Some(s) => s.clone(),
        None => host_suite()?,
    };
    progress.step(1, STEPS, &format!("sources: {suite} from this machine's apt configuration"));
    let sources = match &o.sources {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?;
            let all = if p.extension().is_some_and(|e| e == "sources") {
                parse_deb822(&text)
            } else {
                parse_list(&text)
            };
            let t = select_sources(all, &suite);
            if t.is_empty() {
                return Err(Error::Input(format!("{}: no `deb` entry for {suite}", p.display())));
            }
            t
        }
        None => machine_sources(&suite)?,
    };
    let (_, deb_sha) = file_digest(&o.agent_deb)?;
    let files = node_files(&o.baked)?;
    let (tar, key) = rootfs(o, &suite, &sources, &deb_sha, progress)?;
    let (_, rootfs_sha) = file_digest(&tar)?;
    let files_text: String = files.iter().map(|(p, m, t)| format!("{p} {m:o}\n{t}\n")).collect();
    let inputs = crate::sha256(
        format!(
            "{FORMAT}\n{key}\n{rootfs_sha}\n{files_text}\n{GROWROOT}{KERNEL_HOOK}{MKE2FS_CONF}{}\n",
            cmdline()
        )
        .as_bytes(),
    );
    let manifest_path = o.out.join(crate::MANIFEST);
    if let Ok(text) = std::fs::read_to_string(&manifest_path) {
        if let Ok(m) = serde_json::from_str::<OsManifest>(&text) {
            let present = m
                .files
                .iter()
                .all(|f| std::fs::metadata(o.out.join(&f.name)).is_ok_and(|md| md.len() == f.size));
            if m.inputs == inputs && present && !o.refresh {
                progress.step(STEPS, STEPS, "image: up to date");
                return Ok(m);
            }
        }
    }
    std::fs::create_dir_all(&o.out).map_err(io(format!("creating {}", o.out.display())))?;
    let work = tempfile::Builder::new()
        .prefix("muster-os-")
        .tempdir_in(&o.out)
        .map_err(io("creating a work dir"))?;
    let w = work.path();
    let root = w.join("root");
    std::fs::create_dir(&root).map_err(io("creating the root dir"))?;
    progress.step(3, STEPS, "node files: unpacking the root file system, adding Muster's files");
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&root))?;
    for (path, mode, text) in &files {
        let p = root.join(path);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode))
            .map_err(io(format!("setting the mode of {}", p.display())))?;
    }
    run(Command::new("systemctl").arg(format!("--root={}", root.display())).args([
        "enable",
        "--quiet",
        "systemd-networkd.service",
        "systemd-resolved.service",
        "muster-growroot.service",
        "muster-agent.service",
    ]))?;
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status"))
        .map_err(io("reading the image's dpkg status"))?;
    let packages = installed_packages(&status);
    // /boot's files go to the ESP (mounted at /boot on the node).
    let esp = w.join("esp");
    for d in ["EFI/BOOT", "loader/entries", "syslinux"] {
        std::fs::create_dir_all(esp.join(d)).map_err(io("staging the ESP"))?;
    }
    let boot = root.join("boot");
    let mut kernel_version = String::new();
    for e in std::fs::read_dir(&boot).map_err(io("reading the image's /boot"))?.flatten() {
        let p = e.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            kernel_version = v.to_owned();
        }
        if p.is_file() {
            std::fs::copy(&p, esp.join(&name)).map_err(io(format!("copying {name} to the ESP")))?;
            std::fs::remove_file(&p).map_err(io(format!("moving {name}")))?;
        }
    }
    if kernel_version.is_empty() {
        return Err(Error::Input("the root file system has no /boot/vmlinuz-*".into()));
    }
    std::fs::copy(
        root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        esp.join("EFI/BOOT/BOOTX64.EFI"),
    )
    .map_err(io("copying systemd-boot"))?;
    let cmd = cmdline();
    let v = &kernel_version;
    std::fs::write(esp.join("loader/loader.conf"), "timeout 0\ndefault muster.conf\n")
        .map_err(io("writing loader.conf"))?;
    std::fs::write(
        esp.join("loader/entries/muster.conf"),
        format!("title Muster node\nlinux /vmlinuz-{v}\ninitrd /initrd.img-{v}\noptions {cmd}\n"),
    )
    .map_err(io("writing the loader entry"))?;
    std::fs::write(
        esp.join("syslinux/syslinux.cfg"),
        format!("DEFAULT muster\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL muster\n  LINUX /vmlinuz-{v}\n  INITRD /initrd.img-{v}\n  APPEND {cmd}\n"),
    )
    .map_err(io("writing syslinux.cfg"))?;
    // Every file dated no later than the epoch (Muster's own files and the enablement links
    // were made just now), so the same packages give the same file systems.
    run(Command::new("find").arg(&root).args([
        "-newermt",
        &format!("@{EPOCH}"),
        "-exec",
        "touch",
        "-h",
        "-d",
        &format!("@{EPOCH}"),
        "{}",
        "+",
    ]))?;
    progress.step(4, STEPS, "file systems: ext4 root (mke2fs -d), FAT32 ESP (mcopy)");
    if !mke2fs_clamps_times() {
        eprintln!(
            "note: this mke2fs is older than 1.47.1: the image will not be bit-for-bit reproducible \
             (install e2fsprogs from bookworm-backports)"
        );
    }
    let used = dir_size(&root)?;
    let root_mib = used * 13 / 10 / (1 << 20) + 256;
    let root_img = w.join("root.img");
    // The file system's features are Muster's, not the building machine's mke2fs.conf: those
    // of Debian bookworm's own ext4 defaults, which its kernel and e2fsck know (a newer
    // mke2fs.conf adds orphan_file, whose in-use flag bookworm's e2fsck reads after a power
    // loss as damage and forces a check and a reboot).
    let conf = w.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(io("writing mke2fs.conf"))?;
    run(Command::new("mke2fs")
        .env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .args(["-q", "-F", "-t", "ext4", "-L", "muster-root", "-U", "6d757374-6572-4f53-8000-0000000000ff"])
        .args(["-E", "hash_seed=6d757374-6572-4f53-8000-0000000000fe,root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&root_img)
        .arg(format!("{root_mib}M")))?;
    let esp_img = w.join("esp.img");
    std::fs::File::create(&esp_img)
        .and_then(|f| f.set_len(layout::ESP_MIB << 20))
        .map_err(io("creating the ESP image"))?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "MUSTER-ESP", "-i", "4d555354", "-h", "2048", "--invariant"])
        .arg(&esp_img))?;
    set_times(&esp)?;
    let mut mc = Command::new("mcopy");
    mc.env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .args(["-s", "-m", "-i"])
        .arg(&esp_img);
    for e in std::fs::read_dir(&esp).map_err(io("reading the ESP stage"))?.flatten() {
        mc.arg(e.path());
    }
    run(mc.arg("::/"))?;
    progress.step(5, STEPS, "disk: GPT, ESP, root, boot loaders (syslinux for BIOS, systemd-boot for UEFI)");
    let raw_tmp = w.join(RAW);
    let total_mib = 1 + layout::ESP_MIB + layout::IDENTITY_MIB + root_mib + 1;
    {
        let f = std::fs::File::create(&raw_tmp).map_err(io("creating the raw image"))?;
        f.set_len(total_mib << 20).map_err(io("sizing the raw image"))?;
    }
    let sfdisk = format!(
        "label: gpt\nlabel-id: {}\nfirst-lba: 2048\n\
         start=2048, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={}, name=\"{}\", attrs=\"LegacyBIOSBootable\"\n\
         size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={}, name=\"{}\"\n\
         size={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={}, name=\"{}\"\n",
        layout::DISK_GUID,
        layout::ESP_MIB * 2048,
        layout::ESP_GUID,
        layout::ESP_NAME,
        layout::IDENTITY_MIB * 2048,
        layout::IDENTITY_GUID,
        layout::IDENTITY_NAME,
        root_mib * 2048,
        layout::ROOT_GUID,
        layout::ROOT_NAME,
    );
    run_input(
        Command::new("sfdisk").args(["--quiet", "--no-reread", "--no-tell-kernel"]).arg(&raw_tmp),
        Some(sfdisk.as_bytes()),
    )?;
    {
        let mut f =
            std::fs::OpenOptions::new().write(true).open(&raw_tmp).map_err(io("opening the raw image"))?;
        copy_into(&esp_img, &mut f, 1 << 20)?;
        copy_into(&root_img, &mut f, (1 + layout::ESP_MIB + layout::IDENTITY_MIB) << 20)?;
        f.sync_all().map_err(io("syncing the raw image"))?;
    }
    let _ = std::fs::remove_file(&root_img);
    run(Command::new("syslinux")
        .args(["--offset", "1048576", "--directory", "/syslinux", "--install"])
        .arg(&raw_tmp))?;
    // syslinux and mcopy date some entries now: every entry gets the epoch instead.
    date_fat_entries(&raw_tmp, 1 << 20)?;
    {
        let mbr = std::fs::read(gptmbr).map_err(io("reading gptmbr.bin"))?;
        let code =
            mbr.get(..440).ok_or_else(|| Error::Input("gptmbr.bin is shorter than 440 bytes".into()))?;
        let mut f =
            std::fs::OpenOptions::new().write(true).open(&raw_tmp).map_err(io("opening the raw image"))?;
        f.write_all(code).map_err(io("writing the MBR boot code"))?;
        f.sync_all().map_err(io("syncing the raw image"))?;
    }
    progress.step(6, STEPS, "qcow2 (zstd-compressed) and raw.gz (for install to disk)");
    let qcow_tmp = w.join(QCOW2);
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd"])
        .arg(&raw_tmp)
        .arg(&qcow_tmp))?;
    let gz_tmp = w.join(RAW_GZ);
    gzip_file(&raw_tmp, &gz_tmp)?;
    progress.step(7, STEPS, "manifest.json, SHA256SUMS");
    let mut infos = Vec::new();
    for (tmp, name) in [(&raw_tmp, RAW), (&qcow_tmp, QCOW2), (&gz_tmp, RAW_GZ)] {
        let (size, sha256) = file_digest(tmp)?;
        infos.push(FileInfo { name: name.to_owned(), size, sha256 });
        std::fs::rename(tmp, o.out.join(name)).map_err(io(format!("renaming {name} into place")))?;
    }
    let m = OsManifest {
        format: FORMAT,
        suite,
        kernel_version,
        packages,
        agent_deb_sha256: deb_sha,
        rootfs_sha256: rootfs_sha,
        baked_controller: o.baked.controller.clone(),
        baked_ca_hash: o.baked.ca_hash.clone(),
        baked_boot_token: o.baked.boot_token.is_some(),
        inputs,
        files: infos,
    };
    let sums: String = m.files.iter().map(|f| format!("{}  {}\n", f.sha256, f.name)).collect();
    crate::write_file(&o.out.join("SHA256SUMS"), sums.as_bytes())?;
    let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::Input(format!("manifest: {e}")))?;
    crate::write_file(&manifest_path, &json)?;
    Ok(m)
}

/// Dates every file and directory of the FAT32 file system at `offset` of `raw` 2000-01-01
/// 00:00 (creation, access and modification fields): syslinux's installer dates its files, and
/// mcopy its directories, with the time of the build.
fn date_fat_entries(raw: &Path, offset: u64) -> Result<(), Error> {
    let bad = |what: &str| Error::Input(format!("the ESP written by syslinux: {what}"));
    let mut f =
        std::fs::OpenOptions::new().read(true).write(true).open(raw).map_err(io("opening the raw image"))?;
    let read_at = |f: &mut std::fs::File, at: u64, n: usize| -> Result<Vec<u8>, Error> {
        let mut b = vec![0u8; n];
        f.seek(SeekFrom::Start(at)).map_err(io("seeking in the ESP"))?;
        f.read_exact(&mut b).map_err(io("reading the ESP"))?;
        Ok(b)
    };
    let bpb = read_at(&mut f, offset, 512)?;
    let u16_at = |b: &[u8], o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let u32_at = |b: &[u8], o: usize| u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]));
    let (bps, spc, rsvd, nfats, fatsz, root) = (
        u16_at(&bpb, 11),
        u64::from(bpb[13]),
        u16_at(&bpb, 14),
        u64::from(bpb[16]),
        u32_at(&bpb, 36),
        u32_at(&bpb, 44),
    );
    if bps == 0 || spc == 0 || fatsz == 0 {
        return Err(bad("not FAT32"));
    }
    let data = offset + (rsvd + nfats * fatsz) * bps;
    let cluster_bytes = spc * bps;
    let fat_at = offset + rsvd * bps;
    // The clusters of a chain, at most 64 (directories here are one or two).
    let chain = |f: &mut std::fs::File, mut c: u64| -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        while (2..0x0FFF_FFF8).contains(&c) && out.len() < 64 {
            out.push(c);
            let e = read_at(f, fat_at + 4 * c, 4)?;
            c = u32_at(&e, 0) & 0x0FFF_FFFF;
        }
        Ok(out)
    };
    let entries = |f: &mut std::fs::File, clusters: &[u64]| -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        for c in clusters {
            let at = data + (c - 2) * cluster_bytes;
            let b = read_at(f, at, usize::try_from(cluster_bytes).unwrap_or(0))?;
            for (i, e) in b.chunks(32).enumerate() {
                out.push((at + 32 * i as u64, e.to_vec()));
            }
        }
        Ok(out)
    };
    // Every entry of every directory, from the root down (`.` and `..` included).
    let date = 0x2821u16.to_le_bytes();
    let mut dirs = vec![root];
    let mut seen = 0;
    let mut dated = 0;
    while let Some(d) = dirs.pop() {
        seen += 1;
        if seen > 1024 {
            return Err(bad("too many directories"));
        }
        let clusters = chain(&mut f, d)?;
        for (at, mut e) in entries(&mut f, &clusters)? {
            if e[0] == 0 {
                break;
            }
            // A deleted entry (syslinux's installer leaves one) keeps only its mark.
            if e[0] == 0xE5 {
                let mut blank = [0u8; 32];
                blank[0] = 0xE5;
                f.seek(SeekFrom::Start(at)).map_err(io("seeking in the ESP"))?;
                f.write_all(&blank).map_err(io("dating the ESP's files"))?;
                continue;
            }
            // Long-name parts carry no dates.
            if e[11] & 0x3F == 0x0F {
                continue;
            }
            if e[11] & 0x10 != 0 && e[0] != b'.' {
                dirs.push((u16_at(&e, 20) << 16) | u16_at(&e, 26));
            }
            e[13] = 0;
            e[14..16].copy_from_slice(&[0, 0]);
            e[16..18].copy_from_slice(&date);
            e[18..20].copy_from_slice(&date);
            e[22..24].copy_from_slice(&[0, 0]);
            e[24..26].copy_from_slice(&date);
            f.seek(SeekFrom::Start(at)).map_err(io("seeking in the ESP"))?;
            f.write_all(&e).map_err(io("dating the ESP's files"))?;
            if &e[..11] == b"LDLINUX SYS" || &e[..11] == b"LDLINUX C32" {
                dated += 1;
            }
        }
    }
    if dated != 2 {
        return Err(bad(&format!("found {dated} of ldlinux.sys and ldlinux.c32")));
    }
    f.sync_all().map_err(io("syncing the raw image"))
}

/// Whether `mke2fs` is e2fsprogs 1.47.1 or later (SOURCE_DATE_EPOCH clamps inode times).
fn mke2fs_clamps_times() -> bool {
    let out = Command::new("mke2fs").arg("-V").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    // "mke2fs 1.47.2 (1-Jan-2025)"
    let v: Vec<u32> = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    v >= vec![1, 47, 1]
}

/// Bytes of every regular file under `dir` (not following links).
fn dir_size(dir: &Path) -> Result<u64, Error> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(format!("reading {}", d.display())))?.flatten() {
            let md = e.path().symlink_metadata().map_err(io("sizing the root file system"))?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(total)
}

/// Every file and directory under `dir` dated [`EPOCH`] (mcopy -m keeps the dates).
fn set_times(dir: &Path) -> Result<(), Error> {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(EPOCH));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(format!("reading {}", d.display())))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let f = std::fs::File::open(&p).map_err(io(format!("opening {}", p.display())))?;
            f.set_modified(when).map_err(io(format!("dating {}", p.display())))?;
        }
    }
    Ok(())
}

fn gzip_file(src: &Path, dst: &Path) -> Result<(), Error> {
    let mut input = std::fs::File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let out = std::fs::File::create(dst).map_err(io(format!("creating {}", dst.display())))?;
    let mut gz =
        flate2::GzBuilder::new().mtime(0).write(std::io::BufWriter::new(out), flate2::Compression::new(1));
    std::io::copy(&mut input, &mut gz).map_err(io(format!("compressing {}", src.display())))?;
    let w = gz.finish().map_err(io(format!("compressing {}", src.display())))?;
    w.into_inner()
        .map_err(|e| Error::Input(format!("writing {}: {e}", dst.display())))?
        .sync_all()
        .map_err(io(format!("syncing {}", dst.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_keep_only_the_suite_and_its_pockets() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates trixie\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n\n\
                      Types: deb\nURIs: https://other.invalid/apt\nSuites: nodistro\nComponents: main\n\n\
                      Types: deb\nEnabled: no\nURIs: http://off.invalid/debian\nSuites: bookworm\nComponents: main\n";
        let list = "deb [arch=amd64 signed-by=/k.gpg] http://sec.invalid/debian-security bookworm-security main # x\n\
                    # deb http://commented.invalid bookworm main\ndeb http://x.invalid bookwormish main\n";
        let mut all = parse_deb822(deb822);
        all.extend(parse_list(list));
        let text = select_sources(all, "bookworm");
        assert_eq!(
            text,
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /k.gpg\n"
        );
    }

    #[test]
    fn dpkg_status_gives_installed_packages_only() {
        let status = "Package: a\nStatus: install ok installed\nVersion: 1.0\n\n\
                      Package: b\nStatus: deinstall ok config-files\nVersion: 2\n\n\
                      Package: c\nVersion: 3:4-5\nStatus: install ok installed\n";
        let p = installed_packages(status);
        assert_eq!(
            p.into_iter().collect::<Vec<_>>(),
            vec![("a".into(), "1.0".into()), ("c".into(), "3:4-5".into())]
        );
    }

    #[test]
    fn baked_settings_are_checked_and_private() {
        let files = node_files(&Baked {
            controller: Some("https://10.0.2.2:7443".into()),
            ca_hash: None,
            boot_token: Some("tok".into()),
        })
        .unwrap_or_default();
        let env = files.iter().find(|(p, _, _)| *p == "etc/muster/agent.env");
        let Some((_, mode, text)) = env else { panic!("no agent.env") };
        assert_eq!(*mode, 0o600);
        assert!(text.contains("\nMUSTER_CONTROLLER=https://10.0.2.2:7443\nMUSTER_TOKEN=tok\n"), "{text}");
        let bad = node_files(&Baked { controller: Some("a b".into()), ..Baked::default() });
        assert!(matches!(bad, Err(Error::Input(m)) if m.contains("MUSTER_CONTROLLER")));
        let none = node_files(&Baked::default()).unwrap_or_default();
        assert!(!none.iter().any(|(p, _, _)| *p == "etc/muster/agent.env"));
    }
}
