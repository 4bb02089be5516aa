//! Reconcilers: one per kind of output (the hostname, files, sysctls, kernel modules, interfaces
//! and VLANs, name resolution, users, units, time servers), level-triggered and idempotent.
//!
//! Every kind implements [`Resource`], which keeps three steps apart: building what the config
//! wants (pure, [`Resource::desired`]), reading what the node has ([`Resource::observe`]), and
//! changing only what differs ([`Resource::converge`]); an unchanged file is never touched. A
//! pass reports, per resource, whether it was already right, changed, skipped (with why) or
//! failed, and counts writes. All node changes go through [`Effects`].

mod files;
mod hostname;
mod modules;
mod network;
mod sysctls;
mod timeservers;
mod units;
mod users;

use std::collections::BTreeSet;

use muster_machinery::config::MachineConfig;
use muster_machinery::Outcome;
use serde::Serialize;

use crate::baseline::Baseline;
use crate::effects::{EffectError, Effects};

/// How a pass runs: for real or only to report, and with what Muster recorded of the node
/// before it first changed it (the interface reconciler keeps a link's original routes).
#[derive(Clone, Copy, Default)]
pub struct Pass<'a> {
    pub report_only: bool,
    pub baseline: Option<&'a Baseline>,
}

/// What one reconciler found: nothing to do, something changed (or would), or it cannot apply
/// here.
#[derive(Debug)]
pub(crate) enum Found {
    Same,
    Differs,
    Skip(String),
}

impl From<bool> for Found {
    fn from(differs: bool) -> Self {
        if differs {
            Found::Differs
        } else {
            Found::Same
        }
    }
}

impl Found {
    fn differs(&self) -> bool {
        matches!(self, Found::Differs)
    }
}

/// One kind of resource on a node.
pub(crate) trait Resource {
    /// What the config asks for, for one resource.
    type Want;
    /// What the node has for it.
    type Have;
    /// The resources of this kind `cfg` asks for, each with its report name
    /// (`file:/etc/motd`). Pure: a value that cannot be built is that resource's error.
    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<Self::Want, String>)>;
    /// Reads what the node has for `want`.
    fn observe(fx: &dyn Effects, want: &Self::Want) -> Result<Self::Have, String>;
    /// Makes the node match `want`: [`Found::Same`] when `have` already does. Writes nothing
    /// when `pass.report_only`.
    fn converge(
        fx: &dyn Effects,
        want: &Self::Want,
        have: Self::Have,
        pass: &Pass<'_>,
    ) -> Result<Found, String>;
    /// The objects this resource manages, as the baseline names them (`file:/etc/motd`,
    /// `link:eth0`, ...): while a config claims them, they are not restored.
    fn claims(fx: &dyn Effects, want: &Self::Want) -> Vec<String>;
}

/// One resource's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceStatus {
    /// `hostname`, `file:/etc/motd`, `sysctl:net.ipv4.ip_forward`.
    pub resource: String,
    pub outcome: Outcome,
    /// Why it was skipped or failed; empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
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
        self.resources.iter().any(|r| r.outcome == Outcome::Failed)
    }

    /// Whether the node differs from the config somewhere it was told only to report.
    pub fn drifted(&self) -> bool {
        self.resources.iter().any(|r| r.outcome == Outcome::Drifted)
    }

    fn record(&mut self, resource: String, r: Result<Found, String>, report_only: bool) {
        let (outcome, detail) = match r {
            Ok(Found::Same) => (Outcome::Unchanged, String::new()),
            Ok(Found::Skip(why)) => (Outcome::Skipped, why),
            Ok(Found::Differs) if report_only => (Outcome::Drifted, String::new()),
            Ok(Found::Differs) => {
                self.writes += 1;
                (Outcome::Applied, String::new())
            }
            Err(e) => (Outcome::Failed, e),
        };
        self.resources.push(ResourceStatus { resource, outcome, detail });
    }

    /// Runs every resource of kind `R` in `cfg`.
    fn run<R: Resource>(&mut self, cfg: &MachineConfig, fx: &dyn Effects, pass: &Pass<'_>) {
        for (name, want) in R::desired(cfg) {
            let r = want.and_then(|w| {
                let have = R::observe(fx, &w)?;
                R::converge(fx, &w, have, pass)
            });
            self.record(name, r, pass.report_only);
        }
    }

    /// A baseline object put back (or failing to be).
    pub fn restored(&mut self, key: String, r: Result<bool, String>) {
        let (outcome, detail) = match r {
            Ok(true) => {
                self.writes += 1;
                (Outcome::Restored, String::new())
            }
            Ok(false) => (Outcome::Restored, "already as it was".into()),
            Err(e) => (Outcome::Failed, format!("restoring it as it was before Muster: {e}")),
        };
        self.resources.push(ResourceStatus { resource: key, outcome, detail });
    }
}

