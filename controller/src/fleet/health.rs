//! The health model: a machine is `healthy`, `degraded`, `unhealthy` or `unreachable`, with the
//! reasons, judged from its liveness, its latest health snapshot and its certificate.
//!
//! Defaults (all configurable on `muster-controller serve`):
//!
//! | check | degraded at | unhealthy at |
//! | --- | --- | --- |
//! | filesystem used | > 90 % | > 98 % |
//! | memory used | > 95 % | > 99 % |
//! | 1-minute load | > 2 × CPU count | |
//! | a service check | down | |
//! | clock offset to the controller | > 2 s | |
//! | client certificate | expires within 2 h | expired |
//! | heartbeat | | 3 missed: `unreachable` |

use std::fmt;
use std::time::Duration;

use muster_machinery::health as h;
use muster_machinery::model::State;
use muster_machinery::{GenerationState, Outcome};
use serde::Serialize;

use crate::store::ConfigState;

/// A machine's health status, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
    Unreachable,
}

impl HealthStatus {
    pub const ALL: [HealthStatus; 4] =
        [HealthStatus::Healthy, HealthStatus::Degraded, HealthStatus::Unhealthy, HealthStatus::Unreachable];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
            HealthStatus::Unreachable => "unreachable",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Thresholds of the health model.
#[derive(Debug, Clone)]
pub struct Thresholds {
    pub disk_degraded_percent: f64,
    pub disk_unhealthy_percent: f64,
    pub memory_degraded_percent: f64,
    pub memory_unhealthy_percent: f64,
    pub load_per_cpu: f64,
    pub clock_skew: Duration,
    pub cert_expiry_warning: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            disk_degraded_percent: 90.0,
            disk_unhealthy_percent: 98.0,
            memory_degraded_percent: 95.0,
            memory_unhealthy_percent: 99.0,
            load_per_cpu: 2.0,
            clock_skew: Duration::from_secs(2),
            cert_expiry_warning: Duration::from_secs(2 * 3600),
        }
    }
}

/// The verdict and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub status: HealthStatus,
    pub reasons: Vec<String>,
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// What is wrong with a machine's config, one line each: a current generation that failed
/// (as a whole, or per failing resource) or that its agent reverted.
pub fn config_problems(c: &ConfigState) -> Vec<String> {
    let g = c.generation;
    let mut out = Vec::new();
    if g == 0 {
        return out;
    }
    match c.state {
        GenerationState::Failed => {
            if !c.error.is_empty() {
                out.push(format!("config generation {g} failed: {}", c.error));
            }
            for r in c.resources.iter().filter(|r| r.outcome == Outcome::Failed) {
                out.push(format!("config generation {g}: {} failed: {}", r.resource, r.detail));
            }
            if out.is_empty() {
                out.push(format!("config generation {g} failed"));
            }
        }
        GenerationState::Reverted => out.push(format!(
            "config generation {g} was reverted (not confirmed in time); the node runs generation {}",
            c.applied_generation
        )),
        GenerationState::Pending
        | GenerationState::Applied
        | GenerationState::Trying
        | GenerationState::Staged => {
            // A drift pass can report failures while the generation itself applied.
            for r in c.resources.iter().filter(|r| r.outcome == Outcome::Failed) {
                out.push(format!("config generation {g}: {} failed: {}", r.resource, r.detail));
            }
        }
    }
    out
}

