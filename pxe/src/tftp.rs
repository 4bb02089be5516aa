//! A read-only TFTP server (RFC 1350) with the option extension (RFC 2347) and the `blksize`
//! (RFC 2348), `tsize` and `timeout` (RFC 2349) options, for iPXE binaries.
//!
//! Every transfer runs on its own ephemeral UDP socket (its TID), connected to the client.
//! Write requests get error 2; paths are relative to the root (a leading `/` is ignored, `\` is
//! a separator as PXE ROMs sometimes send), `..` is refused and symlinks must stay inside the
//! root. `netascii` is served as `octet`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::PxeError;

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// TFTP error codes.
pub mod code {
    pub const UNDEFINED: u16 = 0;
    pub const NOT_FOUND: u16 = 1;
    pub const ACCESS: u16 = 2;
    pub const ILLEGAL: u16 = 4;
    pub const OPTION: u16 = 8;
}

/// Largest block size of RFC 2348.
pub const MAX_BLKSIZE: usize = 65464;
const DEFAULT_BLKSIZE: usize = 512;

/// A parsed read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub filename: String,
    pub mode: String,
    /// Options as sent, names lower-cased, in order.
    pub options: Vec<(String, String)>,
}

/// A request that gets an ERROR packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TFTP error {code}: {message}")]
pub struct TftpError {
    pub code: u16,
    pub message: String,
}

fn terr(code: u16, message: impl Into<String>) -> TftpError {
    TftpError { code, message: message.into() }
}

/// Parses the first packet of a transfer.
pub fn parse_request(p: &[u8]) -> Result<ReadRequest, TftpError> {
    let op = p.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match op {
        Some(RRQ) => {}
        Some(WRQ) => return Err(terr(code::ACCESS, "this server is read-only")),
        _ => return Err(terr(code::ILLEGAL, "expected a read request")),
    }
    let body = &p[2..];
    let body = body.strip_suffix(&[0]).ok_or_else(|| terr(code::ILLEGAL, "request not NUL-terminated"))?;
    let mut fields = body.split(|b| *b == 0);
    let mut next = |what: &str| -> Result<Option<String>, TftpError> {
        match fields.next() {
            Some(f) => std::str::from_utf8(f)
                .map(|s| Some(s.to_owned()))
                .map_err(|_| terr(code::ILLEGAL, format!("{what} is not UTF-8"))),
            None => Ok(None),
        }
    };
    let missing = |what: &str| terr(code::ILLEGAL, format!("request has no {what}"));
    let filename = next("file name")?.ok_or_else(|| missing("file name"))?;
    let mode = next("mode")?.ok_or_else(|| missing("mode"))?.to_ascii_lowercase();
    let mut options = Vec::new();
    while let Some(name) = next("option name")? {
        let value = next("option value")?.ok_or_else(|| missing("option value"))?;
        options.push((name.to_ascii_lowercase(), value));
    }
    if filename.is_empty() {
        return Err(terr(code::ILLEGAL, "empty file name"));
    }
    if mode != "octet" && mode != "netascii" {
        return Err(terr(code::ILLEGAL, format!("transfer mode {mode:?} is not supported")));
    }
    Ok(ReadRequest { filename, mode, options })
}

/// The path of `name` relative to the root: `..` refused, `/` prefix and `.` dropped, `\` a
/// separator.
pub fn relative_path(name: &str) -> Result<PathBuf, TftpError> {
    let mut out = PathBuf::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(terr(code::ACCESS, format!("{name:?}: \"..\" is not allowed"))),
            p => out.push(p),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(terr(code::NOT_FOUND, format!("{name:?}: no file name")));
    }
    Ok(out)
}

/// Negotiated transfer parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: usize,
    pub timeout: Duration,
    /// What goes into the OACK (empty: no OACK, send DATA 1 directly).
    pub oack: Vec<(String, String)>,
}

