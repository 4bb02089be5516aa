//! `muster lab`: a controller and N agents as local processes on loopback, for trying Muster
//! out. Each agent has its own state dir and identity hints; all logs and state live in the lab
//! dir, and `lab.json` records every process (PID), namespace and endpoint. `lab status` checks
//! each of them; `lab down` stops exactly the processes the lab recorded, checking each PID is
//! still one of our binaries. A foreground `lab up` supervises the lab (`lab_supervisor`);
//! `--monitoring` adds a VictoriaMetrics (`lab_monitoring`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use muster_cli::client::{self, Admin};
use muster_lab::netns::{self, euid_is_root, ROUTER_ADDR as LAB_ROUTER};
use muster_lab::process::{find_bin, is_ours, signal, spawn, stop_pids, tail};
use muster_lab::{qemu, victoriametrics};
use muster_proto::pb;
use serde::{Deserialize, Serialize};

use crate::lab_supervisor::{ControllerSpec, Procs};
use crate::output::Output;

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
        /// Also run a VictoriaMetrics single-node (Debian's `victoria-metrics`) that discovers
        /// and scrapes the controller and every agent through `/sd/prometheus`, with its UI on
        /// 127.0.0.1 (process nodes only).
        #[arg(long)]
        monitoring: bool,
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
    /// Show which of a lab's processes and namespaces are alive and its endpoints; exits 1
    /// when anything the lab recorded is down, or there is no lab.
    Status {
        /// Lab directory [default: ~/.muster/lab]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Output format: text for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Where lab nodes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioner {
    /// Agents as local processes.
    #[default]
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

/// `lab.json`: what a lab consists of, for `lab status` and `lab down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LabFile {
    pub dir: PathBuf,
    pub controller_pid: u32,
    /// The nodes' PIDs in order (lab-node-N or lab-vm-N): agents, or QEMU for the qemu
    /// provisioner.
    pub agent_pids: Vec<u32>,
    /// The controller's gRPC and HTTP addresses as this machine reaches them.
    pub grpc: String,
    pub http: String,
    pub musterconfig: PathBuf,
    #[serde(default)]
    pub relay_pid: Option<u32>,
    /// Network namespaces the lab created (deleted by `lab down`).
    #[serde(default)]
    pub netns: Vec<String>,
    #[serde(default)]
    pub provisioner: Provisioner,
    /// The foreground `muster lab up` that supervises the lab (none when detached); `lab down`
    /// asks it to stop the lab.
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    /// The lab's VictoriaMetrics (`--monitoring`).
    #[serde(default)]
    pub monitoring: Option<MonitoringFile>,
}

/// A lab's VictoriaMetrics in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MonitoringFile {
    pub pid: u32,
    /// Its HTTP address as this machine reaches it (the API and `/vmui/`).
    pub http: String,
    /// Its UI: `http://ADDR/vmui/`, or `http://ADDR/` for a build without one (Debian's).
    pub ui: String,
    /// Its scrape config, data and log (in the lab dir).
    pub dir: PathBuf,
}

impl LabFile {
    /// The nodes' names, in the order of `agent_pids`.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.agent_pids.len() as u32)
            .map(|i| match self.provisioner {
                Provisioner::Process => node_name(i),
                Provisioner::Qemu => format!("lab-vm-{i}"),
            })
            .collect()
    }

    /// Every PID the lab recorded, the supervisor first, then the nodes, the controller, the
    /// relay and VictoriaMetrics.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.supervisor_pid.into_iter().collect();
        pids.extend(&self.agent_pids);
        pids.push(self.controller_pid);
        pids.extend(self.relay_pid);
        pids.extend(self.monitoring.as_ref().map(|m| m.pid));
        pids
    }
}

/// Lab process node `i` (1-based).
pub(crate) fn node_name(i: u32) -> String {
    format!("lab-node-{i}")
}

/// Writes `lab.json` (whole or not at all: `lab status` may read it at any time).
pub(crate) fn write_lab(dir: &Path, lab: &LabFile) -> Result<()> {
    let path = dir.join("lab.json");
    muster_util::write_atomic(&path, &serde_json::to_vec_pretty(lab)?, 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from(".muster/lab"), |h| PathBuf::from(h).join(".muster/lab"))
}

