//! ProxyDHCP: boot information for PXE clients, never addresses.
//!
//! The LAN's DHCP server hands out addresses; this answers the same broadcast DISCOVER from a
//! PXE client (option 60 starting with `PXEClient`) with an OFFER that carries only boot
//! information: `yiaddr` 0.0.0.0, `siaddr` and option 54 = this server, option 60
//! `PXEClient`, option 97 echoed, option 43 with PXE discovery control 8 (boot the file named
//! here, no boot-server discovery or menu), and the boot file: the HTTP URL of `start.ipxe` for
//! iPXE (option 77 user class `iPXE`), else by option 93 the BIOS (0) or EFI (6, 7, 9) iPXE
//! binary, fetched over TFTP from `siaddr`. A client then asks on UDP 4011 with a REQUEST and
//! gets the same information in an ACK.
//!
//! [`reply`] is the pure decision; [`ProxyDhcp`] the sockets (UDP 67 bound to the interface
//! with `SO_BINDTODEVICE`, `SO_BROADCAST`, `SO_REUSEADDR`, and UDP 4011 likewise).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::PxeError;

/// The DHCP server port and the PXE boot-server port.
pub const DHCP_PORT: u16 = 67;
pub const PXE_PORT: u16 = 4011;

/// iPXE for BIOS PXE ROMs, as Debian's `ipxe` package names it (in `/usr/lib/ipxe`).
pub const IPXE_BIOS_FILE: &str = "undionly.kpxe";
/// iPXE for UEFI PXE, as Debian's `ipxe` package names it.
pub const IPXE_EFI_FILE: &str = "ipxe.efi";

/// What the ProxyDHCP service answers, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyDhcpConfig {
    /// The interface to serve on (e.g. `eth0`, `br0`).
    pub iface: String,
    /// This server's address as PXE clients reach it (`siaddr`, option 54, TFTP server);
    /// `None`: the interface's first IPv4 address.
    pub server_ip: Option<Ipv4Addr>,
    /// Absolute URL of `start.ipxe`, e.g. `http://192.168.1.10:8080/boot/start.ipxe`, for
    /// clients that are iPXE already.
    pub http_boot_url: String,
    /// TFTP file for BIOS PXE ROMs (option 93 = 0), e.g. [`IPXE_BIOS_FILE`].
    pub tftp_bios_file: String,
    /// TFTP file for UEFI PXE (option 93 = 6, 7, 9), e.g. [`IPXE_EFI_FILE`].
    pub tftp_efi_file: String,
}

/// The boot information every answer carries (a [`ProxyDhcpConfig`] with the address resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    pub server_ip: Ipv4Addr,
    pub http_boot_url: String,
    pub tftp_bios_file: String,
    pub tftp_efi_file: String,
}

impl BootInfo {
    /// Checks that every boot file fits into the BOOTP `file` field (127 bytes + NUL).
    pub fn new(cfg: &ProxyDhcpConfig, server_ip: Ipv4Addr) -> Result<Self, PxeError> {
        for (field, v) in [
            ("http_boot_url", &cfg.http_boot_url),
            ("tftp_bios_file", &cfg.tftp_bios_file),
            ("tftp_efi_file", &cfg.tftp_efi_file),
        ] {
            if v.is_empty() || v.len() > 127 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(PxeError::Config(format!(
                    "proxy DHCP {field} {v:?}: must be 1 to 127 printable ASCII characters"
                )));
            }
        }
        Ok(BootInfo {
            server_ip,
            http_boot_url: cfg.http_boot_url.clone(),
            tftp_bios_file: cfg.tftp_bios_file.clone(),
            tftp_efi_file: cfg.tftp_efi_file.clone(),
        })
    }
}

/// Which socket a packet came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// UDP 67: DISCOVER → OFFER.
    Dhcp,
    /// UDP 4011: REQUEST → ACK.
    Pxe,
}

