//! `muster lab up --provisioner qemu`: a controller serving network boot on loopback and N QEMU
//! VMs that PXE-boot from it (SeaBIOS + iPXE, TCG), pre-registered so they come up `ready`.
//!
//! The VMs use user-mode networking with `restrict=on`: they reach nothing but the controller's
//! two loopback ports, forwarded into the guest at 10.0.2.100. Nothing else on this machine or
//! beyond is reachable from them, and no host network configuration is touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use muster_lab::process::{find_bin, spawn, tail};
use muster_lab::qemu::{
    self, boot_failure, lab_vm_name as vm_name, Boot, Net, VmSpec, GUEST_FWD_ADDR as GUEST_ADDR,
};
use muster_proto::pb;

use crate::lab::{wait_ports, write_lab, LabFile, Provisioner};
use crate::lab_supervisor::{ControllerSpec, Procs};

const GUEST_HTTP: u16 = 80;
const GUEST_GRPC: u16 = 7443;
/// TCG boots take ~15 s each; several at once on two cores take longer.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Lab VMs' MACs and UUIDs are in their own group.
const GROUP: u8 = 0x6c;

fn vm_mac(i: u32) -> String {
    qemu::mac(GROUP, u16::try_from(i).unwrap_or(u16::MAX))
}

fn vm_uuid(i: u32) -> String {
    qemu::uuid(0x56, i)
}

/// Where the PXE bundle is built and reused (outside the lab dir, which `lab down` removes).
fn bundle_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("muster/lab-pxe")
}

/// The agent for the image: the size-optimised build (`target/agent/`) when there is one.
fn image_agent() -> Result<PathBuf> {
    if let Some(dir) =
        std::env::current_exe().ok().and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
    {
        let small = dir.join("agent/muster-agent");
        if small.exists() {
            return Ok(small);
        }
    }
    Ok(find_bin("muster-agent")?)
}

/// QEMU's arguments for lab VM `i`: network boot, reaching only the controller's two loopback
/// ports (at 10.0.2.100 in the guest).
pub fn qemu_args(i: u32, dir: &Path, http_port: u16, grpc_port: u16) -> Result<Vec<String>> {
    let mut spec = VmSpec::new(
        &vm_name(i),
        &vm_mac(i),
        Boot::Network,
        Net::User {
            bootfile: Some(format!("http://{GUEST_ADDR}/boot/start.ipxe")),
            forwards: vec![(GUEST_HTTP, http_port), (GUEST_GRPC, grpc_port)],
        },
    );
    spec.uuid = Some(vm_uuid(i));
    spec.serial = Some(format!("MUSTER-LAB-{i}"));
    Ok(qemu::qemu_args(&spec, dir)?.0)
}

