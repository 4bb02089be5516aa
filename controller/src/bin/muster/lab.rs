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

/// The lab bridge's address inside the lab network namespace; nodes get .10 onwards.
const LAB_ROUTER: &str = "10.77.0.1";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn euid_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Creates the lab's namespaces: a router with a bridge, and per node a namespace with a veth on
/// it. Nothing is added to this machine's own network. Returns the names created (so far, on
/// error, after removing them).
fn setup_netns(prefix: &str, nodes: u32) -> Result<Vec<String>> {
    let router = format!("{prefix}r");
    let mut created = Vec::new();
    let result = (|| {
        ip(&["netns", "add", &router])?;
        created.push(router.clone());
        ip(&["-n", &router, "link", "set", "lo", "up"])?;
        ip(&["-n", &router, "link", "add", "mbr0", "type", "bridge"])?;
        ip(&["-n", &router, "addr", "add", &format!("{LAB_ROUTER}/24"), "dev", "mbr0"])?;
        ip(&["-n", &router, "link", "set", "mbr0", "up"])?;
        for i in 1..=nodes {
            let ns = format!("{prefix}n{i}");
            ip(&["netns", "add", &ns])?;
            created.push(ns.clone());
            let veth = format!("vn{i}");
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &router, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &router, "link", "set", &veth, "master", "mbr0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.77.0.{}/24", 9 + i), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", LAB_ROUTER])?;
        }
        Ok::<(), anyhow::Error>(())
    })();
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            teardown_netns(&created);
            Err(e.context("setting up the lab's network namespaces"))
        }
    }
}