/// Why a packet gets no answer (logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a BOOTREQUEST")]
    NotRequest,
    #[error("hardware address length {0} > 16")]
    BadHlen(u8),
    #[error("not a PXE client (option 60 {0:?})")]
    NotPxe(String),
    #[error("DHCP message type {0:?} on {1:?} port")]
    MessageType(Option<MessageType>, Port),
    #[error("client architecture {0} has no boot file")]
    Arch(u16),
}

/// The client's requested boot file kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Ipxe,
    Bios,
    Efi,
}

/// Classifies a PXE request: iPXE, BIOS or EFI PXE ROM.
pub fn classify(req: &Message) -> Result<ClientKind, Ignored> {
    let opts = req.opts();
    let class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => c.as_slice(),
        _ => &[],
    };
    if !class.starts_with(b"PXEClient") {
        return Err(Ignored::NotPxe(String::from_utf8_lossy(class).into_owned()));
    }
    if let Some(DhcpOption::UserClass(uc)) = opts.get(OptionCode::UserClass) {
        // iPXE sends the bare string; RFC 3004 clients length-prefix each class.
        if uc.as_slice() == b"iPXE" || uc.starts_with(b"\x04iPXE") {
            return Ok(ClientKind::Ipxe);
        }
    }
    match opts.get(OptionCode::ClientSystemArchitecture) {
        None => Ok(ClientKind::Bios),
        Some(DhcpOption::ClientSystemArchitecture(Architecture(a))) => match a {
            0 => Ok(ClientKind::Bios),
            6 | 7 | 9 => Ok(ClientKind::Efi),
            other => Err(Ignored::Arch(*other)),
        },
        Some(_) => Ok(ClientKind::Bios),
    }
}

/// The answer to `req` received on `port`, or why there is none. Pure: no I/O.
pub fn reply(info: &BootInfo, req: &Message, port: Port) -> Result<Message, Ignored> {
    if req.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotRequest);
    }
    if req.hlen() > 16 {
        return Err(Ignored::BadHlen(req.hlen()));
    }
    let kind = classify(req)?;
    let mt = req.opts().msg_type();
    let answer = match (port, mt) {
        (Port::Dhcp, Some(MessageType::Discover)) => MessageType::Offer,
        (Port::Pxe, Some(MessageType::Request)) => MessageType::Ack,
        _ => return Err(Ignored::MessageType(mt, port)),
    };
    let file = match kind {
        ClientKind::Ipxe => &info.http_boot_url,
        ClientKind::Bios => &info.tftp_bios_file,
        ClientKind::Efi => &info.tftp_efi_file,
    };
    let ciaddr = if port == Port::Pxe { req.ciaddr() } else { Ipv4Addr::UNSPECIFIED };
    let mut m = Message::new_with_id(
        req.xid(),
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        info.server_ip,
        req.giaddr(),
        req.chaddr(),
    );
    m.set_opcode(Opcode::BootReply).set_htype(req.htype()).set_flags(req.flags());
    // BootInfo::new checked the length (≤ 127) so this does not panic.
    if file.len() <= 127 {
        m.set_fname(file.as_bytes());
    }
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(answer));
    opts.insert(DhcpOption::ServerIdentifier(info.server_ip));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
    if let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
        req.opts().get(OptionCode::ClientMachineIdentifier)
    {
        opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
    }
    // PXE vendor options: PXE_DISCOVERY_CONTROL (6) = 8: boot the file named in this packet.
    opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
    Ok(m)
}

/// Decodes a DHCP message as the server receives it (the one decode path of [`ProxyDhcp`]).
pub fn decode(bytes: &[u8]) -> Result<Message, dhcproto::error::DecodeError> {
    Message::decode(&mut Decoder::new(bytes))
}

/// Where an answer goes: an OFFER to the broadcast address (the client has no address yet),
/// or to the relay; an ACK back to the sender.
pub fn destination(req: &Message, port: Port, from: SocketAddr) -> SocketAddr {
    match port {
        Port::Pxe => from,
        Port::Dhcp if !req.giaddr().is_unspecified() => SocketAddr::from((req.giaddr(), DHCP_PORT)),
        Port::Dhcp => SocketAddr::from((Ipv4Addr::BROADCAST, 68)),
    }
}

