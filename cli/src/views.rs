//! Every view the CLI shows, in one place: the `-o json|yaml` shapes and the tables of
//! machines, tokens, registrations, config history, health and a lab's status.

use std::collections::BTreeMap;
use std::time::SystemTime;

use muster_machinery::model::Role;
use muster_proto::{convert, pb};
use serde::Serialize;

use crate::output::{escape, now_ms, relative, rfc3339, table};

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
    /// The machine's config, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigSummary>,
    /// Its install to disk, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallSummary>,
}

/// Where a machine's install to disk stands.
#[derive(Debug, Serialize)]
pub struct InstallSummary {
    /// requested, writing, installed, failed, resetting.
    pub state: String,
    pub image: String,
    pub disk: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The agent's timings of the last install (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<InstallTimings>,
}

#[derive(Debug, Serialize)]
pub struct InstallTimings {
    pub download_ms: u64,
    pub write_ms: u64,
    pub verify_ms: u64,
}

/// Where a machine's config stands: generations, state, what failed.
#[derive(Debug, Serialize)]
pub struct ConfigSummary {
    pub generation: u64,
    pub applied_generation: u64,
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailedResource>,
}

/// A resource that failed to apply, with why.
#[derive(Debug, Serialize)]
pub struct FailedResource {
    pub resource: String,
    pub error: String,
}

impl ConfigSummary {
    fn of(m: &pb::Machine) -> Option<Self> {
        (m.config_generation > 0).then(|| Self {
            generation: m.config_generation,
            applied_generation: m.config_applied_generation,
            state: generation_state_name(m.config_state),
            error: m.config_error.clone(),
            failures: m
                .config_failures
                .iter()
                .map(|r| FailedResource { resource: r.resource.clone(), error: r.detail.clone() })
                .collect(),
        })
    }

    /// `2/3 trying`: the generation the node runs, the current one, where that stands.
    fn short(&self) -> String {
        format!("{}/{} {}", self.applied_generation, self.generation, self.state)
    }
}

/// A machine state as the wire gives it; "unknown" for a value this CLI does not know.
pub fn state_name(v: i32) -> String {
    convert::state(v).map_or_else(|_| "unknown".into(), |s| s.as_str().into())
}

/// A role as the wire gives it; `None` for no role (or one this CLI does not know).
pub fn role_name(v: i32) -> Option<String> {
    convert::role(v).ok().filter(|r| *r != Role::None).map(|r| r.as_str().into())
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
            config: ConfigSummary::of(m),
            install: (!m.install_state.is_empty()).then(|| InstallSummary {
                state: m.install_state.clone(),
                image: m.install_image.clone(),
                disk: m.install_disk.clone(),
                error: m.install_error.clone(),
                timings: (m.install_write_ms > 0).then_some(InstallTimings {
                    download_ms: m.install_download_ms,
                    write_ms: m.install_write_ms,
                    verify_ms: m.install_verify_ms,
                }),
            }),
        }
    }
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
                ConfigSummary::of(m).map_or_else(|| "-".into(), |c| c.short()),
                relative(m.last_seen_unix_ms, now),
                m.warnings.len().to_string(),
            ]
        })
        .collect();
    table(&["ID", "HOSTNAME", "STATE", "ROLE", "CLUSTER", "HEALTH", "CONFIG", "LAST SEEN", "WARNINGS"], &rows)
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
        let val = escape(val.trim_end());
        s.push_str(&format!("{k:<14} {}\n", if val.is_empty() { "-" } else { &val }));
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
    if let Some(i) = &v.install {
        let mut text = format!("{} ({} on {})", i.state, i.image, i.disk);
        if !i.error.is_empty() {
            text.push_str(&format!(": {}", i.error));
        }
        kv("Install:", text);
    }
    match &v.config {
        None => kv("Config:", "-".into()),
        Some(c) => {
            kv(
                "Config:",
                format!("generation {}, running {} ({})", c.generation, c.applied_generation, c.state),
            );
            if !c.error.is_empty() {
                kv("  error:", c.error.clone());
            }
            for f in &c.failures {
                kv("  failed:", format!("{}: {}", f.resource, f.error));
            }
        }
    }
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

/// A join token as `token list -o json|yaml` shows it (never its secret).
#[derive(Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub created: Option<String>,
    pub expires: Option<String>,
    pub uses_total: u32,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub pending: bool,
    /// A boot token (public in boot scripts; machines land pending unless registered).
    pub boot: bool,
    pub revoked: bool,
    pub description: String,
}

