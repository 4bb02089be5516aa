//! Node metrics: the names and encoding shared by the controller's per-machine metrics and the
//! agent's own `/metrics`, so a dashboard works on either. On the controller every series carries
//! `machine`, `hostname`, `cluster` and `role` labels; on the agent none (the scrape target's
//! labels from service discovery identify it).
//!
//! Also: [`to_prometheus_text`], which turns prometheus-client's OpenMetrics text into the
//! Prometheus 0.0.4 text format for scrapers (and `promtool check metrics`) that do not ask for
//! OpenMetrics.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::pb;

/// The labels identifying one node's series.
pub type NodeLabels<'a> = Vec<(&'static str, &'a str)>;

/// One node's latest snapshot with its identifying labels.
pub struct NodeSample<'a> {
    pub labels: NodeLabels<'a>,
    pub snapshot: &'a pb::HealthSnapshot,
}

fn family<V: EncodeMetric, L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl Iterator<Item = (L, V)>,
) -> fmt::Result {
    let mut series = series.peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in series {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge with one series per node.
pub fn node_gauge(
    enc: &mut DescriptorEncoder,
    nodes: &[NodeSample<'_>],
    name: &str,
    help: &str,
    value: impl Fn(&pb::HealthSnapshot) -> f64,
) -> fmt::Result {
    family(
        enc,
        name,
        help,
        MetricType::Gauge,
        nodes.iter().map(|n| (n.labels.as_slice(), ConstGauge::new(value(n.snapshot)))),
    )
}

/// A metric with one series per node and item (filesystem, interface, sensor, service).
#[allow(clippy::too_many_arguments)]
fn per_item<'s, T: 's, V: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    nodes: &'s [NodeSample<'s>],
    name: &str,
    help: &str,
    kind: MetricType,
    items: impl Fn(&'s pb::HealthSnapshot) -> &'s [T],
    labels: impl Fn(&'s T) -> Vec<(&'static str, &'s str)>,
    value: impl Fn(&T) -> V,
) -> fmt::Result {
    let series = nodes.iter().flat_map(|n| {
        items(n.snapshot).iter().map(|item| {
            let mut l = n.labels.clone();
            l.extend(labels(item));
            (l, value(item))
        })
    });
    family(enc, name, help, kind, series)
}

/// Encodes every node metric for `nodes`.
pub fn encode_nodes(enc: &mut DescriptorEncoder, nodes: &[NodeSample<'_>]) -> fmt::Result {
    node_gauge(enc, nodes, "muster_machine_cpu_usage_ratio", "CPU busy share over all cores (0-1).", |s| {
        f64::from(s.cpu_usage_percent) / 100.0
    })?;
    family(
        enc,
        "muster_machine_cpus",
        "Number of logical CPUs.",
        MetricType::Gauge,
        nodes.iter().map(|n| (n.labels.as_slice(), ConstGauge::new(i64::from(n.snapshot.cpu_count)))),
    )?;
    node_gauge(enc, nodes, "muster_machine_load1", "1-minute load average.", |s| s.load1)?;
    node_gauge(enc, nodes, "muster_machine_load5", "5-minute load average.", |s| s.load5)?;
    node_gauge(enc, nodes, "muster_machine_load15", "15-minute load average.", |s| s.load15)?;
    node_gauge(enc, nodes, "muster_machine_memory_total_bytes", "Physical memory.", |s| {
        s.memory_total_bytes as f64
    })?;
    node_gauge(enc, nodes, "muster_machine_memory_available_bytes", "Memory available for new work.", |s| {
        s.memory_available_bytes as f64
    })?;
    node_gauge(enc, nodes, "muster_machine_swap_total_bytes", "Swap space.", |s| s.swap_total_bytes as f64)?;
    node_gauge(enc, nodes, "muster_machine_swap_free_bytes", "Free swap space.", |s| {
        s.swap_free_bytes as f64
    })?;
    node_gauge(enc, nodes, "muster_machine_uptime_seconds", "Time since boot.", |s| s.uptime_seconds as f64)?;
    node_gauge(enc, nodes, "muster_machine_boot_time_seconds", "Boot time, Unix seconds.", |s| {
        s.boot_time_unix as f64
    })?;
    node_gauge(
        enc,
        nodes,
        "muster_machine_clock_offset_seconds",
        "Node clock minus controller clock.",
        |s| s.clock_offset_ms as f64 / 1000.0,
    )?;
    per_item(
        enc,
        nodes,
        "muster_machine_filesystem_size_bytes",
        "Filesystem size.",
        MetricType::Gauge,
        |s| &s.filesystems,
        fs_labels,
        |f| ConstGauge::new(f.size_bytes as f64),
    )?;
    per_item(
        enc,
        nodes,
        "muster_machine_filesystem_avail_bytes",
        "Filesystem space available to non-root users.",
        MetricType::Gauge,
        |s| &s.filesystems,
        fs_labels,
        |f| ConstGauge::new(f.available_bytes as f64),
    )?;
    for (name, help, get) in [
        (
            "muster_machine_network_receive_bytes",
            "Bytes received.",
            (|n| n.rx_bytes) as fn(&pb::NetworkCounters) -> u64,
        ),
        ("muster_machine_network_transmit_bytes", "Bytes sent.", |n| n.tx_bytes),
        ("muster_machine_network_receive_errors", "Receive errors.", |n| n.rx_errors),
        ("muster_machine_network_transmit_errors", "Transmit errors.", |n| n.tx_errors),
    ] {
        per_item(
            enc,
            nodes,
            name,
            help,
            MetricType::Counter,
            |s| &s.networks,
            nic_labels,
            |n| ConstCounter::new(get(n)),
        )?;
    }
    per_item(
        enc,
        nodes,
        "muster_machine_temperature_celsius",
        "Sensor temperature.",
        MetricType::Gauge,
        |s| &s.temperatures,
        |t: &pb::Temperature| vec![("sensor", t.sensor.as_str())],
        |t| ConstGauge::new(f64::from(t.celsius)),
    )?;
    per_item(
        enc,
        nodes,
        "muster_machine_service_up",
        "1 if a service the machine config requires is running.",
        MetricType::Gauge,
        |s| &s.services,
        |c: &pb::ServiceCheck| vec![("service", c.name.as_str())],
        |c| ConstGauge::new(i64::from(c.up)),
    )?;
    Ok(())
}

fn fs_labels(f: &pb::FilesystemUsage) -> Vec<(&'static str, &str)> {
    vec![
        ("mountpoint", f.mount_point.as_str()),
        ("device", f.device.as_str()),
        ("fstype", f.fs_type.as_str()),
    ]
}

fn nic_labels(n: &pb::NetworkCounters) -> Vec<(&'static str, &str)> {
    vec![("device", n.interface.as_str())]
}

/// Converts prometheus-client's OpenMetrics text to the Prometheus text format 0.0.4: counter
/// families are named with their `_total` suffix, `# UNIT` and `# EOF` lines are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# HELP ") {
            if let Some(h) = pending_help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" && !name.ends_with("_total") { "_total" } else { "" };
            if let Some(h) = pending_help.take() {
                let help = h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')).map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(h) = pending_help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct One(pb::HealthSnapshot);
    impl Collector for One {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            encode_nodes(&mut enc, &[NodeSample { labels: vec![("machine", "m1")], snapshot: &self.0 }])
        }
    }

    #[test]
    fn encodes_and_converts() {
        let snap = pb::HealthSnapshot {
            cpu_usage_percent: 50.0,
            networks: vec![pb::NetworkCounters {
                interface: "eth0".into(),
                rx_bytes: 7,
                ..Default::default()
            }],
            filesystems: vec![pb::FilesystemUsage {
                mount_point: "/".into(),
                size_bytes: 10,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut r = Registry::default();
        r.register_collector(Box::new(One(snap)));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(om.contains("muster_machine_cpu_usage_ratio{machine=\"m1\"} 0.5"), "{om}");
        assert!(
            om.contains("muster_machine_network_receive_bytes_total{machine=\"m1\",device=\"eth0\"} 7"),
            "{om}"
        );
        let text = to_prometheus_text(&om);
        assert!(text.contains("# TYPE muster_machine_network_receive_bytes_total counter\n"), "{text}");
        assert!(
            text.contains("# HELP muster_machine_network_receive_bytes_total Bytes received.\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        // Families without series are left out entirely.
        assert!(!text.contains("temperature"), "{text}");
    }
}
