//! Reconcilers: one per output (the hostname, each file, each sysctl), level-triggered and
//! idempotent. Each compares what the node has with what the config says and changes only what
//! differs; an unchanged file is not touched. The report says, per resource, whether it was
//! already right, changed, or failed, and counts writes.

use base64::Engine;
use muster_proto::config::{FileMode, MachineConfig, Owner};
use serde::Serialize;

use crate::effects::Effects;

/// What happened to one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "outcome", content = "detail")]
pub enum Outcome {
    /// Already as configured.
    Unchanged,
    /// Changed to match.
    Applied,
    /// Differs, but the drift policy says only report (nothing written).
    Drifted,
    /// Had drifted and was put back (by a drift pass).
    Corrected,
    Failed(String),
}

/// One resource's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceStatus {
    /// `hostname`, `file:/etc/motd`, `sysctl:net.ipv4.ip_forward`.
    pub resource: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The result of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub resources: Vec<ResourceStatus>,
    /// How many writes the pass made (0 when the node already matched).
    pub writes: usize,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.resources.iter().any(|r| matches!(r.outcome, Outcome::Failed(_)))
    }
}

/// Makes the node match `cfg` (or, with `report_only`, says where it does not).
pub fn reconcile(cfg: &MachineConfig, fx: &dyn Effects, report_only: bool) -> Report {
    let mut report = Report::default();
    let record = |resource: String, r: Result<bool, String>, report: &mut Report| {
        let outcome = match r {
            Ok(false) => Outcome::Unchanged,
            Ok(true) if report_only => Outcome::Drifted,
            Ok(true) => {
                report.writes += 1;
                Outcome::Applied
            }
            Err(e) => Outcome::Failed(e),
        };
        report.resources.push(ResourceStatus { resource, outcome });
    };
    if let Some(want) = &cfg.hostname {
        let r = (|| {
            let have = fx.hostname().map_err(|e| e.to_string())?;
            if have == *want {
                return Ok(false);
            }
            if !report_only {
                fx.set_hostname(want).map_err(|e| e.to_string())?;
            }
            Ok(true)
        })();
        record("hostname".into(), r, &mut report);
    }
    for f in &cfg.files {
        let r = (|| {
            let content = match (&f.content, &f.content_base64) {
                (Some(c), _) => c.as_bytes().to_vec(),
                (None, Some(b)) => {
                    base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| e.to_string())?
                }
                (None, None) => Vec::new(),
            };
            let mode = f.mode.as_deref().unwrap_or("0644").parse::<FileMode>()?.0;
            let owner = f.owner.as_deref().unwrap_or("root").parse::<Owner>()?;
            let (uid, gid) =
                fx.resolve_owner(&owner.user, owner.group.as_deref()).map_err(|e| e.to_string())?;
            let have = fx.read_file(&f.path).map_err(|e| e.to_string())?;
            let same = have
                .as_ref()
                .is_some_and(|h| h.content == content && h.mode == mode && h.uid == uid && h.gid == gid);
            if same {
                return Ok(false);
            }
            if !report_only {
                fx.write_file(&f.path, &content, mode, uid, gid).map_err(|e| e.to_string())?;
            }
            Ok(true)
        })();
        record(format!("file:{}", f.path), r, &mut report);
    }
    for (key, want) in &cfg.sysctls {
        let r = (|| {
            let have = fx
                .sysctl(key)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no sysctl {key} on this kernel"))?;
            // The kernel prints multi-value sysctls with tabs; compare by words.
            if have.split_whitespace().eq(want.split_whitespace()) {
                return Ok(false);
            }
            if !report_only {
                fx.set_sysctl(key, want).map_err(|e| e.to_string())?;
            }
            Ok(true)
        })();
        record(format!("sysctl:{key}"), r, &mut report);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    type FakeNode = crate::effects::MemoryEffects;

    fn cfg() -> MachineConfig {
        muster_proto::config::parse(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: node-a\nfiles:\n  - path: /etc/motd\n    content: \"hello\\n\"\n    mode: \"0640\"\n    owner: \"1000:1000\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\n",
        )
        .unwrap()
        .0
    }

    #[test]
    fn applies_then_changes_nothing() {
        let node = FakeNode::default();
        let first = reconcile(&cfg(), &node, false);
        assert_eq!(first.writes, 3, "{first:?}");
        assert!(first.resources.iter().all(|r| r.outcome == Outcome::Applied));
        let f = node.files.lock().unwrap()["/etc/motd"].clone();
        assert_eq!((f.content.as_slice(), f.mode, f.uid, f.gid), (&b"hello\n"[..], 0o640, 1000, 1000));
        let second = reconcile(&cfg(), &node, false);
        assert_eq!(second.writes, 0);
        assert!(second.resources.iter().all(|r| r.outcome == Outcome::Unchanged), "{second:?}");
    }

    #[test]
    fn report_only_writes_nothing() {
        let node = FakeNode::default();
        let r = reconcile(&cfg(), &node, true);
        assert_eq!(r.writes, 0);
        assert!(r.resources.iter().all(|x| x.outcome == Outcome::Drifted), "{r:?}");
        assert!(node.files.lock().unwrap().is_empty());
        assert_eq!(*node.hostname.lock().unwrap(), "");
        assert!(!r.failed());
    }

    #[test]
    fn a_failed_resource_is_reported_and_the_rest_still_applied() {
        struct NoSysctls(FakeNode);
        impl Effects for NoSysctls {
            fn hostname(&self) -> Result<String, crate::effects::EffectError> {
                self.0.hostname()
            }
            fn set_hostname(&self, n: &str) -> Result<(), crate::effects::EffectError> {
                self.0.set_hostname(n)
            }
            fn read_file(
                &self,
                p: &str,
            ) -> Result<Option<crate::effects::FileState>, crate::effects::EffectError> {
                self.0.read_file(p)
            }
            fn write_file(
                &self,
                p: &str,
                c: &[u8],
                m: u32,
                u: u32,
                g: u32,
            ) -> Result<(), crate::effects::EffectError> {
                self.0.write_file(p, c, m, u, g)
            }
            fn resolve_owner(
                &self,
                u: &str,
                g: Option<&str>,
            ) -> Result<(u32, u32), crate::effects::EffectError> {
                self.0.resolve_owner(u, g)
            }
            fn sysctl(&self, _: &str) -> Result<Option<String>, crate::effects::EffectError> {
                Ok(None)
            }
            fn set_sysctl(&self, k: &str, v: &str) -> Result<(), crate::effects::EffectError> {
                self.0.set_sysctl(k, v)
            }
        }
        let node = NoSysctls(FakeNode::default());
        let r = reconcile(&cfg(), &node, false);
        assert!(matches!(&r.resources[2].outcome, Outcome::Failed(m) if m.contains("no sysctl")), "{r:?}");
        assert!(r.failed());
        assert_eq!(r.writes, 2, "hostname and file still applied");
    }

    #[test]
    fn a_mode_change_alone_is_drift() {
        let node = FakeNode::default();
        node.sysctls.lock().unwrap().insert("net.ipv4.ip_forward".into(), "1".into());
        reconcile(&cfg(), &node, false);
        node.files.lock().unwrap().get_mut("/etc/motd").unwrap().mode = 0o666;
        let r = reconcile(&cfg(), &node, false);
        assert_eq!(r.writes, 1);
        assert_eq!(
            r.resources[1],
            ResourceStatus { resource: "file:/etc/motd".into(), outcome: Outcome::Applied }
        );
    }
}
