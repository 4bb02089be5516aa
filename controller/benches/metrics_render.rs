//! `/metrics` render time and size for a large simulated fleet.
//!
//! `cargo bench -p muster-controller --bench metrics_render [-- MACHINES]` (default 10,000). Prints
//! numbers; asserts nothing.

use std::io::Write;
use std::time::Instant;

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
        config_drift: Vec::new(),
    }
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let metrics = Metrics::new();
    let mut best = f64::MAX;
    let mut sizes = (0, 0, 0);
    for round in 0..5 {
        let fleet = FleetSnapshot { machines: (0..n).map(machine).collect(), connected: n };
        let t = Instant::now();
        let om = metrics.render(&fleet, Format::OpenMetrics).unwrap_or_default();
        let convert = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let text = metrics.render(&fleet, Format::Prometheus).unwrap_or_default();
        let render = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(text.as_bytes());
        let gz = gz.finish().unwrap_or_default();
        let gzip = t.elapsed().as_secs_f64();
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        println!(
            "round {round}: {n} machines, {series} series: render text 0.0.4 {:.1} ms ({:.1} MB), OpenMetrics {:.1} ms ({:.1} MB), gzip {:.1} ms ({:.2} MB)",
            render * 1e3,
            text.len() as f64 / 1e6,
            convert * 1e3,
            om.len() as f64 / 1e6,
            gzip * 1e3,
            gz.len() as f64 / 1e6
        );
        best = best.min(render);
        sizes = (om.len(), text.len(), gz.len());
    }
    println!(
        "best render (text 0.0.4): {:.1} ms for {n} machines; body {:.1} MB plain, {:.2} MB gzip",
        best * 1e3,
        sizes.1 as f64 / 1e6,
        sizes.2 as f64 / 1e6
    );
}
