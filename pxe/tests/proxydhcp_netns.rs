//! ProxyDHCP on real sockets, inside network namespaces these tests create (two with a veth pair
//! between them; one with only its loopback) and always delete. Nothing touches this machine's
//! own network. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dhcproto::v4::{Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use muster_pxe::{ProxyDhcp, ProxyDhcpConfig};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (Debian iproute2) must be installed");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A network namespace, deleted on drop (which also deletes its end of the veth pair).
struct Netns(String);

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a new thread that has entered this namespace (only that thread moves).
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];

fn packet(mt: MessageType, xid: u32, class: &[u8], user_class: Option<&[u8]>) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, z, z, z, &MAC);
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(mt));
    o.insert(DhcpOption::ClassIdentifier(class.to_vec()));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture(0)));
    o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    if let Some(uc) = user_class {
        o.insert(DhcpOption::UserClass(uc.to_vec()));
    }
    m.to_vec().unwrap()
}

/// Sends `p` to `to` until an answer with `xid` arrives (or `tries` run out).
async fn ask(
    sock: &UdpSocket,
    p: &[u8],
    to: SocketAddr,
    xid: u32,
    tries: u32,
) -> Option<(Message, SocketAddr)> {
    let mut buf = vec![0u8; 1500];
    for _ in 0..tries {
        sock.send_to(p, to).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            let (n, from) = r.unwrap();
            if let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) {
                if m.xid() == xid && m.opcode() == Opcode::BootReply {
                    return Some((m, from));
                }
            }
        }
    }
    None
}

fn bootfile(m: &Message) -> Vec<u8> {
    match m.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(f)) => f.clone(),
        other => panic!("no boot file name: {other:?}"),
    }
}

#[test]
fn offers_and_acks_across_a_veth_pair() {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let base = format!("mpxe-{}-{n}", std::process::id());
    let server_ns = Netns::create(format!("{base}-s"));
    let client_ns = Netns::create(format!("{base}-c"));
    ip(&[
        "-n",
        &server_ns.0,
        "link",
        "add",
        "pxe-s0",
        "type",
        "veth",
        "peer",
        "name",
        "pxe-c0",
        "netns",
        &client_ns.0,
    ]);
    ip(&["-n", &server_ns.0, "addr", "add", "10.99.0.1/24", "dev", "pxe-s0"]);
    ip(&["-n", &server_ns.0, "link", "set", "pxe-s0", "up"]);
    ip(&["-n", &client_ns.0, "link", "set", "pxe-c0", "up"]);

    let cfg = ProxyDhcpConfig {
        iface: "pxe-s0".into(),
        server_ip: None, // from the interface: 10.99.0.1
        http_boot_url: "http://10.99.0.1:8080/boot/start.ipxe".into(),
        tftp_bios_file: "undionly.kpxe".into(),
        tftp_efi_file: "ipxe.efi".into(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let p = match ProxyDhcp::bind(&cfg) {
                Ok(p) => p,
                Err(e) => {
                    ready_tx.send(Err(e.to_string())).unwrap();
                    return;
                }
            };
            ready_tx.send(Ok(p.info().server_ip)).unwrap();
            p.serve(async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        })
    });
    let server_ip = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(server_ip, Ipv4Addr::new(10, 99, 0, 1));

    let client_ns_name = client_ns.0.clone();
    let client = client_ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            // A client without an address, as a PXE ROM is: UDP 68 on the interface.
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            s.set_reuse_address(true).unwrap();
            s.set_broadcast(true).unwrap();
            s.bind_device(Some(b"pxe-c0")).unwrap();
            s.set_nonblocking(true).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).unwrap();
            let sock = UdpSocket::from_std(s.into()).unwrap();
            let bcast = SocketAddr::from((Ipv4Addr::BROADCAST, 67));

            let pxe = b"PXEClient:Arch:00000:UNDI:002001";
            let (offer, _) = ask(&sock, &packet(MessageType::Discover, 1, pxe, None), bcast, 1, 20)
                .await
                .expect("no OFFER from the proxy");
            assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
            assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
            assert_eq!(offer.siaddr(), Ipv4Addr::new(10, 99, 0, 1));
            assert_eq!(offer.chaddr(), &MAC);
            assert_eq!(bootfile(&offer), b"undionly.kpxe");

            let (offer, _) = ask(&sock, &packet(MessageType::Discover, 2, pxe, Some(b"iPXE")), bcast, 2, 20)
                .await
                .expect("no OFFER for iPXE");
            assert_eq!(bootfile(&offer), b"http://10.99.0.1:8080/boot/start.ipxe");

            // Not a PXE client: no answer.
            let none =
                ask(&sock, &packet(MessageType::Discover, 3, b"udhcp 1.35.0", None), bcast, 3, 2).await;
            assert!(none.is_none(), "answered a non-PXE client: {none:?}");

            // With an address (from the LAN's DHCP), the client asks on 4011 and gets an ACK.
            ip(&["-n", &client_ns_name, "addr", "add", "10.99.0.2/24", "dev", "pxe-c0"]);
            let u = UdpSocket::bind("10.99.0.2:0").await.unwrap();
            let mut req =
                Message::decode(&mut Decoder::new(&packet(MessageType::Request, 4, pxe, None))).unwrap();
            req.set_ciaddr(Ipv4Addr::new(10, 99, 0, 2));
            let (ack, from) = ask(&u, &req.to_vec().unwrap(), "10.99.0.1:4011".parse().unwrap(), 4, 20)
                .await
                .expect("no ACK on 4011");
            assert_eq!(from, "10.99.0.1:4011".parse().unwrap());
            assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(ack.ciaddr(), Ipv4Addr::new(10, 99, 0, 2));
            assert_eq!(bootfile(&ack), b"undionly.kpxe");
        })
    });
    let result = client.join();
    let _ = stop_tx.send(());
    server.join().unwrap();
    result.unwrap();
    drop(client_ns);
    drop(server_ns);
    assert!(!std::path::Path::new(&format!("/run/netns/{base}-s")).exists());
}

