//! The config's types. Field names are part of the contract (`hostname`, `files[].path`,
//! `files[].content`, `files[].mode`, `sysctls`, `network.interfaces[].name|mac`,
//! `.addresses`, `.routes[].to|via`, `network.nameservers`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a machine should look like.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineConfig {
    /// Always `muster/v1alpha1`.
    pub api_version: String,
    /// Always `MachineConfig`.
    pub kind: String,
    /// The node's hostname (RFC 1123).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Files the node must have, with content, mode and owner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Kernel parameters under /proc/sys, e.g. `net.ipv4.ip_forward: "1"`. Values are text; a
    /// number is taken as its decimal text (`vm.swappiness: 10` is "10") and true/false as
    /// "1"/"0", as the kernel writes booleans.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "sysctl_values")]
    #[schemars(schema_with = "sysctl_values_schema")]
    pub sysctls: BTreeMap<String, String>,
    /// Network interfaces, routes and DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Kernel modules to load, with parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_modules: Vec<KernelModule>,
    /// Local users and their SSH keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// systemd units: content, enabled, started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
    /// NTP servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_servers: Vec<String>,
    /// Labels for the node's Kubernetes Node object. Accepted and kept; they take effect when
    /// Muster joins the machine to its Kubernetes cluster (not done yet: nothing applies them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// systemd units or processes that must be running: checked with every heartbeat, like the
    /// agent's `--service-check`; one that is down makes the machine `degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_checks: Vec<String>,
    /// What to do when the node drifts from this config: `correct` (default) or `report`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
}

/// A sysctl value as written: text, a number or a boolean.
#[derive(Deserialize)]
#[serde(untagged)]
enum SysctlValue {
    Text(String),
    Bool(bool),
    Number(serde_json::Number),
}

impl From<SysctlValue> for String {
    fn from(v: SysctlValue) -> Self {
        match v {
            SysctlValue::Text(s) => s,
            SysctlValue::Bool(b) => if b { "1" } else { "0" }.to_owned(),
            SysctlValue::Number(n) => n.to_string(),
        }
    }
}

fn sysctl_values<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, SysctlValue>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k, v.into())).collect())
}

fn sysctl_values_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "type": ["string", "number", "boolean"] }
    })
}

/// Drift handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Report drift and put things back.
    #[default]
    Correct,
    /// Only report drift.
    Report,
}

/// One managed file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSpec {
    /// Absolute path.
    pub path: String,
    /// Text content (exclusive with `contentBase64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Binary content, base64 (exclusive with `content`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Octal mode as a string, e.g. "0644" (default "0644").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `user`, `user:group` or `uid:gid` (default root:root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Networking.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// DNS search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_domains: Vec<String>,
}

/// One interface, matched by `name` or by `mac`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Interface {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Get an address by DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// Static addresses in CIDR form, e.g. 192.168.5.20/24. When given (or with `dhcp: false`)
    /// the interface carries exactly these: other addresses are removed, except the kernel's
    /// own link-local and loopback ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Routes through this interface. Routes Muster added that are no longer declared are
    /// removed; routes from the kernel, DHCP or other tools are left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<Vlan>,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// Destination in CIDR form (0.0.0.0/0 for the default route).
    pub to: String,
    /// Gateway address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// A VLAN on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Vlan {
    /// VLAN id, 1-4094.
    pub id: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// A kernel module.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KernelModule {
    pub name: String,
    /// `key=value` parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<String>,
}

/// A local user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

/// A systemd unit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Unit {
    /// Unit name with its type suffix, e.g. `k3s.service`.
    pub name: String,
    /// Unit file content; omitted for units the OS ships.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
}