/// Applies the options the client asked for; unknown or invalid ones are left out of the OACK.
pub fn negotiate(options: &[(String, String)], file_len: u64, default_timeout: Duration) -> Negotiated {
    let mut n = Negotiated { blksize: DEFAULT_BLKSIZE, timeout: default_timeout, oack: Vec::new() };
    for (name, value) in options {
        match name.as_str() {
            "blksize" => {
                if let Ok(b) = value.parse::<usize>() {
                    if b >= 8 {
                        n.blksize = b.min(MAX_BLKSIZE);
                        n.oack.push((name.clone(), n.blksize.to_string()));
                    }
                }
            }
            "tsize" => n.oack.push((name.clone(), file_len.to_string())),
            "timeout" => {
                if let Ok(t) = value.parse::<u64>() {
                    if (1..=255).contains(&t) {
                        n.timeout = Duration::from_secs(t);
                        n.oack.push((name.clone(), t.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    n
}

fn error_packet(e: &TftpError) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + e.message.len());
    p.extend_from_slice(&ERROR.to_be_bytes());
    p.extend_from_slice(&e.code.to_be_bytes());
    p.extend_from_slice(e.message.as_bytes());
    p.push(0);
    p
}

fn oack_packet(opts: &[(String, String)]) -> Vec<u8> {
    let mut p = OACK.to_be_bytes().to_vec();
    for (k, v) in opts {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// Retransmission settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    /// Wait this long for an ACK unless the client negotiated `timeout`.
    pub timeout: Duration,
    /// Send a packet at most 1 + `retries` times.
    pub retries: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Retransmit { timeout: Duration::from_secs(2), retries: 5 }
    }
}

/// A bound TFTP server.
#[derive(Debug)]
pub struct TftpServer {
    root: PathBuf,
    sock: UdpSocket,
    retransmit: Retransmit,
    max_transfers: usize,
}

impl TftpServer {
    /// Binds `bind` (port 0 for an ephemeral port; 69 needs privileges) to serve files under
    /// `root`.
    pub async fn bind(root: impl Into<PathBuf>, bind: SocketAddr) -> Result<Self, PxeError> {
        let root = root.into();
        let root = tokio::fs::canonicalize(&root)
            .await
            .map_err(|e| PxeError::io(format!("TFTP root {}", root.display()), e))?;
        let sock = UdpSocket::bind(bind).await.map_err(|e| PxeError::io(format!("TFTP bind {bind}"), e))?;
        Ok(TftpServer { root, sock, retransmit: Retransmit::default(), max_transfers: 64 })
    }

    pub fn with_retransmit(mut self, r: Retransmit) -> Self {
        self.retransmit = r;
        self
    }

    pub fn local_addr(&self) -> Result<SocketAddr, PxeError> {
        self.sock.local_addr().map_err(|e| PxeError::io("TFTP local address", e))
    }

    /// Serves until `shutdown` completes; transfers in flight are then cut off.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), PxeError> {
        let local = self.local_addr()?;
        tracing::info!(%local, root = %self.root.display(), "TFTP serving");
        let root = Arc::new(self.root);
        let slots = Arc::new(Semaphore::new(self.max_transfers));
        let mut transfers = JoinSet::new();
        let mut buf = vec![0u8; 2048];
        tokio::pin!(shutdown);
        loop {
            let (n, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                Some(_) = transfers.join_next(), if !transfers.is_empty() => continue,
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "TFTP: receiving");
                        continue;
                    }
                },
            };
            let packet = buf[..n].to_vec();
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "TFTP: too many transfers, refusing");
                let _ = self.sock.send_to(&error_packet(&terr(code::UNDEFINED, "server busy")), peer).await;
                continue;
            };
            let (root, retransmit) = (root.clone(), self.retransmit);
            transfers.spawn(async move {
                transfer(&root, local, peer, &packet, retransmit).await;
                drop(permit);
            });
        }
    }
}

