//! The controller's metrics: counters and histograms it keeps (enrollments, gRPC calls, store
//! operations, background services, listener connections) and, per scrape, the fleet as it is now (machines by state, per-machine info,
//! liveness, health and the node metrics of each machine's latest snapshot).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use muster_machinery::metrics::{
    label_prefix, to_prometheus_text, write_nodes, Format, Kind, NodeSample, Writer,
};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::fleet::health::HealthStatus;

type Labels = Vec<(&'static str, String)>;

/// Metrics the controller keeps between scrapes.
pub struct Metrics {
    registry: Registry,
    enrollments: Family<Labels, Counter>,
    rpc_requests: Family<Labels, Counter>,
    rpc_duration: Family<Labels, Histogram>,
    store_duration: Family<Labels, Histogram>,
    service_up: Family<Labels, Gauge>,
    service_restarts: Family<Labels, Counter>,
    connections_open: Family<Labels, Gauge>,
    connections_refused: Family<Labels, Counter>,
    connections_timed_out: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.00005, 4.0, 9))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let enrollments = Family::<Labels, Counter>::default();
        registry.register("muster_enrollments", "Enrollment attempts by result", enrollments.clone());
        let rpc_requests = Family::<Labels, Counter>::default();
        registry.register(
            "muster_grpc_requests",
            "gRPC calls by service, method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration =
            Family::<Labels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "muster_grpc_request_duration_seconds",
            "gRPC call latency (for streams: until the response starts)",
            rpc_duration.clone(),
        );
        let store_duration =
            Family::<Labels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "muster_store_operation_duration_seconds",
            "State store operation latency",
            store_duration.clone(),
        );
        let service_up = Family::<Labels, Gauge>::default();
        registry.register(
            "muster_service_up",
            "1 while the background service (grpc, http, heartbeat-flush, proxy-dhcp, tftp) runs, 0 while it is down and being restarted",
            service_up.clone(),
        );
        let service_restarts = Family::<Labels, Counter>::default();
        registry.register(
            "muster_service_restarts",
            "Times the background service died (error, panic or unexpected end) and was restarted",
            service_restarts.clone(),
        );
        let connections_open = Family::<Labels, Gauge>::default();
        registry.register(
            "muster_connections_open",
            "Connections the listener (grpc, http) holds now",
            connections_open.clone(),
        );
        let connections_refused = Family::<Labels, Counter>::default();
        registry.register(
            "muster_connections_refused",
            "Connections closed at once because the listener or the client's address held its maximum",
            connections_refused.clone(),
        );
        let connections_timed_out = Family::<Labels, Counter>::default();
        registry.register(
            "muster_connections_timed_out",
            "Connections closed by a timeout, by phase (handshake, preface, idle, header, write)",
            connections_timed_out.clone(),
        );
        Self {
            registry,
            enrollments,
            rpc_requests,
            rpc_duration,
            store_duration,
            service_up,
            service_restarts,
            connections_open,
            connections_refused,
            connections_timed_out,
        }
    }

    /// Records whether a background service runs; a restart counter appears with it (at 0).
    pub fn service_state(&self, service: &'static str, up: bool) {
        let l = vec![("service", service.to_owned())];
        self.service_up.get_or_create(&l).set(i64::from(up));
        let _ = self.service_restarts.get_or_create(&l);
    }

    /// Counts a background service's restart.
    pub fn service_restarted(&self, service: &'static str) {
        self.service_restarts.get_or_create(&vec![("service", service.to_owned())]).inc();
    }

    /// The number of connections `listener` holds.
    pub fn connections_open(&self, listener: &'static str, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.connections_open.get_or_create(&vec![("listener", listener.to_owned())]).set(n);
    }

    /// Counts a connection refused by a cap (`max_connections`, `max_per_address`).
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        let l = vec![("listener", listener.to_owned()), ("reason", reason.to_owned())];
        self.connections_refused.get_or_create(&l).inc();
    }

    /// Counts a connection closed by a timeout in `phase`.
    pub fn connection_timed_out(&self, listener: &'static str, phase: &'static str) {
        let l = vec![("listener", listener.to_owned()), ("phase", phase.to_owned())];
        self.connections_timed_out.get_or_create(&l).inc();
    }

    /// Counts an enrollment attempt: `accepted`, `pending`, `repeated` (the same key again),
    /// `rejected_token`, `rejected_csr`, `rate_limited`, `rejected_pending_cap`, `error`.
    pub fn enrollment(&self, result: &'static str) {
        self.enrollments.get_or_create(&vec![("result", result.to_owned())]).inc();
    }

    fn rpc(&self, path: &str, code: &str, seconds: f64) {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let service = service.rsplit('.').next().unwrap_or(service).to_owned();
        let base = vec![("service", service), ("method", method.to_owned())];
        let mut with_code = base.clone();
        with_code.push(("code", code.to_owned()));
        self.rpc_requests.get_or_create(&with_code).inc();
        self.rpc_duration.get_or_create(&base).observe(seconds);
    }

    pub(crate) fn store_op(&self, op: &'static str, seconds: f64) {
        self.store_duration.get_or_create(&vec![("operation", op.to_owned())]).observe(seconds);
    }

    /// Renders the kept metrics and `fleet` in `format`.
    pub fn render(&self, fleet: &FleetSnapshot, format: Format) -> Result<String, fmt::Error> {
        let mut kept = String::new();
        prometheus_client::encoding::text::encode_registry(&mut kept, &self.registry)?;
        let mut out = match format {
            Format::Prometheus => to_prometheus_text(&kept),
            Format::OpenMetrics => kept,
        };
        out.reserve(fleet.machines.len() * 4096);
        fleet.write(&mut Writer::new(&mut out, format));
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
        Ok(out)
    }
}

