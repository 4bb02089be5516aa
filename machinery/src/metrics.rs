//! Node metrics: the names, and a fast exposition writer, shared by the controller's
//! per-machine metrics and the agent's own `/metrics`, so a dashboard works on either. On the
//! controller every series carries `machine`, `hostname`, `cluster` and `role` labels; on the
//! agent none (the scrape target's labels from service discovery identify it).
//!
//! The writer emits the Prometheus text format 0.0.4 or OpenMetrics text directly. A fleet of
//! 10,000 machines is ~300,000 series; a generic encoder spends its time re-escaping the same
//! labels, so each node's label prefix is escaped once and copied.
//!
//! Also: [`to_prometheus_text`], which turns prometheus-client's OpenMetrics output (the
//! counters and histograms a process keeps) into the Prometheus text format.

use std::fmt::Write;

use crate::health::{FilesystemUsage, HealthSnapshot, NetworkCounters};

/// Exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: counter families are named with `_total`.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`: counter families without `_total`.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// Appends `s` escaped as a label value.
pub fn escape_label_value(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A pre-escaped label set, e.g. `machine="a",hostname="b"`.
pub fn label_prefix(labels: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        escape_label_value(&mut s, v);
        s.push('"');
    }
    s
}

/// Writes exposition text.
pub struct Writer<'a> {
    out: &'a mut String,
    format: Format,
    /// The current family's sample name (with `_total` for counters).
    sample: String,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut String, format: Format) -> Self {
        Self { out, format, sample: String::new() }
    }

    /// Starts a family. `name` is the base name (no `_total`); `help` without a final period.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        self.sample.clear();
        self.sample.push_str(name);
        let (family, t) = match kind {
            Kind::Gauge => (name, "gauge"),
            Kind::Counter => {
                self.sample.push_str("_total");
                (if self.format == Format::Prometheus { self.sample.as_str() } else { name }, "counter")
            }
        };
        let _ = write!(self.out, "# HELP {family} {help}.\n# TYPE {family} {t}\n");
    }

    /// One sample: `prefix` is a pre-escaped label set (may be empty), `extra` more labels.
    pub fn sample(&mut self, prefix: &str, extra: &[(&str, &str)], value: f64) {
        self.out.push_str(&self.sample);
        if !prefix.is_empty() || !extra.is_empty() {
            self.out.push('{');
            self.out.push_str(prefix);
            for (i, (k, v)) in extra.iter().enumerate() {
                if i > 0 || !prefix.is_empty() {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = write!(self.out, "{}", value as i64);
        } else if value.is_nan() {
            self.out.push_str("NaN");
        } else {
            let _ = write!(self.out, "{value}");
        }
        self.out.push('\n');
    }
}

/// One node's latest snapshot with its pre-escaped label prefix.
pub struct NodeSample<'a> {
    pub prefix: &'a str,
    pub snapshot: &'a HealthSnapshot,
}

type Get = fn(&HealthSnapshot) -> f64;

/// Node gauges with one series per node.
const NODE_GAUGES: &[(&str, &str, Get)] = &[
    ("muster_machine_cpu_usage_ratio", "CPU busy share over all cores (0-1)", |s| {
        f64::from(s.cpu_usage_percent) / 100.0
    }),
    ("muster_machine_cpus", "Number of logical CPUs", |s| f64::from(s.cpu_count)),
    ("muster_machine_load1", "1-minute load average", |s| s.load1),
    ("muster_machine_load5", "5-minute load average", |s| s.load5),
    ("muster_machine_load15", "15-minute load average", |s| s.load15),
    ("muster_machine_memory_total_bytes", "Physical memory", |s| s.memory_total_bytes as f64),
    ("muster_machine_memory_available_bytes", "Memory available for new work", |s| {
        s.memory_available_bytes as f64
    }),
    ("muster_machine_swap_total_bytes", "Swap space", |s| s.swap_total_bytes as f64),
    ("muster_machine_swap_free_bytes", "Free swap space", |s| s.swap_free_bytes as f64),
    ("muster_machine_uptime_seconds", "Time since boot", |s| s.uptime_seconds as f64),
    ("muster_machine_boot_time_seconds", "Boot time, Unix seconds", |s| s.boot_time_unix as f64),
    ("muster_machine_clock_offset_seconds", "Node clock minus controller clock", |s| {
        s.clock_offset_ms as f64 / 1000.0
    }),
];

/// Every node metric family name this module writes (counters without `_total`).
pub fn family_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = NODE_GAUGES.iter().map(|g| g.0).collect();
    v.extend([
        "muster_machine_filesystem_size_bytes",
        "muster_machine_filesystem_avail_bytes",
        "muster_machine_network_receive_bytes",
        "muster_machine_network_transmit_bytes",
        "muster_machine_network_receive_errors",
        "muster_machine_network_transmit_errors",
        "muster_machine_temperature_celsius",
        "muster_machine_service_up",
    ]);
    v
}

