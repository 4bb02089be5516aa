//! `/metrics` render time and size for a large simulated fleet.
//!
//! `cargo bench -p muster-controller --bench metrics_render [-- MACHINES]` (default 10,000). Prints
//! numbers, with the size of every body it timed. A render that fails (or returns an empty body)
//! stops the bench with an error and a non-zero exit instead of timing nothing.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use muster_controller::fleet::health::HealthStatus;
use muster_controller::metrics::{FleetSnapshot, MachineSample, Metrics};
use muster_machinery::metrics::Format;
use muster_proto::pb;

fn machine(i: usize) -> MachineSample {
    let snapshot = pb::HealthSnapshot {
        cpu_usage_percent: (i % 100) as f32,
        cpu_count: 4,
        load1: 0.5,
        load5: 0.4,
        load15: 0.3,
        memory_total_bytes: 8 << 30,
        memory_available_bytes: 4 << 30,
        swap_total_bytes: 1 << 30,
        swap_free_bytes: 1 << 30,
        uptime_seconds: 86_400,
        boot_time_unix: 1_760_000_000,
        clock_offset_ms: 3,
        filesystems: ["/", "/var"]
            .iter()
            .map(|m| pb::FilesystemUsage {
                mount_point: (*m).into(),
                device: "/dev/sda1".into(),
                fs_type: "ext4".into(),
                size_bytes: 100 << 30,
                available_bytes: 40 << 30,
            })
            .collect(),
        networks: vec![pb::NetworkCounters {
            interface: "eth0".into(),
            rx_bytes: 1 << 40,
            tx_bytes: 1 << 39,
            rx_errors: 0,
            tx_errors: 0,
        }],
        temperatures: vec![pb::Temperature { sensor: "coretemp".into(), celsius: 45.0 }],
        services: vec![pb::ServiceCheck { name: "k3s".into(), up: true, detail: String::new() }],
    };
    MachineSample {
        id: format!("{i:016x}"),
        hostname: format!("node-{i:05}"),
        cluster: format!("cluster-{}", i % 10),
        role: if i.is_multiple_of(10) { "controlplane" } else { "worker" }.into(),
        state: "ready",
        health: HealthStatus::Healthy,
        up: true,
        last_seen_ms: 1_760_000_000_000,
        cert_not_after_ms: 1_760_086_400_000,
        uuid: format!("00000000-0000-4000-8000-{i:012x}"),
        kernel: "6.1.0-26-amd64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        agent_version: "0.1.0".into(),
        snapshot: Some(snapshot.into()),
        config_generation: 0,
        config_applied: 0,
        config_failed: 0,
        config_drift: Vec::new(),
    }
}

/// Renders one body in `format` and times it; a failed or empty render is an error, never a
/// (fast) time.
fn timed_render(
    metrics: &Metrics,
    fleet: &FleetSnapshot,
    format: Format,
    what: &str,
) -> Result<(String, f64)> {
    let n = fleet.machines.len();
    let t = Instant::now();
    let body = metrics
        .render(fleet, format)
        .with_context(|| format!("rendering /metrics as {what} for {n} machines failed; nothing timed"))?;
    let secs = t.elapsed().as_secs_f64();
    if body.is_empty() {
        bail!("rendering /metrics as {what} for {n} machines returned an empty body; nothing timed");
    }
    Ok((body, secs))
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metrics_render: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let metrics = Metrics::new();
    // The best text render: its time and the size of the body it produced.
    let mut best = (f64::MAX, 0);
    let mut gz_size = 0;
    for round in 0..5 {
        let fleet = FleetSnapshot { machines: (0..n).map(machine).collect(), connected: n };
        let (om, convert) = timed_render(&metrics, &fleet, Format::OpenMetrics, "OpenMetrics")?;
        let (text, render) = timed_render(&metrics, &fleet, Format::Prometheus, "text 0.0.4")?;
        let t = Instant::now();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).context("gzip of the text body failed")?;
        let gz = gz.finish().context("gzip of the text body failed")?;
        let gzip = t.elapsed().as_secs_f64();
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        println!(
            "round {round}: {n} machines, {series} series: render text 0.0.4 {:.1} ms (body {} bytes, {:.1} MB), OpenMetrics {:.1} ms (body {} bytes, {:.1} MB), gzip {:.1} ms ({} bytes, {:.2} MB)",
            render * 1e3,
            text.len(),
            text.len() as f64 / 1e6,
            convert * 1e3,
            om.len(),
            om.len() as f64 / 1e6,
            gzip * 1e3,
            gz.len(),
            gz.len() as f64 / 1e6
        );
        if render < best.0 {
            best = (render, text.len());
            gz_size = gz.len();
        }
    }
    println!(
        "best render (text 0.0.4): {:.1} ms for {n} machines, timed body {} bytes ({:.1} MB plain, {:.2} MB gzip)",
        best.0 * 1e3,
        best.1,
        best.1 as f64 / 1e6,
        gz_size as f64 / 1e6
    );
    Ok(())
}
