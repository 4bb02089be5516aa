//! A read-only TFTP server (RFC 1350) with the option extension (RFC 2347) and the `blksize`
//! (RFC 2348), `tsize` and `timeout` (RFC 2349) options, for iPXE binaries.
//!
//! Every transfer runs on its own ephemeral UDP socket (its TID), connected to the client.
//! Write requests get error 2; paths are relative to the root (a leading `/` is ignored, `\` is
//! a separator as PXE ROMs sometimes send), `..` is refused and symlinks must stay inside the
//! root. `netascii` is served as `octet`.
//!
//! # Limits ([`TftpLimits`])
//!
//! UDP sources can be forged and TFTP has no handshake, so the server guards itself and others:
//! - **Slots**: at most `max_transfers` transfers at once, and `per_address` from one client
//!   address; a request beyond either gets a short "server busy" error.
//! - **Time**: a client may ask for a retransmission `timeout` of at most `max_timeout` (a
//!   larger one is declined: left out of the OACK, as RFC 2349 allows, and the server's own
//!   timeout applies); every transfer ends after `transfer_deadline` whatever happens.
//! - **Amplification**: until the client has acknowledged something (proof that it lives at the
//!   address the request came from), the server sends at most `amplification` times the
//!   request's size — but always its first packet once, which RFC 1350 requires. With options,
//!   that first packet is the small OACK and data follows only after ACK 0; without options it
//!   is one 512-byte DATA block, not retransmitted unless the budget allows it.
//! - **Strays**: packets on port 69 that are not requests (ACKs and ERRORs of no transfer,
//!   DATA, garbage) and malformed requests are dropped without an answer; on a transfer's
//!   socket, anything but the expected ACK or an ERROR is ignored.
//! - **Duplicate options**: RFC 2347 does not say what a request that names an option twice
//!   means; the first instance counts and later ones are ignored (and not acknowledged).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::{PxeError, Untrusted};

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

/// Why the first packet of a transfer is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// A well-formed request this server does not serve: answered with an ERROR.
    Answer(TftpError),
    /// Not a request, or a broken one: dropped without an answer.
    Drop(String),
}

fn parse(p: &[u8]) -> Result<ReadRequest, Refusal> {
    let drop = |why: &str| Refusal::Drop(why.to_owned());
    let op = p.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match op {
        Some(RRQ) => {}
        Some(WRQ) => return Err(Refusal::Answer(terr(code::ACCESS, "this server is read-only"))),
        Some(op) => return Err(Refusal::Drop(format!("opcode {op} without a transfer"))),
        None => return Err(drop("shorter than an opcode")),
    }
    let body = &p[2..];
    let body = body.strip_suffix(&[0]).ok_or_else(|| drop("request not NUL-terminated"))?;
    let mut fields = body.split(|b| *b == 0).map(std::str::from_utf8);
    let mut next = |what: &str| -> Result<Option<String>, Refusal> {
        match fields.next() {
            Some(Ok(s)) => Ok(Some(s.to_owned())),
            Some(Err(_)) => Err(Refusal::Drop(format!("{what} is not UTF-8"))),
            None => Ok(None),
        }
    };
    let filename = next("file name")?.ok_or_else(|| drop("request has no file name"))?;
    let mode = next("mode")?.ok_or_else(|| drop("request has no mode"))?.to_ascii_lowercase();
    let mut options = Vec::new();
    while let Some(name) = next("option name")? {
        let value = next("option value")?.ok_or_else(|| drop("option without a value"))?;
        options.push((name.to_ascii_lowercase(), value));
    }
    if filename.is_empty() {
        return Err(drop("empty file name"));
    }
    if mode != "octet" && mode != "netascii" {
        // Short and without the client's text: an answer no bigger than a small request.
        return Err(Refusal::Answer(terr(code::ILLEGAL, "only octet mode")));
    }
    Ok(ReadRequest { filename, mode, options })
}

/// Parses the first packet of a transfer.
pub fn parse_request(p: &[u8]) -> Result<ReadRequest, TftpError> {
    parse(p).map_err(|r| match r {
        Refusal::Answer(e) => e,
        Refusal::Drop(why) => terr(code::ILLEGAL, why),
    })
}

