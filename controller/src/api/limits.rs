//! What one client may hold on the controller's listeners: connection caps (in all and per
//! client address, for each listener apart) and the timeouts that free what idle or slow
//! clients hold. The HTTP listener (`http.rs`) and the gRPC/TLS listener (`tls.rs`) both take a
//! [`ConnPermit`] from their [`ConnLimiter`] before they serve a connection; a connection over
//! either cap is closed at once.
//!
//! Caps default to shares of the process's open-files limit, so that neither listener can take
//! the descriptors the other (or the store) needs: the gRPC listener half of it, the HTTP
//! listener a quarter (an HTTP connection may hold an asset file open too), one client address
//! a quarter of a listener's cap.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::Metrics;

/// Descriptors kept out of the listeners' shares: the store, logs, UDP sockets, the data dir.
const RESERVED_FDS: u64 = 128;

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once from one client address (an IPv6 client: its /64); 0: no such cap
    /// (e.g. every agent behind one NAT address).
    pub max_per_address: usize,
}

/// How the listeners protect themselves. `None` caps are derived from the open-files limit
/// when the controller starts ([`NetLimits::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLimits {
    /// At least 1.
    pub grpc_max_connections: Option<usize>,
    pub grpc_max_per_address: Option<usize>,
    /// At least 1.
    pub http_max_connections: Option<usize>,
    pub http_max_per_address: Option<usize>,
    /// gRPC: from accepting a connection to a finished TLS handshake and the client's HTTP/2
    /// preface.
    pub handshake_timeout: Duration,
    /// gRPC: a connection with no call in progress for this long is closed.
    pub grpc_idle_timeout: Duration,
    /// HTTP: from accepting a connection, or from the end of the previous response on a
    /// kept-alive one, to a complete request head: bounds idle and slow-header connections.
    pub http_header_timeout: Duration,
    /// HTTP: a response write that makes no progress for this long (a client that stopped
    /// reading) ends the connection.
    pub http_write_timeout: Duration,
    /// HTTP: the largest request head (request line and headers); larger gets `431`.
    pub http_max_header_bytes: usize,
    /// gRPC: the largest HTTP/2 header list a client may send.
    pub grpc_max_header_bytes: u32,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            grpc_max_connections: None,
            grpc_max_per_address: None,
            http_max_connections: None,
            http_max_per_address: None,
            handshake_timeout: Duration::from_secs(10),
            grpc_idle_timeout: Duration::from_secs(300),
            http_header_timeout: Duration::from_secs(10),
            http_write_timeout: Duration::from_secs(30),
            http_max_header_bytes: 16 * 1024,
            grpc_max_header_bytes: 16 * 1024,
        }
    }
}

/// [`NetLimits`] with every cap decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLimits {
    pub grpc: ListenerLimits,
    pub http: ListenerLimits,
    pub handshake_timeout: Duration,
    pub grpc_idle_timeout: Duration,
    pub http_header_timeout: Duration,
    pub http_write_timeout: Duration,
    pub http_max_header_bytes: usize,
    pub grpc_max_header_bytes: u32,
}

impl NetLimits {
    /// The caps for a process that may open `open_files` descriptors, where not set.
    pub fn resolve(&self, open_files: u64) -> ResolvedLimits {
        let budget = usize::try_from(open_files.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        let grpc_max = self.grpc_max_connections.unwrap_or((budget / 2).clamp(16, 1 << 20)).max(1);
        let http_max = self.http_max_connections.unwrap_or((budget / 4).clamp(16, 1 << 16)).max(1);
        ResolvedLimits {
            grpc: ListenerLimits {
                max_connections: grpc_max,
                max_per_address: self.grpc_max_per_address.unwrap_or((grpc_max / 4).max(1)),
            },
            http: ListenerLimits {
                max_connections: http_max,
                max_per_address: self.http_max_per_address.unwrap_or((http_max / 4).max(1)),
            },
            handshake_timeout: self.handshake_timeout,
            grpc_idle_timeout: self.grpc_idle_timeout,
            http_header_timeout: self.http_header_timeout,
            http_write_timeout: self.http_write_timeout,
            // hyper needs a read buffer of at least 8 KiB.
            http_max_header_bytes: self.http_max_header_bytes.max(8192),
            grpc_max_header_bytes: self.grpc_max_header_bytes,
        }
    }
}

/// This process's soft open-files limit (`/proc/self/limits`), 1024 when it cannot be read.
pub fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .map(|soft| if soft == "unlimited" { u64::MAX } else { soft.parse().unwrap_or(1024) })
        })
        .unwrap_or(1024)
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its maximum of connections.
    Total,
    /// This client address holds its maximum.
    PerAddress,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerAddress => "max_per_address",
        }
    }
}

