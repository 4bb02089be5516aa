//! The targets: each takes the fuzzer's bytes the way the network (or a node) hands them to
//! Muster, calls the same functions the servers and the agent call, and checks with `assert!`
//! what must hold for every input. A panic is a finding.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Component;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use muster_controller::pki::{Csr, Pki};
use muster_machinery::config;
use muster_machinery::model::{MachineId, State};
use muster_machinery::pin::CaPin;
use muster_machinery::token::{self, JoinToken};
use muster_machinery::KernelArgs;
use muster_proto::pb;
use muster_pxe::assets::RangeRequest;
use muster_pxe::proxydhcp::{self, BootInfo, Port};
use muster_pxe::script::{self, BootAction, BootRequest, MacAddr};
use muster_pxe::tftp;
use prost::Message as _;

/// The text of `data`, if it is UTF-8 (what every text parser below is handed).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// An iPXE script is the fixed template: nothing a client sent may add a line to it.
fn assert_script_lines(script: &str, lines: usize) {
    assert_eq!(script.lines().count(), lines, "script has extra lines: {script:?}");
    assert!(!script.contains("${"), "script would expand a variable: {script:?}");
}

/// `/boot/machine.ipxe?QUERY`: the raw query string through `BootRequest::from_query_str` (as
/// the HTTP handler calls it), and the MAC parser alone.
pub fn boot_query(data: &[u8]) {
    let Some(raw) = text(data) else { return };
    let remote = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    let parsed = BootRequest::from_query_str(raw, remote);
    if let Ok(q) = script::parse_query(raw) {
        assert_eq!(BootRequest::from_query(&q, remote), parsed, "from_query and from_query_str disagree");
    }
    match &parsed {
        Ok(req) => {
            if let Some(mac) = req.mac {
                assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac), "a MAC does not survive its display");
            }
            if let Some(u) = &req.uuid {
                assert_eq!(u.chars().filter(|c| *c != '-').count(), 32, "uuid {u:?}");
                assert!(u.chars().all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f')), "uuid {u:?}");
            }
            for v in [&req.serial, &req.arch, &req.uuid].into_iter().flatten() {
                assert!(!v.is_empty() && v.len() <= 128 && v.trim() == v, "value {v:?}");
                assert!(!v.chars().any(char::is_control), "control character in {v:?}");
            }
            if let Some(a) = &req.arch {
                assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "arch {a:?}");
            }
            assert_eq!(req.remote, remote);
            // What a policy might echo back on the console: still one line.
            let action = BootAction::Exit { reason: format!("{req:?}") };
            if let Ok(s) = script::machine_script(&action) {
                assert_script_lines(&s, 3);
            }
        }
        Err(e) => assert_script_lines(&script::error_script(&e.to_string()), 4),
    }
    if let Ok(mac) = raw.parse::<MacAddr>() {
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
    }
}

/// `Range: HEADER` for a body of `len` bytes: the first 8 bytes are `len` (little-endian), the
/// rest the header value.
pub fn range(data: &[u8]) {
    let Some((len, header)) = data.split_first_chunk::<8>() else { return };
    let len = u64::from_le_bytes(*len);
    let Some(header) = text(header) else { return };
    for len in [len, len % 4096] {
        match muster_pxe::assets::parse_range(header, len) {
            RangeRequest::Partial { first, last } => {
                assert!(first <= last && last < len, "range {first}-{last} of {len} bytes from {header:?}");
            }
            RangeRequest::Unsatisfiable => {
                assert!(
                    header.trim().starts_with("bytes="),
                    "416 for a header that is not a byte range: {header:?}"
                );
            }
            RangeRequest::Full => {}
        }
    }
}

/// A TFTP packet on UDP 69: `parse_request`, then what the server does with a read request:
/// the path under the root and the option negotiation.
pub fn tftp(data: &[u8]) {
    let Ok(req) = tftp::parse_request(data) else { return };
    assert!(!req.filename.is_empty());
    assert!(req.mode == "octet" || req.mode == "netascii", "mode {:?}", req.mode);
    if let Ok(path) = tftp::relative_path(&req.filename) {
        assert!(path.is_relative(), "{path:?} from {:?}", req.filename);
        assert!(path.components().next().is_some(), "empty path from {:?}", req.filename);
        for c in path.components() {
            assert!(matches!(c, Component::Normal(_)), "{c:?} in {path:?} from {:?}", req.filename);
        }
    }
    let file_len = u64::try_from(data.len()).unwrap_or(u64::MAX) * 1000;
    let default_timeout = Duration::from_secs(2);
    let max_timeout = Duration::from_secs(5);
    let n = tftp::negotiate(&req.options, file_len, default_timeout, max_timeout);
    assert!((8..=tftp::MAX_BLKSIZE).contains(&n.blksize), "blksize {}", n.blksize);
    assert!(n.timeout <= max_timeout, "timeout {:?} over the server's limit", n.timeout);
    assert!(
        n.timeout == default_timeout || (1..=5).contains(&n.timeout.as_secs()),
        "timeout {:?}",
        n.timeout
    );
    for (k, v) in &n.oack {
        assert!(matches!(k.as_str(), "blksize" | "tsize" | "timeout"), "OACK option {k:?}");
        assert!(v.parse::<u64>().is_ok(), "OACK value {v:?}");
    }
}

