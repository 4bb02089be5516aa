//! Conversions between the wire messages and Muster's vocabulary. Enum values arrive as `i32`;
//! an unknown (or, where a value is required, unspecified) one is a [`WireError`] naming the
//! field, never a guess.

use muster_machinery::health as h;
use muster_machinery::{ApplyMode, ConfirmPolicy, GenerationState, Outcome, Role, State};

use crate::pb;

/// An enum value this side does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: unknown value {value}")]
pub struct WireError {
    pub field: &'static str,
    pub value: i32,
}

fn known<T>(field: &'static str, value: i32, v: Option<T>) -> Result<T, WireError> {
    v.ok_or(WireError { field, value })
}

impl From<Role> for pb::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::None => pb::Role::Unspecified,
            Role::Controlplane => pb::Role::Controlplane,
            Role::Worker => pb::Role::Worker,
        }
    }
}

impl From<pb::Role> for Role {
    fn from(r: pb::Role) -> Self {
        match r {
            pb::Role::Unspecified => Role::None,
            pb::Role::Controlplane => Role::Controlplane,
            pb::Role::Worker => Role::Worker,
        }
    }
}

/// A role from its wire value (0: no role).
pub fn role(v: i32) -> Result<Role, WireError> {
    known("role", v, pb::Role::try_from(v).ok().map(Role::from))
}

impl From<State> for pb::MachineState {
    fn from(s: State) -> Self {
        match s {
            State::Pending => pb::MachineState::Pending,
            State::Ready => pb::MachineState::Ready,
            State::Unreachable => pb::MachineState::Unreachable,
            State::Revoked => pb::MachineState::Revoked,
        }
    }
}

/// A machine state from its wire value.
pub fn state(v: i32) -> Result<State, WireError> {
    let s = match pb::MachineState::try_from(v).ok() {
        Some(pb::MachineState::Pending) => Some(State::Pending),
        Some(pb::MachineState::Ready) => Some(State::Ready),
        Some(pb::MachineState::Unreachable) => Some(State::Unreachable),
        Some(pb::MachineState::Revoked) => Some(State::Revoked),
        Some(pb::MachineState::Unspecified) | None => None,
    };
    known("state", v, s)
}

impl From<ApplyMode> for pb::ApplyMode {
    fn from(m: ApplyMode) -> Self {
        match m {
            ApplyMode::Auto => pb::ApplyMode::Auto,
            ApplyMode::Try => pb::ApplyMode::Try,
            ApplyMode::Staged => pb::ApplyMode::Staged,
        }
    }
}

impl From<pb::ApplyMode> for ApplyMode {
    fn from(m: pb::ApplyMode) -> Self {
        match m {
            pb::ApplyMode::Auto => ApplyMode::Auto,
            pb::ApplyMode::Try => ApplyMode::Try,
            pb::ApplyMode::Staged => ApplyMode::Staged,
        }
    }
}

/// An apply mode from its wire value.
pub fn apply_mode(v: i32) -> Result<ApplyMode, WireError> {
    known("mode", v, pb::ApplyMode::try_from(v).ok().map(ApplyMode::from))
}

/// An optional apply mode (absent: the controller's policy decides).
pub fn opt_apply_mode(v: Option<i32>) -> Result<Option<ApplyMode>, WireError> {
    v.map(apply_mode).transpose()
}

impl From<ConfirmPolicy> for pb::ConfirmPolicy {
    fn from(c: ConfirmPolicy) -> Self {
        match c {
            ConfirmPolicy::Auto => pb::ConfirmPolicy::Auto,
            ConfirmPolicy::Manual => pb::ConfirmPolicy::Manual,
        }
    }
}

/// A confirm policy from its wire value.
pub fn confirm_policy(v: i32) -> Result<ConfirmPolicy, WireError> {
    let c = match pb::ConfirmPolicy::try_from(v).ok() {
        Some(pb::ConfirmPolicy::Auto) => Some(ConfirmPolicy::Auto),
        Some(pb::ConfirmPolicy::Manual) => Some(ConfirmPolicy::Manual),
        None => None,
    };
    known("confirm", v, c)
}

