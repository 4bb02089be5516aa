//! The controller's network-boot UDP services as shipped (issue #13, findings 3 and 6): a real
//! `muster-controller serve --proxy-dhcp lo --tftp DIR` runs inside a network namespace this
//! test creates (only its loopback, with a second address 10.77.250.1) and always deletes;
//! nothing touches this machine's own network. Needs root (`ip netns`).
//!
//! - The DISCOVER whose option 81 has length 1 (it killed ProxyDHCP for good) is sent once;
//!   then a valid PXE DISCOVER still gets its OFFER, `/readyz` is ready and the metrics show
//!   every service up with no restart.
//! - With `--proxy-dhcp lo`, TFTP listens on lo's address (127.0.0.1), not on every address: a
//!   request to 10.77.250.1 is refused (ICMP port unreachable), one to 127.0.0.1 answered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use muster_tests::ControllerProc;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (Debian package iproute2) must be installed");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread that entered the namespace (only that thread moves).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns(2) on a namespace fd we hold open; it changes only this thread, which
        // runs `f` and ends.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02];

/// A PXE BIOS client's DISCOVER, built by hand (independent of the DHCP library under test),
/// with `extra` raw option bytes before the End option.
fn discover(xid: u32, extra: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // broadcast
    p[28..34].copy_from_slice(&MAC);
    p.extend_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, 1]);
    let class = b"PXEClient:Arch:00000:UNDI:002001";
    p.extend_from_slice(&[60, class.len() as u8]);
    p.extend_from_slice(class);
    p.extend_from_slice(&[93, 2, 0, 0]);
    p.extend_from_slice(&[97, 17]);
    p.extend_from_slice(&[0; 17]);
    p.extend_from_slice(extra);
    p.push(255);
    p
}

/// Sends `packet` until a BOOTREPLY with `xid` arrives (or `tries` run out); its boot file.
fn ask(sock: &UdpSocket, packet: &[u8], xid: u32, tries: u32) -> Option<String> {
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
        sock.send_to(packet, "127.0.0.1:67").unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            let Ok((n, _)) = sock.recv_from(&mut buf) else { break };
            if n > 236 && buf[0] == 2 && buf[4..8] == xid.to_be_bytes() {
                let file = &buf[108..236];
                let end = file.iter().position(|b| *b == 0).unwrap_or(file.len());
                return Some(String::from_utf8_lossy(&file[..end]).into_owned());
            }
        }
    }
    None
}

/// `GET path` over a fresh connection; status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn start_controller(ns: &str, dir: &Path) -> ControllerProc {
    let assets = dir.join("assets");
    let tftp = dir.join("tftp");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::create_dir_all(&tftp).unwrap();
    std::fs::write(assets.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(assets.join("initramfs.img"), b"initrd").unwrap();
    std::fs::write(tftp.join("undionly.kpxe"), vec![7u8; 3000]).unwrap();
    let (assets, tftp) = (assets.display().to_string(), tftp.display().to_string());
    ControllerProc::start_wrapped(
        &["ip", "netns", "exec", ns],
        &dir.join("ctl"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--boot-assets",
            &assets,
            "--boot-controller-url",
            "https://127.0.0.1:7443",
            "--proxy-dhcp",
            "lo",
            "--tftp",
            &tftp,
        ],
    )
    .unwrap()
}

#[test]
fn boot_services_survive_a_poisoned_packet_and_tftp_binds_the_boot_address() {
    let ns = Netns(format!("mbs-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.0, "addr", "add", "10.77.250.1/32", "dev", "lo"]);
    let tmp = tempfile::tempdir().unwrap();
    let ControllerProc { mut proc, ports, .. } = start_controller(&ns.0, tmp.path());

    in_netns(&ns.0, move || {
        // A client without an address, as a PXE ROM is: UDP 68 on the interface.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(b"lo")).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).unwrap();
        let sock: UdpSocket = s.into();

        // The packet of the issue, once (its OFFER, if any, is not waited for).
        sock.send_to(&discover(0x81, &[81, 1, 0]), "127.0.0.1:67").unwrap();
        let file = ask(&sock, &discover(7, &[]), 7, 20);
        assert_eq!(file.as_deref(), Some("undionly.kpxe"), "no OFFER after the option-81 packet");

        let (status, body) = get(ports.http, "/readyz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (_, metrics) = get(ports.http, "/metrics");
        for service in ["grpc", "http", "heartbeat-flush", "proxy-dhcp", "tftp"] {
            let up = format!("muster_service_up{{service=\"{service}\"}} 1");
            let restarts = format!("muster_service_restarts_total{{service=\"{service}\"}} 0");
            assert!(metrics.contains(&up) && metrics.contains(&restarts), "{service}:\n{metrics}");
        }

        // TFTP on the boot interface's address only.
        let rrq = b"\x00\x01undionly.kpxe\x00octet\x00";
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.send_to(rrq, "127.0.0.1:69").unwrap();
        let mut buf = [0u8; 600];
        let (n, _) = c.recv_from(&mut buf).expect("no TFTP answer on 127.0.0.1");
        assert_eq!((&buf[..4], n), (&[0u8, 3, 0, 1][..], 516));
        let other = UdpSocket::bind("10.77.250.1:0").unwrap();
        other.connect("10.77.250.1:69").unwrap();
        other.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        other.send(rrq).unwrap();
        let r = other.recv(&mut buf);
        assert_eq!(
            r.as_ref().map_err(std::io::Error::kind).err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "TFTP answered on 10.77.250.1 although --proxy-dhcp lo says 127.0.0.1: {r:?}"
        );
    });
    let log = proc.log_text();
    proc.kill();
    drop(ns);
    assert!(!log.contains("service died"), "{log}");
}
