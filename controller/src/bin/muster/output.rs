//! How the CLI shows things: tables for people, JSON and YAML for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muster_proto::model::{Role, State};
use muster_proto::pb;
use serde::Serialize;

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Writes `s` to stdout now. A closed pipe comes back as an error (see [`is_broken_pipe`])
/// rather than a panic as with `print!`.
pub fn emit(s: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// Whether `e` is, or was caused by, writing into a pipe whose reader has gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// RFC 3339 (UTC, seconds) of a Unix-ms time; `None` for 0.
pub fn rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string())
}

/// Unix milliseconds of `t`.
pub fn now_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// "3s ago", "5m ago", "in 2h", "never".
pub fn relative(ms: i64, now: SystemTime) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let now_ms = now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let (d, future) = if ms > now_ms { (ms - now_ms, true) } else { (now_ms - ms, false) };
    let secs = d / 1000;
    let text = match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A machine as scripts see it (`-o json|yaml`).
#[derive(Debug, Serialize)]
pub struct MachineView {
    pub id: String,
    pub hostname: String,
    pub state: String,
    pub role: Option<String>,
    pub cluster: Option<String>,
    pub uuid: String,
    pub serial: String,
    pub macs: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub last_seen: Option<String>,
    pub connected: bool,
    pub health: String,
    pub health_reasons: Vec<String>,
    pub warnings: Vec<String>,
    pub enrolled_at: Option<String>,
    pub cert_expires: Option<String>,
    pub token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory: Option<pb::Inventory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_snapshot: Option<pb::HealthSnapshot>,
}

pub fn state_name(v: i32) -> String {
    State::from_wire(v).map_or_else(|| "unknown".into(), |s| s.as_str().into())
}

pub fn role_name(v: i32) -> Option<String> {
    Role::from_wire(v).ok().filter(|r| *r != Role::None).map(|r| r.as_str().into())
}

impl MachineView {
    pub fn new(m: &pb::Machine, full: bool) -> Self {
        Self {
            id: m.id.clone(),
            hostname: m.hostname.clone(),
            state: state_name(m.state),
            role: role_name(m.role),
            cluster: Some(m.cluster.clone()).filter(|c| !c.is_empty()),
            uuid: m.uuid.clone(),
            serial: m.serial.clone(),
            macs: m.macs.clone(),
            labels: m.labels.clone().into_iter().collect(),
            last_seen: rfc3339(m.last_seen_unix_ms),
            connected: m.connected,
            health: m.health.clone(),
            health_reasons: m.health_reasons.clone(),
            warnings: m.warnings.clone(),
            enrolled_at: rfc3339(m.enrolled_unix_ms),
            cert_expires: rfc3339(m.cert_not_after_unix_ms),
            token: m.token_id.clone(),
            metrics_endpoint: full.then(|| m.metrics_endpoint.clone()).filter(|e| !e.is_empty()),
            inventory: if full { m.inventory.clone() } else { None },
            health_snapshot: if full { m.health_snapshot.clone() } else { None },
        }
    }
}

/// Serializes for `-o json|yaml`.
pub fn render<T: Serialize>(v: &T, o: Output) -> anyhow::Result<String> {
    Ok(match o {
        Output::Json => serde_json::to_string_pretty(v)? + "\n",
        Output::Yaml => serde_saphyr::to_string(v)?,
        Output::Table => String::new(),
    })
}

/// A plain aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The machines table.
pub fn machines_table(ms: &[pb::Machine], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                if m.hostname.is_empty() { "-".into() } else { m.hostname.clone() },
                state_name(m.state),
                role_name(m.role).unwrap_or_else(|| "-".into()),
                if m.cluster.is_empty() { "-".into() } else { m.cluster.clone() },
                if m.health.is_empty() { "-".into() } else { m.health.clone() },
                relative(m.last_seen_unix_ms, now),
                m.warnings.len().to_string(),
            ]
        })
        .collect();
    table(&["ID", "HOSTNAME", "STATE", "ROLE", "CLUSTER", "HEALTH", "LAST SEEN", "WARNINGS"], &rows)
}

