//! Power-on to `ready` in a QEMU VM (TCG), broken down, next to a direct-kernel-boot baseline
//! measured in the same run:
//!
//! - firmware + iPXE: VM start → the kernel's first line (network boot only; includes iPXE's
//!   DHCP and the download of start.ipxe, the machine script, kernel and initramfs);
//! - kernel + init: kernel's first line → the init starting the agent;
//! - Muster's own share: agent start → enrolled → config applied (the controller records the
//!   agent's report of generation 1).
//!
//! Times are when each marker first shows on the serial console or in the controller, polled
//! every 10 ms. A marker that never shows leaves the phases it bounds unmeasured for that run:
//! they are reported as `missing`, medians are taken over only the runs that measured them (with
//! how many), and no neighbouring phase takes over the missing one's time. The VM reaches only
//! the controller's loopback ports (user-mode networking, `restrict=on`).
//!
//! A third column runs the same agent binary on this host without a VM (in its own UTS and
//! mount namespaces, files under a temp root, over loopback): Muster's share with the
//! emulator's cost taken out. Under TCG every piece of code is translated the first time it
//! runs, which the once-per-boot TLS handshakes and enrollment pay in full.
//!
//!     cargo build --workspace --bins && cargo build --profile agent -p muster-agent
//!     target/debug/muster-bench-boot [--runs 3]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use muster_lab::muster::ControllerProc;
use muster_lab::process::find_bin as bin;
use muster_lab::qemu::{Boot, Net, Vm, VmSpec, GUEST_FWD_ADDR};
use muster_machinery::boot::{INITRD, KERNEL};
use muster_machinery::KernelArgs;
use muster_proto::pb;

/// Markers on the serial console.
const KERNEL_STARTED: &str = "Linux version";
const AGENT_STARTING: &str = "muster-init: starting muster-agent";
const GUEST_GRPC: u16 = 7443;

#[derive(Parser, Debug)]
#[command(about = "Power-on → ready of a network-booted VM, by phase, vs direct kernel boot")]
struct Args {
    /// Runs of each kind (the report shows the median).
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// The agent baked into the image [default: target/agent/muster-agent if built, else the debug build]
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Give up on a boot after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// More kernel command line for both boots, e.g. `RUST_LOG=muster_agent=debug` (the kernel
    /// hands `NAME=value` words it does not know to the init's environment, and so the agent's).
    #[arg(long, default_value = "")]
    kernel_args: String,
    /// Copy each run's serial log into this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

/// One phase's duration, from a run's marker times; `None` when a marker it needs never showed.
type PhaseFn = fn(&Phases) -> Option<f64>;

/// When each marker first showed, in seconds from power-on; `None` when it never did.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    kernel: Option<f64>,
    agent_start: Option<f64>,
    enrolled: Option<f64>,
    ready: f64,
}

/// `end - start`, only when both markers were seen.
fn span(start: Option<f64>, end: Option<f64>) -> Option<f64> {
    Some(end? - start?)
}

/// The median of a phase over only the runs that measured it, and how many runs those were.
fn median(runs: &[Phases], f: PhaseFn) -> (Option<f64>, usize) {
    let mut x: Vec<f64> = runs.iter().filter_map(f).collect();
    x.sort_by(f64::total_cmp);
    (x.get(x.len() / 2).copied(), x.len())
}

/// A report cell: the median, with `(k/N)` when only k of the N runs measured the phase, or
/// `missing (0/N)` when none did.
fn cell(runs: &[Phases], f: PhaseFn, decimals: usize) -> String {
    let total = runs.len();
    match median(runs, f) {
        (Some(v), n) if n == total => format!("{v:.decimals$}"),
        (Some(v), n) => format!("{v:.decimals$} ({n}/{total})"),
        (None, _) => format!("missing (0/{total})"),
    }
}

