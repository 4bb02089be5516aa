//! The TFTP server against busybox's client and a hand-driven client on loopback (127.0.0.1,
//! and 127.0.0.2 for a second client address: both are on `lo` without any setup).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pseudo_random;
use muster_pxe::tftp::{Retransmit, TftpLimits, TftpServer, TftpStats};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    server: Arc<TftpServer>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(root: &Path, retransmit: Retransmit) -> Server {
        Self::start_with(root, retransmit, TftpLimits::default()).await
    }

    async fn start_with(root: &Path, retransmit: Retransmit, limits: TftpLimits) -> Server {
        let s = TftpServer::bind(root, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_retransmit(retransmit)
            .with_limits(limits);
        let addr = s.local_addr().unwrap();
        let server = Arc::new(s);
        let (tx, rx) = oneshot::channel();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { addr, server, stop: Some(tx), task }
    }

    fn stats(&self) -> TftpStats {
        self.server.stats()
    }

    /// Waits (up to `limit`) until `done` holds for the server's counters.
    async fn until(&self, limit: Duration, done: impl Fn(&TftpStats) -> bool) -> TftpStats {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.stats();
            if done(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "TFTP server never got there: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task).await.unwrap().unwrap();
    }
}

async fn busybox_get(
    server: SocketAddr,
    remote: &str,
    out: &Path,
    blksize: Option<u32>,
) -> std::process::Output {
    let mut c = tokio::process::Command::new("busybox");
    c.args(["tftp", "-g", "-r", remote, "-l"]).arg(out);
    if let Some(b) = blksize {
        c.args(["-b", &b.to_string()]);
    }
    c.args([server.ip().to_string(), server.port().to_string()]);
    tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("busybox tftp hung")
        .expect("busybox (Debian busybox-static) must be installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_downloads() {
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data = pseudo_random(1_000_003, 7);
    std::fs::write(root.path().join("undionly.kpxe"), &data).unwrap();
    std::fs::create_dir(root.path().join("efi")).unwrap();
    std::fs::write(root.path().join("efi/ipxe.efi"), b"efi").unwrap();
    // Exactly 2 blocks of 512: the transfer ends with an empty DATA packet.
    std::fs::write(root.path().join("even"), vec![5u8; 1024]).unwrap();
    std::fs::write(out.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(out.path().join("secret"), root.path().join("escape")).unwrap();
    let srv = Server::start(root.path(), Retransmit::default()).await;

    for (blk, name) in [(None, "a"), (Some(1468), "b"), (Some(8192), "c")] {
        let o = out.path().join(name);
        let r = busybox_get(srv.addr, "undionly.kpxe", &o, blk).await;
        assert!(r.status.success(), "blksize {blk:?}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(std::fs::read(&o).unwrap() == data, "blksize {blk:?}: bytes differ");
    }
    let o = out.path().join("even");
    assert!(busybox_get(srv.addr, "/even", &o, None).await.status.success());
    assert_eq!(std::fs::read(&o).unwrap(), vec![5u8; 1024]);
    let o = out.path().join("efi");
    assert!(busybox_get(srv.addr, "efi/ipxe.efi", &o, None).await.status.success());
    assert_eq!(std::fs::read(&o).unwrap(), b"efi");

    for bad in ["missing.kpxe", "../secret", "efi/../../secret", "escape", "efi"] {
        let r = busybox_get(srv.addr, bad, &out.path().join("x"), None).await;
        assert!(!r.status.success(), "{bad} was served");
    }
    srv.stop().await;
}

fn rrq(parts: &[&str]) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in parts {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70000];
    let (n, from) =
        tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    (buf[..n].to_vec(), from)
}

fn ack(block: u16) -> Vec<u8> {
    let mut p = vec![0, 4];
    p.extend_from_slice(&block.to_be_bytes());
    p
}

#[tokio::test]
async fn protocol_details() {
    let root = tempfile::tempdir().unwrap();
    let data = pseudo_random(1500, 3);
    std::fs::write(root.path().join("f"), &data).unwrap();
    let fast = Retransmit { timeout: Duration::from_millis(200), retries: 2 };
    let srv = Server::start(root.path(), fast).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Write requests are refused with error 2.
    let mut wrq = rrq(&["f", "octet"]);
    wrq[1] = 2;
    c.send_to(&wrq, srv.addr).await.unwrap();
    let (p, _) = recv(&c).await;
    assert_eq!(&p[..4], &[0, 5, 0, 2]);
    // Missing file: error 1; "..": error 2.
    c.send_to(&rrq(&["nope", "octet"]), srv.addr).await.unwrap();
    assert_eq!(&recv(&c).await.0[..4], &[0, 5, 0, 1]);
    c.send_to(&rrq(&["../f", "octet"]), srv.addr).await.unwrap();
    assert_eq!(&recv(&c).await.0[..4], &[0, 5, 0, 2]);

    // Options: OACK with blksize and tsize; then DATA from a new port (the transfer's TID).
    c.send_to(&rrq(&["f", "netascii", "blksize", "1000", "tsize", "0", "bogus", "1"]), srv.addr)
        .await
        .unwrap();
    let (p, tid) = recv(&c).await;
    assert_ne!(tid, srv.addr);
    assert_eq!(p, b"\x00\x06blksize\x001000\x00tsize\x001500\x00");
    c.send_to(&ack(0), tid).await.unwrap();
    let (p, _) = recv(&c).await;
    assert_eq!((&p[..4], &p[4..]), (&[0u8, 3, 0, 1][..], &data[..1000]));
    // No ACK: block 1 is sent again after the timeout.
    let (p2, _) = recv(&c).await;
    assert_eq!(p2, p);
    // ACK 1 brings block 2, the last (short) one.
    c.send_to(&ack(1), tid).await.unwrap();
    let mut p = recv(&c).await.0;
    while p[..4] == [0, 3, 0, 1] {
        p = recv(&c).await.0; // a retransmission of block 1 raced with our ACK
    }
    assert_eq!((&p[..4], &p[4..]), (&[0u8, 3, 0, 2][..], &data[1000..]));
    c.send_to(&ack(2), tid).await.unwrap();

    // A client that never answers: DATA 1 once (it never acknowledged anything, so its
    // address is unconfirmed), then the server gives up.
    let before = srv.stats();
    c.send_to(&rrq(&["f", "octet"]), srv.addr).await.unwrap();
    let (p, _) = recv(&c).await;
    assert_eq!((&p[..4], p.len()), (&[0u8, 3, 0, 1][..], 516));
    srv.until(Duration::from_secs(5), |s| s.failed == before.failed + 1 && s.active == 0).await;
    assert_eq!(try_recv_all(&c), Vec::<Vec<u8>>::new(), "sent more after giving up");
    srv.stop().await;
}

/// Whatever has already arrived on `sock`, without waiting.
fn try_recv_all(sock: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70000];
    while let Ok((n, _)) = sock.try_recv_from(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// A UDP socket on another loopback address (another client, as far as the server can tell).
async fn client_on(ip: &str) -> UdpSocket {
    UdpSocket::bind(format!("{ip}:0")).await.expect("binding a 127.0.0.x address (Linux routes 127/8 to lo)")
}

/// Everything `sock` receives until the server has finished every transfer; the bytes.
async fn drain_until_idle(srv: &Server, sock: &UdpSocket) -> usize {
    srv.until(Duration::from_secs(10), |s| s.active == 0).await;
    try_recv_all(sock).iter().map(Vec::len).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_requests_lock_nobody_out() {
    // Issue #13: 64 requests with timeout=255 that nobody acknowledges took every slot for
    // ~25 minutes. Now one address gets `per_address` slots, a timeout over 5 s is declined, and
    // an address that never acknowledges gets one packet per request.
    let root = tempfile::tempdir().unwrap();
    let data = pseudo_random(100_000, 11);
    std::fs::write(root.path().join("undionly.kpxe"), &data).unwrap();
    let srv = Server::start(root.path(), Retransmit::default()).await;
    let attacker = client_on("127.0.0.2").await;
    for _ in 0..64 {
        let req = rrq(&["undionly.kpxe", "octet", "timeout", "255", "tsize", "0"]);
        attacker.send_to(&req, srv.addr).await.unwrap();
    }
    // Each request is handled before the next one is read: 4 transfers, 60 refusals.
    let s = srv.until(Duration::from_secs(5), |s| s.busy == 60).await;
    assert_eq!(s.active, 4, "{s:?}");
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("undionly.kpxe");
    let started = std::time::Instant::now();
    let r = busybox_get(srv.addr, "undionly.kpxe", &o, Some(1468)).await;
    assert!(r.status.success(), "locked out: {}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read(&o).unwrap() == data);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // The held transfers end on their own, quickly: no 255 s timeout was accepted.
    let s = srv.until(Duration::from_secs(30), |s| s.active == 0).await;
    assert_eq!((s.served, s.failed), (1, 4), "{s:?}");
    srv.stop().await;
}

#[tokio::test]
async fn the_global_cap_holds_across_addresses() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), pseudo_random(10_000, 5)).unwrap();
    let limits = TftpLimits { max_transfers: 3, per_address: 2, ..TftpLimits::default() };
    let srv = Server::start_with(root.path(), Retransmit::default(), limits).await;
    let mut clients = Vec::new();
    for i in 2..6 {
        let c = client_on(&format!("127.0.0.{i}")).await;
        c.send_to(&rrq(&["f", "octet", "tsize", "0"]), srv.addr).await.unwrap();
        clients.push(c);
    }
    // Three get an OACK, the fourth "server busy" (error 0).
    let s = srv.until(Duration::from_secs(5), |s| s.busy == 1).await;
    assert_eq!(s.active, 3);
    let (p, from) = recv(&clients[3]).await;
    assert_eq!((&p[..4], from), (&[0u8, 5, 0, 0][..], srv.addr));
    for c in &clients[..3] {
        assert_eq!(&recv(c).await.0[..2], &[0, 6]);
    }
    srv.stop().await;
}

#[tokio::test]
async fn retransmissions_amplify_little_before_the_client_acks() {
    // Issue #13: a 45-byte request drew 73 times its size in retransmissions (6,661 times with a
    // large blksize). Until the client acknowledges something, at most 3× the request is sent,
    // or the one first packet when that alone is larger.
    let root = tempfile::tempdir().unwrap();
    let name36 = "a".repeat(36);
    std::fs::write(root.path().join(&name36), pseudo_random(200_000, 9)).unwrap();
    std::fs::write(root.path().join("ffff"), pseudo_random(200_000, 9)).unwrap();
    let fast = Retransmit { timeout: Duration::from_millis(150), retries: 5 };
    let srv = Server::start(root.path(), fast).await;

    // Without options: 45 bytes, answered by one 516-byte DATA block, not retransmitted.
    let c = client_on("127.0.0.2").await;
    let plain = rrq(&[&name36, "octet"]);
    assert_eq!(plain.len(), 45);
    c.send_to(&plain, srv.addr).await.unwrap();
    let first = recv(&c).await.0;
    assert_eq!((&first[..4], first.len()), (&[0u8, 3, 0, 1][..], 516));
    let total = first.len() + drain_until_idle(&srv, &c).await;
    assert_eq!(total, 516, "sent {total} bytes ({}x the request)", total / plain.len());

    // With options (the largest block size and the shortest timeout): only OACKs, ≤ 3× in all.
    let c = client_on("127.0.0.3").await;
    let opts = rrq(&["ffff", "octet", "blksize", "65464", "timeout", "1", "tsize", "0"]);
    assert_eq!(opts.len(), 45);
    c.send_to(&opts, srv.addr).await.unwrap();
    let first = recv(&c).await.0;
    assert_eq!(&first[..2], &[0, 6]);
    let total = first.len() + drain_until_idle(&srv, &c).await;
    assert!(total <= 3 * opts.len(), "sent {total} bytes for a {}-byte request", opts.len());
    srv.stop().await;
}

#[tokio::test]
async fn strays_get_no_answer_and_repeated_options_count_once() {
    let root = tempfile::tempdir().unwrap();
    let data = pseudo_random(3000, 4);
    std::fs::write(root.path().join("f"), &data).unwrap();
    let srv = Server::start(root.path(), Retransmit::default()).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let strays: [&[u8]; 8] = [
        b"\x00\x04\x00\x01",           // ACK of no transfer
        b"\x00\x05\x00\x01gone\x00",   // ERROR of no transfer
        b"\x00\x03\x00\x01data",       // DATA
        b"\x00\x06blksize\x00512\x00", // OACK
        b"\x00",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x01f\x00octet",    // not NUL-terminated
        b"\x00\x01\x00octet\x00", // empty file name
    ];
    for p in strays {
        c.send_to(p, srv.addr).await.unwrap();
    }
    // A request for a missing file comes after them and gets error 1: the first (and only)
    // packet that arrives.
    c.send_to(&rrq(&["missing", "octet"]), srv.addr).await.unwrap();
    let (p, _) = recv(&c).await;
    assert_eq!(&p[..4], &[0, 5, 0, 1], "{p:?}");
    let s = srv.until(Duration::from_secs(5), |s| s.active == 0).await;
    assert_eq!(s.dropped, strays.len() as u64, "{s:?}");
    assert_eq!(try_recv_all(&c), Vec::<Vec<u8>>::new());

    // blksize twice: the first counts, and the OACK names it once.
    c.send_to(&rrq(&["f", "octet", "blksize", "1024", "tsize", "0", "blksize", "8", "tsize", "1"]), srv.addr)
        .await
        .unwrap();
    let (p, tid) = recv(&c).await;
    assert_eq!(p, b"\x00\x06blksize\x001024\x00tsize\x003000\x00");
    let mut got = Vec::new();
    c.send_to(&ack(0), tid).await.unwrap();
    for block in 1u16..=3 {
        let (p, _) = recv(&c).await;
        assert_eq!(&p[..4], &[0, 3, 0, block as u8]);
        got.extend_from_slice(&p[4..]);
        c.send_to(&ack(block), tid).await.unwrap();
    }
    assert!(got == data);
    srv.stop().await;
}
