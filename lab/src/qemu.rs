//! The one QEMU command line, for the lab's VMs, the network-boot tests and the boot
//! benchmark: TCG (no KVM here), SeaBIOS with iPXE on the NIC, the serial console in a file, a
//! VirtIO RNG, and a guard that kills QEMU when dropped.
//!
//! User-mode networking is `restrict=on`: the guest reaches nothing but the loopback ports it is
//! explicitly forwarded to (through `guestfwd`, at 10.0.2.100 in the guest), so no traffic
//! leaves this machine. Tap networking is for namespaces a test created itself.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// Lab VMs are named this, then their number (how `lab down` recognises their QEMU processes).
pub const LAB_VM_PREFIX: &str = "muster-lab-vm-";

/// The `-name` of lab VM `i`.
pub fn lab_vm_name(i: u32) -> String {
    format!("{LAB_VM_PREFIX}{i}")
}

/// A MAC in QEMU's locally administered range, distinct per `(group, n)`.
pub fn mac(group: u8, n: u16) -> String {
    let [hi, lo] = n.to_be_bytes();
    format!("52:54:00:{group:02x}:{hi:02x}:{lo:02x}")
}

/// A stable SMBIOS UUID, distinct per `(group, n)` ("muster-L" in hex, the group, the number).
pub fn uuid(group: u8, n: u32) -> String {
    format!("6d757374-6572-4c61-82{group:02x}-{n:012x}")
}

/// The serial-console text in `text` that means a boot has failed for good, if any.
pub fn boot_failure(text: &str) -> Option<&'static str> {
    BOOT_FAILURES.iter().copied().find(|f| text.contains(f))
}

/// The guest-side address forwarded ports appear on.
pub const GUEST_FWD_ADDR: &str = "10.0.2.100";

/// Serial-console text that means the boot has failed for good.
pub const BOOT_FAILURES: &[&str] =
    &["Could not boot", "No bootable device", "Kernel panic", "Boot failed: could not read the boot disk"];

/// How the VM boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Network boot through the NIC's iPXE ROM.
    Network,
    /// From an ISO image.
    Cdrom(PathBuf),
    /// Direct kernel boot (the baseline): `-kernel`, `-initrd`, `-append`.
    Kernel { kernel: PathBuf, initrd: PathBuf, append: String },
    /// From the first disk only (a VM template's clone).
    Disk,
    /// Network boot first, then the first disk (as a bare-metal machine's firmware is set up
    /// for network-boot provisioning: iPXE's `exit` falls through to the disk).
    NetworkThenDisk,
}

/// How the VM is networked.
#[derive(Debug, Clone)]
pub enum Net {
    /// QEMU user-mode networking, restricted: DHCP from QEMU itself (with `bootfile` as the boot
    /// file name), and `forwards` (guest port at [`GUEST_FWD_ADDR`] → 127.0.0.1 port).
    User { bootfile: Option<String>, forwards: Vec<(u16, u16)> },
    /// A tap device that already exists (in the namespace QEMU runs in).
    Tap { ifname: String },
}

/// What a VM is: its name (QEMU's `-name`), NIC, SMBIOS identity, memory, boot and network.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub mac: String,
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub memory_mb: u32,
    pub boot: Boot,
    pub net: Net,
    /// Runs QEMU through `ip netns exec NAME` (for tap networking in a test's namespace).
    pub netns: Option<String>,
    /// fw_cfg entries (`-fw_cfg name=NAME,string=VALUE`), e.g. `opt/muster/controller`.
    pub fw_cfg: Vec<(String, String)>,
    /// qcow2 disks, as virtio-blk devices with serials `muster-disk-N` (N from 0).
    pub disks: Vec<PathBuf>,
    /// UEFI firmware (OVMF) with this file as its variable store; BIOS (SeaBIOS) when `None`.
    pub uefi_vars: Option<PathBuf>,
    /// A guest reboot resets the VM (firmware again) instead of ending QEMU.
    pub allow_reboot: bool,
}

