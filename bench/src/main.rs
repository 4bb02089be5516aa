//! `muster-bench`: N simulated agents in one process, each with its own key, mutual-TLS
//! connection and stream, against a real `muster-controller` process on loopback. Reports the
//! enrollment rate, heartbeat round-trip percentiles, and the controller's memory and CPU.
//!
//! The controller is the binary built beside the bench, so build both in the same profile:
//!
//! ```sh
//! cargo build --release -p muster-bench -p muster-cli
//! target/release/muster-bench --agents 1000 --duration 30s
//! ```
//!
//! Phases: start the controller in a temp dir; make every agent's key and CSR; enroll all agents
//! (bounded concurrency); bring every agent's stream up (bounded concurrency); let heartbeats
//! settle; measure for `--duration`; list the machines; stop. The controller is killed and the
//! temp dir removed at the end, on errors and on Ctrl-C too.
//!
//! The report goes to stdout (`-o json` for tools), progress to stderr. Exit status: 0 for a
//! clean run, 1 when the report lists problems (failed enrollments or streams, lost acks,
//! machines not ready, the controller out of file descriptors), 2 when the bench could not run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use muster_bench::report::{self, Report};
use muster_bench::sim::{self, Identity, Shared};
use muster_bench::stats::Latency;
use muster_bench::sys;
use muster_lab::muster::ControllerProc;
use muster_machinery::musterconfig::MusterConfig;
use muster_proto::pb;
use muster_proto::pb::admin_service_client::AdminServiceClient;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long acks of heartbeats sent at the very end of the window may still arrive.
const ACK_GRACE: Duration = Duration::from_secs(5);
/// How often a long phase prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Simulate N agents against a real controller and report its throughput, latency and cost.
#[derive(Parser, Debug)]
#[command(name = "muster-bench", version, about)]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    agents: u32,
    /// Heartbeat interval of every agent (100ms..=10m, as the controller accepts).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Steady-state measuring window, once every agent is connected.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    enroll_concurrency: u32,
    /// Streams being set up at once (each: TCP + mTLS handshake + Connect + welcome).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connect_concurrency: u32,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    match bench_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("muster-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[tokio::main]