/// Opens `name` under `root`, refusing anything that resolves outside it.
async fn open(root: &Path, name: &str) -> Result<(tokio::fs::File, u64), TftpError> {
    let rel = relative_path(name)?;
    let not_found = || terr(code::NOT_FOUND, format!("{name}: file not found"));
    let path = tokio::fs::canonicalize(root.join(&rel)).await.map_err(|_| not_found())?;
    if !path.starts_with(root) {
        return Err(terr(code::ACCESS, format!("{name}: outside the TFTP root")));
    }
    let file = tokio::fs::File::open(&path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => terr(code::ACCESS, format!("{name}: permission denied")),
        _ => not_found(),
    })?;
    let meta = file.metadata().await.map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    Ok((file, meta.len()))
}

/// Why a transfer stopped early.
#[derive(Debug)]
enum Abort {
    Timeout,
    Client(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Abort {
    fn from(e: std::io::Error) -> Self {
        Abort::Io(e)
    }
}

/// Sends `packet` and waits for ACK `block`, retransmitting on timeout.
async fn send_acked(
    sock: &UdpSocket,
    packet: &[u8],
    block: u16,
    timeout: Duration,
    retries: u32,
) -> Result<(), Abort> {
    let mut buf = vec![0u8; 1024];
    for _ in 0..=retries {
        sock.send(packet).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break, // retransmit
                Ok(r) => r?,
            };
            if n < 4 {
                continue;
            }
            let op = u16::from_be_bytes([buf[0], buf[1]]);
            let arg = u16::from_be_bytes([buf[2], buf[3]]);
            match op {
                ACK if arg == block => return Ok(()),
                // An older ACK (duplicate): keep waiting, do not resend (Sorcerer's Apprentice).
                ACK => {}
                ERROR => {
                    let msg = String::from_utf8_lossy(buf[4..n].split(|b| *b == 0).next().unwrap_or(&[]));
                    return Err(Abort::Client(format!("error {arg}: {msg}")));
                }
                _ => {}
            }
        }
    }
    Err(Abort::Timeout)
}

async fn transfer(root: &Path, local: SocketAddr, peer: SocketAddr, packet: &[u8], rt: Retransmit) {
    let bind = SocketAddr::new(local.ip(), 0);
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "TFTP: transfer socket");
            return;
        }
    };
    if let Err(e) = sock.connect(peer).await {
        tracing::warn!(%peer, error = %e, "TFTP: connecting the transfer socket");
        return;
    }
    let fail = |e: TftpError| {
        let sock = &sock;
        async move {
            tracing::info!(%peer, error = %e, "TFTP: refused");
            let _ = sock.send(&error_packet(&e)).await;
        }
    };
    let req = match parse_request(packet) {
        Ok(r) => r,
        Err(e) => return fail(e).await,
    };
    let (mut file, len) = match open(root, &req.filename).await {
        Ok(f) => f,
        Err(e) => return fail(e).await,
    };
    let neg = negotiate(&req.options, len, rt.timeout);
    tracing::info!(%peer, file = %req.filename, bytes = len, blksize = neg.blksize, "TFTP: sending");
    let started = std::time::Instant::now();
    match send_file(&sock, &mut file, &neg, rt.retries).await {
        Ok(()) => {
            tracing::info!(%peer, file = %req.filename, bytes = len, elapsed = ?started.elapsed(), "TFTP: sent")
        }
        Err(Abort::Io(e)) => {
            tracing::warn!(%peer, file = %req.filename, error = %e, "TFTP: transfer failed");
            let _ = sock.send(&error_packet(&terr(code::UNDEFINED, format!("read error: {e}")))).await;
        }
        Err(Abort::Timeout) => tracing::warn!(%peer, file = %req.filename, "TFTP: client stopped answering"),
        Err(Abort::Client(m)) => {
            tracing::info!(%peer, file = %req.filename, client = %m, "TFTP: client aborted")
        }
    }
}