/// The first IPv4 address of `iface`.
pub fn iface_ipv4(iface: &str) -> Result<Ipv4Addr, PxeError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| PxeError::io(format!("listing addresses of {iface}"), e.into()))?;
    addrs
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()))
        .ok_or_else(|| PxeError::Config(format!("proxy DHCP: interface {iface:?} has no IPv4 address")))
}

fn udp_socket(iface: &str, port: u16) -> Result<UdpSocket, PxeError> {
    let what = |s: &str| format!("proxy DHCP on {iface} UDP {port}: {s}");
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| PxeError::io(what("socket"), e))?;
    sock.set_reuse_address(true).map_err(|e| PxeError::io(what("SO_REUSEADDR"), e))?;
    sock.set_broadcast(true).map_err(|e| PxeError::io(what("SO_BROADCAST"), e))?;
    sock.bind_device(Some(iface.as_bytes())).map_err(|e| PxeError::io(what("SO_BINDTODEVICE"), e))?;
    sock.set_nonblocking(true).map_err(|e| PxeError::io(what("non-blocking"), e))?;
    sock.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())
        .map_err(|e| PxeError::io(what("bind"), e))?;
    UdpSocket::from_std(sock.into()).map_err(|e| PxeError::io(what("tokio socket"), e))
}

/// A bound ProxyDHCP service.
#[derive(Debug)]
pub struct ProxyDhcp {
    info: BootInfo,
    iface: String,
    dhcp: UdpSocket,
    pxe: UdpSocket,
}

impl ProxyDhcp {
    /// Resolves the server address and binds UDP 67 and 4011 on the interface (needs root or
    /// `CAP_NET_BIND_SERVICE` + `CAP_NET_RAW`).
    pub fn bind(cfg: &ProxyDhcpConfig) -> Result<Self, PxeError> {
        let server_ip = match cfg.server_ip {
            Some(ip) => ip,
            None => iface_ipv4(&cfg.iface)?,
        };
        let info = BootInfo::new(cfg, server_ip)?;
        Ok(ProxyDhcp {
            info,
            iface: cfg.iface.clone(),
            dhcp: udp_socket(&cfg.iface, DHCP_PORT)?,
            pxe: udp_socket(&cfg.iface, PXE_PORT)?,
        })
    }

    pub fn info(&self) -> &BootInfo {
        &self.info
    }