/// One machine as the metrics see it.
#[derive(Debug, Clone)]
pub struct MachineSample {
    pub id: String,
    pub hostname: String,
    pub cluster: String,
    pub role: String,
    pub state: &'static str,
    pub health: HealthStatus,
    pub up: bool,
    pub last_seen_ms: i64,
    pub cert_not_after_ms: i64,
    pub uuid: String,
    pub kernel: String,
    pub os: String,
    pub agent_version: String,
    pub snapshot: Option<muster_machinery::health::HealthSnapshot>,
    /// Config generation and the one the agent applied (0: no config).
    pub config_generation: u64,
    pub config_applied: u64,
    /// Failed resources of the current generation (1 when it failed as a whole).
    pub config_failed: usize,
    /// Each reported resource and whether it drifted (found off at the last drift pass).
    pub config_drift: Vec<(String, bool)>,
}

/// The fleet at one scrape.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    pub machines: Vec<MachineSample>,
    pub connected: usize,
}

impl FleetSnapshot {
    /// Writes the fleet's families: counts by state, then per machine (labels `machine`,
    /// `hostname`, `cluster`, `role`) info, liveness, health, and the node metrics of its
    /// latest snapshot.
    pub fn write(&self, w: &mut Writer<'_>) {
        w.family("muster_machines", "Machines by state", Kind::Gauge);
        for state in ["pending", "ready", "unreachable", "revoked"] {
            let n = self.machines.iter().filter(|m| m.state == state).count();
            w.sample("", &[("state", state)], n as f64);
        }
        w.family("muster_connected_agents", "Agents with an open stream to this controller", Kind::Gauge);
        w.sample("", &[], self.connected as f64);
        if self.machines.is_empty() {
            return;
        }
        let prefixes: Vec<String> = self
            .machines
            .iter()
            .map(|m| {
                label_prefix(&[
                    ("machine", &m.id),
                    ("hostname", &m.hostname),
                    ("cluster", &m.cluster),
                    ("role", &m.role),
                ])
            })
            .collect();
        let all = || self.machines.iter().zip(prefixes.iter().map(String::as_str));
        w.family("muster_machine_info", "Machine identity and software; always 1", Kind::Gauge);
        for (m, p) in all() {
            let extra = [
                ("state", m.state),
                ("uuid", m.uuid.as_str()),
                ("kernel", m.kernel.as_str()),
                ("os", m.os.as_str()),
                ("agent_version", m.agent_version.as_str()),
            ];
            w.sample(p, &extra, 1.0);
        }
        w.family(
            "muster_machine_up",
            "1 if the machine is ready (heard from within 3 heartbeats)",
            Kind::Gauge,
        );
        for (m, p) in all() {
            w.sample(p, &[], f64::from(u8::from(m.up)));
        }
        w.family("muster_machine_health", "1 for the machine's current health status", Kind::Gauge);
        for (m, p) in all() {
            for s in HealthStatus::ALL {
                w.sample(p, &[("status", s.as_str())], f64::from(u8::from(m.health == s)));
            }
        }
        w.family(
            "muster_machine_last_heartbeat_timestamp_seconds",
            "When the machine was last heard from, Unix seconds",
            Kind::Gauge,
        );
        for (m, p) in all() {
            w.sample(p, &[], m.last_seen_ms as f64 / 1000.0);
        }
        w.family(
            "muster_machine_certificate_expiry_timestamp_seconds",
            "When the machine's client certificate expires, Unix seconds",
            Kind::Gauge,
        );
        for (m, p) in all().filter(|(m, _)| m.cert_not_after_ms > 0) {
            w.sample(p, &[], m.cert_not_after_ms as f64 / 1000.0);
        }
        let configured = || all().filter(|(m, _)| m.config_generation > 0);
        if configured().next().is_some() {
            w.family(
                "muster_machine_config_generation",
                "The machine's current config generation",
                Kind::Gauge,
            );
            for (m, p) in configured() {
                w.sample(p, &[], m.config_generation as f64);
            }
            w.family(
                "muster_machine_config_applied_generation",
                "The config generation the agent reported applied",
                Kind::Gauge,
            );
            for (m, p) in configured() {
                w.sample(p, &[], m.config_applied as f64);
            }
            w.family(
                "muster_machine_config_failed_resources",
                "Resources of the machine's current config generation that failed to apply (1 when the generation failed as a whole)",
                Kind::Gauge,
            );
            for (m, p) in configured() {
                w.sample(p, &[], m.config_failed as f64);
            }
            w.family(
                "muster_machine_config_drift",
                "1 if the resource was found changed behind Muster's back at the last drift pass",
                Kind::Gauge,
            );
            for (m, p) in configured() {
                for (resource, drifted) in &m.config_drift {
                    w.sample(p, &[("resource", resource)], f64::from(u8::from(*drifted)));
                }
            }
        }
        let nodes: Vec<NodeSample<'_>> = all()
            .filter_map(|(m, p)| m.snapshot.as_ref().map(|s| NodeSample { prefix: p, snapshot: s }))
            .collect();
        write_nodes(w, &nodes);
    }
}

/// A tower layer that counts and times every gRPC call.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

fn code_name(v: &str) -> &'static str {
    match v {
        "0" => "OK",
        "1" => "Cancelled",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = fut.await;
            // Errors answer "trailers-only", so their status is in the headers; a success's
            // status comes in the trailers and is OK.
            let code = match &res {
                Ok(r) => r.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map_or("OK", code_name),
                Err(_) => "Unknown",
            };
            metrics.rpc(&path, code, start.elapsed().as_secs_f64());
            res
        })
    }
}