/// Judges one machine. `last_seen_ms`/`heartbeat_ms` explain an unreachable verdict;
/// `config_problems` (see [`config_problems`]) make it degraded.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    state: State,
    snapshot: Option<&h::HealthSnapshot>,
    cert_not_after_ms: i64,
    last_seen_ms: i64,
    now_ms: i64,
    config_problems: Vec<String>,
    th: &Thresholds,
) -> Health {
    let mut status = HealthStatus::Healthy;
    let mut reasons = Vec::new();
    let mut flag = |s: HealthStatus, why: String| {
        status = status.max(s);
        reasons.push(why);
    };
    for p in config_problems {
        flag(HealthStatus::Degraded, p);
    }
    match state {
        State::Revoked => {
            return Health { status: HealthStatus::Unreachable, reasons: vec!["certificate revoked".into()] };
        }
        State::Unreachable => {
            let silent = Duration::from_millis(u64::try_from(now_ms - last_seen_ms).unwrap_or(0));
            let why = if last_seen_ms > 0 {
                format!("no heartbeat for {} (3 or more missed)", human(silent))
            } else {
                "never heard from".to_owned()
            };
            flag(HealthStatus::Unreachable, why);
        }
        State::Pending | State::Ready => {}
    }
    if cert_not_after_ms > 0 {
        if cert_not_after_ms <= now_ms {
            flag(HealthStatus::Unhealthy, "client certificate has expired".into());
        } else {
            let left = Duration::from_millis(u64::try_from(cert_not_after_ms - now_ms).unwrap_or(0));
            if left < th.cert_expiry_warning {
                flag(HealthStatus::Degraded, format!("client certificate expires in {}", human(left)));
            }
        }
    }
    let Some(s) = snapshot else {
        return Health { status, reasons };
    };
    for fs in &s.filesystems {
        let used = percent(fs.size_bytes.saturating_sub(fs.available_bytes), fs.size_bytes);
        if used > th.disk_unhealthy_percent {
            flag(HealthStatus::Unhealthy, format!("filesystem {} is {used:.0}% full", fs.mount_point));
        } else if used > th.disk_degraded_percent {
            flag(HealthStatus::Degraded, format!("filesystem {} is {used:.0}% full", fs.mount_point));
        }
    }
    let mem = percent(s.memory_total_bytes.saturating_sub(s.memory_available_bytes), s.memory_total_bytes);
    if mem > th.memory_unhealthy_percent {
        flag(HealthStatus::Unhealthy, format!("memory is {mem:.0}% used"));
    } else if mem > th.memory_degraded_percent {
        flag(HealthStatus::Degraded, format!("memory is {mem:.0}% used"));
    }
    if s.cpu_count > 0 && s.load1 > th.load_per_cpu * f64::from(s.cpu_count) {
        flag(
            HealthStatus::Degraded,
            format!("load {:.1} is over {} × {} CPUs", s.load1, th.load_per_cpu, s.cpu_count),
        );
    }
    for svc in s.services.iter().filter(|svc| !svc.up) {
        let detail = if svc.detail.is_empty() { String::new() } else { format!(" ({})", svc.detail) };
        flag(HealthStatus::Degraded, format!("service {} is down{detail}", svc.name));
    }
    let skew = Duration::from_millis(s.clock_offset_ms.unsigned_abs());
    if skew > th.clock_skew {
        flag(HealthStatus::Degraded, format!("clock is off by {:.1}s", skew.as_secs_f64()));
    }
    Health { status, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000_000;
    const DAY_MS: i64 = 86_400_000;

    fn snap() -> h::HealthSnapshot {
        h::HealthSnapshot {
            cpu_count: 4,
            load1: 1.0,
            memory_total_bytes: 1000,
            memory_available_bytes: 500,
            filesystems: vec![h::FilesystemUsage {
                mount_point: "/".into(),
                size_bytes: 100,
                available_bytes: 50,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn eval(state: State, s: Option<&h::HealthSnapshot>) -> Health {
        evaluate(state, s, NOW + DAY_MS, NOW - 1000, NOW, Vec::new(), &Thresholds::default())
    }

    #[test]
    fn table() {
        let healthy = snap();
        let mut full = snap();
        full.filesystems[0].available_bytes = 5;
        let mut very_full = snap();
        very_full.filesystems[0].available_bytes = 1;
        let mut mem = snap();
        mem.memory_available_bytes = 40;
        let mut load = snap();
        load.load1 = 8.5;
        let mut svc = snap();
        svc.services = vec![h::ServiceCheck { name: "k3s".into(), up: false, detail: "inactive".into() }];
        let mut skew = snap();
        skew.clock_offset_ms = -2500;
        let cases: Vec<(&str, State, Option<&h::HealthSnapshot>, HealthStatus, &str)> = vec![
            ("all fine", State::Ready, Some(&healthy), HealthStatus::Healthy, ""),
            ("no snapshot yet", State::Ready, None, HealthStatus::Healthy, ""),
            ("disk 95%", State::Ready, Some(&full), HealthStatus::Degraded, "filesystem / is 95% full"),
            ("disk 99%", State::Ready, Some(&very_full), HealthStatus::Unhealthy, "filesystem / is 99% full"),
            ("memory 96%", State::Ready, Some(&mem), HealthStatus::Degraded, "memory is 96% used"),
            ("load", State::Ready, Some(&load), HealthStatus::Degraded, "load 8.5 is over 2 × 4 CPUs"),
            (
                "service down",
                State::Ready,
                Some(&svc),
                HealthStatus::Degraded,
                "service k3s is down (inactive)",
            ),
            ("clock skew", State::Ready, Some(&skew), HealthStatus::Degraded, "clock is off by 2.5s"),
            (
                "silent",
                State::Unreachable,
                Some(&healthy),
                HealthStatus::Unreachable,
                "no heartbeat for 1s (3 or more missed)",
            ),
            ("revoked", State::Revoked, Some(&full), HealthStatus::Unreachable, "certificate revoked"),
        ];
        for (name, state, s, want, reason) in cases {
            let h = eval(state, s);
            assert_eq!(h.status, want, "{name}: {h:?}");
            if reason.is_empty() {
                assert!(h.reasons.is_empty(), "{name}: {h:?}");
            } else {
                assert_eq!(h.reasons, [reason], "{name}");
            }
        }
    }

    #[test]
    fn certificate_expiry() {
        let th = Thresholds::default();
        let soon = evaluate(State::Ready, None, NOW + 3_600_000, NOW, NOW, Vec::new(), &th);
        assert_eq!(soon.status, HealthStatus::Degraded);
        assert_eq!(soon.reasons, ["client certificate expires in 1h"]);
        let gone = evaluate(State::Ready, None, NOW - 1, NOW, NOW, Vec::new(), &th);
        assert_eq!(gone.status, HealthStatus::Unhealthy);
    }

    #[test]
    fn worst_reason_wins_and_all_are_listed() {
        let mut s = snap();
        s.filesystems[0].available_bytes = 1;
        s.load1 = 100.0;
        let h = eval(State::Ready, Some(&s));
        assert_eq!(h.status, HealthStatus::Unhealthy);
        assert_eq!(h.reasons.len(), 2);
    }

    #[test]
    fn a_failed_or_reverted_generation_degrades_the_machine_with_its_resources() {
        use crate::store::ResourceRecord;
        let mut c = ConfigState { generation: 3, applied_generation: 2, ..Default::default() };
        c.state = GenerationState::Failed;
        c.resources = vec![
            ResourceRecord { resource: "hostname".into(), outcome: Outcome::Applied, detail: String::new() },
            ResourceRecord {
                resource: "file:/etc/x".into(),
                outcome: Outcome::Failed,
                detail: "EACCES".into(),
            },
        ];
        let p = config_problems(&c);
        assert_eq!(p, ["config generation 3: file:/etc/x failed: EACCES"]);
        let h = evaluate(State::Ready, None, NOW + DAY_MS, NOW, NOW, p, &Thresholds::default());
        assert_eq!(h.status, HealthStatus::Degraded);
        c.state = GenerationState::Reverted;
        assert!(config_problems(&c)[0].contains("reverted"));
        c.state = GenerationState::Applied;
        c.resources.clear();
        assert!(config_problems(&c).is_empty());
        assert!(config_problems(&ConfigState::default()).is_empty(), "no config, no problem");
    }
}