impl TokenView {
    pub fn new(t: &pb::Token) -> Self {
        Self {
            id: t.id.clone(),
            created: rfc3339(t.created_unix_ms),
            expires: rfc3339(t.expires_unix_ms),
            uses_total: t.uses_total,
            uses_left: t.uses_left,
            labels: t.labels.clone().into_iter().collect(),
            pending: !t.auto_accept,
            boot: t.boot,
            revoked: t.revoked,
            description: t.description.clone(),
        }
    }
}

/// The tokens table.
pub fn tokens_table(tokens: &[pb::Token], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let status = if t.revoked {
                "revoked"
            } else if t.uses_left == 0 {
                "used"
            } else if t.expires_unix_ms <= now_ms(now) {
                "expired"
            } else {
                "valid"
            };
            vec![
                t.id.clone(),
                status.into(),
                format!("{}/{}", t.uses_left, t.uses_total),
                relative(t.expires_unix_ms, now),
                match (t.boot, t.auto_accept) {
                    (true, _) => "boot".into(),
                    (false, true) => "no".into(),
                    (false, false) => "yes".into(),
                },
                t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                t.description.clone(),
            ]
        })
        .collect();
    table(&["ID", "STATUS", "USES LEFT", "EXPIRES", "PENDING", "LABELS", "DESCRIPTION"], &rows)
}

/// A registration as `machine registrations -o json|yaml` shows it.
#[derive(Debug, Serialize)]
pub struct RegistrationView<'a> {
    pub mac: &'a str,
    pub uuid: &'a str,
    pub hostname: &'a str,
    pub role: String,
    pub cluster: &'a str,
    pub boot_local: bool,
    pub created: Option<String>,
    pub claimed_by: &'a str,
    pub claimed: Option<String>,
    pub yaml: &'a str,
}

impl<'a> RegistrationView<'a> {
    pub fn new(r: &'a pb::Registration) -> Self {
        Self {
            mac: &r.mac,
            uuid: &r.uuid,
            hostname: &r.hostname,
            role: role_name(r.role).unwrap_or_default(),
            cluster: &r.cluster,
            boot_local: r.boot_local,
            created: rfc3339(r.created_unix_ms),
            claimed_by: &r.claimed_by,
            claimed: rfc3339(r.claimed_unix_ms),
            yaml: &r.yaml,
        }
    }
}

/// The registrations table.
pub fn registrations_table(regs: &[RegistrationView<'_>]) -> String {
    let rows: Vec<Vec<String>> = regs
        .iter()
        .map(|r| {
            vec![
                r.mac.into(),
                r.hostname.into(),
                if r.cluster.is_empty() { String::new() } else { format!("{}/{}", r.cluster, r.role) },
                if r.boot_local { "local".into() } else { "network".into() },
                if r.claimed_by.is_empty() { "-".into() } else { r.claimed_by.into() },
            ]
        })
        .collect();
    table(&["MAC", "HOSTNAME", "CLUSTER/ROLE", "BOOT", "CLAIMED BY"], &rows)
}

/// An apply mode as the wire gives it.
pub fn mode_name(v: i32) -> String {
    convert::apply_mode(v).map_or_else(|_| "unknown".into(), |m| m.as_str().into())
}

/// A generation state as the wire gives it.
pub fn generation_state_name(v: i32) -> String {
    convert::generation_state(v).map_or_else(|_| "unknown".into(), |s| s.as_str().into())
}

/// A resource outcome as the wire gives it.
pub fn outcome_name(v: i32) -> String {
    convert::outcome(v).map_or_else(|_| "unknown".into(), |o| o.as_str().into())
}

/// A config generation as `config history -o json|yaml` shows it.
#[derive(Debug, Serialize)]
pub struct RevisionView<'a> {
    pub generation: u64,
    pub created: Option<String>,
    pub source: &'a str,
    pub mode: String,
    pub state: String,
    /// The generation the node runs now.
    pub running: bool,
    pub yaml: &'a str,
}

impl<'a> RevisionView<'a> {
    pub fn new(v: &'a pb::ConfigRevision, applied: u64) -> Self {
        Self {
            generation: v.generation,
            created: rfc3339(v.created_unix_ms),
            source: &v.source,
            mode: mode_name(v.mode),
            state: generation_state_name(v.state),
            running: v.generation == applied,
            yaml: &v.yaml,
        }
    }
}

/// The history table.
pub fn history_table(revs: &[RevisionView<'_>]) -> String {
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|v| {
            vec![
                v.generation.to_string(),
                v.created.clone().unwrap_or_default(),
                v.source.to_owned(),
                v.mode.clone(),
                v.state.clone(),
                if v.running { "*".into() } else { String::new() },
            ]
        })
        .collect();
    table(&["GENERATION", "CREATED", "SOURCE", "MODE", "STATE", "RUNNING"], &rows)
}