    /// Answers until `shutdown` completes. Errors on single packets are logged, not returned.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), PxeError> {
        tracing::info!(iface = %self.iface, server_ip = %self.info.server_ip, http = %self.info.http_boot_url,
            bios = %self.info.tftp_bios_file, efi = %self.info.tftp_efi_file, "proxy DHCP serving");
        let mut b67 = vec![0u8; 1500];
        let mut b4011 = vec![0u8; 1500];
        tokio::pin!(shutdown);
        loop {
            let (port, n, from) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.dhcp.recv_from(&mut b67) => match r {
                    Ok((n, from)) => (Port::Dhcp, n, from),
                    Err(e) => { tracing::warn!(error = %e, "proxy DHCP: receiving on UDP 67"); continue }
                },
                r = self.pxe.recv_from(&mut b4011) => match r {
                    Ok((n, from)) => (Port::Pxe, n, from),
                    Err(e) => { tracing::warn!(error = %e, "proxy DHCP: receiving on UDP 4011"); continue }
                },
            };
            let buf = if port == Port::Dhcp { &b67[..n] } else { &b4011[..n] };
            self.handle(port, buf, from).await;
        }
    }

    async fn handle(&self, port: Port, buf: &[u8], from: SocketAddr) {
        let req = match decode(buf) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%from, ?port, error = %e, "proxy DHCP: undecodable packet");
                return;
            }
        };
        let ans = match reply(&self.info, &req, port) {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(%from, ?port, xid = req.xid(), reason = %why, "proxy DHCP: ignored");
                return;
            }
        };
        let bytes = match ans.to_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "proxy DHCP: encoding the answer");
                return;
            }
        };
        let to = destination(&req, port, from);
        let sock = if port == Port::Dhcp { &self.dhcp } else { &self.pxe };
        let mac = req.chaddr().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        match sock.send_to(&bytes, to).await {
            Ok(_) => tracing::info!(%mac, ?port, %to, file = ?ans.fname_str(), "proxy DHCP: answered"),
            Err(e) => tracing::warn!(%mac, %to, error = %e, "proxy DHCP: sending the answer"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use dhcproto::v4::Flags;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const UUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    fn info() -> BootInfo {
        BootInfo::new(
            &ProxyDhcpConfig {
                iface: "eth0".into(),
                server_ip: None,
                http_boot_url: "http://192.168.1.10:8080/boot/start.ipxe".into(),
                tftp_bios_file: "undionly.kpxe".into(),
                tftp_efi_file: "ipxe.efi".into(),
            },
            Ipv4Addr::new(192, 168, 1, 10),
        )
        .unwrap()
    }

    /// A client packet as a PXE ROM (or iPXE) sends it.
    pub(crate) fn client(
        mt: MessageType,
        arch: Option<u16>,
        user_class: Option<&[u8]>,
        class: &[u8],
    ) -> Message {
        let mut m = Message::new_with_id(
            0xdead_beef,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_flags(Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(mt));
        o.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        o.insert(DhcpOption::ClientMachineIdentifier(UUID.to_vec()));
        if let Some(a) = arch {
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture(a)));
        }
        if let Some(uc) = user_class {
            o.insert(DhcpOption::UserClass(uc.to_vec()));
        }
        m
    }

    /// Encodes and decodes, as the wire would.
    fn wire(m: &Message) -> Message {
        Message::decode(&mut Decoder::new(&m.to_vec().unwrap())).unwrap()
    }

    fn file(m: &Message) -> String {
        match m.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(f)) => {
                let f = String::from_utf8(f.clone()).unwrap();
                // dhcproto's decoder keeps the field's terminating NUL.
                assert_eq!(m.fname_str().unwrap().unwrap().trim_end_matches('\0'), f);
                f
            }
            other => panic!("no boot file: {other:?}"),
        }
    }

    const PXE: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";

    #[test]
    fn bios_pxe_discover_gets_an_offer_without_an_address() {
        let req = wire(&client(MessageType::Discover, Some(0), None, PXE));
        let ans = wire(&reply(&info(), &req, Port::Dhcp).unwrap());
        assert_eq!(ans.opcode(), Opcode::BootReply);
        assert_eq!(ans.xid(), 0xdead_beef);
        assert_eq!(ans.chaddr(), &MAC);
        assert_eq!(ans.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ans.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ans.siaddr(), Ipv4Addr::new(192, 168, 1, 10));
        assert!(ans.flags().broadcast());
        let o = ans.opts();
        assert_eq!(o.msg_type(), Some(MessageType::Offer));
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier([192, 168, 1, 10].into()))
        );
        assert_eq!(
            o.get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            o.get(OptionCode::ClientMachineIdentifier),
            Some(&DhcpOption::ClientMachineIdentifier(UUID.to_vec()))
        );
        assert_eq!(
            o.get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        // Nothing that would configure an address.
        for c in [OptionCode::SubnetMask, OptionCode::Router, OptionCode::AddressLeaseTime] {
            assert!(o.get(c).is_none(), "{c:?}");
        }
        assert_eq!(file(&ans), "undionly.kpxe");
        assert_eq!(
            destination(&req, Port::Dhcp, "0.0.0.0:68".parse().unwrap()),
            "255.255.255.255:68".parse().unwrap()
        );
        // No architecture option: an old BIOS ROM.
        let ans = reply(&info(), &wire(&client(MessageType::Discover, None, None, PXE)), Port::Dhcp).unwrap();
        assert_eq!(file(&ans), "undionly.kpxe");
    }

    #[test]
    fn ipxe_gets_the_http_url_and_efi_the_efi_binary() {
        for arch in [0, 7, 9] {
            let req = wire(&client(MessageType::Discover, Some(arch), Some(b"iPXE"), PXE));
            assert_eq!(
                file(&reply(&info(), &req, Port::Dhcp).unwrap()),
                "http://192.168.1.10:8080/boot/start.ipxe"
            );
        }
        for arch in [6, 7, 9] {
            let req =
                wire(&client(MessageType::Discover, Some(arch), None, b"PXEClient:Arch:00007:UNDI:003016"));
            assert_eq!(file(&reply(&info(), &req, Port::Dhcp).unwrap()), "ipxe.efi", "arch {arch}");
        }
        let req = wire(&client(MessageType::Discover, Some(11), None, PXE));
        assert_eq!(reply(&info(), &req, Port::Dhcp).unwrap_err(), Ignored::Arch(11));
    }

    #[test]
    fn non_pxe_and_wrong_types_are_ignored() {
        let req = wire(&client(MessageType::Discover, None, None, b"MSFT 5.0"));
        assert!(matches!(reply(&info(), &req, Port::Dhcp), Err(Ignored::NotPxe(_))));
        let mut req = client(MessageType::Discover, None, None, PXE);
        req.opts_mut().remove(OptionCode::ClassIdentifier);
        assert!(matches!(reply(&info(), &wire(&req), Port::Dhcp), Err(Ignored::NotPxe(_))));
        // A REQUEST on 67 is for the real DHCP server; a DISCOVER on 4011 is nonsense.
        for (mt, port) in [(MessageType::Request, Port::Dhcp), (MessageType::Discover, Port::Pxe)] {
            let req = wire(&client(mt, Some(0), None, PXE));
            assert!(matches!(reply(&info(), &req, port), Err(Ignored::MessageType(..))));
        }
        let mut offer = client(MessageType::Offer, Some(0), None, PXE);
        offer.set_opcode(Opcode::BootReply);
        assert_eq!(reply(&info(), &wire(&offer), Port::Dhcp).unwrap_err(), Ignored::NotRequest);
    }

    #[test]
    fn request_on_4011_gets_an_ack_to_the_sender() {
        let mut req = client(MessageType::Request, Some(0), None, PXE);
        req.set_ciaddr(Ipv4Addr::new(192, 168, 1, 77));
        let req = wire(&req);
        let ans = wire(&reply(&info(), &req, Port::Pxe).unwrap());
        assert_eq!(ans.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ans.ciaddr(), Ipv4Addr::new(192, 168, 1, 77));
        assert_eq!(ans.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(file(&ans), "undionly.kpxe");
        let from: SocketAddr = "192.168.1.77:4011".parse().unwrap();
        assert_eq!(destination(&req, Port::Pxe, from), from);
    }

    #[test]
    fn garbage_does_not_panic_and_config_is_checked() {
        let mut bytes = client(MessageType::Discover, Some(0), None, PXE).to_vec().unwrap();
        bytes[2] = 200; // hlen
        if let Ok(m) = Message::decode(&mut Decoder::new(&bytes)) {
            assert_eq!(reply(&info(), &m, Port::Dhcp).unwrap_err(), Ignored::BadHlen(200));
        }
        for n in 0..bytes.len() {
            if let Ok(m) = Message::decode(&mut Decoder::new(&bytes[..n])) {
                let _ = reply(&info(), &m, Port::Dhcp);
            }
        }
        let cfg = ProxyDhcpConfig {
            iface: "eth0".into(),
            server_ip: None,
            http_boot_url: format!("http://h/{}", "x".repeat(130)),
            tftp_bios_file: "undionly.kpxe".into(),
            tftp_efi_file: "ipxe.efi".into(),
        };
        let e = BootInfo::new(&cfg, Ipv4Addr::LOCALHOST).unwrap_err();
        assert!(e.to_string().contains("http_boot_url"), "{e}");
        assert!(iface_ipv4("lo").unwrap().is_loopback());
        assert!(iface_ipv4("no-such-if0").unwrap_err().to_string().contains("no-such-if0"));
    }
}