pub async fn up(nodes: u32, dir: PathBuf, detach: bool, ctx: &crate::Ctx) -> Result<()> {
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found: install it with scripts/install-netboot-deps.sh")?;
    which("busybox").context(
        "busybox not found (QEMU's port forwarding uses `busybox nc`): apt-get install busybox-static",
    )?;
    let controller_bin = find_bin("muster-controller")?;
    let muster_bin = std::env::current_exe().context("locating this muster binary")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // 1. The PXE bundle (rebuilt only when its inputs changed).
    let bundle = bundle_dir();
    eprintln!("building or reusing the PXE bundle in {}", bundle.display());
    let status = Command::new(&muster_bin)
        .args(["image", "pxe", "--agent"])
        .arg(image_agent()?)
        .arg("--out")
        .arg(&bundle)
        .status()
        .context("running `muster image pxe`")?;
    if !status.success() {
        bail!("building the PXE bundle failed ({status})");
    }

    // 2. The controller, serving network boot on loopback.
    let ctl_dir = dir.join("controller");
    let _ = std::fs::remove_file(ctl_dir.join("ports.json"));
    let s = |v: &str| v.to_string();
    if !ctl_dir.join("ca.crt").exists() {
        let out = Command::new(&controller_bin)
            .args(["init", "--san", GUEST_ADDR, "--data-dir"])
            .arg(&ctl_dir)
            .stdin(Stdio::null())
            .output()
            .context("running muster-controller init")?;
        if !out.status.success() {
            bail!("muster-controller init: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let ctl_log = dir.join("controller.log");
    let ctl_args = |grpc: &str, http: &str| {
        vec![
            s("serve"),
            s("--grpc-listen"),
            s(grpc),
            s("--http-listen"),
            s(http),
            s("--data-dir"),
            ctl_dir.display().to_string(),
            s("--boot-assets"),
            bundle.display().to_string(),
            s("--boot-controller-url"),
            format!("https://{GUEST_ADDR}:{GUEST_GRPC}"),
            s("--boot-kernel-args"),
            s("console=ttyS0 panic=-1"),
            // QEMU's user networking connects every VM from 127.0.0.1, where the controller
            // cannot see a MAC: the lab trusts the MACs its own VMs report (a LAN needs no
            // such flag).
            s("--trust-reported-macs"),
            s("127.0.0.1/32"),
        ]
    };
    let mut procs = Procs::default();
    let result = async {
        procs.children.push(spawn(&controller_bin, &ctl_args("127.0.0.1:0", "127.0.0.1:0"), &ctl_log)?);
        let ports = wait_ports(&ctl_dir, &ctl_log, &mut procs.children[0]).await?;
        let grpc = ports["grpc"].as_str().unwrap_or_default().to_owned();
        let http = ports["http"].as_str().unwrap_or_default().to_owned();
        // A restarted controller must be where the VMs' forwards point.
        procs.restart = Some(ControllerSpec {
            bin: controller_bin.clone(),
            args: ctl_args(&grpc, &http),
            log: ctl_log.clone(),
            ctl_dir: ctl_dir.clone(),
        });
        let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0);
        let mc_path = ctl_dir.join("musterconfig");
        muster_cli::client::set_endpoint(&mc_path, &format!("https://{grpc}"))?;
        let mut admin = ctx.admin_at(&mc_path).await?;

        // 3. Register the VMs, so they enroll straight to `ready` with their names.
        for i in 1..=nodes {
            let r = admin
                .client
                .register_machine(pb::RegisterMachineRequest {
                    registration: Some(pb::Registration {
                        mac: vm_mac(i),
                        uuid: vm_uuid(i),
                        hostname: format!("lab-vm-{i}"),
                        ..Default::default()
                    }),
                    force: true,
                })
                .await;
            r.map_err(|st| anyhow::Error::new(admin.explain(st)).context("registering the lab VMs"))?;
        }

        // 4. Boot them.
        for i in 1..=nodes {
            let args = qemu_args(i, &dir, port(&http), port(&grpc))?;
            let log = dir.join(format!("{}.qemu.log", vm_name(i)));
            procs.children.push(spawn(&qemu, &args, &log)?);
            procs.nodes.push((format!("lab-vm-{i}"), log));
        }
        let lab = LabFile {
            dir: dir.clone(),
            controller_pid: procs.children[0].id(),
            agent_pids: procs.children[1..].iter().map(Child::id).collect(),
            grpc: grpc.clone(),
            http: http.clone(),
            musterconfig: mc_path.clone(),
            relay_pid: None,
            netns: Vec::new(),
            provisioner: Provisioner::Qemu,
            supervisor_pid: None,
            monitoring: None,
        };
        write_lab(&dir, &lab)?;
        eprintln!(
            "booting {nodes} VM(s) over iPXE (TCG: ~15-60 s each); follow one with `muster lab console lab-vm-1`"
        );

        // 5. Show them enrolling, live.
        let start = Instant::now();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        loop {
            for i in 1..=nodes {
                let log = dir.join(format!("{}.serial.log", vm_name(i)));
                let text = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                if let Some(f) = boot_failure(&text) {
                    bail!("lab-vm-{i}: {f:?} on its console; see {}", log.display());
                }
                if let Ok(Some(st)) = procs.children[i as usize].try_wait() {
                    bail!("lab-vm-{i}: QEMU exited ({st}):\n{}", tail(&dir.join(format!("{}.qemu.log", vm_name(i)))));
                }
            }
            let ms = muster_cli::list::all_machines(&mut admin.client).await.map_err(|st| admin.explain(st))?;
            for m in &ms {
                let state = format!(
                    "{}{}",
                    crate::views::state_name(m.state),
                    if m.connected { "" } else { " (disconnected)" }
                );
                if seen.get(&m.hostname) != Some(&state) {
                    eprintln!("[{:>5.1}s] {} {}: {state}", start.elapsed().as_secs_f64(), m.id, m.hostname);
                    seen.insert(m.hostname.clone(), state);
                }
            }
            let ready = ms.iter().filter(|m| m.state == pb::MachineState::Ready as i32 && m.connected).count();
            if ready >= nodes as usize {
                outln!("\nLab is up in {}: controller https://{grpc} (HTTP http://{http}), {nodes} QEMU VM(s) network-booted.\n", dir.display());
                out!("{}", crate::views::machines_table(&ms, SystemTime::now()));
                outln!("\nPoint the CLI at it:\n  export MUSTERCONFIG={}", mc_path.display());
                outln!("Serial consoles: muster lab console lab-vm-N");
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("only {ready} of {nodes} VMs became ready within {READY_TIMEOUT:?}; see {}/*.serial.log", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    .await;
    procs.hold(&dir, result, detach).await
}

/// `muster lab console NODE`: the VM's serial console so far, then follows it until Ctrl-C.
pub async fn console(dir: &Path, node: &str, follow: bool) -> Result<()> {
    let n = node.trim_start_matches("lab-vm-").trim_start_matches("muster-lab-vm-");
    let i: u32 = n.parse().map_err(|_| anyhow::anyhow!("{node:?}: name a lab VM as lab-vm-N or N"))?;
    let log = dir.join(format!("{}.serial.log", vm_name(i)));
    if !log.exists() {
        bail!("no serial log {} (is a qemu lab running in {}?)", log.display(), dir.display());
    }
    let mut offset = 0usize;
    loop {
        let bytes = std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
        if bytes.len() > offset {
            crate::output::emit(&String::from_utf8_lossy(&bytes[offset..]))?;
            offset = bytes.len();
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("{name} is not on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_vms_are_restricted_to_the_controllers_loopback_ports_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = qemu_args(2, dir.path(), 41000, 42000).unwrap();
        let netdev = &a[a.iter().position(|x| x == "-netdev").unwrap() + 1];
        assert!(netdev.contains("guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 41000"));
        assert!(netdev.contains("guestfwd=tcp:10.0.2.100:7443-cmd:busybox nc 127.0.0.1 42000"));
        assert_eq!(a[1], "muster-lab-vm-2");
        assert!(a.iter().any(|x| x.contains("mac=52:54:00:6c:00:02")), "{a:?}");
        assert_ne!(vm_uuid(1), vm_uuid(2));
        assert!(muster_lab::process::ours_by("qemu-system-x86_64", &a));
    }
}
