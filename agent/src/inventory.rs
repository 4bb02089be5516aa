//! What the node is: CPU, memory, disks, NICs, SMBIOS identity, kernel, OS. Read from `/proc`,
//! `/sys` and `/etc/os-release`; unreadable files (SMBIOS serials need root) are just empty.
//! Sent once per connection in the hello; the controller records it as hints, never as proof.

use std::fs;
use std::path::{Path, PathBuf};

use muster_machinery::model::normalize_mac;
use muster_proto::pb;

use crate::settings::Hints;

/// Filesystem roots to read from (tests use a fake tree).
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    pub etc_root: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self { proc_root: "/proc".into(), sys_root: "/sys".into(), etc_root: "/etc".into() }
    }
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn sorted_dir(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        fs::read_dir(p).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Collects the inventory, with `hints` overriding the hostname and UUID.
pub fn collect(hints: &Hints) -> pb::Inventory {
    let mut inv = collect_from(&Roots::default(), hints);
    let addrs = interface_addresses();
    for nic in &mut inv.nics {
        if let Some(a) = addrs.get(&nic.name) {
            nic.addresses = a.clone();
        }
    }
    inv
}

/// Each interface's IPv4 and global IPv6 addresses as `ADDRESS/PREFIX`, sorted (getifaddrs).
fn interface_addresses() -> std::collections::BTreeMap<String, Vec<String>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that stays valid until freeifaddrs; every
    // pointer is checked for null and each sockaddr is read as the type its family names.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let (ip, prefix) = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    (
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                        u32::from_be(m.sin_addr.s_addr).count_ones(),
                    )
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                    let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                    if ip.segments()[0] & 0xffc0 == 0xfe80 {
                        continue;
                    }
                    (IpAddr::V6(ip), m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum())
                }
                _ => continue,
            };
            out.entry(name).or_default().push(format!("{ip}/{prefix}"));
        }
        libc::freeifaddrs(head);
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

pub fn collect_from(r: &Roots, hints: &Hints) -> pb::Inventory {
    let cpuinfo = read(r.proc_root.join("cpuinfo"));
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|x| x.split_once(':')).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cpu_count = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let memory_bytes = crate::health::parse_meminfo(&read(r.proc_root.join("meminfo"))).0;
    let dmi = r.sys_root.join("class/dmi/id");
    let mut smbios = pb::Smbios {
        uuid: read(dmi.join("product_uuid")).to_ascii_lowercase(),
        serial: read(dmi.join("product_serial")),
        vendor: read(dmi.join("sys_vendor")),
        product: read(dmi.join("product_name")),
    };
    if let Some(u) = &hints.uuid {
        smbios.uuid = u.to_ascii_lowercase();
    }
    let hostname = hints.hostname.clone().unwrap_or_else(|| read(r.proc_root.join("sys/kernel/hostname")));
    let os = read(r.etc_root.join("os-release"))
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    pb::Inventory {
        hostname,
        cpu_model,
        cpu_count: u32::try_from(cpu_count).unwrap_or(0),
        memory_bytes,
        disks: disks(&r.sys_root.join("block")),
        nics: nics(&r.sys_root.join("class/net")),
        smbios: Some(smbios),
        kernel: read(r.proc_root.join("sys/kernel/osrelease")),
        os,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
    }
}

fn disks(block: &Path) -> Vec<pb::Disk> {
    sorted_dir(block)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "sr", "fd"].iter().any(|x| name.starts_with(x)) {
                return None;
            }
            let sectors: u64 = read(p.join("size")).parse().unwrap_or(0);
            (sectors > 0).then(|| pb::Disk {
                size_bytes: sectors * 512,
                model: read(p.join("device/model")),
                removable: read(p.join("removable")) == "1",
                serial: match read(p.join("serial")) {
                    s if s.is_empty() => read(p.join("device/serial")),
                    s => s,
                },
                name,
            })
        })
        .collect()
}

fn nics(net: &Path) -> Vec<pb::Nic> {
    sorted_dir(net)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let mac = normalize_mac(&read(p.join("address")))?;
            if name == "lo" || mac == "00:00:00:00:00:00" {
                return None;
            }
            Some(pb::Nic { name, mac, addresses: Vec::new() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: PathBuf, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn reads_a_fake_machine() {
        let t = tempfile::tempdir().unwrap();
        let r = Roots {
            proc_root: t.path().join("proc"),
            sys_root: t.path().join("sys"),
            etc_root: t.path().join("etc"),
        };
        write(
            r.proc_root.join("cpuinfo"),
            "processor : 0\nmodel name : Test CPU\nprocessor : 1\nmodel name : Test CPU\n",
        );
        write(r.proc_root.join("meminfo"), "MemTotal: 2048 kB\n");
        write(r.proc_root.join("sys/kernel/hostname"), "box\n");
        write(r.proc_root.join("sys/kernel/osrelease"), "6.1.0-test\n");
        write(r.etc_root.join("os-release"), "NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n");
        write(r.sys_root.join("class/dmi/id/product_uuid"), "4C4C4544-0031-3510-8052-B4C04F4E4B32\n");
        write(r.sys_root.join("block/vda/size"), "2048\n");
        write(r.sys_root.join("block/loop0/size"), "2048\n");
        write(r.sys_root.join("class/net/eth0/address"), "52:54:00:AB:CD:EF\n");
        write(r.sys_root.join("class/net/lo/address"), "00:00:00:00:00:00\n");
        let inv = collect_from(&r, &Hints::default());
        assert_eq!((inv.hostname.as_str(), inv.cpu_model.as_str(), inv.cpu_count), ("box", "Test CPU", 2));
        assert_eq!(inv.memory_bytes, 2048 * 1024);
        assert_eq!(inv.smbios.as_ref().unwrap().uuid, "4c4c4544-0031-3510-8052-b4c04f4e4b32");
        assert_eq!(inv.disks.len(), 1);
        assert_eq!(inv.disks[0].size_bytes, 2048 * 512);
        assert_eq!(inv.nics.len(), 1);
        assert_eq!(inv.nics[0].mac, "52:54:00:ab:cd:ef");
        assert_eq!(inv.os, "Debian GNU/Linux 12 (bookworm)");
        let hinted = collect_from(&r, &Hints { hostname: Some("lab-1".into()), uuid: Some("ABC".into()) });
        assert_eq!((hinted.hostname.as_str(), hinted.smbios.unwrap().uuid.as_str()), ("lab-1", "abc"));
    }

    #[test]
    fn this_machine_does_not_panic() {
        let inv = collect(&Hints::default());
        assert!(inv.cpu_count > 0);
    }
}
