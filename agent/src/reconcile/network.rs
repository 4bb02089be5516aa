//! Networking over the effects' netlink: links up with their MTU, the exact set of static
//! addresses, routes of ours (routes from the kernel, DHCP or other tools are never removed),
//! VLANs; and name resolution in `/etc/resolv.conf`.

use muster_machinery::config::{Interface, IpCidr, MachineConfig, Route, Vlan};

use super::files::write_if_differs;
use super::{text, Found, Pass, Resource};
use crate::baseline::{kernel_managed, Prior};
use crate::effects::{
    Addr, Effects, FileState, LinkState, NetChange, NetState, RouteState, PROTO_KERNEL, PROTO_STATIC,
};

/// Interfaces, by name or MAC.
pub(crate) struct Interfaces;

/// VLANs on their parent interface.
pub(crate) struct Vlans;

/// `/etc/resolv.conf` from nameservers and search domains.
pub(crate) struct Resolv;

fn label(itf: &Interface) -> String {
    itf.name.clone().or_else(|| itf.mac.clone()).unwrap_or_default()
}

impl Resource for Interfaces {
    type Want = Interface;
    type Have = NetState;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<Interface, String>)> {
        let Some(net) = &cfg.network else { return Vec::new() };
        net.interfaces.iter().map(|i| (format!("interface:{}", label(i)), Ok(i.clone()))).collect()
    }

    fn observe(fx: &dyn Effects, _: &Interface) -> Result<NetState, String> {
        fx.network().map_err(text)
    }

    fn converge(fx: &dyn Effects, itf: &Interface, have: NetState, pass: &Pass<'_>) -> Result<Found, String> {
        let report_only = pass.report_only;
        let link = find_link(&have, itf)?;
        let kept = original_routes(pass, link, itf.dhcp, &itf.addresses)?;
        let changes = link_changes(link, itf.mtu, itf.dhcp, &itf.addresses, &itf.routes)?;
        let mut found = apply_changes(fx, changes, report_only)?;
        // The link's original routes that fit its addresses, back where an address change made
        // the kernel drop them (looked at after the changes).
        let now = if found.differs() && !report_only { fx.network().map_err(text)? } else { have.clone() };
        let link = now.links.iter().find(|l| l.index == link.index).ok_or("the link went away")?;
        let missing: Vec<NetChange> = kept
            .into_iter()
            .filter(|k| !link.routes.iter().any(|h| h.to == k.to && h.via == k.via))
            .map(|route| NetChange::AddRoute { index: link.index, route })
            .collect();
        if apply_changes(fx, missing, report_only)?.differs() {
            found = Found::Differs;
        }
        Ok(found)
    }

    fn claims(fx: &dyn Effects, itf: &Interface) -> Vec<String> {
        let Ok(net) = fx.network() else { return Vec::new() };
        find_link(&net, itf).map(|l| vec![format!("link:{}", l.name)]).unwrap_or_default()
    }
}

impl Resource for Vlans {
    type Want = (Interface, Vlan);
    type Have = NetState;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<(Interface, Vlan), String>)> {
        let Some(net) = &cfg.network else { return Vec::new() };
        net.interfaces
            .iter()
            .flat_map(|i| {
                i.vlans
                    .iter()
                    .map(move |v| (format!("vlan:{}.{}", label(i), v.id), Ok((i.clone(), v.clone()))))
            })
            .collect()
    }

    fn observe(fx: &dyn Effects, _: &(Interface, Vlan)) -> Result<NetState, String> {
        fx.network().map_err(text)
    }

    fn converge(
        fx: &dyn Effects,
        (itf, v): &(Interface, Vlan),
        mut state: NetState,
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let report_only = pass.report_only;
        let parent = find_link(&state, itf)?;
        let name = format!("{}.{}", parent.name, v.id);
        let mut created = false;
        if !state.links.iter().any(|l| l.name == name) {
            if report_only {
                return Ok(Found::Differs);
            }
            fx.change_network(&NetChange::AddVlan { parent: parent.index, name: name.clone(), id: v.id })
                .map_err(text)?;
            state = fx.network().map_err(text)?;
            created = true;
        }
        let link = state
            .links
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| format!("VLAN {name} did not appear"))?;
        let found =
            apply_changes(fx, link_changes(link, None, v.dhcp, &v.addresses, &v.routes)?, report_only)?;
        Ok(if created { Found::Differs } else { found })
    }

    fn claims(fx: &dyn Effects, (itf, v): &(Interface, Vlan)) -> Vec<String> {
        let Ok(net) = fx.network() else { return Vec::new() };
        find_link(&net, itf).map(|l| vec![format!("link:{}.{}", l.name, v.id)]).unwrap_or_default()
    }
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

