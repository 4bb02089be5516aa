//! `muster-bench`: N simulated agents in one process, each with its own key, mutual-TLS
//! connection and stream, against a real `muster-controller` process. Prints enrollment rate,
//! heartbeat round-trip percentiles, and the controller's memory and CPU.
//!
//! Build it in release with the controller beside it, then run:
//! `cargo build --release -p muster-bench -p muster-controller && target/release/muster-bench --agents 1000`

use muster_bench::stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use muster_agent::client;
use muster_proto::musterconfig::MusterConfig;
use muster_proto::pb;
use muster_tests::ControllerProc;
use serde::Serialize;
use tokio::sync::Semaphore;

/// Simulate N agents against a real controller and report its throughput, latency and cost.
#[derive(Parser, Debug)]
#[command(name = "muster-bench", version, about)]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Heartbeat interval of each agent.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Measuring window once every agent is connected.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 64)]
    enroll_concurrency: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    agents: usize,
    heartbeat_ms: u128,
    enroll_seconds: f64,
    enroll_per_second: f64,
    enroll_failures: usize,
    connect_seconds: f64,
    connect_failures: usize,
    rtt_samples: usize,
    rtt_p50_ms: f64,
    rtt_p90_ms: f64,
    rtt_p99_ms: f64,
    rtt_max_ms: f64,
    heartbeats_sent: u64,
    heartbeats_lost: u64,
    controller_rss_mib: f64,
    controller_peak_rss_mib: f64,
    controller_cpu_enroll_seconds: f64,
    controller_cpu_steady_seconds: f64,
    controller_cpu_steady_percent: f64,
    controller_cpu_per_heartbeat_us: f64,
    bench_cpu_seconds: f64,
    machines_ready: usize,
}