fn teardown_netns(names: &[String]) {
    for n in names.iter().rev() {
        // Only names this lab recorded, and only ours by prefix.
        if n.starts_with("mlab") {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// Connects to `target` from inside the network namespace at `netns`, on a thread of its own
/// (setns changes only the calling thread, which then ends).
fn connect_in_netns(netns: &Path, target: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd we hold open; it affects only this thread,
        // which does nothing but this one connect and exits.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .join()
    .map_err(|_| std::io::Error::other("relay thread panicked"))?
}

async fn relay(netns: PathBuf, maps: Vec<String>, ports_file: PathBuf) -> Result<()> {
    let mut bound = Vec::new();
    for m in &maps {
        let (listen, target) =
            m.split_once('=').with_context(|| format!("--map {m:?}: expected LISTEN=TARGET"))?;
        let target: std::net::SocketAddr =
            target.parse().with_context(|| format!("--map {m:?}: bad target"))?;
        let l = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        bound.push(serde_json::json!({"listen": l.local_addr()?.to_string(), "target": target.to_string()}));
        let netns = netns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else { continue };
                let netns = netns.clone();
                tokio::spawn(async move {
                    let connected =
                        tokio::task::spawn_blocking(move || connect_in_netns(&netns, target)).await;
                    let Ok(Ok(std_stream)) = connected else { return };
                    let _ = std_stream.set_nonblocking(true);
                    if let Ok(mut outbound) = tokio::net::TcpStream::from_std(std_stream) {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }
    muster_util::write_atomic(&ports_file, &serde_json::to_vec(&bound)?, 0o644)?;
    muster_util::shutdown_signal().await;
    Ok(())
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from(".muster/lab"), |h| PathBuf::from(h).join(".muster/lab"))
}

/// A sibling binary of this executable, else one on PATH.
pub(crate) fn find_bin(name: &str) -> Result<PathBuf> {
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
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return false };
    let Some(name) = exe.file_name().map(|n| n.to_string_lossy().into_owned()) else { return false };
    let args: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| b.split(|c| *c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
        .unwrap_or_default();
    ours_by(&name, &args)
}

/// The controller and agent binaries (a rebuilt binary shows as `NAME (deleted)`), and this
/// binary only while it runs the lab's relay.
fn ours_by(exe_name: &str, args: &[String]) -> bool {
    // QEMU only when it runs one of the lab's VMs.
    (exe_name.starts_with("qemu-system")
        && args.windows(2).any(|w| w[0] == "-name" && w[1].starts_with("muster-lab-vm-")))
        || exe_name.starts_with("muster-controller")
        || exe_name.starts_with("muster-agent")
        || ((exe_name == "muster" || exe_name.starts_with("muster ("))
            && args.windows(2).any(|w| w[0] == "lab" && w[1] == "relay"))
}

/// The `--hint-uuid` of lab node `i`: stable across runs, distinct per node ("muster-La..." in
/// hex, then the node number).
fn node_uuid(i: u32) -> String {
    format!("6d757374-6572-4c61-8200-{i:012x}")
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
pub(crate) fn stop_pids(pids: &[u32]) {
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

/// `args` with the join token hidden, for logs.
fn redacted(args: &[String]) -> Vec<&str> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide = false;
    for a in args {
        out.push(if hide { "<redacted>" } else { a.as_str() });
        hide = a == "--token";
    }
    out
}

pub(crate) fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    tracing::debug!(bin = %bin.display(), args = ?redacted(args), log = %log.display(), "starting");
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

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub async fn run(cmd: &LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up { nodes, dir, detach, heartbeat, provisioner, isolation } => {
            if *provisioner == Provisioner::Qemu {
                let dir = dir.clone().unwrap_or_else(default_dir);
                if let Some(l) = read_lab(&dir) {
                    if is_ours(l.controller_pid) || l.agent_pids.iter().any(|p| is_ours(*p)) {
                        bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
                    }
                }
                return crate::lab_qemu::up(*nodes, dir, *detach).await;
            }
            let netns = match isolation {
                Isolation::Netns => true,
                Isolation::None => false,
                Isolation::Auto => {
                    euid_is_root() && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
                }
            };
            up(*nodes, dir.clone().unwrap_or_else(default_dir), *detach, *heartbeat, netns).await
        }
        LabCmd::Relay { netns, maps, ports_file } => {
            relay(netns.clone(), maps.clone(), ports_file.clone()).await
        }
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
            teardown_netns(&l.netns);
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

async fn up(nodes: u32, dir: PathBuf, detach: bool, heartbeat: Duration, netns: bool) -> Result<()> {
    if let Some(l) = read_lab(&dir) {
        if is_ours(l.controller_pid) || l.agent_pids.iter().any(|p| is_ours(*p)) {
            bail!("a lab is already running in {}; run `muster lab down` first", dir.display());
        }
        teardown_netns(&l.netns);
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
            namespaces = setup_netns(&prefix, nodes)?;
        }
        let router = format!("{prefix}r");
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
        let dd = muster_controller::pki::DataDir::new(&ctl_dir);
        muster_controller::pki::set_musterconfig_endpoint(&dd, &format!("https://{grpc}"))?;
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
                boot: false,
            })
            .await
            .map_err(|s| crate::explain(s, &format!("https://{grpc}")).context("creating the lab token"))?
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
                node_uuid(i),
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
                    format!("{prefix}n{i}"),
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
        let ms =
            wait_ready(&mut admin, &format!("https://{grpc}"), nodes as usize, &dir.join("lab-node-*.log"))
                .await?;
        let how = if netns {
            "each in its own namespaces on 10.77.0.0/24"
        } else {
            "sharing this machine's namespaces (configs are recorded, not applied)"
        };
        outln!(
            "Lab is up in {}: controller https://{grpc} (HTTP http://{http}), {nodes} agents {how}.\n",
            dir.display()
        );
        out!("{}", crate::output::machines_table(&ms, SystemTime::now()));
        outln!("\nPoint the CLI at it:\n  export MUSTERCONFIG={}", mc_path.display());
        outln!("Metrics: curl http://{http}/metrics   Service discovery: curl http://{http}/sd/prometheus");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        for c in children.iter_mut().chain(relay_child.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        teardown_netns(&namespaces);
        let _ = std::fs::remove_file(dir.join("lab.json"));
        return Err(e);
    }
    if detach {
        outln!("Running in the background; stop it with `muster lab down`.");
        return Ok(());
    }
    // Never fail from here on: the children must be stopped whatever happens to stdout.
    let _ = crate::output::emit("Stop it with Ctrl-C (or `muster lab down` from another shell).\n");
    wait_for_signal_or_exit(&mut children).await;
    let mut pids: Vec<u32> = children.iter().map(Child::id).rev().collect();
    pids.extend(relay_child.as_ref().map(Child::id));
    stop_pids(&pids);
    for c in children.iter_mut().chain(relay_child.iter_mut()) {
        let _ = c.wait();
    }
    teardown_netns(&namespaces);
    let _ = std::fs::remove_file(dir.join("lab.json"));
    let _ = crate::output::emit(&format!(
        "lab stopped (state and logs kept in {}; `muster lab down` removes them)\n",
        dir.display()
    ));
    Ok(())
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

async fn wait_ready(admin: &mut crate::Admin, ep: &str, n: usize, logs: &Path) -> Result<Vec<pb::Machine>> {
    let start = Instant::now();
    let mut last = usize::MAX;
    loop {
        let ms = admin
            .list_machines(pb::ListMachinesRequest {})
            .await
            .map_err(|s| crate::explain(s, ep))?
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

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_our_binaries_are_signalled() {
        assert!(ours_by("muster-controller", &args(&["muster-controller", "serve"])));
        assert!(ours_by("muster-agent (deleted)", &[]));
        assert!(ours_by("muster", &args(&["muster", "lab", "relay", "--netns", "x"])));
        assert!(!ours_by("muster", &args(&["muster", "machines"])), "an operator's muster is not the relay");
        assert!(!ours_by("bash", &args(&["bash", "muster-agent", "lab", "relay"])));
        assert!(!ours_by("sleep", &[]));
        assert!(!is_ours(u32::MAX), "no such process");
        // This test process is none of ours.
        assert!(!is_ours(std::process::id()));
    }

    #[test]
    fn tokens_stay_out_of_logs() {
        let a = args(&["--controller", "https://x", "--token", "abc.secret", "--heartbeat", "2s"]);
        assert_eq!(redacted(&a), ["--controller", "https://x", "--token", "<redacted>", "--heartbeat", "2s"]);
    }

    #[test]
    fn node_uuids_are_stable_and_distinct() {
        let ids: std::collections::BTreeSet<String> = (1..=200).map(node_uuid).collect();
        assert_eq!(ids.len(), 200);
        assert_eq!(node_uuid(1), "6d757374-6572-4c61-8200-000000000001");
        assert!(ids.iter().all(|u| u.len() == 36));
    }

    #[test]
    fn a_missing_lab_is_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert!(read_lab(t.path()).is_none());
        std::fs::write(t.path().join("lab.json"), "{not json").unwrap();
        assert!(read_lab(t.path()).is_none());
    }

    #[test]
    fn lab_qemu_processes_are_recognised_by_their_name_only() {
        assert!(ours_by("qemu-system-x86_64", &args(&["qemu-system-x86_64", "-name", "muster-lab-vm-1"])));
        assert!(!ours_by("qemu-system-x86_64", &args(&["qemu-system-x86_64", "-name", "someone-elses-vm"])));
        assert!(!ours_by("qemu-system-x86_64", &args(&["qemu-system-x86_64"])));
    }
}
