//! Networking over the effects' netlink: links up with their MTU, the exact set of static
//! addresses, routes of ours (routes from the kernel, DHCP or other tools are never removed),
//! VLANs; and name resolution in `/etc/resolv.conf`.

use muster_machinery::config::{Interface, IpCidr, MachineConfig, Route, Vlan};

use super::files::write_if_differs;
use super::{text, Found, Resource};
use crate::effects::{Addr, Effects, FileState, LinkState, NetChange, NetState, RouteState};

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

    fn converge(
        fx: &dyn Effects,
        itf: &Interface,
        have: NetState,
        report_only: bool,
    ) -> Result<Found, String> {
        let link = find_link(&have, itf)?;
        apply_changes(fx, link_changes(link, itf.mtu, itf.dhcp, &itf.addresses, &itf.routes)?, report_only)
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
        report_only: bool,
    ) -> Result<Found, String> {
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
        report_only: bool,
    ) -> Result<Found, String> {
        write_if_differs(fx, RESOLV_CONF, have, want.as_bytes(), 0o644, (0, 0), report_only)
    }
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
