//! The listeners' timeouts and size limit, each against a controller in this process (127.0.0.1,
//! temp dir) configured with short timeouts (issue #13, finding 5):
//! - gRPC: a connection with no call in progress is closed after the idle timeout, while an
//!   agent's open `Connect` stream on its own connection is never idle and keeps working.
//! - HTTP: a kept-alive connection that sends no next request is closed after the request-head
//!   timeout; a head larger than the limit gets 431; a client that stops reading a large asset
//!   is cut off after the write timeout.
//!
//! Idle, slow and silent clients under a low open-files limit are in `starvation.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use muster_controller::api::limits::NetLimits;
use muster_controller::fleet::boot::BootOptions;
use muster_proto::pb;
use muster_tests::{http_get, TestController};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Polls `/metrics` until `done` holds (or 20 s pass); the last text.
async fn metrics_until(http: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&http_get(http, "/metrics", &[]).await.unwrap().body).into_owned();
        if done(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads until the server closes the connection; everything it sent.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server kept the connection open");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grpc_connections_close_but_an_open_stream_stays() {
    let net = NetLimits { grpc_idle_timeout: Duration::from_secs(1), ..NetLimits::default() };
    let f = TestController::start_serving(Default::default(), net, None).await.unwrap();
    let http = f.running.ports.http;
    let token = f.token(0, 1).await.unwrap();
    let m = f.enroll(&token).await.unwrap();
    // An admin client that makes one call and keeps its connection, idle …
    let mut idle_admin = f.admin().await.unwrap();
    idle_admin.list_tokens(pb::ListTokensRequest {}).await.unwrap();
    // … and the agent's stream on its own connection, fed by the test.
    let (tx, mut down) =
        f.open_stream(&m, pb::Hello { heartbeat_interval_ms: 60_000, ..Default::default() }).await.unwrap();
    assert!(down.message().await.unwrap().is_some(), "welcome");
    // The idle one is closed; only the agent's remains.
    let text = metrics_until(http, "closed the idle gRPC connection", |t| {
        value(t, "muster_connections_timed_out_total{listener=\"grpc\",phase=\"idle\"}") >= 1.0
            && value(t, "muster_connections_open{listener=\"grpc\"}") == 1.0
    })
    .await;
    assert_eq!(value(&text, "muster_connected_agents"), 1.0, "{text}");
    // Well past the idle timeout, the stream still carries messages both ways.
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq: 7, ..Default::default() })),
    })
    .await
    .unwrap();
    let ack = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), down.message()).await.unwrap().unwrap();
        match msg.and_then(|m| m.msg) {
            Some(pb::controller_message::Msg::HeartbeatAck(a)) => break a,
            Some(_) => continue,
            None => panic!("the agent's stream was closed"),
        }
    };
    assert_eq!(ack.seq, 7);
    // The closed client connects again by itself (its first call may still meet the closed
    // connection).
    if idle_admin.list_tokens(pb::ListTokensRequest {}).await.is_err() {
        idle_admin.list_tokens(pb::ListTokensRequest {}).await.unwrap();
    }
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_idle_big_heads_and_stalled_readers_are_cut_off() {
    let assets = tempfile::tempdir().unwrap();
    // Large enough to fill the socket buffers of a client that reads nothing.
    std::fs::write(assets.path().join("vmlinuz"), vec![1u8; 32 << 20]).unwrap();
    std::fs::write(assets.path().join("initramfs.img"), b"initrd").unwrap();
    let boot = BootOptions {
        assets: assets.path().to_owned(),
        controller_url: Some("https://127.0.0.1:7443".into()),
        kernel_args: String::new(),
        proxy_dhcp: None,
        tftp_root: None,
        http_url: None,
    };
    let net = NetLimits {
        http_header_timeout: Duration::from_secs(1),
        http_write_timeout: Duration::from_secs(1),
        ..NetLimits::default()
    };
    let f = TestController::start_serving(Default::default(), net, Some(boot)).await.unwrap();
    let http = f.running.ports.http;

    // Kept alive after a response, then silent: closed after the request-head timeout.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    // A head over 16 KiB: 431.
    let mut s = TcpStream::connect(http).await.unwrap();
    let big = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * 1024));
    let _ = s.write_all(big.as_bytes()).await;
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&got));
    // A normal head passes.
    assert_eq!(http_get(http, "/healthz", &[("x-normal", &"b".repeat(4096))]).await.unwrap().status, 200);

    // A client that asks for the kernel and reads nothing: cut off after the write timeout.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /boot/assets/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let text = metrics_until(http, "cut off the stalled reader", |t| {
        value(t, "muster_connections_timed_out_total{listener=\"http\",phase=\"write\"}") >= 1.0
    })
    .await;
    assert!(
        value(&text, "muster_connections_timed_out_total{listener=\"http\",phase=\"header\"}") >= 1.0,
        "{text}"
    );
    // The socket is closed: reading drains what was buffered, then ends well short of 32 MiB.
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.len() < 32 << 20, "all {} bytes arrived", got.len());
    f.still_serving().await.unwrap();
}