/// Writes a family with one series per node and item of `items`, skipping it if it has none.
fn per_item<T>(
    w: &mut Writer<'_>,
    nodes: &[NodeSample<'_>],
    (name, help, kind): (&str, &str, Kind),
    items: fn(&HealthSnapshot) -> &[T],
    each: impl Fn(&mut Writer<'_>, &str, &T),
) {
    if nodes.iter().all(|n| items(n.snapshot).is_empty()) {
        return;
    }
    w.family(name, help, kind);
    for n in nodes {
        for item in items(n.snapshot) {
            each(w, n.prefix, item);
        }
    }
}

/// Writes every node metric family for `nodes`.
pub fn write_nodes(w: &mut Writer<'_>, nodes: &[NodeSample<'_>]) {
    if nodes.is_empty() {
        return;
    }
    for (name, help, get) in NODE_GAUGES {
        w.family(name, help, Kind::Gauge);
        for n in nodes {
            w.sample(n.prefix, &[], get(n.snapshot));
        }
    }
    type FsGet = fn(&FilesystemUsage) -> u64;
    let fs: [(&str, &str, FsGet); 2] = [
        ("muster_machine_filesystem_size_bytes", "Filesystem size", |f| f.size_bytes),
        ("muster_machine_filesystem_avail_bytes", "Filesystem space available to non-root users", |f| {
            f.available_bytes
        }),
    ];
    for (name, help, get) in fs {
        per_item(
            w,
            nodes,
            (name, help, Kind::Gauge),
            |s| &s.filesystems,
            |w, p, f| {
                w.sample(
                    p,
                    &[("mountpoint", &f.mount_point), ("device", &f.device), ("fstype", &f.fs_type)],
                    get(f) as f64,
                )
            },
        );
    }
    type NetGet = fn(&NetworkCounters) -> u64;
    let net: [(&str, &str, NetGet); 4] = [
        ("muster_machine_network_receive_bytes", "Bytes received", |n| n.rx_bytes),
        ("muster_machine_network_transmit_bytes", "Bytes sent", |n| n.tx_bytes),
        ("muster_machine_network_receive_errors", "Receive errors", |n| n.rx_errors),
        ("muster_machine_network_transmit_errors", "Transmit errors", |n| n.tx_errors),
    ];
    for (name, help, get) in net {
        per_item(
            w,
            nodes,
            (name, help, Kind::Counter),
            |s| &s.networks,
            |w, p, n| w.sample(p, &[("device", &n.interface)], get(n) as f64),
        );
    }
    per_item(
        w,
        nodes,
        ("muster_machine_temperature_celsius", "Sensor temperature", Kind::Gauge),
        |s| &s.temperatures,
        |w, p, t| w.sample(p, &[("sensor", &t.sensor)], f64::from(t.celsius)),
    );
    per_item(
        w,
        nodes,
        ("muster_machine_service_up", "1 if a service the machine config requires is running", Kind::Gauge),
        |s| &s.services,
        |w, p, c| w.sample(p, &[("service", &c.name)], f64::from(u8::from(c.up))),
    );
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
                let _ = writeln!(out, "# HELP {name}{suffix} {help}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
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
mod tests {
    use super::*;

    fn snap() -> HealthSnapshot {
        HealthSnapshot {
            cpu_usage_percent: 50.0,
            networks: vec![NetworkCounters { interface: "eth0".into(), rx_bytes: 7, ..Default::default() }],
            filesystems: vec![FilesystemUsage {
                mount_point: "/".into(),
                size_bytes: 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn writes_both_formats() {
        let s = snap();
        let prefix = label_prefix(&[("machine", "m1"), ("hostname", "a\"b\\c\nd")]);
        assert_eq!(prefix, r#"machine="m1",hostname="a\"b\\c\nd""#);
        let nodes = [NodeSample { prefix: &prefix, snapshot: &s }];
        let mut prom = String::new();
        write_nodes(&mut Writer::new(&mut prom, Format::Prometheus), &nodes);
        assert!(prom.contains(&format!("muster_machine_cpu_usage_ratio{{{prefix}}} 0.5\n")), "{prom}");
        assert!(prom.contains("# TYPE muster_machine_network_receive_bytes_total counter\n"), "{prom}");
        assert!(prom.contains(&format!(
            "muster_machine_network_receive_bytes_total{{{prefix},device=\"eth0\"}} 7\n"
        )));
        // Families without series are left out entirely.
        assert!(!prom.contains("temperature"), "{prom}");
        let mut om = String::new();
        write_nodes(&mut Writer::new(&mut om, Format::OpenMetrics), &nodes);
        assert!(om.contains("# TYPE muster_machine_network_receive_bytes counter\n"), "{om}");
        assert!(om.contains("muster_machine_network_receive_bytes_total{"), "{om}");
    }

    #[test]
    fn unlabelled_and_float_samples() {
        let mut out = String::new();
        let mut w = Writer::new(&mut out, Format::Prometheus);
        w.family("x", "An x", Kind::Gauge);
        w.sample("", &[], 2.0);
        w.sample("", &[("a", "b")], 0.25);
        w.sample("", &[], f64::NAN);
        assert_eq!(out, "# HELP x An x.\n# TYPE x gauge\nx 2\nx{a=\"b\"} 0.25\nx NaN\n");
    }

    #[test]
    fn converts_openmetrics_counters() {
        let om = "# HELP c Calls.\n# TYPE c counter\nc_total 3\n# HELP g G.\n# TYPE g gauge\n# UNIT g bytes\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP c_total Calls.\n# TYPE c_total counter\nc_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