/// The path of `name` relative to the root: `..` refused, `/` prefix and `.` dropped, `\` a
/// separator.
pub fn relative_path(name: &str) -> Result<PathBuf, TftpError> {
    let mut out = PathBuf::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(terr(code::ACCESS, format!("{:?}: \"..\" is not allowed", Untrusted(name)))),
            p => out.push(p),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(terr(code::NOT_FOUND, format!("{:?}: no file name", Untrusted(name))));
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

/// Applies the options the client asked for; unknown, invalid and repeated ones (the first
/// instance counts) are left out of the OACK, and so is a `timeout` above `max_timeout`
/// (`default_timeout` then applies, clamped to `max_timeout` too).
pub fn negotiate(
    options: &[(String, String)],
    file_len: u64,
    default_timeout: Duration,
    max_timeout: Duration,
) -> Negotiated {
    let mut n =
        Negotiated { blksize: DEFAULT_BLKSIZE, timeout: default_timeout.min(max_timeout), oack: Vec::new() };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in options {
        if seen.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
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
                    if (1..=255).contains(&t) && Duration::from_secs(t) <= max_timeout {
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
    /// Send a packet at most 1 + `retries` times (before the client's first ACK, the
    /// amplification budget may allow fewer).
    pub retries: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Retransmit { timeout: Duration::from_secs(2), retries: 5 }
    }
}

/// What one client, or a flood of forged requests, may take (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TftpLimits {
    /// Transfers at once, from all clients.
    pub max_transfers: usize,
    /// Transfers at once from one client address.
    pub per_address: usize,
    /// The longest retransmission timeout a client may ask for.
    pub max_timeout: Duration,
    /// A transfer still running after this is abandoned.
    pub transfer_deadline: Duration,
    /// Until the client's first ACK, bytes sent ≤ this × the request's size (the first packet
    /// is always sent once).
    pub amplification: usize,
}

impl Default for TftpLimits {
    fn default() -> Self {
        TftpLimits {
            max_transfers: 64,
            per_address: 4,
            max_timeout: Duration::from_secs(5),
            transfer_deadline: Duration::from_secs(120),
            amplification: 3,
        }
    }
}

/// Counters since the server was bound.
#[derive(Debug, Default)]
struct Counters {
    active: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    dropped: AtomicU64,
}

/// A snapshot of [`TftpServer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TftpStats {
    /// Transfers running now.
    pub active: u64,
    /// Files sent completely.
    pub served: u64,
    /// Transfers that ended early (refused file, client gone or aborted, deadline).
    pub failed: u64,
    /// Requests refused for lack of a slot.
    pub busy: u64,
    /// Packets on port 69 dropped without an answer (strays, malformed requests).
    pub dropped: u64,
}