impl Resource for Resolv {
    /// The file's text.
    type Want = String;
    type Have = Option<FileState>;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<String, String>)> {
        let Some(net) = &cfg.network else { return Vec::new() };
        if net.nameservers.is_empty() && net.search_domains.is_empty() {
            return Vec::new();
        }
        let mut text = String::from("# Written by muster-agent from the machine config.\n");
        for ns in &net.nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        if !net.search_domains.is_empty() {
            text.push_str(&format!("search {}\n", net.search_domains.join(" ")));
        }
        vec![("resolv.conf".into(), Ok(text))]
    }

    fn observe(fx: &dyn Effects, _: &String) -> Result<Option<FileState>, String> {
        fx.read_file(RESOLV_CONF).map_err(text)
    }

    fn converge(
        fx: &dyn Effects,
        want: &String,
        have: Option<FileState>,
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let report_only = pass.report_only;
        write_if_differs(fx, RESOLV_CONF, have, want.as_bytes(), 0o644, (0, 0), report_only)
    }

    fn claims(_: &dyn Effects, _: &String) -> Vec<String> {
        vec![format!("file:{RESOLV_CONF}")]
    }
}

/// The routes a link had before Muster first changed it that are not the kernel's or Muster's
/// own (the default route from boot or DHCP, routes added by hand), and that still fit the
/// addresses the config gives it: they are kept, and put back if an address change made the
/// kernel drop them. Only for links whose addresses Muster manages.
fn original_routes(
    pass: &Pass<'_>,
    link: &LinkState,
    dhcp: Option<bool>,
    addresses: &[String],
) -> Result<Vec<RouteState>, String> {
    // Not recorded yet: Muster has not changed this link, so as it is now is how it was.
    let before = match pass.baseline.map(|b| b.get(&format!("link:{}", link.name))) {
        None | Some(Some(Prior::Link { state: None })) => return Ok(Vec::new()),
        Some(Some(Prior::Link { state: Some(before) })) => before,
        Some(_) => link.clone(),
    };
    if dhcp == Some(true) || addresses.is_empty() {
        return Ok(Vec::new());
    }
    let nets: Vec<IpCidr> = addresses.iter().map(|a| a.parse::<IpCidr>()).collect::<Result<_, _>>()?;
    let reachable = |via: &std::net::IpAddr| {
        nets.iter().any(|n| network_of(*n) == network_of(IpCidr { addr: *via, prefix: n.prefix }))
    };
    Ok(before
        .routes
        .into_iter()
        .filter(|r| r.protocol != PROTO_KERNEL && !r.ours())
        .filter(|r| r.via.as_ref().is_some_and(reachable))
        .collect())
}

pub(crate) fn addr(c: IpCidr) -> Addr {
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
            Ok(RouteState { to, via, metric: r.metric, protocol: PROTO_STATIC })
        })
        .collect()
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
        for h in link.routes.iter().filter(|h| h.ours() && !want_routes.iter().any(|w| same(h, w))) {
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
            fx.change_network(c).map_err(text)?;
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
            let m = muster_machinery::model::normalize_mac(m).unwrap_or_else(|| m.to_lowercase());
            state
                .links
                .iter()
                .find(|l| l.mac.as_deref() == Some(m.as_str()))
                .ok_or_else(|| format!("no interface with MAC {m}"))
        }
        (None, None) => Err("the interface has neither name nor mac".into()),
    }
}
