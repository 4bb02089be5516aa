//! The harness shared by Muster's cross-process tests and benchmarks: real binaries started on
//! loopback in temp dirs, killed when dropped, and small gRPC client helpers.
//!
//! Nothing here touches the host outside the temp dirs it creates, and every network address
//! is on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use muster_controller::server::Ports;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub mod vm;

/// Directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MUSTER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test binaries live in target/<profile>/deps; the crate binaries one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; fails with a hint when it has not been built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let f = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (SIGKILL after). Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).ok()?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `muster-controller serve` process on loopback.
pub struct ControllerProc {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub ports: Ports,
}

impl ControllerProc {
    /// Starts a controller on `grpc`/`http` (use port 0 for any) with `data_dir`.
    pub fn start(data_dir: &Path, grpc: &str, http: &str, extra: &[&str]) -> Result<Self> {
        let ports_file = data_dir.join("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.with_extension(format!("log.{}", now_nanos()));
        let mut cmd = Command::new(bin("muster-controller")?);
        cmd.args(["serve", "--grpc-listen", grpc, "--http-listen", http, "--data-dir"])
            .arg(data_dir)
            .args(extra);
        cmd.env("RUST_LOG", "info");
        let mut proc = Proc::spawn(&mut cmd, log)?;
        let ports = wait_for("controller ports.json", Duration::from_secs(30), || {
            if !proc.alive() {
                return Some(Err(anyhow!("controller exited: {}", proc.log_text())));
            }
            let text = std::fs::read_to_string(&ports_file).ok()?;
            let p: Ports = serde_json::from_str(&text).ok()?;
            (p.pid == proc.pid()).then_some(Ok(p))
        })??;
        Ok(Self { proc, data_dir: data_dir.to_owned(), ports })
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.grpc.port())
    }

    pub fn musterconfig(&self) -> PathBuf {
        self.data_dir.join("musterconfig")
    }

    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("ca.crt"))?)
    }

    /// The CA pin agents are started with.
    pub fn pin(&self) -> Result<String> {
        Ok(muster_proto::pin::CaPin::of_cert_pem(&self.ca_pem()?)?.to_string())
    }

    /// Runs the `muster` CLI against this controller.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        cli(&self.musterconfig(), args)
    }

    /// Runs the CLI and returns stdout, failing with stderr when it exits non-zero.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("muster {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `muster machines -o json`, parsed.
    pub fn machines(&self) -> Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&["machines", "-o", "json"])?)?;
        v.as_array().cloned().ok_or_else(|| anyhow!("machines -o json is not an array: {v}"))
    }
}