async fn bench_main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    muster_agent::init_crypto();
    let args = Args::parse();
    if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&args.heartbeat) {
        bail!("--heartbeat must be between 100ms and 10m (the controller clamps to that range)");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than zero");
    }
    // One connection per agent, and as many again for a moment while enrolling.
    let (before, now) = sys::raise_nofile().context("raising the open-file limit")?;
    tracing::debug!(before, now, "RLIMIT_NOFILE soft limit");
    if now < u64::from(args.agents) + 256 {
        eprintln!(
            "warning: open-file limit {now} is tight for {} connections; raise the hard limit (ulimit -Hn)",
            args.agents
        );
    }

    let report = tokio::select! {
        r = run(&args) => r?,
        r = tokio::signal::ctrl_c() => {
            r?;
            bail!("interrupted");
        }
    };
    match args.output {
        Output::Text => print!("{}", report.text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The controller binary beside this one, with a hint how to build it when it is missing.
fn controller_binary() -> Result<PathBuf> {
    let p = muster_lab::process::bin_dir().join("muster-controller");
    if !p.exists() {
        let profile = if cfg!(debug_assertions) { "" } else { "--release " };
        bail!(
            "{} not found. The bench runs the controller built in its own profile: \
             cargo build {profile}-p muster-bench -p muster-cli \
             (or set MUSTER_BIN_DIR to a directory holding muster-controller)",
            p.display()
        );
    }
    Ok(p)
}

async fn run(args: &Args) -> Result<Report> {
    let binary = controller_binary()?;
    let tmp = tempfile::Builder::new().prefix("muster-bench-").tempdir()?;
    let data_dir = tmp.path().join("controller");
    // The harness polls for the controller's ports.json with blocking sleeps.
    // Every simulated agent connects from 127.0.0.1: no per-address cap, and room for all of
    // them (one connection each, two while enrolling).
    let max = (u64::from(args.agents) * 2 + 256).to_string();
    let ctl = tokio::task::spawn_blocking(move || {
        // Every simulated agent connects and enrolls from 127.0.0.1: no per-address caps.
        let caps = [
            "--grpc-max-connections-per-address",
            "0",
            "--grpc-max-connections",
            &max,
            "--enroll-rate",
            "1000000",
        ];
        ControllerProc::start(&data_dir, "127.0.0.1:0", "127.0.0.1:0", &caps)
    })
    .await?
    .with_context(|| format!("starting {}", binary.display()))?;
    eprintln!("controller {} running as pid {}", binary.display(), ctl.proc.pid());
    let r = bench(args, &ctl, &binary).await;
    if r.is_err() {
        let log = ctl.proc.log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("controller log, last lines:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    // `ctl` is dropped (killed and reaped) before `tmp` is removed.
    drop(ctl);
    drop(tmp);
    r
}

fn cpu(pid: &str) -> f64 {
    sys::cpu_seconds(pid)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Prints `done/total` every [`PROGRESS_EVERY`].
struct Progress {
    what: &'static str,
    total: usize,
    last: Instant,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Self {
        Self { what, total, last: Instant::now() }
    }

    fn tick(&mut self, done: usize) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            eprintln!("  {done}/{} {}", self.total, self.what);
        }
    }
}

async fn bench(args: &Args, ctl: &ControllerProc, binary: &Path) -> Result<Report> {
    let n = args.agents as usize;
    let pid = ctl.proc.pid().to_string();
    let endpoint = ctl.endpoint();
    let ca = ctl.ca_pem()?;
    let mc_path = ctl.musterconfig();
    let mc = MusterConfig::from_yaml(
        &std::fs::read_to_string(&mc_path).with_context(|| format!("reading {}", mc_path.display()))?,
    )?;
    let (admin_ch, _) = muster_cli::client::admin_channel(&mc).await.context("connecting as admin")?;
    let mut admin = AdminServiceClient::new(admin_ch).max_decoding_message_size(usize::MAX);
    let token = admin
        .create_token(pb::CreateTokenRequest {
            ttl_ms: 3_600_000,
            uses: args.agents,
            description: "muster-bench".into(),
            ..Default::default()
        })
        .await
        .context("creating the join token")?
        .into_inner()
        .token;

    let mut report = Report {
        agents: n,
        heartbeat_ms: u64::try_from(args.heartbeat.as_millis()).unwrap_or(u64::MAX),
        window_seconds: args.duration.as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        debug_build: cfg!(debug_assertions),
        ..Default::default()
    };
    report.controller.binary = binary.display().to_string();
    report.controller.pid = ctl.proc.pid();

    // Keys and CSRs first, so the enrollment phase times the controller, not key generation.
    eprintln!("making {n} P-256 keys and CSRs...");
    let t = Instant::now();
    let ids = tokio::task::spawn_blocking(move || (0..n).map(Identity::generate).collect::<Result<Vec<_>>>())
        .await??;
    report.bench.keygen_seconds = t.elapsed().as_secs_f64();
    let rss_start = sys::rss(&pid).0;
    report.controller.rss_start_mib = mib(rss_start);

    // Enrollment: each agent on its own server-authenticated connection.
    eprintln!("enrolling {n} agents, {} at a time...", args.enroll_concurrency);
    let slots = Arc::new(Semaphore::new(args.enroll_concurrency as usize));
    let (ctl_cpu, own_cpu, t) = (cpu(&pid), cpu("self"), Instant::now());
    let mut tasks = JoinSet::new();
    for mut id in ids {
        let (slots, endpoint, ca, token) = (slots.clone(), endpoint.clone(), ca.clone(), token.clone());
        tasks.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else { return (id, Err("no enroll slot".into())) };
            let t = Instant::now();
            let r = tokio::time::timeout(sim::ENROLL_TIMEOUT, sim::enroll(&endpoint, &ca, &token, &mut id))
                .await
                .unwrap_or_else(|_| Err(anyhow!("timed out after {:?}", sim::ENROLL_TIMEOUT)));
            let r = r.map(|()| t.elapsed()).map_err(|e| sim::describe(&e));
            (id, r)
        });
    }
    let mut enrolled = Vec::with_capacity(n);
    let (mut latencies, mut errors) = (Vec::with_capacity(n), Vec::new());
    let mut progress = Progress::new("enrolled", n);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((id, Ok(latency))) => {
                latencies.push(latency);
                enrolled.push(id);
            }
            Ok((id, Err(e))) => {
                tracing::debug!(agent = id.index, error = %e, "enrollment failed");
                errors.push(e);
            }
            Err(e) => errors.push(format!("enroll task failed: {e}")),
        }
        progress.tick(enrolled.len() + errors.len());
    }
    let e = &mut report.enroll;
    e.seconds = t.elapsed().as_secs_f64();
    e.controller_cpu_seconds = cpu(&pid) - ctl_cpu;
    e.bench_cpu_seconds = cpu("self") - own_cpu;
    e.concurrency = args.enroll_concurrency as usize;
    e.ok = enrolled.len();
    e.failed = errors.len();
    e.per_second = e.ok as f64 / e.seconds;
    e.latency = Latency::of(&mut latencies);
    e.errors = report::top_errors(errors, 5);
    eprintln!("  {} enrolled, {} failed in {:.2} s", e.ok, e.failed, e.seconds);

    // Streams: each agent its own mutual-TLS connection and Connect stream, then heartbeats.
    let up = enrolled.len();
    eprintln!("bringing {up} streams up, {} at a time...", args.connect_concurrency);
    let shared = Arc::new(Shared {
        endpoint: endpoint.clone(),
        ca_pem: ca.clone(),
        heartbeat: args.heartbeat,
        phase: AtomicU8::new(sim::WARMUP),
        stop: CancellationToken::new(),
        connect_slots: Semaphore::new(args.connect_concurrency as usize),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    });
    // Whatever happens from here, the agents stop with this function.
    let _stop_agents = shared.stop.clone().drop_guard();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (ctl_cpu, own_cpu, t) = (cpu(&pid), cpu("self"), Instant::now());
    let mut agents = JoinSet::new();
    for id in enrolled {
        agents.spawn(sim::run_agent(shared.clone(), id, events_tx.clone()));
    }
    drop(events_tx);
    let (mut latencies, mut errors) = (Vec::with_capacity(up), Vec::new());
    let mut progress = Progress::new("streams up", up);
    while let Some(ev) = events.recv().await {
        match ev {
            Ok(latency) => latencies.push(latency),
            Err(e) => errors.push(e),
        }
        progress.tick(latencies.len() + errors.len());
        if latencies.len() + errors.len() == up {
            break;
        }
    }
    let k = &mut report.connect;
    k.seconds = t.elapsed().as_secs_f64();
    k.controller_cpu_seconds = cpu(&pid) - ctl_cpu;
    k.bench_cpu_seconds = cpu("self") - own_cpu;
    k.concurrency = args.connect_concurrency as usize;
    k.ok = latencies.len();
    k.failed = up - latencies.len();
    k.per_second = k.ok as f64 / k.seconds;
    k.latency = Latency::of(&mut latencies);
    k.errors = report::top_errors(errors, 5);
    eprintln!("  {} streams up, {} failed in {:.2} s", k.ok, k.failed, k.seconds);
    report.controller.open_fds = sys::open_fds(&pid).unwrap_or(0);
    report.controller.nofile_soft_limit = sys::nofile_soft_limit(&pid);

    // Steady state: first heartbeats land within one interval of each stream coming up.
    let warmup = args.heartbeat * 2;
    eprintln!(
        "steady state: {} to settle, then measuring for {}...",
        humantime::format_duration(warmup),
        humantime::format_duration(args.duration)
    );
    tokio::time::sleep(warmup).await;
    let (ctl_cpu, own_cpu, t) = (sys::cpu_times(&pid), cpu("self"), Instant::now());
    let machine_cpu = sys::machine_busy_seconds();
    let switches = sys::context_switches(&pid);
    shared.phase.store(sim::MEASURING, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    shared.phase.store(sim::AFTER, Ordering::Relaxed);
    let window = t.elapsed().as_secs_f64();
    let ctl_cpu_end = sys::cpu_times(&pid);
    let switches = sys::context_switches(&pid).saturating_sub(switches);
    let ctl_steady = (ctl_cpu_end.0 - ctl_cpu.0) + (ctl_cpu_end.1 - ctl_cpu.1);
    report.controller.cpu_steady_system_seconds = ctl_cpu_end.1 - ctl_cpu.1;
    let own_steady = cpu("self") - own_cpu;
    let others = sys::machine_busy_seconds() - machine_cpu - ctl_steady - own_steady;
    let (rss, hwm) = sys::rss(&pid);
    report.bench.rss_mib = mib(sys::rss("self").0);
    report.bench.nofile_soft_limit = sys::nofile().map_or(0, |(soft, _)| soft);
    report.window_seconds = window;

    // The fleet as the controller sees it, while every stream is still open.
    let t = Instant::now();
    let machines = muster_cli::list::all_machines(&mut admin).await.context("listing machines")?;
    let m = &mut report.machines;
    m.list_ms = t.elapsed().as_secs_f64() * 1e3;
    m.total = machines.len();
    m.connected = machines.iter().filter(|m| m.connected).count();
    for machine in &machines {
        let state = pb::MachineState::try_from(machine.state).map_or_else(
            |_| format!("state {}", machine.state),
            |s| s.as_str_name().trim_start_matches("MACHINE_STATE_").to_ascii_lowercase(),
        );
        *m.by_state.entry(state).or_default() += 1;
    }

    // Acks of the window's last heartbeats, then stop every agent.
    tokio::time::sleep(ACK_GRACE.saturating_sub(t.elapsed())).await;
    shared.stop.cancel();
    let (mut rtts, mut sent, mut dropped, mut stream_errors) = (Vec::new(), 0u64, 0usize, Vec::new());
    while let Some(r) = agents.join_next().await {
        match r {
            Ok(o) => {
                sent += o.sent_in_window;
                rtts.extend(o.rtts);
                // Connect failures are already counted; these are streams that ended later.
                if let (true, Some(e)) = (o.connected, o.error) {
                    dropped += 1;
                    stream_errors.push(e);
                }
            }
            Err(e) => {
                dropped += 1;
                stream_errors.push(format!("agent task failed: {e}"));
            }
        }
    }
    let h = &mut report.heartbeats;
    h.sent = sent;
    h.per_second = sent as f64 / window;
    h.lost = sent.saturating_sub(rtts.len() as u64);
    h.rtt = Latency::of(&mut rtts);
    h.streams_dropped = dropped;
    h.stream_errors = report::top_errors(stream_errors, 5);

    let c = &mut report.controller;
    c.rss_mib = mib(rss);
    c.peak_rss_mib = mib(hwm);
    c.rss_per_agent_kib = (rss as f64 - rss_start as f64) / 1024.0 / n as f64;
    c.cpu_steady_seconds = ctl_steady;
    c.cpu_steady_percent = ctl_steady / window * 100.0;
    c.cpu_per_heartbeat_us = if sent == 0 { 0.0 } else { ctl_steady / sent as f64 * 1e6 };
    c.context_switches_per_heartbeat = if sent == 0 { 0.0 } else { switches as f64 / sent as f64 };
    c.fd_errors_in_log = ctl
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("accept failed") || l.contains("Too many open files"))
        .count();
    report.bench.cpu_steady_seconds = own_steady;
    report.bench.cpu_steady_percent = own_steady / window * 100.0;
    report.bench.others_cpu_percent = (others / window * 100.0).max(0.0);

    report.problems = problems(&report);
    Ok(report)
}

