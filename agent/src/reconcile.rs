//! Reconcilers: one per output (the hostname, each file, each sysctl, each module, each
//! interface and VLAN, name resolution, each user, each unit, time servers), level-triggered and
//! idempotent. Each compares what the node has with what the config says and changes only what
//! differs; an unchanged file is not touched. The report says, per resource, whether it was
//! already right, changed, skipped (with why) or failed, and counts writes.

use base64::Engine;
use muster_proto::config::{FileMode, Interface, IpCidr, MachineConfig, Owner, Route, User};
use serde::Serialize;

use crate::effects::{Addr, Effects, LinkState, NetChange, NetState, RouteState};

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
    /// Not applicable on this node (e.g. "systemd not present"); not a failure.
    Skipped(String),
    Failed(String),
}

/// What one reconciler found: nothing to do, something changed (or would), or it cannot apply
/// here.
enum Found {
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
    let mut record = |resource: String, r: Result<Found, String>| {
        let outcome = match r {
            Ok(Found::Same) => Outcome::Unchanged,
            Ok(Found::Skip(why)) => Outcome::Skipped(why),
            Ok(Found::Differs) if report_only => Outcome::Drifted,
            Ok(Found::Differs) => {
                report.writes += 1;
                Outcome::Applied
            }
            Err(e) => Outcome::Failed(e),
        };
        report.resources.push(ResourceStatus { resource, outcome });
    };
    let e = |e: crate::effects::EffectError| e.to_string();
    if let Some(want) = &cfg.hostname {
        let r = (|| {
            if fx.hostname().map_err(e)? == *want {
                return Ok(Found::Same);
            }
            if !report_only {
                fx.set_hostname(want).map_err(e)?;
            }
            Ok(Found::Differs)
        })();
        record("hostname".into(), r);
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
            let (uid, gid) = fx.resolve_owner(&owner.user, owner.group.as_deref()).map_err(e)?;
            ensure_file(fx, &f.path, &content, mode, (uid, gid), report_only)
        })();
        record(format!("file:{}", f.path), r);
    }
    for (key, want) in &cfg.sysctls {
        let r = (|| {
            let have = fx.sysctl(key).map_err(e)?.ok_or_else(|| format!("no sysctl {key} on this kernel"))?;
            // The kernel prints multi-value sysctls with tabs; compare by words.
            if have.split_whitespace().eq(want.split_whitespace()) {
                return Ok(Found::Same);
            }
            if !report_only {
                fx.set_sysctl(key, want).map_err(e)?;
            }
            Ok(Found::Differs)
        })();
        record(format!("sysctl:{key}"), r);
    }
    for m in &cfg.kernel_modules {
        let r = (|| {
            if fx.module_loaded(&m.name).map_err(e)? {
                return Ok(Found::Same);
            }
            if let Err(why) = fx.kernel_owned() {
                return Ok(Found::Skip(why));
            }
            if !report_only {
                fx.load_module(&m.name, &m.parameters).map_err(e)?;
            }
            Ok(Found::Differs)
        })();
        record(format!("module:{}", m.name), r);
    }
    if let Some(net) = &cfg.network {
        if !net.interfaces.is_empty() {
            match fx.network() {
                Ok(mut state) => {
                    for itf in &net.interfaces {
                        let label = itf.name.clone().or_else(|| itf.mac.clone()).unwrap_or_default();
                        let r = interface(fx, &state, itf, report_only);
                        record(format!("interface:{label}"), r);
                        for v in &itf.vlans {
                            let r = vlan(fx, &mut state, itf, v, report_only);
                            record(format!("vlan:{label}.{}", v.id), r);
                        }
                    }
                }
                Err(err) => record("network".into(), Err(err.to_string())),
            }
        }
        if !net.nameservers.is_empty() || !net.search_domains.is_empty() {
            let mut text = String::from("# Written by muster-agent from the machine config.\n");
            for ns in &net.nameservers {
                text.push_str(&format!("nameserver {ns}\n"));
            }
            if !net.search_domains.is_empty() {
                text.push_str(&format!("search {}\n", net.search_domains.join(" ")));
            }
            let r = ensure_file(fx, "/etc/resolv.conf", text.as_bytes(), 0o644, (0, 0), report_only);
            record("resolv.conf".into(), r);
        }
    }
    for u in &cfg.users {
        record(format!("user:{}", u.name), user(fx, u, report_only));
    }
    for u in &cfg.units {
        let r = (|| {
            let mut found = Found::Same;
            if let Some(content) = &u.content {
                let path = format!("/etc/systemd/system/{}", u.name);
                found = ensure_file(fx, &path, content.as_bytes(), 0o644, (0, 0), report_only)?;
            }
            if let Err(why) = fx.systemd() {
                // Only the file was asked for: that much is done.
                return Ok(if u.enabled.is_none() && u.started.is_none() {
                    found
                } else {
                    Found::Skip(format!("{why}: not enabled or started"))
                });
            }
            let file_changed = matches!(found, Found::Differs);
            if file_changed && !report_only {
                fx.systemctl("daemon-reload", None).map_err(e)?;
            }
            let have = fx.unit_state(&u.name).map_err(e)?;
            let mut verbs = Vec::new();
            match u.enabled {
                Some(true) if !have.enabled => verbs.push("enable"),
                Some(false) if have.enabled => verbs.push("disable"),
                _ => {}
            }
            match u.started {
                Some(true) if !have.active => verbs.push("start"),
                Some(true) if file_changed => verbs.push("restart"),
                Some(false) if have.active => verbs.push("stop"),
                _ => {}
            }
            if !report_only {
                for v in &verbs {
                    fx.systemctl(v, Some(&u.name)).map_err(e)?;
                }
            }
            Ok(Found::from(file_changed || !verbs.is_empty()))
        })();
        record(format!("unit:{}", u.name), r);
    }
    if !cfg.time_servers.is_empty() {
        let r = (|| {
            let text = format!(
                "# Written by muster-agent from the machine config.\n[Time]\nNTP={}\n",
                cfg.time_servers.join(" ")
            );
            let found = ensure_file(
                fx,
                "/etc/systemd/timesyncd.conf.d/muster.conf",
                text.as_bytes(),
                0o644,
                (0, 0),
                report_only,
            )?;
            if matches!(found, Found::Differs) && !report_only && fx.systemd().is_ok() {
                fx.systemctl("try-restart", Some("systemd-timesyncd.service")).map_err(e)?;
            }
            Ok(found)
        })();
        record("timeservers".into(), r);
    }
    report
}