/// The key a client address is counted under: an IPv4 address (also when mapped into IPv6),
/// an IPv6 /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Counts one listener's connections against its [`ListenerLimits`].
#[derive(Debug)]
pub struct ConnLimiter {
    listener: &'static str,
    limits: ListenerLimits,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl ConnLimiter {
    /// A limiter for the listener named `listener` (`grpc`, `http`: the metrics' label).
    pub fn new(listener: &'static str, limits: ListenerLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.connections_open(listener, 0);
        Arc::new(ConnLimiter { listener, limits, counts: Mutex::default(), metrics })
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Admits a connection from `ip`, or says which cap it hits (and counts the refusal).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let key = address_key(ip);
        let refused = {
            let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let from = c.per_address.get(&key).copied().unwrap_or(0);
            if c.total >= self.limits.max_connections {
                Some(Refused::Total)
            } else if self.limits.max_per_address > 0 && from >= self.limits.max_per_address {
                Some(Refused::PerAddress)
            } else {
                c.total += 1;
                *c.per_address.entry(key).or_default() += 1;
                self.metrics.connections_open(self.listener, c.total);
                None
            }
        };
        match refused {
            Some(r) => {
                self.metrics.connection_refused(self.listener, r.as_str());
                Err(r)
            }
            None => Ok(ConnPermit { limiter: self.clone(), key }),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let l = &self.limiter;
        let mut c = l.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_address.remove(&self.key);
            }
        }
        l.metrics.connections_open(l.listener, c.total);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_open_files_limit_unless_set() {
        let r = NetLimits::default().resolve(400);
        assert_eq!(r.grpc, ListenerLimits { max_connections: 136, max_per_address: 34 });
        assert_eq!(r.http, ListenerLimits { max_connections: 68, max_per_address: 17 });
        let r = NetLimits::default().resolve(0);
        assert_eq!((r.grpc.max_connections, r.http.max_connections), (16, 16));
        let set = NetLimits {
            grpc_max_connections: Some(10),
            http_max_per_address: Some(0),
            http_max_header_bytes: 100,
            ..NetLimits::default()
        };
        let r = set.resolve(1 << 20);
        assert_eq!(r.grpc, ListenerLimits { max_connections: 10, max_per_address: 2 });
        assert_eq!(r.http.max_per_address, 0);
        assert_eq!(r.http_max_header_bytes, 8192);
        assert!(open_files_limit() >= 16);
    }

    #[test]
    fn permits_count_per_address_and_in_all() {
        let m = Arc::new(Metrics::new());
        let l = ConnLimiter::new("http", ListenerLimits { max_connections: 3, max_per_address: 2 }, m);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(mapped).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refused::PerAddress);
        // One IPv6 /64 is one client.
        let _p3 = l.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(l.try_acquire("10.0.0.2".parse().unwrap()).unwrap_err(), Refused::Total);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.try_acquire(a).unwrap();
        let l6 = ConnLimiter::new(
            "grpc",
            ListenerLimits { max_connections: 9, max_per_address: 1 },
            Arc::new(Metrics::new()),
        );
        let _q = l6.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(l6.try_acquire("2001:db8::ffff".parse().unwrap()).unwrap_err(), Refused::PerAddress);
        assert!(l6.try_acquire("2001:db8:0:1::1".parse().unwrap()).is_ok());
        // 0: no per-address cap.
        let l0 = ConnLimiter::new(
            "grpc",
            ListenerLimits { max_connections: 3, max_per_address: 0 },
            Arc::new(Metrics::new()),
        );
        let _all: Vec<_> = (0..3).map(|_| l0.try_acquire(a).unwrap()).collect();
        assert_eq!(l0.try_acquire(a).unwrap_err(), Refused::Total);
    }
}
