//! One simulated agent: its own P-256 key and CSR, enrollment over server-authenticated TLS,
//! then its own mutual-TLS connection (one TCP connection, one channel, never shared) carrying
//! the `Connect` stream: a hello, then heartbeats whose acks give the round trip.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long one enrollment may take, connection included.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one agent may take to get its stream up (connection, handshake, welcome), once it
/// has its turn.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// A simulated node's identity: its key and CSR, and once enrolled its certificate.
pub struct Identity {
    pub index: usize,
    pub key_pem: String,
    pub csr_pem: String,
    pub machine_id: String,
    pub cert_pem: String,
}

impl Identity {
    /// A fresh P-256 key and a CSR for it, as the agent makes them.
    pub fn generate(index: usize) -> Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr_pem = rcgen::CertificateParams::new(vec![])?.serialize_request(&key)?.pem()?;
        Ok(Self {
            index,
            key_pem: key.serialize_pem(),
            csr_pem,
            machine_id: String::new(),
            cert_pem: String::new(),
        })
    }
}

/// Plausible inventory for simulated node `i`: unique hostname, SMBIOS UUID, serial and MAC.
pub fn inventory(i: usize) -> pb::Inventory {
    let b = (i as u64).to_be_bytes();
    pb::Inventory {
        hostname: format!("bench-{i:05}"),
        cpu_model: "Simulated CPU @ 2.00GHz".into(),
        cpu_count: 8,
        memory_bytes: 32 << 30,
        disks: vec![pb::Disk {
            name: "nvme0n1".into(),
            size_bytes: 512 << 30,
            model: "Simulated NVMe".into(),
            removable: false,
            serial: format!("SIM{i:05}"),
        }],
        nics: vec![pb::Nic {
            name: "eth0".into(),
            mac: format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7]),
            addresses: vec![format!("10.{}.{}.{}/16", b[5], b[6], b[7])],
        }],
        smbios: Some(pb::Smbios {
            uuid: format!("6d757374-6572-4000-8000-{i:012x}"),
            serial: format!("BENCH{i:07}"),
            vendor: "Muster".into(),
            product: "muster-bench".into(),
        }),
        kernel: "6.1.0-bench".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        agent_version: concat!("bench-", env!("CARGO_PKG_VERSION")).into(),
        arch: "x86_64".into(),
    }
}

/// `code: message` of a gRPC status, or the whole cause chain of any other error.
pub fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => format!("{:?}: {}", s.code(), s.message()),
        None => format!("{e:#}"),
    }
}

/// Enrolls `id` with `token` over its own server-authenticated connection; fills in its
/// machine id and certificate.
pub async fn enroll(endpoint: &str, ca_pem: &str, token: &str, id: &mut Identity) -> Result<()> {
    let ch = muster_agent::client::server_tls_channel(endpoint, ca_pem).await.context("connecting")?;
    let r = AgentServiceClient::new(ch)
        .enroll(pb::EnrollRequest {
            token: token.to_owned(),
            csr_pem: id.csr_pem.clone(),
            inventory: Some(inventory(id.index)),
        })
        .await?
        .into_inner();
    if r.certificate_pem.is_empty() {
        bail!("enrollment returned no certificate");
    }
    id.machine_id = r.machine_id;
    id.cert_pem = r.certificate_pem;
    Ok(())
}

/// Where the benchmark is; agents tag each heartbeat with it when they send it.
pub const WARMUP: u8 = 0;
pub const MEASURING: u8 = 1;
pub const AFTER: u8 = 2;

/// What every simulated agent shares.
pub struct Shared {
    pub endpoint: String,
    pub ca_pem: String,
    pub heartbeat: Duration,
    /// [`WARMUP`], [`MEASURING`] or [`AFTER`].
    pub phase: AtomicU8,
    /// Agents close their streams and return when cancelled.
    pub stop: CancellationToken,
    /// Turns for getting a stream up, so connections ramp instead of all landing at once.
    pub connect_slots: Semaphore,
    /// Seed of the first-heartbeat jitter.
    pub seed: u64,
}

/// The outcome of getting one agent's stream up.
pub type ConnectEvent = Result<Duration, String>;

/// What one agent saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub connected: bool,
    /// Heartbeats sent while [`MEASURING`].
    pub sent_in_window: u64,
    /// Round trips of the heartbeats sent while [`MEASURING`] whose acks came back.
    pub rtts: Vec<Duration>,
    /// Why the stream ended before it was told to stop.
    pub error: Option<String>,
}