pub async fn run(cmd: &LabCmd, ctx: &crate::Ctx) -> Result<()> {
    match cmd {
        LabCmd::Up { nodes, dir, detach, heartbeat, provisioner, isolation, monitoring } => {
            if *provisioner == Provisioner::Qemu {
                if *monitoring {
                    bail!(
                        "--monitoring works with process nodes only: a QEMU VM's agent is not reachable \
                         for scraping from this machine"
                    );
                }
                let dir = dir.clone().unwrap_or_else(default_dir);
                if let Some(l) = read_lab(&dir) {
                    if l.pids().iter().any(|p| is_ours(*p)) {
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
            let dir = dir.clone().unwrap_or_else(default_dir);
            up(Up {
                nodes: *nodes,
                dir,
                detach: *detach,
                heartbeat: *heartbeat,
                netns,
                monitoring: *monitoring,
                ctx,
            })
            .await
        }
        LabCmd::Relay { netns, maps, ports_file } => relay(netns, maps, ports_file).await,
        LabCmd::Down { dir, keep } => down(&dir.clone().unwrap_or_else(default_dir), *keep),
        LabCmd::Console { node, dir, no_follow } => {
            crate::lab_qemu::console(&dir.clone().unwrap_or_else(default_dir), node, !*no_follow).await
        }
        LabCmd::Status { dir, output } => {
            crate::lab_status::show(&dir.clone().unwrap_or_else(default_dir), *output).await
        }
    }
}

pub(crate) fn read_lab(dir: &Path) -> Option<LabFile> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).ok()?).ok()
}