/// Runs `muster --musterconfig PATH args...`.
pub fn cli(musterconfig: &Path, args: &[&str]) -> Result<Output> {
    Command::new(bin("muster")?)
        .arg("--musterconfig")
        .arg(musterconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running muster")
}

/// The agent binary: `$MUSTER_AGENT_BIN` if set (e.g. the size-optimised
/// `target/agent/muster-agent`), else the workspace build.
pub fn agent_bin() -> Result<PathBuf> {
    match std::env::var_os("MUSTER_AGENT_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => bin("muster-agent"),
    }
}

/// A `muster-agent` process.
pub fn start_agent(ctl: &ControllerProc, token: &str, state_dir: &Path, extra: &[&str]) -> Result<Proc> {
    std::fs::create_dir_all(state_dir.parent().unwrap_or(state_dir))?;
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(["--controller", &ctl.endpoint(), "--ca-hash", &ctl.pin()?, "--state-dir"])
        .arg(state_dir)
        .args(["--cmdline-file", "/dev/null"])
        // Test agents run in this machine's namespaces: never apply configs to it.
        .arg("--no-apply-config")
        .args(extra);
    if !token.is_empty() {
        cmd.args(["--token", token]);
    }
    cmd.env("RUST_LOG", "info");
    Proc::spawn(&mut cmd, state_dir.with_extension(format!("log.{}", now_nanos())))
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A gRPC channel to `endpoint` that trusts `ca_pem`, with an optional client identity.
pub async fn channel(endpoint: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Channel> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Endpoint::from_shared(endpoint.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(ch)
}

/// Installs the ring crypto provider once per process.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Logs to the test's captured output, once per process.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on `addr` (loopback) with extra request headers; reads to connection close.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw)).await??;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = b.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..end]).trim(), 16)?;
        b = &b[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
        b = b.get(size + 2..).ok_or_else(|| anyhow!("short chunk"))?;
    }
}

/// Runs `promtool check metrics` on `text`; returns its verdict output on failure.
pub fn promtool_check_metrics(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus; tests/run.sh installs it)")?;
    child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A controller running inside the test process (on 127.0.0.1, in a temp dir), with clients.
pub struct TestController {
    pub dir: tempfile::TempDir,
    pub running: muster_controller::server::Running,
    pub endpoint: String,
    pub mc: muster_proto::musterconfig::MusterConfig,
}

/// A machine enrolled by a test: its id, certificate and key.
pub struct Enrolled {
    pub id: String,
    pub cert: String,
    pub key: String,
}

type AdminClient = muster_proto::pb::admin_service_client::AdminServiceClient<Channel>;
type AgentClient = muster_proto::pb::agent_service_client::AgentServiceClient<Channel>;

impl TestController {
    pub async fn start() -> Result<Self> {
        Self::start_with(muster_controller::server::ControllerOptions::default()).await
    }

    pub async fn start_with(opts: muster_controller::server::ControllerOptions) -> Result<Self> {
        init_crypto();
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("ctl");
        let running = Self::serve(&data_dir, "127.0.0.1:0".parse()?, opts).await?;
        let endpoint = format!("https://127.0.0.1:{}", running.ports.grpc.port());
        let mc = muster_proto::musterconfig::MusterConfig::from_yaml(&std::fs::read_to_string(
            data_dir.join("musterconfig"),
        )?)?;
        Ok(Self { dir, running, endpoint, mc })
    }

    async fn serve(
        data_dir: &Path,
        grpc: std::net::SocketAddr,
        controller: muster_controller::server::ControllerOptions,
    ) -> Result<muster_controller::server::Running> {
        Ok(muster_controller::server::start(muster_controller::server::ServeOptions {
            data_dir: data_dir.to_owned(),
            grpc_listen: grpc,
            http_listen: "127.0.0.1:0".parse()?,
            sans: vec![],
            controller,
            boot: None,
        })
        .await?)
    }

    /// Stops the controller and starts it again on the same gRPC port and data dir.
    pub async fn restart(self) -> Result<Self> {
        let grpc = self.running.ports.grpc;
        self.running.stop().await?;
        let running = Self::serve(&self.dir.path().join("ctl"), grpc, Default::default()).await?;
        Ok(Self { running, ..self })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ctl")
    }

    pub fn pin(&self) -> Result<muster_proto::pin::CaPin> {
        Ok(muster_proto::pin::CaPin::of_cert_pem(&self.mc.ca)?)
    }

    pub async fn admin(&self) -> Result<AdminClient> {
        Ok(AdminClient::new(channel(&self.endpoint, &self.mc.ca, Some((&self.mc.cert, &self.mc.key))).await?))
    }

    pub async fn anon_agent(&self) -> Result<AgentClient> {
        Ok(AgentClient::new(channel(&self.endpoint, &self.mc.ca, None).await?))
    }

    pub async fn machine_agent(&self, m: &Enrolled) -> Result<AgentClient> {
        Ok(AgentClient::new(channel(&self.endpoint, &self.mc.ca, Some((&m.cert, &m.key))).await?))
    }

    /// A join token (0 = default TTL / uses).
    pub async fn token(&self, ttl_ms: u64, uses: u32) -> Result<String> {
        let r = self
            .admin()
            .await?
            .create_token(muster_proto::pb::CreateTokenRequest { ttl_ms, uses, ..Default::default() })
            .await?;
        Ok(r.into_inner().token)
    }

    /// Enrolls a fresh key with `token` and `inventory`.
    pub async fn enroll_with(
        &self,
        token: &str,
        inventory: muster_proto::pb::Inventory,
    ) -> Result<std::result::Result<Enrolled, tonic::Status>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(vec![])?.serialize_request(&key)?.pem()?;
        let r = self
            .anon_agent()
            .await?
            .enroll(muster_proto::pb::EnrollRequest {
                token: token.into(),
                csr_pem: csr,
                inventory: Some(inventory),
            })
            .await;
        Ok(r.map(|r| {
            let r = r.into_inner();
            Enrolled { id: r.machine_id, cert: r.certificate_pem, key: key.serialize_pem() }
        }))
    }

    pub async fn enroll(&self, token: &str) -> std::result::Result<Enrolled, tonic::Status> {
        let inv = muster_proto::pb::Inventory { hostname: "n1".into(), ..Default::default() };
        match self.enroll_with(token, inv).await {
            Ok(r) => r,
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        }
    }

    pub async fn machine_count(&self) -> Result<usize> {
        Ok(self
            .admin()
            .await?
            .list_machines(muster_proto::pb::ListMachinesRequest {})
            .await?
            .into_inner()
            .machines
            .len())
    }

    /// Checks the controller still answers, then stops it.
    pub async fn still_serving(self) -> Result<()> {
        self.admin().await?.list_tokens(muster_proto::pb::ListTokensRequest {}).await?;
        self.running.stop().await?;
        Ok(())
    }
}
