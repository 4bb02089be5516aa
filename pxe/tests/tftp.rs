//! The TFTP server against busybox's client and a hand-driven client on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::pseudo_random;
use muster_pxe::tftp::{Retransmit, TftpServer};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(root: &Path, retransmit: Retransmit) -> Server {
        let s =
            TftpServer::bind(root, "127.0.0.1:0".parse().unwrap()).await.unwrap().with_retransmit(retransmit);
        let addr = s.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            s.serve(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { addr, stop: Some(tx), task }
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

    // A client that never answers: the server gives up after the retries (1 + 2 sends).
    c.send_to(&rrq(&["f", "octet"]), srv.addr).await.unwrap();
    let mut sends = 0;
    let mut buf = vec![0u8; 2000];
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(700), c.recv_from(&mut buf)).await {
        let (n, _) = r.unwrap();
        assert_eq!(&buf[..4], &[0, 3, 0, 1]);
        assert_eq!(n, 516);
        sends += 1;
    }
    assert_eq!(sends, 3);
    srv.stop().await;
}