fn bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// `machine get` as a readable block.
pub fn machine_detail(m: &pb::Machine, now: SystemTime) -> String {
    let v = MachineView::new(m, true);
    let mut s = String::new();
    let mut kv = |k: &str, val: String| {
        let val = val.trim_end();
        s.push_str(&format!("{k:<14} {}\n", if val.is_empty() { "-" } else { val }));
    };
    kv("ID:", v.id.clone());
    kv("Hostname:", v.hostname.clone());
    kv("State:", format!("{}{}", v.state, if v.connected { " (connected)" } else { "" }));
    kv(
        "Health:",
        if v.health_reasons.is_empty() {
            v.health.clone()
        } else {
            format!("{}: {}", v.health, v.health_reasons.join("; "))
        },
    );
    kv("Role:", v.role.clone().unwrap_or_else(|| "-".into()));
    kv("Cluster:", v.cluster.clone().unwrap_or_else(|| "-".into()));
    kv(
        "Labels:",
        if v.labels.is_empty() {
            "-".into()
        } else {
            v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
        },
    );
    kv(
        "Last seen:",
        format!(
            "{} ({})",
            v.last_seen.clone().unwrap_or_else(|| "never".into()),
            relative(m.last_seen_unix_ms, now)
        ),
    );
    kv("Enrolled:", v.enrolled_at.clone().unwrap_or_default());
    kv(
        "Certificate:",
        format!("serial {}, expires {}", m.cert_serial, v.cert_expires.clone().unwrap_or_default()),
    );
    kv("Token:", v.token.clone());
    if let Some(ep) = &v.metrics_endpoint {
        kv("Metrics:", format!("http://{ep}/metrics"));
    }
    if let Some(inv) = &m.inventory {
        kv(
            "CPU:",
            format!("{} × {}", inv.cpu_count, if inv.cpu_model.is_empty() { "?" } else { &inv.cpu_model }),
        );
        kv("Memory:", bytes(inv.memory_bytes));
        kv("Kernel:", inv.kernel.clone());
        kv("OS:", inv.os.clone());
        kv("Arch:", inv.arch.clone());
        kv("Agent:", inv.agent_version.clone());
        let smbios = inv.smbios.clone().unwrap_or_default();
        let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
        kv(
            "SMBIOS:",
            format!(
                "uuid {}, serial {}, {} {}",
                dash(&smbios.uuid),
                dash(&smbios.serial),
                dash(&smbios.vendor),
                dash(&smbios.product)
            ),
        );
        for d in &inv.disks {
            let mut disk = format!("{} {}", d.name, bytes(d.size_bytes));
            if !d.model.is_empty() {
                disk.push(' ');
                disk.push_str(&d.model);
            }
            if d.removable {
                disk.push_str(" (removable)");
            }
            kv("Disk:", disk);
        }
        for n in &inv.nics {
            let mut nic = format!("{} {}", n.name, if n.mac.is_empty() { "-" } else { &n.mac });
            if !n.addresses.is_empty() {
                nic.push(' ');
                nic.push_str(&n.addresses.join(", "));
            }
            kv("NIC:", nic);
        }
    }
    for w in &v.warnings {
        kv("Warning:", w.clone());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::Machine {
        pb::Machine {
            id: "0123456789abcdef".into(),
            hostname: "node-1".into(),
            state: pb::MachineState::Ready as i32,
            role: pb::Role::Worker as i32,
            cluster: "homelab".into(),
            uuid: "u".into(),
            macs: vec!["52:54:00:00:00:01".into()],
            last_seen_unix_ms: 1_763_856_000_000,
            warnings: vec!["w".into()],
            health: "healthy".into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v = serde_json::to_value(vec![MachineView::new(&sample(), false)]).unwrap();
        let m = &v[0];
        for k in
            ["id", "hostname", "state", "role", "cluster", "uuid", "macs", "labels", "last_seen", "warnings"]
        {
            assert!(m.get(k).is_some(), "missing {k}: {m}");
        }
        assert_eq!(m["state"], "ready");
        assert_eq!(m["role"], "worker");
        assert_eq!(m["last_seen"], "2025-11-23T00:00:00Z");
        let none = MachineView::new(&pb::Machine::default(), false);
        let v = serde_json::to_value(none).unwrap();
        assert!(v["role"].is_null() && v["cluster"].is_null() && v["last_seen"].is_null());
    }

    #[test]
    fn yaml_renders() {
        let y = render(&vec![MachineView::new(&sample(), false)], Output::Yaml).unwrap();
        assert!(y.contains("hostname: node-1"), "{y}");
    }

    #[test]
    fn tables_align() {
        let t = machines_table(&[sample()], UNIX_EPOCH + Duration::from_millis(1_763_856_005_000));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID "));
        assert!(lines[1].contains("5s ago"), "{t}");
        assert_eq!(lines[0].find("HOSTNAME"), lines[1].find("node-1"));
    }

    #[test]
    fn detail_is_a_readable_block() {
        let mut m = sample();
        m.inventory = Some(pb::Inventory {
            cpu_model: "AMD EPYC".into(),
            cpu_count: 4,
            memory_bytes: 8 << 30,
            kernel: "6.1.0".into(),
            os: "Debian GNU/Linux 12".into(),
            agent_version: "0.1.0".into(),
            disks: vec![pb::Disk { name: "vda".into(), size_bytes: 256 << 30, ..Default::default() }],
            nics: vec![pb::Nic {
                name: "eth0".into(),
                mac: "52:54:00:00:00:01".into(),
                addresses: vec!["10.0.0.5/24".into()],
            }],
            smbios: Some(pb::Smbios { uuid: "u".into(), ..Default::default() }),
            ..Default::default()
        });
        let d = machine_detail(&m, UNIX_EPOCH + Duration::from_millis(1_763_856_003_000));
        for want in [
            "ID:            0123456789abcdef\n",
            "Role:          worker\n",
            "Cluster:       homelab\n",
            "Last seen:     2025-11-23T00:00:00Z (3s ago)\n",
            "CPU:           4 × AMD EPYC\n",
            "Memory:        8.0 GiB\n",
            "Kernel:        6.1.0\n",
            "OS:            Debian GNU/Linux 12\n",
            "Agent:         0.1.0\n",
            "Disk:          vda 256.0 GiB\n",
            "NIC:           eth0 52:54:00:00:00:01 10.0.0.5/24\n",
            "SMBIOS:        uuid u, serial -, - -\n",
            "Warning:       w\n",
        ] {
            assert!(d.contains(want), "missing {want:?} in\n{d}");
        }
        assert!(d.lines().all(|l| l == l.trim_end()), "no trailing spaces:\n{d}");
    }

    #[test]
    fn json_of_one_machine_has_the_inventory() {
        let mut m = sample();
        m.inventory = Some(pb::Inventory { kernel: "6.1.0".into(), ..Default::default() });
        m.enrolled_unix_ms = 1_763_856_000_000;
        let v = serde_json::to_value(MachineView::new(&m, true)).unwrap();
        assert_eq!(v["inventory"]["kernel"], "6.1.0");
        assert_eq!(v["enrolled_at"], "2025-11-23T00:00:00Z");
        assert!(v["cert_expires"].is_null());
        let list = serde_json::to_value(MachineView::new(&m, false)).unwrap();
        assert!(list.get("inventory").is_none(), "the list stays small");
    }

    #[test]
    fn broken_pipes_are_recognised() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("broken pipe, but only in words")));
    }

    #[test]
    fn relative_times() {
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(relative(0, now), "never");
        let later = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(relative(1_000_000_000 - 3 * 86_400_000, later), "3d ago");
        assert_eq!(relative(99_000_000, now), "16m ago");
        assert_eq!(relative(100_000_000 + 7_200_000, now), "in 2h");
        assert_eq!(relative(100_000_000, now), "0s ago");
        assert_eq!(relative(100_000_000 - 59_999, now), "59s ago");
        assert_eq!(relative(100_000_000 - 60_000, now), "1m ago");
        assert_eq!(relative(-5, now), "never");
    }
}