/// OVMF's code and an empty variable store (Debian's `ovmf`, 4 MiB flash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

impl VmSpec {
    pub fn new(name: &str, mac: &str, boot: Boot, net: Net) -> Self {
        Self {
            name: name.into(),
            mac: mac.into(),
            uuid: None,
            serial: None,
            memory_mb: 256,
            boot,
            net,
            netns: None,
            fw_cfg: Vec::new(),
            disks: Vec::new(),
            uefi_vars: None,
            allow_reboot: false,
        }
    }
}

/// A running VM; killed and reaped when dropped. Its serial log is kept in `dir`.
pub struct Vm {
    pub name: String,
    child: Child,
    pub serial_log: PathBuf,
    pub started: Instant,
}

/// The QEMU command line for `spec`, writing files (serial log, sercon) into `dir`. Returns
/// the arguments and the serial log's path.
pub fn qemu_args(spec: &VmSpec, dir: &Path) -> Result<(Vec<String>, PathBuf), LabError> {
    let serial_log = dir.join(format!("{}.serial.log", spec.name));
    // SeaBIOS and iPXE print to the serial port only when told its I/O port (0x3f8).
    let sercon = dir.join("sercon-port");
    std::fs::write(&sercon, [0xf8u8, 0x03]).map_err(LabError::io("writing the sercon fw_cfg file"))?;
    let mut a: Vec<String> = [
        "-name",
        &spec.name,
        "-accel",
        "tcg",
        "-m",
        &spec.memory_mb.to_string(),
        "-display",
        "none",
        "-nodefaults",
        "-serial",
        &format!("file:{}", serial_log.display()),
        "-fw_cfg",
        &format!("name=etc/sercon-port,file={}", sercon.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !spec.allow_reboot {
        a.push("-no-reboot".into());
    }
    if let Some(vars) = &spec.uefi_vars {
        if !Path::new(OVMF_CODE).is_file() {
            return Err(LabError::Vm {
                name: spec.name.clone(),
                detail: format!("{OVMF_CODE} is missing: apt-get install ovmf"),
            });
        }
        a.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
    }
    if let Some(u) = &spec.uuid {
        a.extend(["-uuid".into(), u.clone()]);
    }
    if let Some(s) = &spec.serial {
        a.extend(["-smbios".into(), format!("type=1,serial={s}")]);
    }
    for (name, value) in &spec.fw_cfg {
        // QEMU's option syntax: a comma in a value is written twice.
        a.extend(["-fw_cfg".into(), format!("name={name},string={}", value.replace(',', ",,"))]);
    }
    let netdev = match &spec.net {
        Net::User { bootfile, forwards } => {
            let mut nd = "user,id=n0,restrict=on".to_string();
            if let Some(b) = bootfile {
                let _ = write!(nd, ",bootfile={b}");
            }
            for (guest, host) in forwards {
                let _ = write!(nd, ",guestfwd=tcp:{GUEST_FWD_ADDR}:{guest}-cmd:busybox nc 127.0.0.1 {host}");
            }
            nd
        }
        Net::Tap { ifname } => format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
    };
    a.extend(["-netdev".into(), netdev]);
    let nic_boot = match spec.boot {
        Boot::NetworkThenDisk => ",bootindex=1",
        _ => "",
    };
    a.extend(["-device".into(), format!("virtio-net-pci,netdev=n0,mac={}{nic_boot}", spec.mac)]);
    for (i, d) in spec.disks.iter().enumerate() {
        let boot = match (&spec.boot, i) {
            (Boot::Disk, 0) => ",bootindex=1",
            (Boot::NetworkThenDisk, 0) => ",bootindex=2",
            _ => "",
        };
        a.extend([
            "-drive".into(),
            format!("if=none,id=d{i},format=qcow2,file={}", d.display()),
            "-device".into(),
            format!("virtio-blk-pci,drive=d{i},serial=muster-disk-{i}{boot}"),
        ]);
    }
    // Entropy at once, as a CPU with RDRAND gives a real node: without it the kernel's CRNG
    // takes seconds to seed under TCG and the agent's first key or TLS handshake waits.
    a.extend(["-device".into(), "virtio-rng-pci".into()]);
    match &spec.boot {
        Boot::Network => a.extend(["-boot".into(), "n".into()]),
        Boot::Cdrom(iso) => {
            a.extend(["-cdrom".into(), iso.display().to_string(), "-boot".into(), "d".into()]);
        }
        Boot::Kernel { kernel, initrd, append } => a.extend([
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            append.clone(),
        ]),
        Boot::Disk | Boot::NetworkThenDisk => {}
    }
    Ok((a, serial_log))
}

impl Vm {
    /// Starts QEMU for `spec` (its output in `dir/NAME.qemu.log`).
    pub fn start(spec: &VmSpec, dir: &Path) -> Result<Vm, LabError> {
        let (args, serial_log) = qemu_args(spec, dir)?;
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let log = dir.join(format!("{}.qemu.log", spec.name));
        let out = std::fs::File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(LabError::io(format!("creating {}", log.display())))?;
        let child = cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(
            LabError::io("starting qemu-system-x86_64 (scripts/install-netboot-deps.sh installs it)"),
        )?;
        Ok(Vm { name: spec.name.clone(), child, serial_log, started: Instant::now() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Fails at once if the console shows a boot failure or QEMU exited.
    pub fn check(&mut self) -> Result<(), LabError> {
        let text = self.serial();
        if let Some(f) = boot_failure(&text) {
            return Err(LabError::Vm {
                name: self.name.clone(),
                detail: format!("{f:?} on the serial console (log kept at {})", self.serial_log.display()),
            });
        }
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(LabError::Vm {
                name: self.name.clone(),
                detail: format!("QEMU exited ({st}); serial log at {}", self.serial_log.display()),
            });
        }
        Ok(())
    }

    /// Waits until the serial console contains `needle`; when it does, how long since start.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> Result<Duration, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(needle) {
                return Ok(self.started.elapsed());
            }
            self.check()?;
            if Instant::now() > deadline {
                return Err(LabError::Vm {
                    name: self.name.clone(),
                    detail: format!(
                        "{needle:?} not on the serial console within {timeout:?} (log kept at {})",
                        self.serial_log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills QEMU (by its PID) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn user_networking_is_restricted_and_forwards_only_to_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let spec = VmSpec::new(
            "muster-lab-vm-2",
            &mac(0x6c, 2),
            Boot::Network,
            Net::User {
                bootfile: Some("http://10.0.2.100/boot/start.ipxe".into()),
                forwards: vec![(80, 41000), (7443, 42000)],
            },
        );
        let (args, log) = qemu_args(&spec, dir.path()).unwrap();
        let netdev = &args[args.iter().position(|a| a == "-netdev").unwrap() + 1];
        assert!(netdev.starts_with("user,id=n0,restrict=on,"), "{netdev}");
        assert!(netdev.contains("guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 41000"), "{netdev}");
        assert!(netdev.contains("guestfwd=tcp:10.0.2.100:7443-cmd:busybox nc 127.0.0.1 42000"), "{netdev}");
        assert_eq!(args[..2], ["-name", "muster-lab-vm-2"]);
        assert!(args.iter().any(|x| x.contains("mac=52:54:00:6c:00:02")), "{args:?}");
        assert!(args.contains(&"tcg".to_string()));
        assert!(log.ends_with("muster-lab-vm-2.serial.log"));
    }

    #[test]
    fn identities_are_stable_and_distinct() {
        let ids: std::collections::BTreeSet<String> = (1..=200).map(|i| uuid(0, i)).collect();
        assert_eq!(ids.len(), 200);
        assert_eq!(uuid(0, 1), "6d757374-6572-4c61-8200-000000000001");
        assert_ne!(mac(1, 1), mac(2, 1));
        assert_eq!(boot_failure("...Kernel panic - not syncing"), Some("Kernel panic"));
        assert_eq!(boot_failure("muster-agent ready"), None);
    }
}
