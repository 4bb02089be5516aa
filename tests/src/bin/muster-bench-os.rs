//! The node OS in numbers (QEMU under TCG here; KVM hosts are many times faster):
//!
//! - `muster image os` cold (an empty cache: mmdebstrap downloads and installs every package),
//!   cached (the root file system from the cache, the disk made again) and up to date (nothing
//!   to do), and the image's sizes;
//! - power-on → `ready` of a clone of the qcow2 template (SeaBIOS, then UEFI), split at the
//!   kernel's first line and at systemd starting the agent;
//! - install to disk of a network-booted VM: the agent's own split (waiting on the download,
//!   writing, reading back), the wall time from `muster machine install` to `installed`, and
//!   from there to the installed system's agent connecting again.
//!
//! Run it so:
//!
//!     cargo build --workspace --bins && cargo build --profile agent -p muster-agent
//!     sudo target/debug/muster-bench-os [--cache DIR]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muster_tests::e2e::{
    agent_deb, build_os, clone_disk, controller_with, pxe_bundle, user_net, wait_machine, GUEST_GRPC,
    GUEST_HTTP,
};
use muster_tests::vm::{mac, Boot, Vm, VmSpec, GUEST_FWD_ADDR, OVMF_VARS};
use muster_tests::{bin, wait_for};

const TIMEOUT: Duration = Duration::from_secs(600);

