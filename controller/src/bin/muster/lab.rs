//! `muster lab`: a controller and N agents as local processes on loopback, for trying Muster
//! out. Each agent has its own state dir and identity hints; all logs and state live in the lab
//! dir. `lab down` stops exactly the processes the lab recorded, checking each PID is still one
//! of our binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use muster_controller::client;
use muster_proto::pb;
use serde::{Deserialize, Serialize};

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Start a controller and N agents on this machine (loopback only) and wait until they are ready.
    Up {
        /// How many agents.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=200))]
        nodes: u32,
        /// Lab directory (state, logs, lab.json) [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the lab running in the background and return.
        #[arg(long, short)]
        detach: bool,
        /// Agents' heartbeat interval.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        heartbeat: Duration,
        /// How nodes are provided: local processes (`qemu` VMs come in a later release).
        #[arg(long, default_value = "process")]
        provisioner: String,
    },
    /// Stop the lab's processes and remove its directory.
    Down {
        /// Lab directory [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the directory (state and logs).
        #[arg(long)]
        keep: bool,
    },
    /// Show whether a lab is running and where.
    Status {
        /// Lab directory [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct LabFile {
    dir: PathBuf,
    controller_pid: u32,
    agent_pids: Vec<u32>,
    grpc: String,
    http: String,
    musterconfig: PathBuf,
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from(".muster/lab"), |h| PathBuf::from(h).join(".muster/lab"))
}

/// A sibling binary of this executable, else one on PATH.
fn find_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("{name} not found next to this muster binary or on PATH; build it with `cargo build --workspace --bins`")
}

/// Whether `pid` is alive and runs one of our binaries (never signal anything else).
fn is_ours(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("muster-controller") || n.starts_with("muster-agent"))
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a PID we recorded and just checked runs one of our binaries.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// SIGTERM, up to 5 s of grace, then SIGKILL, for PIDs that are still ours.
fn stop_pids(pids: &[u32]) {
    let ours: Vec<u32> = pids.iter().copied().filter(|p| is_ours(*p)).collect();
    for p in &ours {
        signal(*p, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && ours.iter().any(|p| is_ours(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in ours.iter().filter(|p| is_ours(**p)) {
        signal(*p, libc::SIGKILL);
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let f2 = f.try_clone()?;
    use std::os::unix::process::CommandExt;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        // Own process group: Ctrl-C reaches `muster`, which stops the children in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub async fn run(cmd: &LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up { nodes, dir, detach, heartbeat, provisioner } => {
            if provisioner != "process" {
                bail!("--provisioner {provisioner:?}: only `process` is implemented so far (qemu comes with network boot)");
            }
            up(*nodes, dir.clone().unwrap_or_else(default_dir), *detach, *heartbeat).await
        }
        LabCmd::Down { dir, keep } => down(&dir.clone().unwrap_or_else(default_dir), *keep),
        LabCmd::Status { dir } => {
            let dir = dir.clone().unwrap_or_else(default_dir);
            match read_lab(&dir) {
                Some(l) if is_ours(l.controller_pid) => {
                    let alive = l.agent_pids.iter().filter(|p| is_ours(**p)).count();
                    println!(
                        "lab running in {}: controller pid {} (grpc {}, http {}), {alive}/{} agents alive",
                        dir.display(),
                        l.controller_pid,
                        l.grpc,
                        l.http,
                        l.agent_pids.len()
                    );
                    println!("export MUSTERCONFIG={}", l.musterconfig.display());
                }
                Some(_) => println!(
                    "lab in {} is not running (stale lab.json; `muster lab down` cleans up)",
                    dir.display()
                ),
                None => println!("no lab in {}", dir.display()),
            }
            Ok(())
        }
    }
}

fn read_lab(dir: &Path) -> Option<LabFile> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).ok()?).ok()
}

fn down(dir: &Path, keep: bool) -> Result<()> {
    match read_lab(dir) {
        Some(l) => {
            let mut pids = l.agent_pids.clone();
            pids.push(l.controller_pid);
            stop_pids(&pids);
            println!("lab in {} stopped", dir.display());
        }
        None => println!("no running lab recorded in {}", dir.display()),
    }
    if !keep && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("removed {}", dir.display());
    }
    Ok(())
}