/// A bound TFTP server.
#[derive(Debug)]
pub struct TftpServer {
    root: PathBuf,
    sock: UdpSocket,
    retransmit: Retransmit,
    limits: TftpLimits,
    counters: Arc<Counters>,
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
        Ok(TftpServer {
            root,
            sock,
            retransmit: Retransmit::default(),
            limits: TftpLimits::default(),
            counters: Arc::default(),
        })
    }

    pub fn with_retransmit(mut self, r: Retransmit) -> Self {
        self.retransmit = r;
        self
    }

    pub fn with_limits(mut self, l: TftpLimits) -> Self {
        self.limits = l;
        self
    }

    pub fn local_addr(&self) -> Result<SocketAddr, PxeError> {
        self.sock.local_addr().map_err(|e| PxeError::io("TFTP local address", e))
    }

    pub fn stats(&self) -> TftpStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TftpStats {
            active: get(&c.active),
            served: get(&c.served),
            failed: get(&c.failed),
            busy: get(&c.busy),
            dropped: get(&c.dropped),
        }
    }

    /// Serves until `shutdown` completes; transfers in flight are then cut off. The socket
    /// stays bound as long as `self` lives, so a supervisor can call this again.
    pub async fn serve(&self, shutdown: impl Future<Output = ()>) -> Result<(), PxeError> {
        let local = self.local_addr()?;
        tracing::info!(%local, root = %self.root.display(), "TFTP serving");
        // A restarted serve starts with no transfers (the last one's ended with it).
        self.counters.active.store(0, Ordering::Relaxed);
        let root = Arc::new(self.root.clone());
        let mut transfers = JoinSet::new();
        let mut owners: HashMap<tokio::task::Id, IpAddr> = HashMap::new();
        let mut per_address: HashMap<IpAddr, usize> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        tokio::pin!(shutdown);
        loop {
            let (n, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                Some(done) = transfers.join_next_with_id(), if !transfers.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            if e.is_panic() {
                                tracing::error!("TFTP: a transfer panicked");
                            }
                            e.id()
                        }
                    };
                    if let Some(ip) = owners.remove(&id) {
                        if let Some(c) = per_address.get_mut(&ip) {
                            *c = c.saturating_sub(1);
                            if *c == 0 {
                                per_address.remove(&ip);
                            }
                        }
                    }
                    self.counters.active.store(transfers.len() as u64, Ordering::Relaxed);
                    continue;
                }
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "TFTP: receiving");
                        continue;
                    }
                },
            };
            let req = match parse(&buf[..n]) {
                Ok(r) => r,
                Err(Refusal::Drop(why)) => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, bytes = n, why = %Untrusted(&why), "TFTP: dropped a packet");
                    continue;
                }
                Err(Refusal::Answer(e)) => {
                    tracing::info!(%peer, error = %e, "TFTP: refused");
                    let _ = self.sock.send_to(&error_packet(&e), peer).await;
                    continue;
                }
            };
            let ip = peer.ip();
            let from_peer = per_address.get(&ip).copied().unwrap_or(0);
            if transfers.len() >= self.limits.max_transfers || from_peer >= self.limits.per_address {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, transfers = transfers.len(), from_peer, "TFTP: no transfer slot free, refusing");
                let _ = self.sock.send_to(&error_packet(&terr(code::UNDEFINED, "server busy")), peer).await;
                continue;
            }
            let t = Transfer {
                root: root.clone(),
                local,
                peer,
                request_len: n,
                retransmit: self.retransmit,
                limits: self.limits,
                counters: self.counters.clone(),
            };
            let handle = transfers.spawn(t.run(req));
            owners.insert(handle.id(), ip);
            *per_address.entry(ip).or_default() += 1;
            self.counters.active.store(transfers.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Opens `name` under `root`, refusing anything that resolves outside it.
async fn open(root: &Path, name: &str) -> Result<(tokio::fs::File, u64), TftpError> {
    let rel = relative_path(name)?;
    let shown = Untrusted(name);
    let not_found = || terr(code::NOT_FOUND, format!("{shown}: file not found"));
    let path = tokio::fs::canonicalize(root.join(&rel)).await.map_err(|_| not_found())?;
    if !path.starts_with(root) {
        return Err(terr(code::ACCESS, format!("{shown}: outside the TFTP root")));
    }
    let file = tokio::fs::File::open(&path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => terr(code::ACCESS, format!("{shown}: permission denied")),
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
    /// The client did not acknowledge in time.
    Timeout,
    /// No ACK yet and the amplification budget is spent.
    Unconfirmed,
    Client(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Abort {
    fn from(e: std::io::Error) -> Self {
        Abort::Io(e)
    }
}

/// One transfer's socket and what it may still send.
struct Link {
    sock: UdpSocket,
    /// Whether the client has acknowledged anything (it lives at its address).
    confirmed: bool,
    /// Bytes sent so far and the most allowed before confirmation.
    sent: usize,
    budget: usize,
}

impl Link {
    /// Sends `packet` and waits for ACK `block`, retransmitting on timeout within the retries
    /// and, before the client's first ACK, within the amplification budget.
    async fn send_acked(
        &mut self,
        packet: &[u8],
        block: u16,
        timeout: Duration,
        retries: u32,
    ) -> Result<(), Abort> {
        let mut buf = vec![0u8; 1024];
        for attempt in 0..=retries {
            if attempt > 0 && !self.confirmed && self.sent + packet.len() > self.budget {
                return Err(Abort::Unconfirmed);
            }
            self.sock.send(packet).await?;
            self.sent += packet.len();
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let n = match tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await {
                    Err(_) => break, // retransmit
                    Ok(r) => r?,
                };
                if n < 4 {
                    continue;
                }
                let op = u16::from_be_bytes([buf[0], buf[1]]);
                let arg = u16::from_be_bytes([buf[2], buf[3]]);
                match op {
                    ACK if arg == block => {
                        self.confirmed = true;
                        return Ok(());
                    }
                    // An older ACK (duplicate): keep waiting, do not resend (Sorcerer's Apprentice).
                    ACK => self.confirmed = true,
                    ERROR => {
                        let msg = String::from_utf8_lossy(buf[4..n].split(|b| *b == 0).next().unwrap_or(&[]))
                            .into_owned();
                        return Err(Abort::Client(format!("error {arg}: {}", Untrusted(&msg))));
                    }
                    _ => {}
                }
            }
        }
        Err(Abort::Timeout)
    }
}

/// One transfer: everything it needs, owned, so that it runs as its own task.
struct Transfer {
    root: Arc<PathBuf>,
    local: SocketAddr,
    peer: SocketAddr,
    request_len: usize,
    retransmit: Retransmit,
    limits: TftpLimits,
    counters: Arc<Counters>,
}

impl Transfer {
    async fn run(self, req: ReadRequest) {
        let (peer, file) = (self.peer, Untrusted(&req.filename));
        let outcome = tokio::time::timeout(self.limits.transfer_deadline, self.send(&req)).await;
        let ok = match outcome {
            Ok(Ok(())) => true,
            Ok(Err(())) => false,
            Err(_) => {
                tracing::warn!(%peer, %file, deadline = ?self.limits.transfer_deadline, "TFTP: transfer deadline passed, abandoned");
                false
            }
        };
        let counter = if ok { &self.counters.served } else { &self.counters.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends the file; `Err` when the transfer did not complete (already logged).
    async fn send(&self, req: &ReadRequest) -> Result<(), ()> {
        let (peer, file) = (self.peer, Untrusted(&req.filename));
        let bind = SocketAddr::new(self.local.ip(), 0);
        let sock = match UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "TFTP: transfer socket");
                return Err(());
            }
        };
        if let Err(e) = sock.connect(peer).await {
            tracing::warn!(%peer, error = %e, "TFTP: connecting the transfer socket");
            return Err(());
        }
        let budget = self.limits.amplification.saturating_mul(self.request_len);
        let mut link = Link { sock, confirmed: false, sent: 0, budget };
        let (mut f, len) = match open(&self.root, &req.filename).await {
            Ok(f) => f,
            Err(e) => {
                tracing::info!(%peer, error = %e, "TFTP: refused");
                let _ = link.sock.send(&error_packet(&e)).await;
                return Err(());
            }
        };
        let neg = negotiate(&req.options, len, self.retransmit.timeout, self.limits.max_timeout);
        tracing::info!(%peer, %file, bytes = len, blksize = neg.blksize, "TFTP: sending");
        let started = std::time::Instant::now();
        match send_file(&mut link, &mut f, &neg, self.retransmit.retries).await {
            Ok(()) => {
                tracing::info!(%peer, %file, bytes = len, elapsed = ?started.elapsed(), "TFTP: sent");
                return Ok(());
            }
            Err(Abort::Io(e)) => {
                tracing::warn!(%peer, %file, error = %e, "TFTP: transfer failed");
                let _ =
                    link.sock.send(&error_packet(&terr(code::UNDEFINED, format!("read error: {e}")))).await;
            }
            Err(Abort::Timeout) => tracing::warn!(%peer, %file, "TFTP: client stopped answering"),
            Err(Abort::Unconfirmed) => tracing::info!(%peer, %file, sent = link.sent,
                "TFTP: no acknowledgement from the client; not sending more to an unconfirmed address"),
            Err(Abort::Client(m)) => tracing::info!(%peer, %file, client = %m, "TFTP: client aborted"),
        }
        Err(())
    }
}

async fn send_file(
    link: &mut Link,
    file: &mut tokio::fs::File,
    neg: &Negotiated,
    retries: u32,
) -> Result<(), Abort> {
    if !neg.oack.is_empty() {
        // The client acknowledges an OACK with ACK 0 (or refuses it with ERROR 8).
        link.send_acked(&oack_packet(&neg.oack), 0, neg.timeout, retries).await?;
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
        link.send_acked(&packet[..4 + filled], block, neg.timeout, retries).await?;
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
        let (t, max) = (Duration::from_secs(2), Duration::from_secs(5));
        let n = negotiate(&o(&[("blksize", "1468"), ("tsize", "0"), ("timeout", "3")]), 1000, t, max);
        assert_eq!((n.blksize, n.timeout), (1468, Duration::from_secs(3)));
        assert_eq!(n.oack, o(&[("blksize", "1468"), ("tsize", "1000"), ("timeout", "3")]));
        let n = negotiate(&o(&[("blksize", "100000"), ("windowsize", "4")]), 0, t, max);
        assert_eq!((n.blksize, n.oack), (MAX_BLKSIZE, o(&[("blksize", "65464")])));
        let n = negotiate(&o(&[("blksize", "4"), ("timeout", "0")]), 0, t, max);
        assert_eq!((n.blksize, n.timeout, n.oack.is_empty()), (512, t, true));
    }

    #[test]
    fn long_timeouts_are_declined() {
        let o = |v: &[(&str, &str)]| v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect::<Vec<_>>();
        let (t, max) = (Duration::from_secs(2), Duration::from_secs(5));
        // Above the limit: left out of the OACK (RFC 2349 has the server echo the value or
        // decline it), the server's timeout applies.
        for asked in ["6", "255"] {
            let n = negotiate(&o(&[("timeout", asked), ("tsize", "0")]), 7, t, max);
            assert_eq!((n.timeout, n.oack), (t, o(&[("tsize", "7")])), "{asked}");
        }
        let n = negotiate(&o(&[("timeout", "5")]), 7, t, max);
        assert_eq!((n.timeout, n.oack), (max, o(&[("timeout", "5")])));
        // The server's own default is clamped too.
        assert_eq!(negotiate(&[], 0, Duration::from_secs(30), max).timeout, max);
    }

    #[test]
    fn repeated_options_count_once_first_wins() {
        let o = |v: &[(&str, &str)]| v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect::<Vec<_>>();
        let (t, max) = (Duration::from_secs(2), Duration::from_secs(5));
        let n = negotiate(
            &o(&[
                ("blksize", "1024"),
                ("tsize", "0"),
                ("blksize", "8"),
                ("timeout", "1"),
                ("timeout", "4"),
                ("tsize", "9"),
            ]),
            70,
            t,
            max,
        );
        assert_eq!((n.blksize, n.timeout), (1024, Duration::from_secs(1)));
        assert_eq!(n.oack, o(&[("blksize", "1024"), ("tsize", "70"), ("timeout", "1")]));
        // A first instance that is invalid still counts: the later one is not taken instead.
        let n = negotiate(&o(&[("blksize", "x"), ("blksize", "1024")]), 0, t, max);
        assert_eq!((n.blksize, n.oack.is_empty()), (512, true));
        // Names compare after lower-casing (the parser lower-cases them).
        let r = parse_request(&rrq(&["f", "octet", "BLKSIZE", "1024", "blksize", "2048"])).unwrap();
        assert_eq!(negotiate(&r.options, 0, t, max).blksize, 1024);
    }

    #[test]
    fn strays_are_dropped_and_requests_answered() {
        for stray in [
            &b"\x00\x04\x00\x01"[..],
            b"\x00\x05\x00\x01x\x00",
            b"\x00\x03\x00\x01data",
            b"\x00",
            b"",
            b"GET / HTTP/1.1\r\n",
            b"\x00\x01f\x00octet",
            b"\x00\x01\xff\x00octet\x00",
        ] {
            assert!(matches!(parse(stray), Err(Refusal::Drop(_))), "{stray:?}");
        }
        let mut wrq = rrq(&["f", "octet"]);
        wrq[1] = 2;
        assert!(matches!(parse(&wrq), Err(Refusal::Answer(TftpError { code: code::ACCESS, .. }))));
        assert!(matches!(
            parse(&rrq(&["f", "mail"])),
            Err(Refusal::Answer(TftpError { code: code::ILLEGAL, .. }))
        ));
        assert!(parse(&rrq(&["f", "octet"])).is_ok());
    }

    #[test]
    fn packets() {
        assert_eq!(error_packet(&terr(1, "nope")), b"\x00\x05\x00\x01nope\x00");
        assert_eq!(oack_packet(&[("tsize".into(), "5".into())]), b"\x00\x06tsize\x005\x00");
    }
}
