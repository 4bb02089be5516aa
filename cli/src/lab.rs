//! `muster lab`: a controller and N agents as local processes on loopback, for trying Muster
//! out. Each agent has its own state dir and identity hints; all logs and state live in the lab
//! dir. `lab down` stops exactly the processes the lab recorded, checking each PID is still one
//! of our binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use muster_cli::client::{self, Admin};
use muster_lab::netns::{self, euid_is_root, ROUTER_ADDR as LAB_ROUTER};
use muster_lab::process::{find_bin, is_ours, spawn, stop_pids, tail};
use muster_lab::qemu;
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
        /// How nodes are provided: `process` runs each agent as a local process; `qemu` boots
        /// VMs (TCG) that network-boot from the controller over iPXE, pre-registered so they
        /// come up ready (needs qemu-system-x86_64; see scripts/install-netboot-deps.sh).
        #[arg(long, value_enum, default_value_t = Provisioner::Process)]
        provisioner: Provisioner,
        /// How process nodes are kept off this machine: `netns` gives each its own network
        /// (a veth on a lab bridge), UTS and mount namespace and file root, so configs apply for
        /// real without touching the host (needs root and `ip`); `none` shares this machine's
        /// namespaces and records configs without applying them; `auto` picks netns when it can.
        #[arg(long, value_enum, default_value_t = Isolation::Auto)]
        isolation: Isolation,
    },
    /// (internal) Relays host loopback ports into the lab's network namespace.
    #[command(hide = true)]
    Relay {
        /// The lab network namespace (a /run/netns path).
        #[arg(long)]
        netns: PathBuf,
        /// LISTEN=TARGET, e.g. 127.0.0.1:0=10.77.0.1:7443. Repeatable.
        #[arg(long = "map")]
        maps: Vec<String>,
        /// Where to write the bound ports (JSON).
        #[arg(long)]
        ports_file: PathBuf,
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
    /// Print a QEMU lab VM's serial console and follow it (Ctrl-C stops).
    Console {
        /// The VM: lab-vm-N or N.
        node: String,
        /// Lab directory [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// Show whether a lab is running and where.
    Status {
        /// Lab directory [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Where lab nodes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provisioner {
    /// Agents as local processes.
    Process,
    /// QEMU virtual machines that network-boot from the controller.
    Qemu,
}

/// How lab nodes are isolated from this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    Auto,
    Netns,
    None,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LabFile {
    pub dir: PathBuf,
    pub controller_pid: u32,
    pub agent_pids: Vec<u32>,
    pub grpc: String,
    pub http: String,
    pub musterconfig: PathBuf,
    #[serde(default)]
    pub relay_pid: Option<u32>,
    /// Network namespaces the lab created (deleted by `lab down`).
    #[serde(default)]
    pub netns: Vec<String>,
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from(".muster/lab"), |h| PathBuf::from(h).join(".muster/lab"))
}

pub async fn run(cmd: &LabCmd, ctx: &crate::Ctx) -> Result<()> {
    match cmd {
        LabCmd::Up { nodes, dir, detach, heartbeat, provisioner, isolation } => {
            if *provisioner == Provisioner::Qemu {
                let dir = dir.clone().unwrap_or_else(default_dir);
                if let Some(l) = read_lab(&dir) {
                    if is_ours(l.controller_pid) || l.agent_pids.iter().any(|p| is_ours(*p)) {
                        bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
                    }
                }
                return crate::lab_qemu::up(*nodes, dir, *detach, ctx).await;
            }
            let netns = match isolation {
                Isolation::Netns => true,
                Isolation::None => false,
                Isolation::Auto => {
                    euid_is_root() && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
                }
            };
            up(*nodes, dir.clone().unwrap_or_else(default_dir), *detach, *heartbeat, netns, ctx).await
        }
        LabCmd::Relay { netns, maps, ports_file } => relay(netns, maps, ports_file).await,
        LabCmd::Down { dir, keep } => down(&dir.clone().unwrap_or_else(default_dir), *keep),
        LabCmd::Console { node, dir, no_follow } => {
            crate::lab_qemu::console(&dir.clone().unwrap_or_else(default_dir), node, !*no_follow).await
        }
        LabCmd::Status { dir } => {
            let dir = dir.clone().unwrap_or_else(default_dir);
            match read_lab(&dir) {
                Some(l) if is_ours(l.controller_pid) => {
                    let alive = l.agent_pids.iter().filter(|p| is_ours(**p)).count();
                    outln!(
                        "lab running in {}: controller pid {} (grpc {}, http {}), {alive}/{} agents alive",
                        dir.display(),
                        l.controller_pid,
                        l.grpc,
                        l.http,
                        l.agent_pids.len()
                    );
                    outln!("export MUSTERCONFIG={}", l.musterconfig.display());
                }
                Some(_) => outln!(
                    "lab in {} is not running (stale lab.json; `muster lab down` cleans up)",
                    dir.display()
                ),
                None => outln!("no lab in {}", dir.display()),
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
            pids.extend(l.relay_pid);
            stop_pids(&pids);
            netns::teardown(&l.netns);
            outln!("lab in {} stopped", dir.display());
        }
        None => outln!("no running lab recorded in {}", dir.display()),
    }
    if !keep && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        outln!("removed {}", dir.display());
    }
    Ok(())
}

/// `muster lab relay`: relays host loopback ports into the lab's router namespace until SIGTERM,
/// after writing the bound ports to `ports_file`.
async fn relay(netns: &Path, maps: &[String], ports_file: &Path) -> Result<()> {
    let bound = netns::relay(netns, maps).await?;
    let json: Vec<serde_json::Value> = bound
        .iter()
        .map(|r| serde_json::json!({"listen": r.listen.to_string(), "target": r.target.to_string()}))
        .collect();
    muster_util::write_atomic(ports_file, &serde_json::to_vec(&json)?, 0o644)?;
    muster_util::shutdown_signal().await;
    Ok(())
}

async fn up(
    nodes: u32,
    dir: PathBuf,
    detach: bool,
    heartbeat: Duration,
    netns: bool,
    ctx: &crate::Ctx,
) -> Result<()> {
    if let Some(l) = read_lab(&dir) {
        if is_ours(l.controller_pid) || l.agent_pids.iter().any(|p| is_ours(*p)) {
            bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
        }
        netns::teardown(&l.netns);
    }
    let controller_bin = find_bin("muster-controller")?;
    let agent_bin = find_bin("muster-agent")?;
    let muster_bin = std::env::current_exe().context("locating this muster binary")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ctl_dir = dir.join("controller");
    let _ = std::fs::remove_file(ctl_dir.join("ports.json"));
    let prefix = format!("mlab{}", std::process::id());
    let mut children: Vec<Child> = Vec::new();
    let mut relay_child: Option<Child> = None;
    let mut namespaces: Vec<String> = Vec::new();
    let result = async {
        if netns {
            namespaces = netns::setup(&prefix, nodes)?;
        }
        let router = netns::router_ns(&prefix);
        let ctl_log = dir.join("controller.log");
        let s = |v: &str| v.to_string();
        let (grpc_listen, http_listen) = if netns {
            (format!("{LAB_ROUTER}:7443"), format!("{LAB_ROUTER}:7480"))
        } else {
            (s("127.0.0.1:0"), s("127.0.0.1:0"))
        };
        let mut ctl_args = vec![s("serve"), s("--grpc-listen"), grpc_listen, s("--http-listen"), http_listen];
        ctl_args.extend([s("--san"), s(LAB_ROUTER), s("--data-dir"), ctl_dir.display().to_string()]);
        let (bin, args) = if netns {
            let mut a = vec![s("netns"), s("exec"), router.clone(), controller_bin.display().to_string()];
            a.extend(ctl_args);
            (PathBuf::from("ip"), a)
        } else {
            (controller_bin.clone(), ctl_args)
        };
        children.push(spawn(&bin, &args, &ctl_log)?);
        let ports = wait_ports(&ctl_dir, &ctl_log, &mut children[0]).await?;
        let (endpoint, grpc, http) = if netns {
            // The host reaches the controller through a relay; the agents directly.
            let relay_file = dir.join("relay.json");
            let _ = std::fs::remove_file(&relay_file);
            let args = vec![
                s("lab"),
                s("relay"),
                s("--netns"),
                format!("/run/netns/{router}"),
                s("--map"),
                format!("127.0.0.1:0={LAB_ROUTER}:7443"),
                s("--map"),
                format!("127.0.0.1:0={LAB_ROUTER}:7480"),
                s("--ports-file"),
                relay_file.display().to_string(),
            ];
            let mut child = spawn(&muster_bin, &args, &dir.join("relay.log"))?;
            let maps = wait_file(&relay_file, &mut child, &dir.join("relay.log")).await?;
            relay_child = Some(child);
            let listen = |i: usize| maps[i]["listen"].as_str().unwrap_or_default().to_owned();
            (format!("https://{LAB_ROUTER}:7443"), listen(0), listen(1))
        } else {
            let grpc = ports["grpc"].as_str().unwrap_or_default().to_owned();
            (format!("https://{grpc}"), grpc, ports["http"].as_str().unwrap_or_default().to_owned())
        };
        // The CLI on this machine reaches the controller at the relay (or its own port).
        let mc_path = ctl_dir.join("musterconfig");
        client::set_endpoint(&mc_path, &format!("https://{grpc}"))?;
        let ca = std::fs::read_to_string(ctl_dir.join("ca.crt")).context("reading the lab CA")?;
        let pin = muster_machinery::pin::CaPin::of_cert_pem(&ca)?;
        let mut admin = ctx.admin_at(&mc_path).await?;
        let token = admin
            .client
            .create_token(pb::CreateTokenRequest {
                ttl_ms: 15 * 60 * 1000,
                uses: nodes,
                labels: [("muster.dev/lab".to_string(), "true".to_string())].into(),
                pending: false,
                description: "muster lab".into(),
                boot: false,
            })
            .await
            .map_err(|s| anyhow::Error::new(admin.explain(s)).context("creating the lab token"))?
            .into_inner()
            .token;
        for i in 1..=nodes {
            let name = format!("lab-node-{i}");
            let mut args: Vec<String> = vec![
                s("--controller"),
                endpoint.clone(),
                s("--token"),
                token.clone(),
                s("--ca-hash"),
                pin.to_string(),
                s("--state-dir"),
                dir.join(&name).join("state").display().to_string(),
                s("--heartbeat"),
                humantime::format_duration(heartbeat).to_string(),
                s("--cmdline-file"),
                s("/dev/null"),
                s("--hint-hostname"),
                name.clone(),
                s("--hint-uuid"),
                qemu::uuid(0, i),
            ];
            let (bin, args) = if netns {
                // Its own network (veth on the lab bridge), hostname and mounts; files under its
                // own root; only per-namespace sysctls.
                args.extend([
                    s("--metrics-listen"),
                    s("0.0.0.0:7481"),
                    s("--config-root"),
                    dir.join(&name).join("root").display().to_string(),
                    s("--namespaced-sysctls-only"),
                ]);
                let mut a = vec![
                    s("netns"),
                    s("exec"),
                    netns::node_ns(&prefix, i),
                    s("unshare"),
                    s("--uts"),
                    s("--mount"),
                ];
                a.extend([s("--propagation"), s("private"), agent_bin.display().to_string()]);
                a.extend(args);
                (PathBuf::from("ip"), a)
            } else {
                // Sharing this machine's namespaces: record configs, never apply them here.
                args.extend([s("--metrics-listen"), s("127.0.0.1:0"), s("--no-apply-config")]);
                (agent_bin.clone(), args)
            };
            children.push(spawn(&bin, &args, &dir.join(format!("{name}.log")))?);
        }
        let lab = LabFile {
            dir: dir.clone(),
            controller_pid: children[0].id(),
            agent_pids: children[1..].iter().map(Child::id).collect(),
            grpc: grpc.clone(),
            http: http.clone(),
            musterconfig: mc_path.clone(),
            relay_pid: relay_child.as_ref().map(Child::id),
            netns: namespaces.clone(),
        };
        std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
        let ms = wait_ready(&mut admin, nodes as usize, &dir.join("lab-node-*.log")).await?;
        let how = if netns {
            "each in its own namespaces on 10.77.0.0/24"
        } else {
            "sharing this machine's namespaces (configs are recorded, not applied)"
        };
        outln!(
            "Lab is up in {}: controller https://{grpc} (HTTP http://{http}), {nodes} agents {how}.\n",
            dir.display()
        );
        out!("{}", crate::views::machines_table(&ms, SystemTime::now()));
        outln!("\nPoint the CLI at it:\n  export MUSTERCONFIG={}", mc_path.display());
        outln!("Metrics: curl http://{http}/metrics   Service discovery: curl http://{http}/sd/prometheus");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let mut procs = Procs { children, relay: relay_child, namespaces };
    procs.hold(&dir, result, detach).await
}

/// What a running lab consists of: its processes (the controller first), the relay, and the
/// network namespaces it made.
pub(crate) struct Procs {
    pub children: Vec<Child>,
    pub relay: Option<Child>,
    pub namespaces: Vec<String>,
}

impl Procs {
    /// After start-up: on failure, removes everything and returns the error; detached, leaves
    /// the lab running; else waits for Ctrl-C, SIGTERM or the controller's exit, then stops the
    /// processes (newest first), removes the namespaces and `lab.json`, and keeps the logs.
    pub(crate) async fn hold(&mut self, dir: &Path, started: Result<()>, detach: bool) -> Result<()> {
        if let Err(e) = started {
            for c in self.children.iter_mut().chain(self.relay.iter_mut()) {
                let _ = c.kill();
                let _ = c.wait();
            }
            netns::teardown(&self.namespaces);
            let _ = std::fs::remove_file(dir.join("lab.json"));
            return Err(e);
        }
        if detach {
            outln!("Running in the background; stop it with `muster lab down`.");
            return Ok(());
        }
        // Never fail from here on: the children must be stopped whatever happens to stdout.
        let _ = crate::output::emit("Stop it with Ctrl-C (or `muster lab down` from another shell).\n");
        wait_for_signal_or_exit(&mut self.children).await;
        let mut pids: Vec<u32> = self.children.iter().map(Child::id).rev().collect();
        pids.extend(self.relay.as_ref().map(Child::id));
        stop_pids(&pids);
        for c in self.children.iter_mut().chain(self.relay.iter_mut()) {
            let _ = c.wait();
        }
        netns::teardown(&self.namespaces);
        let _ = std::fs::remove_file(dir.join("lab.json"));
        let _ = crate::output::emit(&format!(
            "lab stopped (state and logs kept in {}; `muster lab down` removes them)\n",
            dir.display()
        ));
        Ok(())
    }
}

async fn wait_file(path: &Path, child: &mut Child, log: &Path) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<Vec<serde_json::Value>>(&text) {
                return Ok(v);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the lab relay exited ({status}):\n{}", tail(log));
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the lab relay did not start within 10s:\n{}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_for_signal_or_exit(children: &mut [Child]) {
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

pub(crate) async fn wait_ports(ctl_dir: &Path, log: &Path, child: &mut Child) -> Result<serde_json::Value> {
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

async fn wait_ready(admin: &mut Admin, n: usize, logs: &Path) -> Result<Vec<pb::Machine>> {
    let start = Instant::now();
    let mut last = usize::MAX;
    loop {
        let ms = admin
            .client
            .list_machines(pb::ListMachinesRequest {})
            .await
            .map_err(|s| admin.explain(s))?
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
            bail!("only {ready} of {n} agents became ready within 60s; see {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_lab_is_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert!(read_lab(t.path()).is_none());
        std::fs::write(t.path().join("lab.json"), "{not json").unwrap();
        assert!(read_lab(t.path()).is_none());
    }
}