fn boot_info() -> BootInfo {
    BootInfo {
        server_ip: Ipv4Addr::new(192, 0, 2, 1),
        http_boot_url: "http://192.0.2.1:8080/boot/start.ipxe".into(),
        tftp_bios_file: proxydhcp::IPXE_BIOS_FILE.into(),
        tftp_efi_file: proxydhcp::IPXE_EFI_FILE.into(),
    }
}

/// A UDP datagram on port 67 or 4011 (at most 1500 bytes, the server's buffer), through the
/// server's own path ([`proxydhcp::answer`]: checked and rebuilt, decoded, classified, answered,
/// encoded and addressed) on both ports, without the server's `catch_unwind`, so a panic
/// anywhere in it is a crash here.
pub fn proxydhcp(data: &[u8]) {
    let data = &data[..data.len().min(1500)];
    let info = boot_info();
    let from = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 99), 68));
    let Ok(req) = proxydhcp::decode_request(data) else {
        for port in [Port::Dhcp, Port::Pxe] {
            assert!(
                proxydhcp::answer(&info, data, port, from).is_err(),
                "answered a packet it cannot decode"
            );
        }
        return;
    };
    let _ = proxydhcp::classify(&req);
    for port in [Port::Dhcp, Port::Pxe] {
        if let Ok(ans) = proxydhcp::reply(&info, &req, port) {
            assert_eq!(ans.xid(), req.xid());
            assert_eq!(ans.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxy never hands out addresses");
            assert_eq!(ans.siaddr(), info.server_ip);
        }
        if let Ok(ans) = proxydhcp::answer(&info, data, port, from) {
            if port == Port::Pxe {
                assert_eq!(ans.to, from, "a port 4011 answer goes back to its sender");
            }
            assert!(!ans.bytes.is_empty());
        }
    }
}

/// A join token (`--token`, `muster.token=`, the Enroll request) and a CA pin
/// (`muster.ca_hash=`, `--ca-hash`).
pub fn token_pin(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let redacted = token::redact(s);
    assert!(redacted.ends_with("<redacted>"));
    if let Ok(t) = JoinToken::parse(s) {
        let shown = t.to_string();
        assert_eq!(JoinToken::parse(&shown).as_ref(), Ok(&t), "a token does not survive its display");
        assert_eq!(t.id().len(), token::ID_LEN);
        assert!(t.matches_digest(&t.digest()));
        assert!(!t.matches_digest(&t.digest()[..31]));
        let debug = format!("{t:?}");
        assert!(!debug.contains(&shown), "Debug shows the secret: {debug}");
        assert_eq!(token::redact(&shown), format!("{}.<redacted>", t.id()));
    }
    if let Ok(p) = s.parse::<CaPin>() {
        assert_eq!(p.to_string().parse::<CaPin>(), Ok(p), "a pin does not survive its display");
    }
}

/// The controller's signer with a throwaway CA (made in a temp dir that is removed at once).
static SIGNER: OnceLock<Option<Pki>> = OnceLock::new();

fn signer() -> Option<&'static Pki> {
    SIGNER
        .get_or_init(|| {
            let tmp = tempfile::tempdir().ok()?;
            let dir = muster_controller::pki::DataDir::new(tmp.path().join("data"));
            muster_controller::pki::init(&dir, &[], "https://127.0.0.1:7443").ok()?;
            Pki::load(&dir).ok()
        })
        .as_ref()
}

/// Makes the throwaway CA before the fork server starts.
pub fn csr_init() {
    let _ = signer();
}

/// The `csr_pem` of Enroll and Renew: PEM text as sent, or (input not starting with `-----`)
/// DER bytes, wrapped into PEM here so the fuzzer works on the structure. A CSR the signer
/// accepts is signed, and the certificate must say only what the controller decides.
pub fn csr(data: &[u8]) {
    let pem;
    let csr_pem = if data.starts_with(b"-----") {
        let Some(s) = text(data) else { return };
        s
    } else {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        let mut body = String::with_capacity(b64.len() + b64.len() / 64 + 80);
        body.push_str("-----BEGIN CERTIFICATE REQUEST-----\n");
        for line in b64.as_bytes().chunks(64) {
            body.push_str(&String::from_utf8_lossy(line));
            body.push('\n');
        }
        body.push_str("-----END CERTIFICATE REQUEST-----\n");
        pem = body;
        &pem
    };
    let Ok(csr) = Csr::parse(csr_pem) else { return };
    assert_eq!(csr.key_sha256.len(), 64);
    let Some(pki) = signer() else { return };
    let id = MachineId::from_random([0x5a; 8]);
    let issued = pki.sign_csr(&csr, &id, SystemTime::now(), Duration::from_secs(3600));
    let issued = match issued {
        Ok(c) => c,
        Err(e) => panic!("a CSR the signer accepted could not be signed: {e}"),
    };
    let parsed = x509_parser::pem::parse_x509_pem(issued.pem.as_bytes());
    let Ok((_, pem)) = parsed else { panic!("the signer issued unparseable PEM") };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&pem.contents) else {
        panic!("the signer issued an unparseable certificate")
    };
    let cn: Vec<_> = cert.subject().iter_common_name().filter_map(|c| c.as_str().ok()).collect();
    assert_eq!(cn, [id.as_str()], "subject CN");
    assert!(!cert.is_ca(), "a machine certificate must not be a CA");
}