/// A layer revision as `config history --cluster|--role -o json|yaml` shows it.
#[derive(Debug, Serialize)]
pub struct LayerRevisionView<'a> {
    pub revision: u64,
    pub created: Option<String>,
    pub deleted: bool,
    pub yaml: &'a str,
}

impl<'a> LayerRevisionView<'a> {
    pub fn new(r: &'a pb::LayerRevision) -> Self {
        Self { revision: r.revision, created: rfc3339(r.created_unix_ms), deleted: r.deleted, yaml: &r.yaml }
    }
}

/// The layer history table.
pub fn layer_history_table(revs: &[LayerRevisionView<'_>]) -> String {
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|r| {
            vec![
                r.revision.to_string(),
                r.created.clone().unwrap_or_default(),
                if r.deleted { "deleted".into() } else { format!("{} lines", r.yaml.lines().count()) },
            ]
        })
        .collect();
    table(&["REVISION", "CREATED", "CHANGE"], &rows)
}

/// A machine's health as `health -o json|yaml` shows it.
#[derive(Debug, Serialize)]
pub struct HealthView<'a> {
    pub id: &'a str,
    pub hostname: &'a str,
    pub health: &'a str,
    pub reasons: &'a [String],
    pub snapshot: Option<&'a pb::HealthSnapshot>,
}

impl<'a> HealthView<'a> {
    pub fn new(m: &'a pb::Machine) -> Self {
        Self {
            id: &m.id,
            hostname: &m.hostname,
            health: &m.health,
            reasons: &m.health_reasons,
            snapshot: m.health_snapshot.as_ref(),
        }
    }
}

/// The health table.
pub fn health_table(ms: &[pb::Machine]) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.hostname.clone(),
                m.health.clone(),
                if m.health_reasons.is_empty() { "-".into() } else { m.health_reasons.join("; ") },
            ]
        })
        .collect();
    table(&["ID", "HOSTNAME", "HEALTH", "REASONS"], &rows)
}

/// `muster lab status -o json|yaml`: a lab's processes, namespaces and endpoints, each checked.
#[derive(Debug, Serialize)]
pub struct LabStatusView {
    pub dir: String,
    /// `running` (everything the lab recorded is alive), `degraded` (something is down),
    /// `stopped` (nothing is alive: a stale `lab.json`) or `none` (no lab recorded).
    pub state: LabState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<String>,
    /// `netns` (nodes in their own namespaces), `none` (sharing this machine's) or `qemu` (VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    pub processes: Vec<LabProcessView>,
    pub namespaces: Vec<LabNamespaceView>,
    pub endpoints: Vec<LabEndpointView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub musterconfig: Option<String>,
    /// The names of the processes and namespaces that are down.
    pub down: Vec<String>,
}

/// How a lab stands as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabState {
    Running,
    Degraded,
    Stopped,
    None,
}

/// One process a lab recorded.
#[derive(Debug, Serialize)]
pub struct LabProcessView {
    /// `controller`, `lab-node-N`, `lab-vm-N`, `relay`, `monitoring` or `supervisor`.
    pub name: String,
    /// `controller`, `agent`, `vm`, `relay`, `monitoring` or `supervisor` (a foreground `lab up`).
    pub kind: &'static str,
    pub pid: u32,
    pub alive: bool,
}

/// One network namespace a lab made.
#[derive(Debug, Serialize)]
pub struct LabNamespaceView {
    pub name: String,
    pub exists: bool,
}

/// One endpoint of a lab as this machine reaches it.
#[derive(Debug, Serialize)]
pub struct LabEndpointView {
    /// `controller-grpc`, `controller-http` or `monitoring-ui`.
    pub name: &'static str,
    pub url: String,
    /// Whether it answered just now (a TCP connection for gRPC, `/healthz` or `/health` for
    /// HTTP).
    pub reachable: bool,
}