struct Enrolled {
    cert: String,
    key: String,
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    muster_agent::init_crypto();
    raise_fd_limit();
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let ctl = ControllerProc::start(&tmp.path().join("controller"), "127.0.0.1:0", "127.0.0.1:0", &[])
        .context("starting muster-controller (build it in the same profile: cargo build --release -p muster-controller)")?;
    let pid = ctl.proc.pid().to_string();
    let endpoint = ctl.endpoint();
    let ca = ctl.ca_pem()?;
    let mc = MusterConfig::from_yaml(&std::fs::read_to_string(ctl.musterconfig())?)?;
    let mut admin = muster_controller::client::admin_client(&mc).await?;
    let n = args.agents;
    let token = admin
        .create_token(pb::CreateTokenRequest {
            uses: u32::try_from(n).unwrap_or(u32::MAX),
            ttl_ms: 3_600_000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let mut report = Report { agents: n, heartbeat_ms: args.heartbeat.as_millis(), ..Default::default() };
    let bench_cpu0 = stats::cpu_seconds("self");

    // Phase 1: enrollment, each agent with its own key.
    eprintln!("enrolling {n} agents ({} at a time)...", args.enroll_concurrency);
    let cpu0 = stats::cpu_seconds(&pid);
    let sem = Arc::new(Semaphore::new(args.enroll_concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (sem, endpoint, ca, token) = (sem.clone(), endpoint.clone(), ca.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let key = client::generate_key().ok()?;
            let csr = client::csr_pem(&key).ok()?;
            let inv = pb::Inventory {
                hostname: format!("sim-{i:05}"),
                smbios: Some(pb::Smbios {
                    uuid: format!("00000000-0000-4000-8000-{i:012x}"),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let r = client::enroll_once(&endpoint, &ca, &token, &csr, inv).await.ok()?;
            Some(Enrolled { cert: r.certificate_pem, key: key.serialize_pem() })
        }));
    }
    let mut enrolled = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(e)) = t.await {
            enrolled.push(e);
        }
    }
    report.enroll_seconds = t0.elapsed().as_secs_f64();
    report.enroll_failures = n - enrolled.len();
    report.enroll_per_second = enrolled.len() as f64 / report.enroll_seconds;
    report.controller_cpu_enroll_seconds = stats::cpu_seconds(&pid) - cpu0;

    // Phase 2: every agent opens its own mTLS connection and stream.
    eprintln!("connecting {} streams...", enrolled.len());
    let measuring = Arc::new(AtomicBool::new(false));
    let rtts: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::with_capacity(n * 64)));
    let sent = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t1 = Instant::now();
    for (i, e) in enrolled.into_iter().enumerate() {
        let (endpoint, ca, hb) = (endpoint.clone(), ca.clone(), args.heartbeat);
        let (measuring, rtts, sent, connected, failed) =
            (measuring.clone(), rtts.clone(), sent.clone(), connected.clone(), failed.clone());
        // Spread first heartbeats over one interval.
        let offset = hb.mul_f64((i as f64 * 0.618_034) % 1.0);
        tokio::spawn(async move {
            if simulate(&endpoint, &ca, e, hb, offset, measuring, rtts, sent, connected.clone())
                .await
                .is_err()
            {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let target = (n - report.enroll_failures) as u64;
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < target {
        if t1.elapsed() > Duration::from_secs(120) {
            eprintln!("gave up waiting for connections after 120s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.connect_seconds = t1.elapsed().as_secs_f64();
    report.connect_failures = failed.load(Ordering::Relaxed) as usize;

    // Phase 3: steady state.
    eprintln!("measuring for {}...", humantime::format_duration(args.duration));
    tokio::time::sleep(args.heartbeat * 2).await;
    let cpu1 = stats::cpu_seconds(&pid);
    let sent0 = sent.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let steady_cpu = stats::cpu_seconds(&pid) - cpu1;
    let sent_in_window = sent.load(Ordering::Relaxed) - sent0;
    let mut samples = rtts.lock().map(|v| v.clone()).unwrap_or_default();
    samples.sort();
    report.rtt_samples = samples.len();
    report.rtt_p50_ms = ms(stats::percentile(&samples, 50.0));
    report.rtt_p90_ms = ms(stats::percentile(&samples, 90.0));
    report.rtt_p99_ms = ms(stats::percentile(&samples, 99.0));
    report.rtt_max_ms = ms(samples.last().copied().unwrap_or_default());
    report.heartbeats_sent = sent_in_window;
    report.heartbeats_lost = sent_in_window.saturating_sub(samples.len() as u64);
    let (rss, hwm) = stats::rss(&pid);
    report.controller_rss_mib = rss as f64 / 1048576.0;
    report.controller_peak_rss_mib = hwm as f64 / 1048576.0;
    report.controller_cpu_steady_seconds = steady_cpu;
    report.controller_cpu_steady_percent = steady_cpu / args.duration.as_secs_f64() * 100.0;
    report.controller_cpu_per_heartbeat_us =
        if samples.is_empty() { 0.0 } else { steady_cpu / samples.len() as f64 * 1e6 };
    report.bench_cpu_seconds = stats::cpu_seconds("self") - bench_cpu0;
    let ms_list = admin.list_machines(pb::ListMachinesRequest {}).await?.into_inner().machines;
    report.machines_ready = ms_list.iter().filter(|m| m.state == pb::MachineState::Ready as i32).count();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, args.duration);
    }
    drop(ctl);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn simulate(
    endpoint: &str,
    ca: &str,
    e: Enrolled,
    hb: Duration,
    offset: Duration,
    measuring: Arc<AtomicBool>,
    rtts: Arc<Mutex<Vec<Duration>>>,
    sent: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
) -> Result<()> {
    let ch = client::mtls_channel(endpoint, ca, &e.cert, &e.key).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            inventory: None,
            heartbeat_interval_ms: u32::try_from(hb.as_millis()).unwrap_or(u32::MAX),
            metrics_port: 0,
        })),
    })
    .await?;
    let mut down = pb::agent_service_client::AgentServiceClient::new(ch)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    connected.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, hb);
    let mut seq = 0u64;
    let mut inflight: std::collections::VecDeque<(u64, Instant)> = Default::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                inflight.push_back((seq, Instant::now()));
                if inflight.len() > 16 { inflight.pop_front(); }
                if measuring.load(Ordering::Relaxed) { sent.fetch_add(1, Ordering::Relaxed); }
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, sent_unix_ms: 0, health: None })),
                }).await?;
            }
            m = down.message() => {
                let Some(m) = m? else { anyhow::bail!("stream closed") };
                if let Some(pb::controller_message::Msg::HeartbeatAck(a)) = m.msg {
                    if let Some(pos) = inflight.iter().position(|(s, _)| *s == a.seq) {
                        let rtt = inflight[pos].1.elapsed();
                        inflight.drain(..=pos);
                        if measuring.load(Ordering::Relaxed) {
                            if let Ok(mut v) = rtts.lock() { v.push(rtt); }
                        }
                    }
                }
            }
        }
    }
}

fn print_text(r: &Report, window: Duration) {
    println!(
        "muster-bench: {} agents, heartbeat every {} ms, measured over {}",
        r.agents,
        r.heartbeat_ms,
        humantime::format_duration(window)
    );
    println!(
        "  enrollment:        {:.1}/s ({} in {:.2} s, {} failed)",
        r.enroll_per_second,
        r.agents - r.enroll_failures,
        r.enroll_seconds,
        r.enroll_failures
    );
    println!("  all streams up in: {:.2} s ({} failed)", r.connect_seconds, r.connect_failures);
    println!(
        "  heartbeat RTT:     p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples, {} lost)",
        r.rtt_p50_ms, r.rtt_p90_ms, r.rtt_p99_ms, r.rtt_max_ms, r.rtt_samples, r.heartbeats_lost
    );
    println!(
        "  controller RSS:    {:.1} MiB (peak {:.1} MiB)",
        r.controller_rss_mib, r.controller_peak_rss_mib
    );
    println!(
        "  controller CPU:    enroll phase {:.2} s; steady {:.2} s = {:.1}% of one core, {:.1} µs per heartbeat",
        r.controller_cpu_enroll_seconds, r.controller_cpu_steady_seconds, r.controller_cpu_steady_percent, r.controller_cpu_per_heartbeat_us
    );
    println!("  bench process CPU: {:.2} s (shares the 2 cores with the controller)", r.bench_cpu_seconds);
    println!("  machines ready:    {}", r.machines_ready);
}
