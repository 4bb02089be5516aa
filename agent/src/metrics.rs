//! The agent's own `/metrics`: the node metrics (same names as the controller's per-machine
//! series, without identifying labels: service discovery adds those) and the agent's state.
//! A small HTTP/1.1 responder keeps the agent lean; it answers `GET /metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_machinery::metrics::{write_nodes, Format, Kind, NodeSample, Writer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::agent::AgentStatus;
use crate::health::Collector;

/// Renders the exposition.
pub fn render(collector: &Mutex<Collector>, status: &AgentStatus, format: Format) -> String {
    let mut out = String::with_capacity(4096);
    let snapshot = collector
        .lock()
        .map(|mut c| c.collect(status.clock_offset_ms, &status.service_checks))
        .unwrap_or_default();
    let mut w = Writer::new(&mut out, format);
    write_nodes(&mut w, &[NodeSample { prefix: "", snapshot: &snapshot }]);
    w.family("muster_agent_info", "Agent version and machine id; always 1", Kind::Gauge);
    let id = status.machine_id.clone().unwrap_or_default();
    w.sample("", &[("version", env!("CARGO_PKG_VERSION")), ("machine", &id)], 1.0);
    w.family("muster_agent_connected", "1 while the stream to the controller is open", Kind::Gauge);
    w.sample("", &[], f64::from(u8::from(status.connected)));
    w.family("muster_agent_heartbeats_acked", "Heartbeats the controller acknowledged", Kind::Counter);
    w.sample("", &[], status.heartbeats_acked as f64);
    w.family("muster_agent_reconnects", "Times the stream was re-established", Kind::Counter);
    w.sample("", &[], status.reconnects as f64);
    if let Some(rtt) = status.last_rtt {
        w.family(
            "muster_agent_heartbeat_rtt_seconds",
            "Round trip of the last acknowledged heartbeat",
            Kind::Gauge,
        );
        w.sample("", &[], rtt.as_secs_f64());
    }
    if status.cert_not_after > 0 {
        w.family(
            "muster_agent_certificate_expiry_timestamp_seconds",
            "When this machine's client certificate expires, Unix seconds",
            Kind::Gauge,
        );
        w.sample("", &[], status.cert_not_after as f64);
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    collector: Arc<Mutex<Collector>>,
    status: watch::Receiver<AgentStatus>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (collector, status) = (collector.clone(), status.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &collector, &status)).await;
        });
    }
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    collector: Arc<Mutex<Collector>>,
    status: watch::Receiver<AgentStatus>,
) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    tokio::spawn(serve(l, collector, status));
    Ok(bound)
}

async fn answer(
    mut s: TcpStream,
    collector: &Mutex<Collector>,
    status: &watch::Receiver<AgentStatus>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return s.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        }
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let (code, ctype, body) = match (method, path.split('?').next().unwrap_or_default()) {
        ("GET", "/metrics") => {
            let format = if openmetrics { Format::OpenMetrics } else { Format::Prometheus };
            let st = status.borrow().clone();
            ("200 OK", format.content_type(), render(collector, &st, format))
        }
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Sources;

    #[test]
    fn renders_node_and_agent_metrics() {
        let c = Mutex::new(Collector::new(Sources::default(), vec![]));
        let st = AgentStatus {
            machine_id: Some("m".into()),
            connected: true,
            heartbeats_acked: 3,
            ..Default::default()
        };
        let text = render(&c, &st, Format::Prometheus);
        assert!(text.contains("muster_machine_memory_total_bytes "), "{text}");
        assert!(text.contains("muster_agent_connected 1\n"), "{text}");
        assert!(text.contains("muster_agent_heartbeats_acked_total 3\n"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(render(&c, &st, Format::OpenMetrics).ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn serves_over_http() {
        let c = Arc::new(Mutex::new(Collector::new(Sources::default(), vec![])));
        let (_tx, rx) = watch::channel(AgentStatus::default());
        let addr = spawn("127.0.0.1:0".parse().unwrap(), c, rx).await.unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains("text/plain; version=0.0.4"));
        assert!(resp.contains("muster_agent_connected 0"));
    }
}