/// `muster lab status` for people.
pub fn lab_status_text(v: &LabStatusView) -> String {
    let mut out = match v.state {
        LabState::None => return format!("no lab in {}\n", v.dir),
        LabState::Running => format!("lab in {}: running\n", v.dir),
        LabState::Degraded => format!("lab in {}: degraded, down: {}\n", v.dir, v.down.join(", ")),
        LabState::Stopped => {
            format!("lab in {}: not running (stale lab.json; `muster lab down` cleans up)\n", v.dir)
        }
    };
    let up = |b: bool, yes: &str, no: &str| if b { yes.to_owned() } else { no.to_owned() };
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .processes
        .iter()
        .map(|p| vec![p.name.clone(), p.kind.to_owned(), p.pid.to_string(), up(p.alive, "up", "down")])
        .collect();
    out.push_str(&table(&["PROCESS", "KIND", "PID", "STATE"], &rows));
    if !v.namespaces.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> =
            v.namespaces.iter().map(|n| vec![n.name.clone(), up(n.exists, "present", "missing")]).collect();
        out.push_str(&table(&["NAMESPACE", "STATE"], &rows));
    }
    if !v.endpoints.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = v
            .endpoints
            .iter()
            .map(|e| vec![e.name.to_owned(), e.url.clone(), up(e.reachable, "reachable", "unreachable")])
            .collect();
        out.push_str(&table(&["ENDPOINT", "URL", "STATE"], &rows));
    }
    if let Some(mc) = v.musterconfig.as_ref().filter(|_| v.state != LabState::Stopped) {
        out.push_str(&format!("\nexport MUSTERCONFIG={mc}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::output::{render, Output};

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
        assert_eq!(lines[0].find("LAST SEEN"), lines[1].find("5s ago"), "each value under its header: {t}");
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

    /// What a node says about itself cannot reach the terminal raw: a hostname with an OSC
    /// sequence and a newline, a label, an inventory string, a failed resource's error.
    #[test]
    fn node_strings_are_escaped_in_tables_and_details() {
        let evil = "\u{1b}]0;pwn\u{7}\nx";
        let mut m = sample();
        m.hostname = evil.into();
        m.labels = [("k".to_owned(), "v\u{9b}2J".to_owned())].into();
        m.health_reasons = vec!["disk \u{1b}[31m/ full".into()];
        m.inventory = Some(pb::Inventory { kernel: "6.1\r\n".into(), ..Default::default() });
        m.config_generation = 1;
        m.config_failures = vec![pb::ResourceStatus {
            resource: "file:/etc/x".into(),
            detail: "bad\u{1b}[2Jthing".into(),
            ..Default::default()
        }];
        let now = UNIX_EPOCH + Duration::from_millis(1_763_856_005_000);
        let table = machines_table(&[m.clone()], now);
        let detail = machine_detail(&m, now);
        let health = health_table(&[m.clone()]);
        for out in [&table, &detail, &health] {
            assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "raw control character in\n{out}");
        }
        assert_eq!(table.lines().count(), 2, "one row, not broken by the newline:\n{table}");
        assert!(table.contains("\\u{1b}]0;pwn\\u{7}\\nx"), "{table}");
        for want in [
            "Hostname:      \\u{1b}]0;pwn\\u{7}\\nx\n",
            "Labels:        k=v\\u{9b}2J\n",
            "Kernel:        6.1\n",
            "failed:      file:/etc/x: bad\\u{1b}[2Jthing\n",
        ] {
            assert!(detail.contains(want), "missing {want:?} in\n{detail}");
        }
        assert!(health.contains("disk \\u{1b}[31m/ full"), "{health}");
        // Columns still line up: the escaped hostname is as wide as it is shown.
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0].find("STATE"), lines[1].find("ready"), "{table}");
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
    fn a_degraded_lab_says_what_is_down() {
        let v = LabStatusView {
            dir: "/l".into(),
            state: LabState::Degraded,
            provisioner: Some("process".into()),
            isolation: Some("netns".into()),
            processes: vec![
                LabProcessView { name: "controller".into(), kind: "controller", pid: 10, alive: true },
                LabProcessView { name: "lab-node-2".into(), kind: "agent", pid: 12, alive: false },
            ],
            namespaces: vec![LabNamespaceView { name: "mlab1r".into(), exists: true }],
            endpoints: vec![LabEndpointView {
                name: "controller-http",
                url: "http://127.0.0.1:1".into(),
                reachable: true,
            }],
            musterconfig: Some("/l/controller/musterconfig".into()),
            down: vec!["lab-node-2".into()],
        };
        let t = lab_status_text(&v);
        assert!(t.starts_with("lab in /l: degraded, down: lab-node-2\n"), "{t}");
        assert!(t.lines().any(|l| l.split_whitespace().eq(["lab-node-2", "agent", "12", "down"])), "{t}");
        assert!(t.lines().any(|l| l.split_whitespace().eq(["mlab1r", "present"])), "{t}");
        assert!(t.ends_with("export MUSTERCONFIG=/l/controller/musterconfig\n"), "{t}");
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["state"], "degraded");
        assert_eq!(j["processes"][1]["alive"], false);
    }
}