/// Every kind of resource, in the order a pass runs them (users before files: a file may be
/// owned by a user the same config declares).
macro_rules! each_kind {
    ($m:ident) => {
        $m!(hostname::Hostname);
        $m!(users::Users);
        $m!(files::Files);
        $m!(sysctls::Sysctls);
        $m!(modules::Modules);
        $m!(network::Interfaces);
        $m!(network::Vlans);
        $m!(network::Resolv);
        $m!(units::Units);
        $m!(timeservers::TimeServers);
    };
}

/// Makes the node match `cfg` (or, with `pass.report_only`, says where it does not).
pub fn reconcile(cfg: &MachineConfig, fx: &dyn Effects, pass: &Pass<'_>) -> Report {
    let mut report = Report::default();
    macro_rules! run {
        ($r:ty) => {
            report.run::<$r>(cfg, fx, pass)
        };
    }
    each_kind!(run);
    users::prune(cfg, fx, pass, &mut report);
    report
}

/// The objects `cfg` manages (see [`Resource::claims`]).
pub fn claimed(cfg: &MachineConfig, fx: &dyn Effects) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    macro_rules! claim {
        ($r:ty) => {
            for w in <$r>::desired(cfg).into_iter().filter_map(|(_, w)| w.ok()) {
                out.extend(<$r>::claims(fx, &w));
            }
        };
    }
    each_kind!(claim);
    out
}

