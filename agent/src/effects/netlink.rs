//! Links, addresses and routes over rtnetlink, for [`super::LinuxEffects`].
//!
//! The reconcilers are synchronous, and may run on a tokio worker; each call here runs its
//! netlink conversation on a short-lived thread with its own current-thread runtime (the thread
//! shares the process's network namespace), so it never nests runtimes.

use std::io;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkVlan, RouteMessageBuilder};

use super::{Addr, LinkState, NetChange, NetState, RouteState};

/// Runs `f` with a netlink handle on a thread of its own and waits for it.
fn with_handle<T, F, Fut>(f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                let conn = tokio::spawn(conn);
                let out = f(handle).await.map_err(to_io);
                conn.abort();
                out
            })
        })
        .join()
        .map_err(|_| io::Error::other("the netlink thread panicked"))?
    })
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()),
            None => io::Error::other(m.to_string()),
        },
        other => io::Error::other(other.to_string()),
    }
}

fn link_state(m: &LinkMessage) -> LinkState {
    let mut l = LinkState {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..LinkState::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(b) if b.len() == 6 => {
                l.mac = Some(b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":"));
            }
            _ => {}
        }
    }
    l
}

fn addr_of(m: &AddressMessage) -> Option<Addr> {
    // IFA_LOCAL is the interface's own address on point-to-point links; prefer it.
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => addr = Some(*ip),
            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
            _ => {}
        }
    }
    addr.map(|ip| Addr { ip, prefix: m.header.prefix_len })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn route_state(m: &RouteMessage) -> Option<(u32, RouteState)> {
    let mut table = u32::from(m.header.table);
    let (mut to, mut via, mut oif, mut metric) = (None, None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => to = ip_of(d),
            RouteAttribute::Gateway(g) => via = ip_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let to = match to {
        Some(ip) => ip,
        None if m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        }
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    Some((
        oif?,
        RouteState {
            to: Addr { ip: to, prefix: m.header.destination_prefix_length },
            via,
            metric,
            protocol: u8::from(m.header.protocol),
        },
    ))
}

/// Every link with its addresses and main-table routes.
pub fn snapshot() -> io::Result<NetState> {
    with_handle(|h| async move {
        let mut links: Vec<LinkState> =
            h.link().get().execute().map_ok(|m| link_state(&m)).try_collect().await?;
        let addrs: Vec<AddressMessage> = h.address().get().execute().try_collect().await?;
        for a in &addrs {
            if let (Some(l), Some(ad)) = (links.iter_mut().find(|l| l.index == a.header.index), addr_of(a)) {
                l.addresses.push(ad);
            }
        }
        for req in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = h.route().get(req).execute().try_collect().await?;
            for r in &routes {
                if let Some((oif, st)) = route_state(r) {
                    if let Some(l) = links.iter_mut().find(|l| l.index == oif) {
                        l.routes.push(st);
                    }
                }
            }
        }
        Ok(NetState { links })
    })
}

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

fn route_message(index: u32, r: &RouteState) -> io::Result<RouteMessage> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.to.ip, r.to.prefix)
        .map_err(bad)?
        .output_interface(index)
        .protocol(RouteProtocol::from(r.protocol))
        .table_id(u32::from(RouteHeader::RT_TABLE_MAIN));
    b = match r.via {
        Some(g) => b.gateway(g).map_err(bad)?,
        None => b.scope(RouteScope::Link),
    };
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    Ok(b.build())
}

/// Makes one change.
pub fn apply(change: &NetChange) -> io::Result<()> {
    let adding_address = matches!(change, NetChange::AddAddress { .. });
    match apply_inner(change) {
        // The address is there already: bringing a link up can add it (the kernel puts
        // 127.0.0.1/8 on `lo` by itself), which is the state wanted.
        Err(e) if adding_address && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

fn apply_inner(change: &NetChange) -> io::Result<()> {
    let route = match change {
        NetChange::AddRoute { index, route } | NetChange::DelRoute { index, route } => {
            Some(route_message(*index, route)?)
        }
        _ => None,
    };
    let change = change.clone();
    with_handle(move |h| async move {
        match change {
            NetChange::SetLink { index, up, mtu } => {
                let mut b = LinkUnspec::new_with_index(index);
                if let Some(m) = mtu {
                    b = b.mtu(m);
                }
                b = if up { b.up() } else { b.down() };
                h.link().set(b.build()).execute().await
            }
            NetChange::AddAddress { index, addr } => {
                h.address().add(index, addr.ip, addr.prefix).execute().await
            }
            NetChange::DelAddress { index, addr } => {
                let msgs: Vec<AddressMessage> =
                    h.address().get().set_link_index_filter(index).execute().try_collect().await?;
                for m in msgs {
                    if addr_of(&m) == Some(addr) {
                        h.address().del(m).execute().await?;
                    }
                }
                Ok(())
            }
            NetChange::AddRoute { .. } => match route {
                Some(m) => h.route().add(m).execute().await,
                None => Ok(()),
            },
            NetChange::DelRoute { .. } => match route {
                Some(mut m) => {
                    // Match whatever protocol and scope the kernel has it under.
                    m.header.protocol = RouteProtocol::Unspec;
                    m.header.scope = RouteScope::NoWhere;
                    h.route().del(m).execute().await
                }
                None => Ok(()),
            },
            NetChange::DelLink { index } => h.link().del(index).execute().await,
            NetChange::AddVlan { parent, name, id } => {
                h.link().add(LinkVlan::new(&name, parent, id).up().build()).execute().await
            }
        }
    })
}
