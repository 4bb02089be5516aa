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
        bail!("{} not found: build the workspace binaries first (cargo build --workspace --bins)", p.display());
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
        cmd.args(["serve", "--grpc-listen", grpc, "--http-listen", http, "--data-dir"]).arg(data_dir).args(extra);
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

/// A `muster-agent` process.
pub fn start_agent(ctl: &ControllerProc, token: &str, state_dir: &Path, extra: &[&str]) -> Result<Proc> {
    std::fs::create_dir_all(state_dir.parent().unwrap_or(state_dir))?;
    let mut cmd = Command::new(bin("muster-agent")?);
    cmd.args(["--controller", &ctl.endpoint(), "--ca-hash", &ctl.pin()?, "--state-dir"])
        .arg(state_dir)
        .args(["--cmdline-file", "/dev/null"])
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
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
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
