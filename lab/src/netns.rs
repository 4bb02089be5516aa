//! Network namespaces for the lab and the tests: a router namespace with a bridge, one
//! namespace per node with a veth on that bridge, and a relay that carries host loopback
//! connections into the router namespace. Nothing is added to this machine's own network.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::LabError;

/// Every namespace the lab makes starts with this (teardown removes nothing else).
pub const PREFIX: &str = "mlab";
/// The bridge's address inside the router namespace; nodes get .10 onwards.
pub const ROUTER_ADDR: &str = "10.77.0.1";

/// Runs `ip ARGS`; a failure carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io("running ip (iproute2: apt-get install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether this process runs as root (namespaces need it).
pub fn euid_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The namespace of lab node `i` (1-based) under `prefix`.
pub fn node_ns(prefix: &str, i: u32) -> String {
    format!("{prefix}n{i}")
}

/// The router namespace under `prefix`.
pub fn router_ns(prefix: &str) -> String {
    format!("{prefix}r")
}

/// The address of lab node `i` (1-based) on the bridge.
pub fn node_addr(i: u32) -> String {
    format!("10.77.0.{}", 9 + i)
}

/// Creates the namespaces: a router with bridge `mbr0` at [`ROUTER_ADDR`]/24, and per node a
/// namespace whose `eth0` (a veth on the bridge) has [`node_addr`]/24, `lo` up and a default
/// route via the router. Returns the names created; on error removes what it made.
pub fn setup(prefix: &str, nodes: u32) -> Result<Vec<String>, LabError> {
    if !prefix.starts_with(PREFIX) {
        return Err(LabError::Command {
            command: "lab namespaces".into(),
            detail: format!("prefix {prefix:?} must start with {PREFIX:?}"),
        });
    }
    let router = router_ns(prefix);
    let mut created = Vec::new();
    let result = (|| {
        ip(&["netns", "add", &router])?;
        created.push(router.clone());
        ip(&["-n", &router, "link", "set", "lo", "up"])?;
        ip(&["-n", &router, "link", "add", "mbr0", "type", "bridge"])?;
        ip(&["-n", &router, "addr", "add", &format!("{ROUTER_ADDR}/24"), "dev", "mbr0"])?;
        ip(&["-n", &router, "link", "set", "mbr0", "up"])?;
        for i in 1..=nodes {
            let ns = node_ns(prefix, i);
            ip(&["netns", "add", &ns])?;
            created.push(ns.clone());
            let veth = format!("vn{i}");
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &router, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &router, "link", "set", &veth, "master", "mbr0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", node_addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", ROUTER_ADDR])?;
        }
        Ok::<(), LabError>(())
    })();
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            teardown(&created);
            Err(e)
        }
    }
}

/// Removes namespaces by name, newest first; only names with the lab's prefix.
pub fn teardown(names: &[String]) {
    for n in names.iter().rev().filter(|n| n.starts_with(PREFIX)) {
        let _ = ip(&["netns", "del", n]);
    }
}

/// Connects to `target` from inside the network namespace at `netns`, on a thread of its own
/// (setns changes only the calling thread, which then ends).
pub fn connect_in(netns: &Path, target: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd we hold open; it affects only this thread,
        // which does nothing but this one connect and exits.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .join()
    .map_err(|_| std::io::Error::other("relay thread panicked"))?
}

/// One relayed port: connections to `listen` on this machine reach `target` in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// Binds each `LISTEN=TARGET` map on this machine and relays its connections to TARGET inside
/// the network namespace at `netns` until the returned task is dropped or the runtime ends.
pub async fn relay(netns: &Path, maps: &[String]) -> Result<Vec<Relayed>, LabError> {
    let mut bound = Vec::new();
    for m in maps {
        let bad =
            |detail: &str| LabError::Command { command: format!("relay map {m:?}"), detail: detail.into() };
        let (listen, target) = m.split_once('=').ok_or_else(|| bad("expected LISTEN=TARGET"))?;
        let target: SocketAddr = target.parse().map_err(|_| bad("bad target address"))?;
        let l =
            tokio::net::TcpListener::bind(listen).await.map_err(LabError::io(format!("binding {listen}")))?;
        let listen = l.local_addr().map_err(LabError::io(format!("binding {listen}")))?;
        bound.push(Relayed { listen, target });
        let netns = netns.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else { continue };
                let netns = netns.clone();
                tokio::spawn(async move {
                    let connected = tokio::task::spawn_blocking(move || connect_in(&netns, target)).await;
                    let Ok(Ok(std_stream)) = connected else { return };
                    let _ = std_stream.set_nonblocking(true);
                    if let Ok(mut outbound) = tokio::net::TcpStream::from_std(std_stream) {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }
    Ok(bound)
}