/// A file with exactly this content, mode and owner.
fn ensure_file(
    fx: &dyn Effects,
    path: &str,
    content: &[u8],
    mode: u32,
    (uid, gid): (u32, u32),
    report_only: bool,
) -> Result<Found, String> {
    let have = fx.read_file(path).map_err(|e| e.to_string())?;
    if have.as_ref().is_some_and(|h| h.content == content && h.mode == mode && h.uid == uid && h.gid == gid) {
        return Ok(Found::Same);
    }
    if !report_only {
        fx.write_file(path, content, mode, uid, gid).map_err(|e| e.to_string())?;
    }
    Ok(Found::Differs)
}

fn addr(c: IpCidr) -> Addr {
    Addr { ip: c.addr, prefix: c.prefix }
}

/// A route destination with its host bits cleared, as the kernel keeps it.
fn network_of(c: IpCidr) -> Addr {
    let ip = match c.addr {
        std::net::IpAddr::V4(v) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(c.prefix)).unwrap_or(0);
            std::net::IpAddr::V4((u32::from(v) & mask).into())
        }
        std::net::IpAddr::V6(v) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(c.prefix)).unwrap_or(0);
            std::net::IpAddr::V6((u128::from(v) & mask).into())
        }
    };
    Addr { ip, prefix: c.prefix }
}

fn wanted_routes(routes: &[Route]) -> Result<Vec<RouteState>, String> {
    routes
        .iter()
        .map(|r| {
            let to = network_of(r.to.parse::<IpCidr>()?);
            let via =
                r.via.as_deref().map(str::parse).transpose().map_err(|_| "bad via address".to_owned())?;
            Ok(RouteState { to, via, metric: r.metric, ours: true })
        })
        .collect()
}

/// IPv6 link-local and loopback addresses belong to the kernel (bringing `lo` up adds
/// 127.0.0.1/8 and ::1/128 by itself): never removed, added only when declared.
fn kernel_managed(a: &Addr) -> bool {
    match a.ip {
        std::net::IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80 || v.is_loopback(),
        std::net::IpAddr::V4(v) => v.is_loopback(),
    }
}