/// A marker time for the per-run log line.
fn secs(t: Option<f64>) -> String {
    t.map_or_else(|| "missing".to_owned(), |t| format!("{t:.2}s"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agent = match args.agent.clone() {
        Some(a) => a,
        None => {
            let small = muster_lab::process::bin_dir().join("../agent/muster-agent");
            if small.exists() {
                small
            } else {
                muster_lab::muster::agent_bin()?
            }
        }
    };
    let tmp = tempfile::Builder::new().prefix("muster-bench-boot-").tempdir()?;
    let bundle = tmp.path().join("pxe");
    let started = Instant::now();
    let st = Command::new(bin("muster")?)
        .args(["image", "pxe", "--quiet", "--agent"])
        .arg(&agent)
        .arg("--out")
        .arg(&bundle)
        .status()?;
    if !st.success() {
        bail!("muster image pxe failed");
    }
    eprintln!("PXE bundle built in {:.1}s", started.elapsed().as_secs_f64());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut net, mut direct, mut native) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let n = u8::try_from(run % 200).unwrap_or(0);
        net.push(rt.block_on(boot_once(tmp.path(), &bundle, Kind::Ipxe, n, &args, &agent))?);
        direct.push(rt.block_on(boot_once(tmp.path(), &bundle, Kind::Direct, n, &args, &agent))?);
        native.push(rt.block_on(boot_once(tmp.path(), &bundle, Kind::Native, n, &args, &agent))?);
    }
    println!("\npower-on → ready, median of {} run(s) each (seconds from QEMU start)", args.runs);
    println!(
        "(k/N): median over only the k of N runs whose markers bound that phase; missing: no run measured it"
    );
    println!("{:<38} {:>16} {:>16} {:>16}", "phase", "iPXE boot", "direct kernel", "native (no VM)");
    let rows: [(&str, PhaseFn, bool); 4] = [
        ("firmware (+ iPXE, downloads)", |p| p.kernel, false),
        ("kernel + init → agent start", |p| span(p.kernel, p.agent_start), false),
        ("agent start → enrolled", |p| span(p.agent_start, p.enrolled), true),
        ("enrolled → config applied (ready)", |p| span(p.enrolled, Some(p.ready)), true),
    ];
    for (name, f, on_host) in rows {
        let host = if on_host { cell(&native, f, 3) } else { "-".into() };
        println!("{name:<38} {:>16} {:>16} {host:>16}", cell(&net, f, 2), cell(&direct, f, 2));
    }
    println!(
        "{:<38} {:>16} {:>16} {:>16}",
        "total power-on → ready",
        cell(&net, |p| Some(p.ready), 2),
        cell(&direct, |p| Some(p.ready), 2),
        "-"
    );
    let share: PhaseFn = |p| span(p.agent_start, Some(p.ready));
    println!(
        "Muster's own share (agent start → ready with config): {} s (iPXE run), {} s (direct run), {} s (same agent, no VM)",
        cell(&net, share, 3),
        cell(&direct, share, 3),
        cell(&native, share, 3)
    );
    let manifest = std::fs::read_to_string(bundle.join("manifest.json")).unwrap_or_default();
    println!("\nimage sizes:");
    for f in [KERNEL, INITRD] {
        let len = std::fs::metadata(bundle.join(f)).map(|m| m.len()).unwrap_or(0);
        println!("  {f:<14} {:>8.2} MB", len as f64 / 1e6);
    }
    if manifest.is_empty() {
        println!("  (no manifest.json)");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A VM network-booting over iPXE.
    Ipxe,
    /// A VM given the kernel and initramfs directly.
    Direct,
    /// The agent as a process on this host.
    Native,
}

/// The node under test: a VM, or the agent as a process.
enum Node {
    Vm(Vm),
    Process(std::process::Child),
}

/// The MAC the agent reports first on this host (from its own inventory).
fn host_mac() -> Result<String> {
    muster_agent::inventory::collect(&muster_agent::Hints::default())
        .nics
        .into_iter()
        .next()
        .map(|n| n.mac)
        .context("this host has no network interface with a MAC to register the native agent by")
}

async fn boot_once(
    dir: &Path,
    bundle: &Path,
    which: Kind,
    run: u8,
    args: &Args,
    agent_bin: &Path,
) -> Result<Phases> {
    let timeout = args.timeout;
    let kernel_args = format!("console=ttyS0 panic=-1 {}", args.kernel_args).trim_end().to_owned();
    let netboot = which == Kind::Ipxe;
    let kind = match which {
        Kind::Ipxe => "ipxe",
        Kind::Direct => "direct",
        Kind::Native => "native",
    };
    let run_dir = dir.join(format!("{kind}-{run}"));
    std::fs::create_dir_all(&run_dir)?;
    let data = run_dir.join("controller");
    muster_lab::muster::init_controller(&data, &["--san", GUEST_FWD_ADDR])?;
    let url = format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}");
    let ctl = ControllerProc::start(
        &data,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--boot-assets",
            &bundle.display().to_string(),
            "--boot-controller-url",
            &url,
            "--boot-kernel-args",
            &kernel_args,
        ],
    )?;
    let mac = match which {
        Kind::Native => host_mac()?,
        _ => format!("52:54:00:be:{}:{run:02x}", if netboot { "01" } else { "02" }),
    };
    let cfg = run_dir.join("cfg.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/motd\n    content: \"bench\\n\"\n",
    )?;
    ctl.cli_ok(&[
        "machine",
        "register",
        "--mac",
        &mac,
        "--hostname",
        "bench-vm",
        "-f",
        &cfg.display().to_string(),
    ])?;
    let forwards = vec![(80, ctl.ports.http.port()), (GUEST_GRPC, ctl.ports.grpc.port())];
    let token = std::fs::read_to_string(data.join("boot-token")).context("the controller's boot token")?;
    let token = token.trim();
    let spec = match which {
        Kind::Ipxe => Some((
            Boot::Network,
            Net::User { bootfile: Some(format!("http://{GUEST_FWD_ADDR}/boot/start.ipxe")), forwards },
        )),
        // The same kernel, initramfs and command line the boot service would give it.
        Kind::Direct => {
            let append = KernelArgs::enrollment(&url, &ctl.pin()?, token).after(&kernel_args);
            Some((
                Boot::Kernel { kernel: bundle.join(KERNEL), initrd: bundle.join(INITRD), append },
                Net::User { bootfile: None, forwards },
            ))
        }
        Kind::Native => None,
    };
    let mc = muster_cli::client::load_musterconfig(&ctl.musterconfig())?;
    let mut admin = muster_cli::client::admin_client(&mc).await?;
    let started = Instant::now();
    let mut node = match spec {
        Some((boot, netcfg)) => {
            Node::Vm(Vm::start(&VmSpec::new(&format!("bench-{kind}-{run}"), &mac, boot, netcfg), &run_dir)?)
        }
        None => {
            let root = run_dir.join("root");
            std::fs::create_dir_all(&root)?;
            // Its own UTS and mount namespaces: the registered hostname lands there, files under
            // the temp root; it talks to the controller over loopback.
            Node::Process(
                Command::new("unshare")
                    .args(["--uts", "--mount", "--propagation", "private"])
                    .arg(agent_bin)
                    .arg("--controller")
                    .arg(format!("https://127.0.0.1:{}", ctl.ports.grpc.port()))
                    .args(["--ca-hash", &ctl.pin()?, "--token", token, "--metrics-listen", "off"])
                    .arg("--state-dir")
                    .arg(run_dir.join("agent-state"))
                    .arg("--config-root")
                    .arg(&root)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(run_dir.join("agent.log"))?)
                    .spawn()
                    .context("unshare (util-linux) with the agent")?,
            )
        }
    };
    let t0 = match &node {
        Node::Vm(vm) => vm.started,
        Node::Process(_) => started,
    };
    let mut p = Phases::default();
    let (mut kernel, mut agent, mut enrolled) = (None, None, None);
    if which == Kind::Native {
        (kernel, agent) = (Some(0.0), Some(0.0));
    }
    loop {
        let now = t0.elapsed().as_secs_f64();
        match &mut node {
            Node::Vm(vm) => {
                vm.check()?;
                let serial = vm.serial();
                if kernel.is_none() && serial.contains(KERNEL_STARTED) {
                    kernel = Some(now);
                }
                if agent.is_none() && serial.contains(AGENT_STARTING) {
                    agent = Some(now);
                }
            }
            Node::Process(child) => {
                if let Some(st) = child.try_wait()? {
                    bail!("the agent exited ({st}); see {}", run_dir.join("agent.log").display());
                }
            }
        }
        let ms = muster_cli::list::all_machines(&mut admin).await?;
        if let Some(m) = ms.iter().find(|m| m.macs.contains(&mac)) {
            if enrolled.is_none() {
                enrolled = Some(now);
            }
            let c = admin
                .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
                .await?
                .into_inner();
            if c.applied_generation >= 1 && m.state == pb::MachineState::Ready as i32 {
                p.ready = now;
                break;
            }
        }
        if t0.elapsed() > timeout {
            match &node {
                Node::Vm(vm) => {
                    bail!("{kind} boot not ready within {timeout:?}; serial log {}", vm.serial_log.display())
                }
                Node::Process(_) => bail!("the agent was not ready within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A marker that never showed stays missing: the phases it bounds are not measured in this
    // run, rather than filled in with a made-up time that would move theirs into a neighbour.
    (p.kernel, p.agent_start, p.enrolled) = (kernel, agent, enrolled);
    eprintln!(
        "{kind} run {run}: kernel {}, agent {}, enrolled {}, ready {:.2}s",
        secs(p.kernel),
        secs(p.agent_start),
        secs(p.enrolled),
        p.ready
    );
    if p.kernel.is_none() {
        eprintln!(
            "  warning: {KERNEL_STARTED:?} never showed on the serial console: firmware and kernel + init not measured in this run"
        );
    }
    if p.agent_start.is_none() {
        eprintln!(
            "  warning: {AGENT_STARTING:?} never showed on the serial console: kernel + init and agent start → enrolled not measured in this run"
        );
    }
    if p.enrolled.is_none() {
        eprintln!(
            "  warning: enrollment was not seen before ready: agent start → enrolled and enrolled → ready not measured in this run"
        );
    }
    match &mut node {
        Node::Vm(vm) => {
            vm.kill();
            if let Some(keep) = &args.keep_logs {
                std::fs::create_dir_all(keep)?;
                std::fs::copy(&vm.serial_log, keep.join(format!("{kind}-{run}.serial.log")))?;
            }
        }
        Node::Process(child) => {
            // Our own child, by its PID.
            let _ = child.kill();
            let _ = child.wait();
            if let Some(keep) = &args.keep_logs {
                std::fs::create_dir_all(keep)?;
                std::fs::copy(run_dir.join("agent.log"), keep.join(format!("{kind}-{run}.agent.log")))?;
            }
        }
    }
    drop(ctl);
    Ok(p)
}