/// What a clean run would not show.
fn problems(r: &Report) -> Vec<String> {
    let mut p = Vec::new();
    let c = &r.controller;
    if c.fd_errors_in_log > 0 {
        p.push(format!(
            "the controller ran out of file descriptors: {} \"accept failed\"/\"Too many open files\" lines \
             in its log, with an RLIMIT_NOFILE of {} (it raises its soft limit to the hard limit at start, \
             so the hard limit is the one to raise)",
            c.fd_errors_in_log,
            c.nofile_soft_limit.map_or("unlimited".to_owned(), |l| l.to_string())
        ));
    } else if let Some(limit) = c.nofile_soft_limit {
        if c.open_fds as f64 > 0.9 * limit as f64 {
            p.push(format!("the controller has {} fds open of a soft limit of {limit}", c.open_fds));
        }
    }
    if r.enroll.failed > 0 {
        p.push(format!("{} of {} enrollments failed", r.enroll.failed, r.agents));
    }
    if r.connect.failed > 0 {
        p.push(format!("{} of {} streams did not come up", r.connect.failed, r.enroll.ok));
    }
    if r.heartbeats.streams_dropped > 0 {
        p.push(format!("{} streams ended during the run", r.heartbeats.streams_dropped));
    }
    if r.heartbeats.lost > 0 {
        p.push(format!(
            "{} of {} heartbeats sent in the window were not acked within {:?} after it",
            r.heartbeats.lost, r.heartbeats.sent, ACK_GRACE
        ));
    }
    let ready = r.machines.by_state.get("ready").copied().unwrap_or(0);
    if ready != r.agents || r.machines.connected != r.agents {
        p.push(format!(
            "{ready} machines ready and {} connected, of {} agents",
            r.machines.connected, r.agents
        ));
    }
    p
}