/// The changes that make `link` carry exactly these addresses (when managed) and routes.
fn link_changes(
    link: &LinkState,
    mtu: Option<u32>,
    dhcp: Option<bool>,
    addresses: &[String],
    routes: &[Route],
) -> Result<Vec<NetChange>, String> {
    // With DHCP the addresses belong to the DHCP client; without a word on addresses, to no one.
    let manage_addresses = dhcp != Some(true) && (!addresses.is_empty() || dhcp == Some(false));
    let index = link.index;
    let want: Vec<Addr> =
        addresses.iter().map(|a| a.parse::<IpCidr>().map(addr)).collect::<Result<_, _>>()?;
    let want_routes = wanted_routes(routes)?;
    let mut out = Vec::new();
    let mtu = mtu.filter(|m| *m != link.mtu);
    if !link.up || mtu.is_some() {
        out.push(NetChange::SetLink { index, up: true, mtu });
    }
    if manage_addresses {
        for a in link.addresses.iter().filter(|a| !want.contains(a) && !kernel_managed(a)) {
            out.push(NetChange::DelAddress { index, addr: *a });
        }
        for a in want.iter().filter(|a| !link.addresses.contains(a)) {
            out.push(NetChange::AddAddress { index, addr: *a });
        }
    }
    let same = |h: &RouteState, w: &RouteState| {
        h.to == w.to && h.via == w.via && (w.metric.is_none() || h.metric == w.metric)
    };
    for w in &want_routes {
        if !link.routes.iter().any(|h| same(h, w)) {
            out.push(NetChange::AddRoute { index, route: w.clone() });
        }
    }
    if manage_addresses {
        for h in link.routes.iter().filter(|h| h.ours && !want_routes.iter().any(|w| same(h, w))) {
            out.push(NetChange::DelRoute { index, route: h.clone() });
        }
    }
    Ok(out)
}

fn apply_changes(fx: &dyn Effects, changes: Vec<NetChange>, report_only: bool) -> Result<Found, String> {
    if changes.is_empty() {
        return Ok(Found::Same);
    }
    if !report_only {
        for c in &changes {
            tracing::info!(change = %c, "network");
            fx.change_network(c).map_err(|e| e.to_string())?;
        }
    }
    Ok(Found::Differs)
}

fn find_link<'a>(state: &'a NetState, itf: &Interface) -> Result<&'a LinkState, String> {
    match (&itf.name, &itf.mac) {
        (Some(n), _) => {
            state.links.iter().find(|l| l.name == *n).ok_or_else(|| format!("no interface named {n}"))
        }
        (None, Some(m)) => {
            let m = muster_proto::model::normalize_mac(m).unwrap_or_else(|| m.to_lowercase());
            state
                .links
                .iter()
                .find(|l| l.mac.as_deref() == Some(m.as_str()))
                .ok_or_else(|| format!("no interface with MAC {m}"))
        }
        (None, None) => Err("the interface has neither name nor mac".into()),
    }
}

fn interface(
    fx: &dyn Effects,
    state: &NetState,
    itf: &Interface,
    report_only: bool,
) -> Result<Found, String> {
    let link = find_link(state, itf)?;
    apply_changes(fx, link_changes(link, itf.mtu, itf.dhcp, &itf.addresses, &itf.routes)?, report_only)
}

fn vlan(
    fx: &dyn Effects,
    state: &mut NetState,
    itf: &Interface,
    v: &muster_proto::config::Vlan,
    report_only: bool,
) -> Result<Found, String> {
    let parent = find_link(state, itf)?;
    let name = format!("{}.{}", parent.name, v.id);
    let mut created = false;
    if !state.links.iter().any(|l| l.name == name) {
        if report_only {
            return Ok(Found::Differs);
        }
        fx.change_network(&NetChange::AddVlan { parent: parent.index, name: name.clone(), id: v.id })
            .map_err(|e| e.to_string())?;
        *state = fx.network().map_err(|e| e.to_string())?;
        created = true;
    }
    let link =
        state.links.iter().find(|l| l.name == name).ok_or_else(|| format!("VLAN {name} did not appear"))?;
    let found = apply_changes(fx, link_changes(link, None, v.dhcp, &v.addresses, &v.routes)?, report_only)?;
    Ok(if created { Found::Differs } else { found })
}

/// Whether a passwd, group or shadow line is `name`'s entry.
fn entry_of(name: &str) -> impl Fn(&String) -> bool + '_ {
    move |l| l.split(':').next() == Some(name)
}