/// An effect's error as a resource's failure text.
fn text(e: EffectError) -> String {
    e.to_string()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::{Addr, LinkState, NetState, RouteState};

    type FakeNode = crate::effects::MemoryEffects;

    fn cfg() -> MachineConfig {
        muster_machinery::config::parse(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: node-a\nfiles:\n  - path: /etc/motd\n    content: \"hello\\n\"\n    mode: \"0640\"\n    owner: \"1000:1000\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\n",
        )
        .unwrap()
        .0
    }

    #[test]
    fn applies_then_changes_nothing() {
        let node = FakeNode::default();
        let first = reconcile(&cfg(), &node, &Pass::default());
        assert_eq!(first.writes, 3, "{first:?}");
        assert!(first.resources.iter().all(|r| r.outcome == Outcome::Applied));
        let f = node.files.lock().unwrap()["/etc/motd"].clone();
        assert_eq!((f.content.as_slice(), f.mode, f.uid, f.gid), (&b"hello\n"[..], 0o640, 1000, 1000));
        let second = reconcile(&cfg(), &node, &Pass::default());
        assert_eq!(second.writes, 0);
        assert!(second.resources.iter().all(|r| r.outcome == Outcome::Unchanged), "{second:?}");
    }

    #[test]
    fn report_only_writes_nothing() {
        let node = FakeNode::default();
        let r = reconcile(&cfg(), &node, &Pass { report_only: true, baseline: None });
        assert_eq!(r.writes, 0);
        assert!(r.resources.iter().all(|x| x.outcome == Outcome::Drifted), "{r:?}");
        assert!(node.files.lock().unwrap().is_empty());
        assert_eq!(*node.hostname.lock().unwrap(), "");
        assert!(!r.failed());
    }

    #[test]
    fn a_failed_resource_is_reported_and_the_rest_still_applied() {
        let node = FakeNode { strict_sysctls: true, ..FakeNode::default() };
        let r = reconcile(&cfg(), &node, &Pass::default());
        assert_eq!(r.resources[2].outcome, Outcome::Failed, "{r:?}");
        assert!(r.resources[2].detail.contains("no sysctl"), "{r:?}");
        assert!(r.failed());
        assert_eq!(r.writes, 2, "hostname and file still applied");
    }

    fn parse(y: &str) -> MachineConfig {
        muster_machinery::config::parse(&format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\n{y}"))
            .unwrap()
            .0
    }

    fn a(s: &str) -> Addr {
        network::addr(s.parse().unwrap())
    }

    fn lan_node() -> FakeNode {
        let node = FakeNode::default();
        *node.net.lock().unwrap() = NetState {
            links: vec![LinkState {
                index: 2,
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                mtu: 1500,
                up: false,
                addresses: vec![a("10.0.0.5/24"), a("fe80::1/64")],
                routes: vec![RouteState {
                    to: a("10.9.0.0/16"),
                    via: None,
                    metric: None,
                    protocol: crate::effects::PROTO_BOOT,
                }],
            }],
        };
        node
    }

    #[test]
    fn interface_gets_exactly_its_addresses_routes_and_mtu_then_nothing_to_do() {
        let node = lan_node();
        let c = parse(
            "network:\n  interfaces:\n    - mac: \"52:54:00:12:34:56\"\n      mtu: 9000\n      addresses: [\"192.168.5.20/24\"]\n      routes: [{to: \"0.0.0.0/0\", via: \"192.168.5.1\"}, {to: \"10.1.2.3/8\", via: \"192.168.5.254\"}]\n      vlans: [{id: 10, addresses: [\"192.168.10.2/24\"]}]\n  nameservers: [\"192.168.5.1\"]\n  searchDomains: [lan]\n",
        );
        let r = reconcile(&c, &node, &Pass::default());
        assert!(!r.failed(), "{r:?}");
        let net = node.net.lock().unwrap().clone();
        let eth0 = &net.links[0];
        assert_eq!((eth0.up, eth0.mtu), (true, 9000));
        assert_eq!(
            eth0.addresses,
            vec![a("fe80::1/64"), a("192.168.5.20/24")],
            "old address gone, link-local kept"
        );
        let tos: Vec<String> = eth0.routes.iter().map(|r| r.to.to_string()).collect();
        assert_eq!(
            tos,
            ["10.9.0.0/16", "192.168.5.0/24", "0.0.0.0/0", "10.0.0.0/8"],
            "others' routes kept, the kernel's subnet route with the address, host bits cleared"
        );
        let vlan = net.links.iter().find(|l| l.name == "eth0.10").unwrap();
        assert_eq!(vlan.addresses, vec![a("192.168.10.2/24")]);
        let resolv = node.files.lock().unwrap()["/etc/resolv.conf"].content.clone();
        assert!(String::from_utf8(resolv).unwrap().ends_with("nameserver 192.168.5.1\nsearch lan\n"));
        let again = reconcile(&c, &node, &Pass::default());
        assert_eq!(again.writes, 0, "{again:?}");
    }

    #[test]
    fn a_removed_route_of_ours_goes_and_dhcp_interfaces_keep_their_addresses() {
        let node = lan_node();
        let with = parse("network:\n  interfaces:\n    - name: eth0\n      addresses: [\"10.0.0.5/24\"]\n      routes: [{to: \"10.8.0.0/16\", via: \"10.0.0.1\"}]\n");
        reconcile(&with, &node, &Pass::default());
        let without =
            parse("network:\n  interfaces:\n    - name: eth0\n      addresses: [\"10.0.0.5/24\"]\n");
        reconcile(&without, &node, &Pass::default());
        let routes: Vec<String> =
            node.net.lock().unwrap().links[0].routes.iter().map(|r| r.to.to_string()).collect();
        assert_eq!(routes, ["10.9.0.0/16"]);
        let dhcp = parse("network:\n  interfaces:\n    - name: eth0\n      dhcp: true\n");
        let r = reconcile(&dhcp, &node, &Pass::default());
        assert_eq!(r.writes, 0, "already up; DHCP owns the addresses: {r:?}");
        let missing = parse("network:\n  interfaces:\n    - name: eth9\n      dhcp: true\n");
        let r = reconcile(&missing, &node, &Pass::default());
        assert_eq!(
            (r.resources[0].outcome, r.resources[0].detail.as_str()),
            (Outcome::Failed, "no interface named eth9"),
            "{r:?}"
        );
    }

    #[test]
    fn users_get_accounts_groups_and_keys_once() {
        let node = FakeNode::default();
        node.files.lock().unwrap().insert(
            "/etc/group".into(),
            crate::effects::FileState {
                content: b"root:x:0:\nsudo:x:27:\n".to_vec(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        );
        let c = parse("users:\n  - name: ops\n    groups: [sudo]\n    sshAuthorizedKeys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@lab\"]\n");
        let r = reconcile(&c, &node, &Pass::default());
        assert_eq!(r.resources[0].outcome, Outcome::Applied, "{r:?}");
        let files = node.files.lock().unwrap().clone();
        let text = |p: &str| String::from_utf8(files[p].content.clone()).unwrap();
        assert_eq!(text("/etc/passwd"), "ops:x:1000:1000:managed by muster:/home/ops:/bin/sh\n");
        assert_eq!(text("/etc/group"), "root:x:0:\nsudo:x:27:ops\nops:x:1000:\n");
        assert!(text("/etc/shadow").starts_with("ops:!:"));
        assert_eq!(files["/etc/shadow"].mode, 0o600);
        let keys = &files["/home/ops/.ssh/authorized_keys"];
        assert_eq!((keys.mode, keys.uid, keys.gid), (0o600, 1000, 1000));
        drop(files);
        assert_eq!(reconcile(&c, &node, &Pass::default()).writes, 0);
        let bad = parse("users:\n  - name: ops2\n    groups: [wheel]\n");
        let r = reconcile(&bad, &node, &Pass::default());
        assert_eq!(r.resources[0].outcome, Outcome::Failed, "{r:?}");
        assert!(r.resources[0].detail.contains("group wheel does not exist"), "{r:?}");
    }

    #[test]
    fn units_are_written_reloaded_enabled_and_started_and_modules_loaded() {
        let node = FakeNode::default();
        let c = parse("units:\n  - name: hello.service\n    content: \"[Service]\\nExecStart=/bin/true\\n\"\n    enabled: true\n    started: true\nkernelModules:\n  - name: br_netfilter\ntimeServers: [pool.ntp.org]\n");
        let r = reconcile(&c, &node, &Pass::default());
        assert!(!r.failed(), "{r:?}");
        assert_eq!(
            *node.systemctl_calls.lock().unwrap(),
            [
                "daemon-reload",
                "enable hello.service",
                "start hello.service",
                "try-restart systemd-timesyncd.service"
            ]
        );
        assert!(node.modules.lock().unwrap().contains("br_netfilter"));
        assert!(node.files.lock().unwrap().contains_key("/etc/systemd/system/hello.service"));
        assert_eq!(reconcile(&c, &node, &Pass::default()).writes, 0);
    }

    #[test]
    fn a_mode_change_alone_is_drift() {
        let node = FakeNode::default();
        node.sysctls.lock().unwrap().insert("net.ipv4.ip_forward".into(), "1".into());
        reconcile(&cfg(), &node, &Pass::default());
        node.files.lock().unwrap().get_mut("/etc/motd").unwrap().mode = 0o666;
        let r = reconcile(&cfg(), &node, &Pass::default());
        assert_eq!(r.writes, 1);
        assert_eq!(
            r.resources[1],
            ResourceStatus {
                resource: "file:/etc/motd".into(),
                outcome: Outcome::Applied,
                detail: String::new()
            }
        );
    }
}