impl From<GenerationState> for pb::GenerationState {
    fn from(s: GenerationState) -> Self {
        match s {
            GenerationState::Pending => pb::GenerationState::Pending,
            GenerationState::Applied => pb::GenerationState::Applied,
            GenerationState::Trying => pb::GenerationState::Trying,
            GenerationState::Staged => pb::GenerationState::Staged,
            GenerationState::Reverted => pb::GenerationState::Reverted,
            GenerationState::Failed => pb::GenerationState::Failed,
        }
    }
}

/// A generation state from its wire value (unspecified is refused).
pub fn generation_state(v: i32) -> Result<GenerationState, WireError> {
    let s = match pb::GenerationState::try_from(v).ok() {
        Some(pb::GenerationState::Pending) => Some(GenerationState::Pending),
        Some(pb::GenerationState::Applied) => Some(GenerationState::Applied),
        Some(pb::GenerationState::Trying) => Some(GenerationState::Trying),
        Some(pb::GenerationState::Staged) => Some(GenerationState::Staged),
        Some(pb::GenerationState::Reverted) => Some(GenerationState::Reverted),
        Some(pb::GenerationState::Failed) => Some(GenerationState::Failed),
        Some(pb::GenerationState::Unspecified) | None => None,
    };
    known("state", v, s)
}

impl From<Outcome> for pb::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Unchanged => pb::Outcome::Unchanged,
            Outcome::Applied => pb::Outcome::Applied,
            Outcome::Drifted => pb::Outcome::Drifted,
            Outcome::Corrected => pb::Outcome::Corrected,
            Outcome::Skipped => pb::Outcome::Skipped,
            Outcome::Failed => pb::Outcome::Failed,
            Outcome::Restored => pb::Outcome::Restored,
        }
    }
}

/// A resource outcome from its wire value (unspecified is refused).
pub fn outcome(v: i32) -> Result<Outcome, WireError> {
    let o = match pb::Outcome::try_from(v).ok() {
        Some(pb::Outcome::Unchanged) => Some(Outcome::Unchanged),
        Some(pb::Outcome::Applied) => Some(Outcome::Applied),
        Some(pb::Outcome::Drifted) => Some(Outcome::Drifted),
        Some(pb::Outcome::Corrected) => Some(Outcome::Corrected),
        Some(pb::Outcome::Skipped) => Some(Outcome::Skipped),
        Some(pb::Outcome::Failed) => Some(Outcome::Failed),
        Some(pb::Outcome::Restored) => Some(Outcome::Restored),
        Some(pb::Outcome::Unspecified) | None => None,
    };
    known("outcome", v, o)
}

impl From<h::HealthSnapshot> for pb::HealthSnapshot {
    fn from(s: h::HealthSnapshot) -> Self {
        pb::HealthSnapshot {
            cpu_usage_percent: s.cpu_usage_percent,
            load1: s.load1,
            load5: s.load5,
            load15: s.load15,
            memory_total_bytes: s.memory_total_bytes,
            memory_available_bytes: s.memory_available_bytes,
            swap_total_bytes: s.swap_total_bytes,
            swap_free_bytes: s.swap_free_bytes,
            filesystems: s
                .filesystems
                .into_iter()
                .map(|f| pb::FilesystemUsage {
                    mount_point: f.mount_point,
                    device: f.device,
                    fs_type: f.fs_type,
                    size_bytes: f.size_bytes,
                    available_bytes: f.available_bytes,
                })
                .collect(),
            networks: s
                .networks
                .into_iter()
                .map(|n| pb::NetworkCounters {
                    interface: n.interface,
                    rx_bytes: n.rx_bytes,
                    tx_bytes: n.tx_bytes,
                    rx_errors: n.rx_errors,
                    tx_errors: n.tx_errors,
                })
                .collect(),
            uptime_seconds: s.uptime_seconds,
            boot_time_unix: s.boot_time_unix,
            temperatures: s
                .temperatures
                .into_iter()
                .map(|t| pb::Temperature { sensor: t.sensor, celsius: t.celsius })
                .collect(),
            services: s
                .services
                .into_iter()
                .map(|c| pb::ServiceCheck { name: c.name, up: c.up, detail: c.detail })
                .collect(),
            cpu_count: s.cpu_count,
            clock_offset_ms: s.clock_offset_ms,
        }
    }
}