/// A local account: `/etc/passwd`, `/etc/group`, `/etc/shadow` (password locked) and the SSH
/// authorized keys, all under the effects' root.
fn user(fx: &dyn Effects, u: &User, report_only: bool) -> Result<Found, String> {
    let e = |e: crate::effects::EffectError| e.to_string();
    // Each file keeps its mode and owner (Debian's shadow is root:shadow 0640); new ones are
    // root's, and shadow is private.
    let read = |p: &str, new_mode: u32| -> Result<(String, u32, (u32, u32)), String> {
        Ok(fx
            .read_file(p)
            .map_err(e)?
            .filter(|f| f.mode != 0)
            .map_or((String::new(), new_mode, (0, 0)), |f| {
                (String::from_utf8_lossy(&f.content).into_owned(), f.mode, (f.uid, f.gid))
            }))
    };
    let (passwd, passwd_mode, passwd_owner) = read("/etc/passwd", 0o644)?;
    let (group, group_mode, group_owner) = read("/etc/group", 0o644)?;
    let (shadow, shadow_mode, shadow_owner) = read("/etc/shadow", 0o600)?;
    let fields = |l: &str| l.split(':').map(str::to_owned).collect::<Vec<_>>();
    let ids =
        |text: &str| -> Vec<u32> { text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect() };
    let next_free = |taken: &[u32]| (1000..60000).find(|i| !taken.contains(i)).unwrap_or(60000);

    let mut p_lines: Vec<String> = passwd.lines().map(str::to_owned).collect();
    let mut g_lines: Vec<String> = group.lines().map(str::to_owned).collect();
    let mut s_lines: Vec<String> = shadow.lines().map(str::to_owned).collect();
    let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".into());
    let home = format!("/home/{}", u.name);

    // The primary group, named after the user.
    let gid = match g_lines.iter().find(|l| entry_of(&u.name)(l)).map(|l| fields(l)) {
        Some(f) => f
            .get(2)
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| format!("/etc/group: bad entry for {}", u.name))?,
        None => {
            let taken = ids(&group);
            let gid = u.uid.filter(|id| !taken.contains(id)).unwrap_or_else(|| next_free(&taken));
            g_lines.push(format!("{}:x:{gid}:", u.name));
            gid
        }
    };
    let uid = match p_lines.iter().position(entry_of(&u.name)) {
        Some(i) => {
            let mut f = fields(&p_lines[i]);
            f.resize(7, String::new());
            let have_uid: u32 = f[2].parse().map_err(|_| format!("/etc/passwd: bad uid for {}", u.name))?;
            let uid = u.uid.unwrap_or(have_uid);
            if u.shell.is_some() {
                f[6].clone_from(&shell);
            }
            f[2] = uid.to_string();
            p_lines[i] = f.join(":");
            uid
        }
        None => {
            let taken = ids(&passwd);
            if let Some(id) = u.uid.filter(|id| taken.contains(id)) {
                return Err(format!("uid {id} is already taken in /etc/passwd"));
            }
            let uid = u.uid.unwrap_or_else(|| next_free(&taken));
            p_lines.push(format!("{}:x:{uid}:{gid}::{home}:{shell}", u.name));
            uid
        }
    };
    if !s_lines.iter().any(entry_of(&u.name)) {
        s_lines.push(format!("{}:!::0:99999:7:::", u.name));
    }
    for g in &u.groups {
        let i = g_lines
            .iter()
            .position(entry_of(g))
            .ok_or_else(|| format!("group {g} does not exist on this node"))?;
        let mut f = fields(&g_lines[i]);
        f.resize(4, String::new());
        let mut members: Vec<String> = f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
        if !members.contains(&u.name) {
            members.push(u.name.clone());
            f[3] = members.join(",");
            g_lines[i] = f.join(":");
        }
    }
    let text = |lines: Vec<String>| {
        let mut t = lines.join("\n");
        t.push('\n');
        t
    };
    let mut differs = false;
    for (path, lines, mode, owner) in [
        ("/etc/group", g_lines, group_mode, group_owner),
        ("/etc/passwd", p_lines, passwd_mode, passwd_owner),
        ("/etc/shadow", s_lines, shadow_mode, shadow_owner),
    ] {
        let found = ensure_file(fx, path, text(lines).as_bytes(), mode, owner, report_only)?;
        differs |= matches!(found, Found::Differs);
    }
    if !u.ssh_authorized_keys.is_empty() {
        let keys = text(u.ssh_authorized_keys.clone());
        let path = format!("{home}/.ssh/authorized_keys");
        let found = ensure_file(fx, &path, keys.as_bytes(), 0o600, (uid, gid), report_only)?;
        differs |= matches!(found, Found::Differs);
    }
    Ok(Found::from(differs))
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
        let node = FakeNode { strict_sysctls: true, ..FakeNode::default() };
        let r = reconcile(&cfg(), &node, false);
        assert!(matches!(&r.resources[2].outcome, Outcome::Failed(m) if m.contains("no sysctl")), "{r:?}");
        assert!(r.failed());
        assert_eq!(r.writes, 2, "hostname and file still applied");
    }

    fn parse(y: &str) -> MachineConfig {
        muster_proto::config::parse(&format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\n{y}"))
            .unwrap()
            .0
    }

    fn a(s: &str) -> Addr {
        addr(s.parse().unwrap())
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
                routes: vec![RouteState { to: a("10.9.0.0/16"), via: None, metric: None, ours: false }],
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
        let r = reconcile(&c, &node, false);
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
        assert_eq!(tos, ["10.9.0.0/16", "0.0.0.0/0", "10.0.0.0/8"], "others' routes kept, host bits cleared");
        let vlan = net.links.iter().find(|l| l.name == "eth0.10").unwrap();
        assert_eq!(vlan.addresses, vec![a("192.168.10.2/24")]);
        let resolv = node.files.lock().unwrap()["/etc/resolv.conf"].content.clone();
        assert!(String::from_utf8(resolv).unwrap().ends_with("nameserver 192.168.5.1\nsearch lan\n"));
        let again = reconcile(&c, &node, false);
        assert_eq!(again.writes, 0, "{again:?}");
    }

    #[test]
    fn a_removed_route_of_ours_goes_and_dhcp_interfaces_keep_their_addresses() {
        let node = lan_node();
        let with = parse("network:\n  interfaces:\n    - name: eth0\n      addresses: [\"10.0.0.5/24\"]\n      routes: [{to: \"10.8.0.0/16\", via: \"10.0.0.1\"}]\n");
        reconcile(&with, &node, false);
        let without =
            parse("network:\n  interfaces:\n    - name: eth0\n      addresses: [\"10.0.0.5/24\"]\n");
        reconcile(&without, &node, false);
        let routes: Vec<String> =
            node.net.lock().unwrap().links[0].routes.iter().map(|r| r.to.to_string()).collect();
        assert_eq!(routes, ["10.9.0.0/16"]);
        let dhcp = parse("network:\n  interfaces:\n    - name: eth0\n      dhcp: true\n");
        let r = reconcile(&dhcp, &node, false);
        assert_eq!(r.writes, 0, "already up; DHCP owns the addresses: {r:?}");
        let missing = parse("network:\n  interfaces:\n    - name: eth9\n      dhcp: true\n");
        let r = reconcile(&missing, &node, false);
        assert!(
            matches!(&r.resources[0].outcome, Outcome::Failed(m) if m == "no interface named eth9"),
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
        let r = reconcile(&c, &node, false);
        assert_eq!(r.resources[0].outcome, Outcome::Applied, "{r:?}");
        let files = node.files.lock().unwrap().clone();
        let text = |p: &str| String::from_utf8(files[p].content.clone()).unwrap();
        assert_eq!(text("/etc/passwd"), "ops:x:1000:1000::/home/ops:/bin/sh\n");
        assert_eq!(text("/etc/group"), "root:x:0:\nsudo:x:27:ops\nops:x:1000:\n");
        assert!(text("/etc/shadow").starts_with("ops:!:"));
        assert_eq!(files["/etc/shadow"].mode, 0o600);
        let keys = &files["/home/ops/.ssh/authorized_keys"];
        assert_eq!((keys.mode, keys.uid, keys.gid), (0o600, 1000, 1000));
        drop(files);
        assert_eq!(reconcile(&c, &node, false).writes, 0);
        let bad = parse("users:\n  - name: ops2\n    groups: [wheel]\n");
        let r = reconcile(&bad, &node, false);
        assert!(
            matches!(&r.resources[0].outcome, Outcome::Failed(m) if m.contains("group wheel does not exist")),
            "{r:?}"
        );
    }

    #[test]
    fn units_are_written_reloaded_enabled_and_started_and_modules_loaded() {
        let node = FakeNode::default();
        let c = parse("units:\n  - name: hello.service\n    content: \"[Service]\\nExecStart=/bin/true\\n\"\n    enabled: true\n    started: true\nkernelModules:\n  - name: br_netfilter\ntimeServers: [pool.ntp.org]\n");
        let r = reconcile(&c, &node, false);
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
        assert_eq!(reconcile(&c, &node, false).writes, 0);
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