fn build(out: &Path, cache: &Path, deb: &Path) -> Result<f64> {
    let t = Instant::now();
    build_os(deb, cache, out, None)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds from QEMU's start until `needle` shows on the console, if it does.
fn seen(vm: &Vm, needle: &str) -> Option<f64> {
    if vm.serial().contains(needle) {
        Some(vm.started.elapsed().as_secs_f64())
    } else {
        None
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tmp = tempfile::Builder::new().prefix("muster-bench-os-").tempdir()?;
    let cache = match args.iter().position(|a| a == "--cache") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--cache DIR")?),
        None => tmp.path().join("cache"),
    };
    let deb = agent_deb(&tmp.path().join("debian"), None)?;
    let out = tmp.path().join("os");
    let cold = build(&out, &cache, &deb)?;
    std::fs::remove_dir_all(&out)?;
    let cached = build(&out, &cache, &deb)?;
    let current = build(&out, &cache, &deb)?;
    let size = |n: &str| std::fs::metadata(out.join(n)).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    println!("image build: cold {cold:.1}s (cache {}), cached root file system {cached:.1}s, up to date {current:.1}s", cache.display());
    println!(
        "image sizes: raw {:.0} MB, qcow2 {:.0} MB, raw.gz {:.0} MB",
        size("muster-os.raw"),
        size("muster-os.qcow2"),
        size("muster-os.raw.gz")
    );

    // Power-on → ready from the template's disk.
    let ctl = controller_with(
        tmp.path(),
        Some(&pxe_bundle()?),
        None,
        &["--boot-http-url", &format!("http://{GUEST_FWD_ADDR}:{GUEST_HTTP}")],
    )?;
    let token = ctl.cli_ok(&["token", "create", "--boot"])?.trim().to_owned();
    ctl.cli_ok(&["machine", "register", "--mac", &mac(7, 1), "--hostname", "bench-bios"])?;
    ctl.cli_ok(&["machine", "register", "--mac", &mac(7, 2), "--hostname", "bench-uefi"])?;
    let fw_cfg = vec![
        ("opt/muster/controller".to_owned(), format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}")),
        ("opt/muster/token".to_owned(), token),
        ("opt/muster/ca_hash".to_owned(), ctl.pin()?),
    ];
    println!("\npower-on → ready from the template's disk (seconds from QEMU start):");
    println!("{:<6} {:>8} {:>16} {:>8}", "", "kernel", "agent started", "ready");
    for (name, uefi, n) in [("bios", false, 1u16), ("uefi", true, 2)] {
        let disk = tmp.path().join(format!("{name}.qcow2"));
        clone_disk(&out.join("muster-os.qcow2"), &disk, "8G")?;
        let m = mac(7, n);
        let mut spec = VmSpec::new(&format!("bench-{name}"), &m, Boot::Disk, user_net(&ctl, false));
        spec.memory_mb = 1024;
        spec.disks = vec![disk];
        spec.fw_cfg = fw_cfg.clone();
        if uefi {
            let vars = tmp.path().join(format!("{name}.vars.fd"));
            std::fs::copy(OVMF_VARS, &vars).context("OVMF (apt-get install ovmf)")?;
            spec.uefi_vars = Some(vars);
        }
        let mut vm = Vm::start(&spec, tmp.path())?;
        let (mut kernel, mut agent) = (None, None);
        let start = Instant::now();
        let ready = loop {
            vm.check()?;
            kernel = kernel.or_else(|| seen(&vm, "Linux version"));
            agent = agent.or_else(|| seen(&vm, "Started muster-agent.service"));
            let ms = ctl.machines()?;
            if ms.iter().any(|j| {
                j["state"] == "ready"
                    && j["macs"].as_array().is_some_and(|a| a.iter().any(|x| x == m.as_str()))
            }) {
                break vm.started.elapsed().as_secs_f64();
            }
            if start.elapsed() > TIMEOUT {
                bail!("{name}: not ready within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let f = |t: Option<f64>| t.map_or_else(|| "missing".to_owned(), |t| format!("{t:.1}"));
        println!("{:<6} {:>8} {:>16} {:>8.1}", name, f(kernel), f(agent), ready);
    }

    // Install to disk.
    let data = tmp.path().join("controller");
    let st = Command::new(bin("muster-controller")?)
        .args(["image", "add"])
        .arg(out.join("muster-os.raw.gz"))
        .args(["--name", "bench", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("muster-controller image add failed");
    }
    let m = mac(7, 3);
    let disk = tmp.path().join("metal.qcow2");
    let q = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("8G").status()?;
    if !q.success() {
        bail!("qemu-img create failed");
    }
    let mut spec = VmSpec::new("bench-metal", &m, Boot::NetworkThenDisk, user_net(&ctl, true));
    spec.memory_mb = 1024;
    spec.disks = vec![disk];
    spec.allow_reboot = true;
    let mut vm = Vm::start(&spec, tmp.path())?;
    let j = wait_machine(&ctl, &mut vm, &m, "pending", |j| j["state"] == "pending")?;
    let id = j["id"].as_str().context("id")?.to_owned();
    ctl.cli_ok(&["approve", &id])?;
    wait_machine(&ctl, &mut vm, &m, "ready", |j| j["state"] == "ready")?;
    let t = Instant::now();
    ctl.cli_ok(&["machine", "install", &id, "--disk", "serial=muster-disk-0", "--image", "bench"])?;
    let get = |id: &str| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&ctl.cli_ok(&["machine", "get", id, "-o", "json"])?)?)
    };
    let done = wait_for("installed", TIMEOUT, || {
        let j = get(&id).ok()?;
        (j["install"]["state"] == "installed").then_some(j)
    })?;
    let installed = t.elapsed().as_secs_f64();
    let back_t = Instant::now();
    wait_for("connected from its disk", TIMEOUT, || {
        let j = get(&id).ok()?;
        (j["connected"] == true && j["inventory"]["os"].as_str().is_some_and(|o| o.contains("Debian")))
            .then_some(())
    })?;
    let back = back_t.elapsed().as_secs_f64();
    let ms = |k: &str| done["install"]["timings"][k].as_u64().map_or(0.0, |v| v as f64 / 1000.0);
    println!("\ninstall to disk (raw {:.0} MB over QEMU user networking):", size("muster-os.raw"));
    println!(
        "  agent: waiting on the download {:.1}s, writing {:.1}s, reading back + compare {:.1}s",
        ms("download_ms"),
        ms("write_ms"),
        ms("verify_ms")
    );
    println!(
        "  `machine install` → installed: {installed:.1}s; installed → agent back from the disk: {back:.1}s"
    );
    Ok(())
}
