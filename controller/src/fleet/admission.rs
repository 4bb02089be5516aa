//! Who may become a machine, and how fast. A join token proves the caller may enroll; what it
//! says about itself (its MACs, its hostname) is only a claim. This module holds what the
//! controller can check beyond that claim, and the limits on what a public boot token can cost:
//!
//! - **MAC evidence.** A registration is given to a machine only when the controller can tell
//!   that the enrolling client is the machine with the registered MAC: its own neighbour (ARP)
//!   table maps the connection's source address to that MAC (the client is on a LAN segment the
//!   controller is on), or the operator has said to trust reported MACs from the source's
//!   network (`--trust-reported-macs CIDR`, for routed or NATed networks such as QEMU's user
//!   networking). Otherwise the claim waits for `muster approve`.
//! - **Rate.** Enrollments per source address are limited by a token bucket.
//! - **Pending caps.** Machines waiting for approval are capped per token and in total.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Instant;

use muster_machinery::model::normalize_mac;

/// An IP network, `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = addr.parse().map_err(|_| format!("{s:?}: not an IP network like 10.0.0.0/8"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
        };
        Ok(Self { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Admission limits and trust.
#[derive(Debug, Clone)]
pub struct AdmissionOptions {
    /// Machines waiting for approval, in total.
    pub max_pending: usize,
    /// Machines waiting for approval that one token admitted.
    pub max_pending_per_token: usize,
    /// Enrollments one source address may make at once...
    pub enroll_burst: u32,
    /// ...and then per minute.
    pub enroll_per_minute: u32,
    /// Source networks whose clients' reported MACs are taken as evidence (routed or NATed
    /// networks where the controller cannot see the client's MAC itself).
    pub trust_reported_macs: Vec<Cidr>,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        Self {
            max_pending: 1000,
            max_pending_per_token: 200,
            enroll_burst: 60,
            enroll_per_minute: 60,
            trust_reported_macs: Vec::new(),
        }
    }
}

/// Why the controller vouches for a reported MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The controller's neighbour table maps the client's address to it.
    Neighbour,
    /// The client's address is in a network the operator trusts (`--trust-reported-macs`).
    TrustedNetwork,
}

impl Evidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Evidence::Neighbour => "neighbour table",
            Evidence::TrustedNetwork => "trusted network",
        }
    }
}

/// What the controller knows about a client's MACs: the ones it vouches for, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vouched {
    pub macs: Vec<String>,
    pub evidence: Option<Evidence>,
}

impl Vouched {
    pub fn contains(&self, mac: &str) -> bool {
        self.macs.iter().any(|m| m == mac)
    }
}

/// The reported MACs of a client at `peer` that the controller can vouch for.
pub fn vouch(opts: &AdmissionOptions, peer: Option<IpAddr>, reported: &[String]) -> Vouched {
    let Some(peer) = peer.map(|p| p.to_canonical()) else {
        return Vouched::default();
    };
    if opts.trust_reported_macs.iter().any(|c| c.contains(peer)) {
        return Vouched { macs: reported.to_vec(), evidence: Some(Evidence::TrustedNetwork) };
    }
    let seen = match peer {
        IpAddr::V4(v4) => std::fs::read_to_string("/proc/net/arp").ok().and_then(|t| arp_lookup(&t, v4)),
        // The kernel's IPv6 neighbours are only in netlink; not read here (see the README).
        IpAddr::V6(_) => None,
    };
    match seen {
        Some(mac) if reported.contains(&mac) => {
            Vouched { macs: vec![mac], evidence: Some(Evidence::Neighbour) }
        }
        _ => Vouched::default(),
    }
}

/// The MAC of a complete entry for `ip` in `/proc/net/arp`'s text.
pub fn arp_lookup(table: &str, ip: Ipv4Addr) -> Option<String> {
    const ATF_COM: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [addr, _hw_type, flags, mac, ..] = f.as_slice() else {
            return None;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        (addr.parse::<Ipv4Addr>().ok()? == ip && flags & ATF_COM != 0).then_some(())?;
        normalize_mac(mac).filter(|m| m != "00:00:00:00:00:00")
    })
}

/// Enrollments per source address: a token bucket each.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Addresses remembered at most; beyond that, full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    /// Takes one enrollment for `peer`; `Err(seconds)` until the next is allowed.
    pub fn take(&self, opts: &AdmissionOptions, peer: IpAddr, now: Instant) -> Result<(), u64> {
        let burst = f64::from(opts.enroll_burst.max(1));
        let per_sec = f64::from(opts.enroll_per_minute.max(1)) / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = buckets.entry(peer.to_canonical()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            // Whole seconds, rounded up, and at least one.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let wait = ((1.0 - *tokens) / per_sec).ceil().max(1.0) as u64;
            Err(wait)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ARP: &str = "IP address       HW type     Flags       HW address            Mask     Device
10.77.0.10       0x1         0x2         52:54:00:aa:00:01     *        mbr0
10.77.0.11       0x1         0x0         00:00:00:00:00:00     *        mbr0
10.77.0.12       0x1         0x2         02:AB:00:00:00:0c     *        mbr0
";

    #[test]
    fn arp_lookup_takes_complete_entries_only() {
        assert_eq!(arp_lookup(ARP, "10.77.0.10".parse().unwrap()).as_deref(), Some("52:54:00:aa:00:01"));
        assert_eq!(arp_lookup(ARP, "10.77.0.11".parse().unwrap()), None, "incomplete");
        assert_eq!(arp_lookup(ARP, "10.77.0.12".parse().unwrap()).as_deref(), Some("02:ab:00:00:00:0c"));
        assert_eq!(arp_lookup(ARP, "10.77.0.13".parse().unwrap()), None);
        assert_eq!(arp_lookup("garbage\n1 2\n", "10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.77.0.0/24".parse().unwrap();
        assert!(c.contains("10.77.0.9".parse().unwrap()));
        assert!(c.contains("::ffff:10.77.0.9".parse().unwrap()), "IPv4-mapped");
        assert!(!c.contains("10.78.0.9".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!("127.0.0.1".parse::<Cidr>().unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/-1", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reported_macs_are_vouched_for_only_with_evidence() {
        let mut opts = AdmissionOptions::default();
        let reported = vec!["52:54:00:aa:00:01".to_owned()];
        // Loopback has no neighbour entries: nothing to vouch with.
        assert_eq!(vouch(&opts, Some("127.0.0.1".parse().unwrap()), &reported), Vouched::default());
        assert_eq!(vouch(&opts, None, &reported), Vouched::default());
        opts.trust_reported_macs = vec!["127.0.0.0/8".parse().unwrap()];
        let v = vouch(&opts, Some("127.0.0.1".parse().unwrap()), &reported);
        assert_eq!(v.evidence, Some(Evidence::TrustedNetwork));
        assert!(v.contains("52:54:00:aa:00:01"));
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_refills() {
        let opts = AdmissionOptions { enroll_burst: 3, enroll_per_minute: 60, ..Default::default() };
        let r = RateLimiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            r.take(&opts, a, t0).unwrap();
        }
        assert_eq!(r.take(&opts, a, t0), Err(1));
        r.take(&opts, b, t0).unwrap();
        r.take(&opts, a, t0 + Duration::from_secs(1)).unwrap();
        assert!(r.take(&opts, a, t0 + Duration::from_secs(1)).is_err());
    }
}
