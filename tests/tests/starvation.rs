//! Idle and slow clients cannot starve the controller (issue #13, finding 5). A real
//! `muster-controller serve` (a child process on 127.0.0.1, in a temp dir) runs with a low
//! open-files limit (`prlimit --nofile=256`, only for that child) and its default limits. From
//! 127.0.0.2 and 127.0.0.3 (other loopback addresses: other clients as far as it can tell),
//! 300 idle TCP connections to each listener, requests with endless or huge headers and TLS
//! connections that never send the HTTP/2 preface are held open. Meanwhile an agent-style
//! client (mutual TLS, `Connect` stream) gets its welcome, a new agent enrolls, an admin lists
//! the machines and `/healthz` answers; then the controller closes every held connection
//! by itself (caps and timeouts), and its metrics count what it refused and timed out.
//! Before the fix, the idle connections exhausted the descriptors and every one of these calls
//! failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_proto::pb;
use muster_tests::{channel, http_get, ControllerProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_stream::StreamExt;

const OPEN_FILES: u32 = 256;
const IDLE_PER_LISTENER: usize = 300;

/// `muster-controller serve` on 127.0.0.1 with at most `OPEN_FILES` descriptors.
fn start_controller(dir: &Path) -> ControllerProc {
    let nofile = format!("--nofile={OPEN_FILES}:{OPEN_FILES}");
    ControllerProc::start_wrapped(
        &["prlimit", &nofile, "--"],
        &dir.join("ctl"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )
    .expect("prlimit (Debian package util-linux) must be installed")
}

/// A TCP connection from `from` (a 127.0.0.x address) to `to`, given up after 2 s (a starved
/// server's full accept queue drops SYNs, and connect would retry for minutes).
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().expect("an address"))?;
    tokio::time::timeout(Duration::from_secs(2), s.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Waits until the server closes `s` (EOF or reset), reading and dropping whatever it sends.
async fn closed_by_server(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A TLS client that trusts only the controller's CA and offers h2, as agents do.
fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn hello() -> impl tokio_stream::Stream<Item = pb::AgentMessage> + Send + 'static {
    tokio_stream::iter([pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            heartbeat_interval_ms: 5000,
            ..Default::default()
        })),
    }])
    .chain(tokio_stream::pending())
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_agents_or_admins() {
    muster_tests::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let ControllerProc { mut proc, ports, .. } = start_controller(tmp.path());
    let mc = muster_machinery::musterconfig::MusterConfig::from_yaml(
        &std::fs::read_to_string(tmp.path().join("ctl/musterconfig")).unwrap(),
    )
    .unwrap();
    let endpoint = format!("https://127.0.0.1:{}", ports.grpc.port());
    let admin = || async {
        let ch = channel(&endpoint, &mc.ca, Some((&mc.cert, &mc.key))).await?;
        anyhow::Ok(pb::admin_service_client::AdminServiceClient::new(ch))
    };
    let token = admin()
        .await
        .unwrap()
        .create_token(pb::CreateTokenRequest { uses: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let enroll = |hostname: &'static str| {
        let (endpoint, ca, token) = (endpoint.clone(), mc.ca.clone(), token.clone());
        async move {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = rcgen::CertificateParams::new(vec![])?.serialize_request(&key)?.pem()?;
            let ch = channel(&endpoint, &ca, None).await?;
            let r = pb::agent_service_client::AgentServiceClient::new(ch)
                .enroll(pb::EnrollRequest {
                    token,
                    csr_pem: csr,
                    inventory: Some(pb::Inventory { hostname: hostname.into(), ..Default::default() }),
                })
                .await?
                .into_inner();
            anyhow::Ok((r.certificate_pem, key.serialize_pem()))
        }
    };
    let (cert, key) = enroll("agent-1").await.unwrap();

    // The attack: idle connections to both listeners from one address, endless and huge
    // headers and silent TLS connections from another.
    let mut held = Vec::new();
    for to in [ports.http, ports.grpc] {
        for _ in 0..IDLE_PER_LISTENER {
            // A connection the server refuses may be closed before connect() returns.
            if let Ok(s) = connect_from("127.0.0.2", to).await {
                held.push(s);
            }
        }
    }
    for i in 0..8 {
        let Ok(mut s) = connect_from("127.0.0.3", ports.http).await else { continue };
        let head = if i % 2 == 0 {
            // A head that never ends.
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa".to_vec()
        } else {
            // A huge head (a 390 KiB one held 400 KiB of buffer each before).
            [&b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "[..], &vec![b'a'; 390 * 1024]].concat()
        };
        // The server may stop reading (431) or never read (starved): do not wait for it.
        let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&head)).await;
        held.push(s);
    }
    let tls = tls_connector(&mc.ca);
    let mut silent_tls = Vec::new();
    for _ in 0..8 {
        let tcp = connect_from("127.0.0.3", ports.grpc)
            .await
            .unwrap_or_else(|e| panic!("starved: connecting to gRPC: {e}\n{}", proc.log_text()));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        // Handshake done, then nothing: no HTTP/2 preface.
        let handshake = tokio::time::timeout(Duration::from_secs(30), tls.connect(name, tcp)).await;
        let stream = handshake
            .unwrap_or_else(|_| panic!("starved: no TLS handshake in 30 s\n{}", proc.log_text()))
            .expect("TLS handshake");
        silent_tls.push(stream);
    }

    // Meanwhile: an agent's stream, a new enrollment, an admin call, a health probe.
    let serving = async {
        let ch = channel(&endpoint, &mc.ca, Some((&cert, &key))).await?;
        let mut down =
            pb::agent_service_client::AgentServiceClient::new(ch).connect(hello()).await?.into_inner();
        anyhow::ensure!(down.message().await?.is_some(), "no welcome on the agent's stream");
        enroll("agent-2").await?;
        let machines =
            admin().await?.list_machines(pb::ListMachinesRequest::default()).await?.into_inner().machines;
        anyhow::ensure!(machines.len() == 2, "{} machines", machines.len());
        let h = http_get(ports.http, "/healthz", &[]).await?;
        anyhow::ensure!(h.status == 200, "/healthz: {}", h.status);
        anyhow::Ok(down)
    };
    let stream = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .unwrap_or_else(|_| panic!("starved: no answer in 30 s\n{}", proc.log_text()))
        .unwrap_or_else(|e| panic!("starved: {e:#}\n{}", proc.log_text()));

    // The controller frees what the attack held by itself: refused at once, or timed out
    // (request head 10 s, TLS handshake and preface 10 s).
    let all_closed = async {
        let mut waits = tokio::task::JoinSet::new();
        for s in held {
            waits.spawn(closed_by_server(s));
        }
        for mut s in silent_tls {
            waits.spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
        while waits.join_next().await.is_some() {}
    };
    tokio::time::timeout(Duration::from_secs(40), all_closed)
        .await
        .unwrap_or_else(|_| panic!("the controller still holds idle connections\n{}", proc.log_text()));

    let m = http_get(ports.http, "/metrics", &[]).await.unwrap();
    let text = String::from_utf8_lossy(&m.body).into_owned();
    for (series, why) in [
        (
            "muster_connections_refused_total{listener=\"http\",reason=\"max_per_address\"}",
            "HTTP per-address cap",
        ),
        (
            "muster_connections_refused_total{listener=\"grpc\",reason=\"max_per_address\"}",
            "gRPC per-address cap",
        ),
        (
            "muster_connections_timed_out_total{listener=\"http\",phase=\"header\"}",
            "HTTP request-head timeout",
        ),
        (
            "muster_connections_timed_out_total{listener=\"grpc\",phase=\"handshake\"}",
            "TLS handshake timeout",
        ),
        ("muster_connections_timed_out_total{listener=\"grpc\",phase=\"preface\"}", "HTTP/2 preface timeout"),
    ] {
        assert!(metric(&text, series) > 0.0, "{why}: no {series}\n{text}");
    }
    // The agent's stream stayed up through it all (a call in progress is never idle).
    assert_eq!(metric(&text, "muster_connected_agents"), 1.0, "{text}");
    assert_eq!(metric(&text, "muster_service_up{"), 3.0, "grpc, http, heartbeat-flush up\n{text}");
    drop(stream);
    proc.kill();
}