/// `packet` (an encoded message) with the raw option bytes `raw` inserted before its End option.
fn with_raw_option(packet: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut i = 240;
    while packet[i] != 255 {
        i += if packet[i] == 0 { 1 } else { 2 + usize::from(packet[i + 1]) };
    }
    [&packet[..i], raw, &packet[i..]].concat()
}

#[test]
fn a_poisoned_packet_does_not_stop_the_service() {
    // Issue #13: a DISCOVER whose option 81 has length 1 tripped a debug assertion in the DHCP
    // library and killed the service for good. Served on the loopback of a namespace of its own.
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let ns = Netns::create(format!("mpxe-{}-{n}-p", std::process::id()));
    let cfg = ProxyDhcpConfig {
        iface: "lo".into(),
        server_ip: None, // 127.0.0.1
        http_boot_url: "http://127.0.0.1:8080/boot/start.ipxe".into(),
        tftp_bios_file: "undionly.kpxe".into(),
        tftp_efi_file: "ipxe.efi".into(),
    };
    let result = ns
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let p = ProxyDhcp::bind(&cfg).expect("binding UDP 67 and 4011 on lo (needs root)");
                assert_eq!(p.info().server_ip, Ipv4Addr::LOCALHOST);
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(async move {
                    p.serve(async {
                        let _ = stop_rx.await;
                    })
                    .await
                });
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
                s.set_reuse_address(true).unwrap();
                s.set_broadcast(true).unwrap();
                s.bind_device(Some(b"lo")).unwrap();
                s.set_nonblocking(true).unwrap();
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).unwrap();
                let sock = UdpSocket::from_std(s.into()).unwrap();
                let to: SocketAddr = "127.0.0.1:67".parse().unwrap();
                let pxe = b"PXEClient:Arch:00000:UNDI:002001";

                // The exact packet, sent once: with the option dropped before decoding, it is
                // even answered.
                let poisoned = with_raw_option(&packet(MessageType::Discover, 0x81, pxe, None), &[81, 1, 0]);
                let (offer, _) =
                    ask(&sock, &poisoned, to, 0x81, 1).await.expect("no OFFER to the option-81 packet");
                assert_eq!(bootfile(&offer), b"undionly.kpxe");
                // More of the options that made the library panic, each sent once.
                for (i, raw) in [
                    &[80u8, 1, 0][..],
                    &[152, 0],
                    &[153, 1, 0],
                    &[154, 2, 0, 0],
                    &[155, 0],
                    &[94, 1, 1],
                    &[151, 0],
                ]
                .into_iter()
                .enumerate()
                {
                    let xid = 0x100 + i as u32;
                    let _ = ask(
                        &sock,
                        &with_raw_option(&packet(MessageType::Discover, xid, pxe, None), raw),
                        to,
                        xid,
                        1,
                    )
                    .await;
                }
                // Still serving: a valid PXE DISCOVER gets its OFFER.
                let (offer, _) = ask(&sock, &packet(MessageType::Discover, 7, pxe, None), to, 7, 20)
                    .await
                    .expect("no OFFER after the poisoned packets: the service died");
                assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
                assert!(!server.is_finished(), "the service stopped");
                let _ = stop_tx.send(());
                server.await.unwrap().unwrap();
            })
        })
        .join();
    drop(ns);
    result.unwrap();
}