/// Runs one enrolled agent until `shared.stop`: connects (reporting on `events`), says hello,
/// then heartbeats with a jittered first tick.
pub async fn run_agent(
    shared: Arc<Shared>,
    id: Identity,
    events: mpsc::UnboundedSender<ConnectEvent>,
) -> Outcome {
    let mut out = Outcome::default();
    let conn = {
        let Ok(_turn) = shared.connect_slots.acquire().await else {
            let _ = events.send(Err("connect slots closed".into()));
            return out;
        };
        let t = Instant::now();
        let r = tokio::select! {
            () = shared.stop.cancelled() => Err(anyhow!("stopped before the stream was up")),
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&shared, &id)) => {
                r.unwrap_or_else(|_| Err(anyhow!("stream not up after {CONNECT_TIMEOUT:?}")))
            }
        };
        let _ = events.send(r.as_ref().map(|_| t.elapsed()).map_err(describe));
        match r {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(agent = id.index, error = %describe(&e), "connect failed");
                out.error = Some(describe(&e));
                return out;
            }
        }
    };
    out.connected = true;
    if let Err(e) = heartbeat(&shared, &id, conn, &mut out).await {
        tracing::debug!(agent = id.index, error = %describe(&e), "stream ended");
        out.error = Some(describe(&e));
    }
    out
}

/// An open `Connect` stream: the client (kept so its connection stays), the sender of the
/// agent's messages, and the controller's messages.
struct Conn {
    _client: AgentServiceClient<Channel>,
    up: mpsc::Sender<pb::AgentMessage>,
    down: tonic::Streaming<pb::ControllerMessage>,
}

async fn connect(shared: &Shared, id: &Identity) -> Result<Conn> {
    let ch = muster_agent::mtls_channel(&shared.endpoint, &shared.ca_pem, &id.cert_pem, &id.key_pem)
        .await
        .context("connecting")?;
    let mut client = AgentServiceClient::new(ch);
    let (up, rx) = mpsc::channel(16);
    up.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            inventory: Some(inventory(id.index)),
            heartbeat_interval_ms: u32::try_from(shared.heartbeat.as_millis()).unwrap_or(u32::MAX),
            metrics_port: 0,
        })),
    })
    .await?;
    let mut down = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    match down.message().await? {
        Some(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(_)) }) => {}
        Some(other) => bail!("expected a welcome first, got {other:?}"),
        None => bail!("the controller closed the stream before its welcome"),
    }
    Ok(Conn { _client: client, up, down })
}

/// splitmix64: spreads consecutive indices over the whole range.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Delay of agent `index`'s first heartbeat: uniform in `[0, interval)`.
pub fn first_tick(seed: u64, index: usize, interval: Duration) -> Duration {
    interval.mul_f64((mix(seed ^ index as u64) >> 11) as f64 / (1u64 << 53) as f64)
}

async fn heartbeat(shared: &Shared, id: &Identity, mut conn: Conn, out: &mut Outcome) -> Result<()> {
    let start = tokio::time::Instant::now() + first_tick(shared.seed, id.index, shared.heartbeat);
    let mut ticker = tokio::time::interval_at(start, shared.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    // Heartbeats awaiting their ack, oldest first: (seq, sent at, sent while measuring).
    let mut inflight: VecDeque<(u64, Instant, bool)> = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return Ok(()),
            m = conn.down.message() => {
                let Some(m) = m? else { bail!("the controller closed the stream") };
                if let Some(pb::controller_message::Msg::HeartbeatAck(ack)) = m.msg {
                    // Acks come in order on the stream; anything older than this one is lost.
                    while let Some(&(s, at, measured)) = inflight.front() {
                        if s > ack.seq {
                            break;
                        }
                        inflight.pop_front();
                        if s == ack.seq && measured {
                            out.rtts.push(at.elapsed());
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                let measured = shared.phase.load(Ordering::Relaxed) == MEASURING;
                out.sent_in_window += u64::from(measured);
                let sent_unix_ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                inflight.push_back((seq, Instant::now(), measured));
                conn.up
                    .send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                            seq,
                            sent_unix_ms,
                            health: None,
                        })),
                    })
                    .await
                    .map_err(|_| anyhow!("the request stream closed"))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ticks_spread_over_the_interval() {
        let hb = Duration::from_secs(1);
        let ticks: Vec<Duration> = (0..1000).map(|i| first_tick(42, i, hb)).collect();
        assert!(ticks.iter().all(|t| *t < hb));
        // Every tenth of the interval gets some agents.
        for decile in 0..10u32 {
            let lo = hb * decile / 10;
            let hi = hb * (decile + 1) / 10;
            let n = ticks.iter().filter(|t| **t >= lo && **t < hi).count();
            assert!((50..=150).contains(&n), "decile {decile}: {n}");
        }
    }

    #[test]
    fn inventories_are_distinct() {
        let a = inventory(1);
        let b = inventory(256);
        assert_ne!(a.hostname, b.hostname);
        assert_ne!(a.smbios, b.smbios);
        assert_ne!(a.nics[0].mac, b.nics[0].mac);
        assert!(!muster_machinery::model::is_placeholder_uuid(&inventory(0).smbios.unwrap_or_default().uuid));
    }
}