async fn up(nodes: u32, dir: PathBuf, detach: bool, heartbeat: Duration) -> Result<()> {
    if let Some(l) = read_lab(&dir) {
        if is_ours(l.controller_pid) || l.agent_pids.iter().any(|p| is_ours(*p)) {
            bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
        }
    }
    let controller_bin = find_bin("muster-controller")?;
    let agent_bin = find_bin("muster-agent")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ctl_dir = dir.join("controller");
    let _ = std::fs::remove_file(ctl_dir.join("ports.json"));
    let mut children: Vec<Child> = Vec::new();
    let result = async {
        let ctl_log = dir.join("controller.log");
        let args: Vec<String> =
            ["serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([ctl_dir.display().to_string()])
                .collect();
        children.push(spawn(&controller_bin, &args, &ctl_log)?);
        let ports = wait_ports(&ctl_dir, &ctl_log, &mut children[0]).await?;
        let grpc = ports["grpc"].as_str().unwrap_or_default().to_owned();
        let http = ports["http"].as_str().unwrap_or_default().to_owned();
        let endpoint = format!("https://{grpc}");
        let mc_path = ctl_dir.join("musterconfig");
        let mc = client::load_musterconfig(&mc_path)?;
        let ca = std::fs::read_to_string(ctl_dir.join("ca.crt")).context("reading the lab CA")?;
        let pin = muster_proto::pin::CaPin::of_cert_pem(&ca)?;
        let mut admin = client::admin_client(&mc).await?;
        let token = admin
            .create_token(pb::CreateTokenRequest {
                ttl_ms: 15 * 60 * 1000,
                uses: nodes,
                labels: [("muster.dev/lab".to_string(), "true".to_string())].into(),
                pending: false,
                description: "muster lab".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("creating the lab token: {}", s.message()))?
            .into_inner()
            .token;
        for i in 1..=nodes {
            let name = format!("lab-node-{i}");
            let args: Vec<String> = vec![
                "--controller".into(),
                endpoint.clone(),
                "--token".into(),
                token.clone(),
                "--ca-hash".into(),
                pin.to_string(),
                "--state-dir".into(),
                dir.join(&name).display().to_string(),
                "--heartbeat".into(),
                humantime::format_duration(heartbeat).to_string(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--cmdline-file".into(),
                "/dev/null".into(),
                // Lab agents share this machine's namespaces: they must not apply configs to it.
                "--no-apply-config".into(),
                "--hint-hostname".into(),
                name.clone(),
                "--hint-uuid".into(),
                format!("6d757374-6572-4c61-8200-{i:012x}"),
            ];
            children.push(spawn(&agent_bin, &args, &dir.join(format!("{name}.log")))?);
        }
        let lab = LabFile {
            dir: dir.clone(),
            controller_pid: children[0].id(),
            agent_pids: children[1..].iter().map(Child::id).collect(),
            grpc: grpc.clone(),
            http: http.clone(),
            musterconfig: mc_path.clone(),
        };
        std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
        let ms = wait_ready(&mut admin, nodes as usize).await?;
        println!(
            "Lab is up in {}: controller {endpoint} (HTTP http://{http}), {nodes} agents.\n",
            dir.display()
        );
        print!("{}", crate::output::machines_table(&ms, SystemTime::now()));
        println!("\nPoint the CLI at it:\n  export MUSTERCONFIG={}", mc_path.display());
        println!("Metrics: curl http://{http}/metrics   Service discovery: curl http://{http}/sd/prometheus");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(dir.join("lab.json"));
        return Err(e);
    }
    if detach {
        println!("Running in the background; stop it with `muster lab down`.");
        return Ok(());
    }
    println!("Stop it with Ctrl-C (or `muster lab down` from another shell).");
    wait_for_signal_or_exit(&mut children).await;
    let pids: Vec<u32> = children.iter().map(Child::id).rev().collect();
    stop_pids(&pids);
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(dir.join("lab.json"));
    println!("lab stopped (state and logs kept in {}; `muster lab down` removes them)", dir.display());
    Ok(())
}

async fn wait_for_signal_or_exit(children: &mut [Child]) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        let term_fut = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            () = term_fut => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                // `muster lab down` from another shell stopped the controller.
                if matches!(children[0].try_wait(), Ok(Some(_))) {
                    return;
                }
            }
        }
    }
}

async fn wait_ports(ctl_dir: &Path, log: &Path, child: &mut Child) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(ctl_dir.join("ports.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if v["pid"].as_u64() == Some(u64::from(child.id())) {
                    return Ok(v);
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the controller exited ({status}):\n{}", tail(log));
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the controller did not start within 30s:\n{}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(admin: &mut crate::Admin, n: usize) -> Result<Vec<pb::Machine>> {
    let start = Instant::now();
    let mut last = usize::MAX;
    loop {
        let ms = admin
            .list_machines(pb::ListMachinesRequest {})
            .await
            .map_err(|s| anyhow::anyhow!(s.message().to_owned()))?
            .into_inner()
            .machines;
        let ready = ms.iter().filter(|m| m.state == pb::MachineState::Ready as i32 && m.connected).count();
        if ready != last {
            eprintln!("waiting for agents: {ready}/{n} ready");
            last = ready;
        }
        if ready >= n {
            return Ok(ms);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("only {ready} of {n} agents became ready within 60s; see the lab-node-*.log files");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