fn down(dir: &Path, keep: bool) -> Result<()> {
    match read_lab(dir) {
        Some(l) => {
            // A foreground `lab up` stops its lab itself (and would restart a controller stopped
            // under it): ask it first, then stop whatever is left.
            if let Some(sup) = l.supervisor_pid.filter(|p| is_ours(*p)) {
                signal(sup, libc::SIGTERM);
                let start = Instant::now();
                while is_ours(sup) && start.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            stop_pids(&l.pids());
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

/// `lab up` for process nodes.
struct Up<'a> {
    nodes: u32,
    dir: PathBuf,
    detach: bool,
    heartbeat: Duration,
    netns: bool,
    monitoring: bool,
    ctx: &'a crate::Ctx,
}

async fn up(opts: Up<'_>) -> Result<()> {
    let Up { nodes, dir, detach, heartbeat, netns, monitoring, ctx } = opts;
    if let Some(l) = read_lab(&dir) {
        if l.pids().iter().any(|p| is_ours(*p)) {
            bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
        }
        netns::teardown(&l.netns);
    }
    let controller_bin = find_bin("muster-controller")?;
    let agent_bin = find_bin("muster-agent")?;
    // Before anything starts: a missing VictoriaMetrics fails with its install hint.
    let vm_bin = if monitoring { Some(victoriametrics::find()?) } else { None };
    let muster_bin = std::env::current_exe().context("locating this muster binary")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ctl_dir = dir.join("controller");
    let _ = std::fs::remove_file(ctl_dir.join("ports.json"));
    let prefix = format!("mlab{}", std::process::id());
    let mut procs = Procs::default();
    let result = async {
        if netns {
            procs.namespaces = netns::setup(&prefix, nodes)?;
        }
        let router = netns::router_ns(&prefix);
        let ctl_log = dir.join("controller.log");
        let s = |v: &str| v.to_string();
        // The controller's command line for listen addresses (restarts use the bound ones, so
        // agents and the relay find it where it was).
        let ctl_cmd = |grpc_listen: &str, http_listen: &str| {
            let mut args =
                vec![s("serve"), s("--grpc-listen"), s(grpc_listen), s("--http-listen"), s(http_listen)];
            args.extend([s("--san"), s(LAB_ROUTER), s("--data-dir"), ctl_dir.display().to_string()]);
            if netns {
                let mut a = vec![s("netns"), s("exec"), router.clone(), controller_bin.display().to_string()];
                a.extend(args);
                (PathBuf::from("ip"), a)
            } else {
                (controller_bin.clone(), args)
            }
        };
        let (bin, args) = if netns {
            ctl_cmd(&format!("{LAB_ROUTER}:7443"), &format!("{LAB_ROUTER}:7480"))
        } else {
            ctl_cmd("127.0.0.1:0", "127.0.0.1:0")
        };
        procs.children.push(spawn(&bin, &args, &ctl_log)?);
        let ports = wait_ports(&ctl_dir, &ctl_log, &mut procs.children[0]).await?;
        let bound = |k: &str| ports[k].as_str().unwrap_or_default().to_owned();
        let (bin, args) = ctl_cmd(&bound("grpc"), &bound("http"));
        procs.restart = Some(ControllerSpec { bin, args, log: ctl_log.clone(), ctl_dir: ctl_dir.clone() });
        let (endpoint, grpc, http, vm_host) = if netns {
            // The host reaches the controller (and VictoriaMetrics) through a relay; the agents
            // directly.
            let relay_file = dir.join("relay.json");
            let _ = std::fs::remove_file(&relay_file);
            let mut args = vec![
                s("lab"),
                s("relay"),
                s("--netns"),
                format!("/run/netns/{router}"),
                s("--map"),
                format!("127.0.0.1:0={LAB_ROUTER}:7443"),
                s("--map"),
                format!("127.0.0.1:0={LAB_ROUTER}:7480"),
            ];
            if monitoring {
                args.extend([s("--map"), format!("127.0.0.1:0={LAB_ROUTER}:{}", victoriametrics::PORT)]);
            }
            args.extend([s("--ports-file"), relay_file.display().to_string()]);
            let mut child = spawn(&muster_bin, &args, &dir.join("relay.log"))?;
            let maps = wait_file(&relay_file, &mut child, &dir.join("relay.log")).await;
            procs.relay = Some(child);
            let maps = maps?;
            let listen = |i: usize| {
                maps.get(i).and_then(|m| m["listen"].as_str()).map(str::to_owned).unwrap_or_default()
            };
            (format!("https://{LAB_ROUTER}:7443"), listen(0), listen(1), monitoring.then(|| listen(2)))
        } else {
            let grpc = bound("grpc");
            (format!("https://{grpc}"), grpc, bound("http"), None)
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
            let name = node_name(i);
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
                s("--only-flags"),
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
            let log = dir.join(format!("{name}.log"));
            procs.children.push(spawn(&bin, &args, &log)?);
            procs.nodes.push((name, log));
        }
        let mut lab = LabFile {
            dir: dir.clone(),
            controller_pid: procs.children[0].id(),
            agent_pids: procs.children[1..].iter().map(Child::id).collect(),
            grpc: grpc.clone(),
            http: http.clone(),
            musterconfig: mc_path.clone(),
            relay_pid: procs.relay.as_ref().map(Child::id),
            netns: procs.namespaces.clone(),
            provisioner: Provisioner::Process,
            supervisor_pid: None,
            monitoring: None,
        };
        write_lab(&dir, &lab)?;
        let ms = wait_ready(&mut admin, nodes as usize, &dir.join("lab-node-*.log")).await?;
        if let Some(vm_bin) = &vm_bin {
            use crate::lab_monitoring::Placement;
            let place = if netns {
                Placement {
                    netns: Some(router.clone()),
                    listen: Some(format!("{LAB_ROUTER}:{}", victoriametrics::PORT)),
                    host: vm_host.clone(),
                    controller_http: format!("{LAB_ROUTER}:7480"),
                }
            } else {
                Placement { netns: None, listen: None, host: None, controller_http: http.clone() }
            };
            let (child, m) = crate::lab_monitoring::start(&dir, vm_bin, &place).await?;
            procs.monitoring = Some(child);
            lab.monitoring = Some(m);
            write_lab(&dir, &lab)?;
        }
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
        if let Some(m) = &lab.monitoring {
            let note = if m.ui.ends_with("/vmui/") { "" } else { "; this build has no /vmui/" };
            outln!(
                "Monitoring: VictoriaMetrics UI {} (scrapes the controller and every agent; targets: \
                 http://{}/targets{note})",
                m.ui,
                m.http
            );
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    procs.hold(&dir, result, detach).await
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
        let ms = muster_cli::list::all_machines(&mut admin.client).await.map_err(|s| admin.explain(s))?;
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