/// A kernel command line (`/proc/cmdline`): the agent's `KernelArgs::parse`. What it shows
/// (the boot service writes command lines with the same `Display`) parses back to the same.
pub fn kernel_args(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let args = KernelArgs::parse(s);
    let _ = format!("{args:?}");
    for (k, _) in &args.other {
        let _ = args.get(k);
    }
    let shown = args.to_string();
    assert_eq!(KernelArgs::parse(&shown), args, "{s:?} shown as {shown:?}");
    let _ = args.after("console=ttyS0");
}

const MAX_STR: usize = 128;

/// What a node reports: the bytes as a protobuf `Inventory` (Enroll, Hello) through the
/// controller's `sanitize`, and as a `HealthSnapshot` (Heartbeat) through `sanitize_health` and
/// the health verdict. What is kept must be bounded.
pub fn inventory(data: &[u8]) {
    use muster_controller::fleet::session::{sanitize, sanitize_health};
    if let Ok(inv) = pb::Inventory::decode(data) {
        let inv = sanitize(inv);
        if !inv.hostname.is_empty() {
            assert!(inv.hostname.parse::<config::Hostname>().is_ok(), "hostname {:?}", inv.hostname);
        }
        for s in [&inv.cpu_model, &inv.kernel, &inv.os, &inv.agent_version, &inv.arch] {
            assert!(s.len() <= MAX_STR);
        }
        assert!(inv.disks.len() <= 64 && inv.nics.len() <= 32);
        for d in &inv.disks {
            assert!(d.name.len() <= MAX_STR && d.model.len() <= MAX_STR);
        }
        for n in &inv.nics {
            assert!(n.name.len() <= MAX_STR && n.mac.len() <= MAX_STR && n.addresses.len() <= 16);
            assert!(n.addresses.iter().all(|a| a.len() <= 64));
        }
        if let Some(s) = &inv.smbios {
            assert!([&s.uuid, &s.serial, &s.vendor, &s.product].iter().all(|f| f.len() <= MAX_STR));
        }
        assert!(inv.encoded_len() < 64 * 1024, "a sanitized inventory of {} bytes", inv.encoded_len());
    }
    if let Ok(h) = pb::HealthSnapshot::decode(data) {
        let h = sanitize_health(h.into());
        assert!(h.filesystems.len() <= 64 && h.networks.len() <= 64);
        assert!(h.temperatures.len() <= 64 && h.services.len() <= 64);
        assert!(h.services.iter().all(|s| s.name.len() <= MAX_STR && s.detail.len() <= 256));
        let th = muster_controller::fleet::health::Thresholds::default();
        let now = 1_700_000_000_000;
        let verdict = muster_controller::fleet::health::evaluate(
            State::Ready,
            Some(&h),
            now + 3_600_000,
            now,
            now,
            Vec::new(),
            &th,
        );
        let _ = verdict.status.as_str();
    }
}

/// Machine configs: the input as one YAML document through `config::parse` (as the agent and
/// `muster config` parse one), and split at NUL bytes into cluster, role and machine layers
/// through `config::render` (as the controller renders). A valid config must survive
/// `to_yaml` → `parse` unchanged: that is how the controller sends it to the agent.
pub fn config(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok((cfg, _)) = config::parse(s) {
        assert_round_trip(&cfg);
    }
    const NAMES: [&str; 3] = ["cluster", "role", "machine"];
    let values: Vec<serde_json::Value> =
        s.split('\0').take(3).filter_map(|part| config::parse_value(part).ok()).collect();
    let layers: Vec<(&'static str, &serde_json::Value)> = NAMES.into_iter().zip(values.iter()).collect();
    if let Ok((cfg, _)) = config::render(&layers) {
        assert_round_trip(&cfg);
    }
}

fn assert_round_trip(cfg: &config::MachineConfig) {
    let yaml = match cfg.to_yaml() {
        Ok(y) => y,
        Err(e) => panic!("a valid config does not render to YAML: {e}\n{cfg:?}"),
    };
    match config::parse(&yaml) {
        Ok((again, _)) => assert_eq!(&again, cfg, "the config changed through YAML:\n{yaml}"),
        Err(e) => panic!("a valid config's YAML does not parse: {e}\n{yaml}"),
    }
}