async fn send_file(
    sock: &UdpSocket,
    file: &mut tokio::fs::File,
    neg: &Negotiated,
    retries: u32,
) -> Result<(), Abort> {
    if !neg.oack.is_empty() {
        // The client acknowledges an OACK with ACK 0 (or refuses it with ERROR 8).
        send_acked(sock, &oack_packet(&neg.oack), 0, neg.timeout, retries).await?;
    }
    let mut block: u16 = 1;
    let mut packet = vec![0u8; 4 + neg.blksize];
    loop {
        packet[..2].copy_from_slice(&DATA.to_be_bytes());
        packet[2..4].copy_from_slice(&block.to_be_bytes());
        let mut filled = 0;
        while filled < neg.blksize {
            let n = file.read(&mut packet[4 + filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        send_acked(sock, &packet[..4 + filled], block, neg.timeout, retries).await?;
        if filled < neg.blksize {
            return Ok(());
        }
        // Block numbers roll over after 65535 (what iPXE and most clients expect).
        block = block.wrapping_add(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut p = RRQ.to_be_bytes().to_vec();
        for s in parts {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
        p
    }

    #[test]
    fn parses_requests() {
        let r = parse_request(&rrq(&["undionly.kpxe", "OCTET", "blksize", "1468", "tsize", "0"])).unwrap();
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(r.mode, "octet");
        assert_eq!(r.options, vec![("blksize".into(), "1468".into()), ("tsize".into(), "0".into())]);
        assert_eq!(parse_request(&rrq(&["f", "netascii"])).unwrap().mode, "netascii");
        let mut wrq = rrq(&["f", "octet"]);
        wrq[1] = 2;
        assert_eq!(parse_request(&wrq).unwrap_err().code, code::ACCESS);
        assert_eq!(parse_request(&rrq(&["f", "mail"])).unwrap_err().code, code::ILLEGAL);
        assert_eq!(parse_request(&rrq(&["f"])).unwrap_err().code, code::ILLEGAL);
        assert_eq!(parse_request(&rrq(&["f", "octet", "blksize"])).unwrap_err().code, code::ILLEGAL);
        assert_eq!(parse_request(b"\x00\x01f\x00octet").unwrap_err().code, code::ILLEGAL);
        assert_eq!(parse_request(b"\x00").unwrap_err().code, code::ILLEGAL);
        assert_eq!(parse_request(b"").unwrap_err().code, code::ILLEGAL);
    }

    #[test]
    fn paths_stay_inside() {
        assert_eq!(relative_path("/undionly.kpxe").unwrap(), PathBuf::from("undionly.kpxe"));
        assert_eq!(relative_path("a\\b/./c").unwrap(), PathBuf::from("a/b/c"));
        for bad in ["../etc/passwd", "a/../../b", "..\\x", "/.."] {
            assert_eq!(relative_path(bad).unwrap_err().code, code::ACCESS, "{bad}");
        }
        assert_eq!(relative_path("/").unwrap_err().code, code::NOT_FOUND);
    }

    #[test]
    fn negotiates_options() {
        let o = |v: &[(&str, &str)]| v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect::<Vec<_>>();
        let t = Duration::from_secs(2);
        let n = negotiate(&o(&[("blksize", "1468"), ("tsize", "0"), ("timeout", "3")]), 1000, t);
        assert_eq!((n.blksize, n.timeout), (1468, Duration::from_secs(3)));
        assert_eq!(n.oack, o(&[("blksize", "1468"), ("tsize", "1000"), ("timeout", "3")]));
        let n = negotiate(&o(&[("blksize", "100000"), ("windowsize", "4")]), 0, t);
        assert_eq!((n.blksize, n.oack), (MAX_BLKSIZE, o(&[("blksize", "65464")])));
        let n = negotiate(&o(&[("blksize", "4"), ("timeout", "0")]), 0, t);
        assert_eq!((n.blksize, n.timeout, n.oack.is_empty()), (512, t, true));
    }

    #[test]
    fn packets() {
        assert_eq!(error_packet(&terr(1, "nope")), b"\x00\x05\x00\x01nope\x00");
        assert_eq!(oack_packet(&[("tsize".into(), "5".into())]), b"\x00\x06tsize\x005\x00");
    }
}