impl From<pb::HealthSnapshot> for h::HealthSnapshot {
    fn from(s: pb::HealthSnapshot) -> Self {
        h::HealthSnapshot {
            cpu_usage_percent: s.cpu_usage_percent,
            load1: s.load1,
            load5: s.load5,
            load15: s.load15,
            memory_total_bytes: s.memory_total_bytes,
            memory_available_bytes: s.memory_available_bytes,
            swap_total_bytes: s.swap_total_bytes,
            swap_free_bytes: s.swap_free_bytes,
            filesystems: s
                .filesystems
                .into_iter()
                .map(|f| h::FilesystemUsage {
                    mount_point: f.mount_point,
                    device: f.device,
                    fs_type: f.fs_type,
                    size_bytes: f.size_bytes,
                    available_bytes: f.available_bytes,
                })
                .collect(),
            networks: s
                .networks
                .into_iter()
                .map(|n| h::NetworkCounters {
                    interface: n.interface,
                    rx_bytes: n.rx_bytes,
                    tx_bytes: n.tx_bytes,
                    rx_errors: n.rx_errors,
                    tx_errors: n.tx_errors,
                })
                .collect(),
            uptime_seconds: s.uptime_seconds,
            boot_time_unix: s.boot_time_unix,
            temperatures: s
                .temperatures
                .into_iter()
                .map(|t| h::Temperature { sensor: t.sensor, celsius: t.celsius })
                .collect(),
            services: s
                .services
                .into_iter()
                .map(|c| h::ServiceCheck { name: c.name, up: c.up, detail: c.detail })
                .collect(),
            cpu_count: s.cpu_count,
            clock_offset_ms: s.clock_offset_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_crosses_the_wire_and_back() {
        for r in [Role::None, Role::Controlplane, Role::Worker] {
            assert_eq!(role(pb::Role::from(r) as i32), Ok(r));
        }
        for s in [State::Pending, State::Ready, State::Unreachable, State::Revoked] {
            assert_eq!(state(pb::MachineState::from(s) as i32), Ok(s));
        }
        for m in ApplyMode::ALL {
            assert_eq!(apply_mode(pb::ApplyMode::from(*m) as i32), Ok(*m));
        }
        for s in GenerationState::ALL {
            assert_eq!(generation_state(pb::GenerationState::from(*s) as i32), Ok(*s));
        }
        for o in Outcome::ALL {
            assert_eq!(outcome(pb::Outcome::from(*o) as i32), Ok(*o));
        }
        for c in ConfirmPolicy::ALL {
            assert_eq!(confirm_policy(pb::ConfirmPolicy::from(*c) as i32), Ok(*c));
        }
    }

    #[test]
    fn unknown_and_unspecified_values_are_named_errors() {
        assert_eq!(role(99), Err(WireError { field: "role", value: 99 }));
        assert!(state(0).is_err());
        assert!(generation_state(0).is_err());
        assert!(outcome(0).is_err());
        assert_eq!(opt_apply_mode(None), Ok(None));
        assert!(opt_apply_mode(Some(7)).is_err());
        let e = outcome(42).unwrap_err().to_string();
        assert_eq!(e, "outcome: unknown value 42");
    }

    #[test]
    fn health_snapshots_convert_losslessly() {
        let s = h::HealthSnapshot {
            cpu_usage_percent: 12.5,
            filesystems: vec![h::FilesystemUsage {
                mount_point: "/".into(),
                size_bytes: 9,
                ..Default::default()
            }],
            networks: vec![h::NetworkCounters {
                interface: "eth0".into(),
                rx_bytes: 3,
                ..Default::default()
            }],
            temperatures: vec![h::Temperature { sensor: "cpu".into(), celsius: 40.0 }],
            services: vec![h::ServiceCheck { name: "k3s".into(), up: true, detail: String::new() }],
            clock_offset_ms: -5,
            ..Default::default()
        };
        assert_eq!(h::HealthSnapshot::from(pb::HealthSnapshot::from(s.clone())), s);
    }
}
