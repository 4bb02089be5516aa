//! What a node reports about its health with each heartbeat, as the agent collects it and the
//! controller judges it. The wire form is `muster.v1.HealthSnapshot`; `muster-proto` converts.

use serde::{Deserialize, Serialize};

/// One health snapshot of a node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthSnapshot {
    /// CPU busy share over all cores since the previous snapshot, 0..100.
    pub cpu_usage_percent: f32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub filesystems: Vec<FilesystemUsage>,
    pub networks: Vec<NetworkCounters>,
    pub uptime_seconds: u64,
    pub boot_time_unix: i64,
    pub temperatures: Vec<Temperature>,
    pub services: Vec<ServiceCheck>,
    pub cpu_count: u32,
    /// Agent clock minus controller clock, estimated from heartbeat round trips (milliseconds).
    pub clock_offset_ms: i64,
}

/// A mounted filesystem's size and free space.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FilesystemUsage {
    pub mount_point: String,
    pub device: String,
    pub fs_type: String,
    pub size_bytes: u64,
    pub available_bytes: u64,
}

/// Byte and error counters of one interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkCounters {
    pub interface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// One temperature sensor.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Temperature {
    pub sensor: String,
    pub celsius: f32,
}

/// A systemd unit or process the machine config (or the agent's flags) says must be running.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceCheck {
    pub name: String,
    pub up: bool,
    pub detail: String,
}
