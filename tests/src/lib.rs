//! The harness of Muster's integration and end-to-end tests: a controller in the test process
//! ([`TestController`]) with raw gRPC clients, promtool, and the lab crate's processes, VMs and
//! HTTP client re-exported (so the tests read the same as the benchmarks). Only tests use it.
//!
//! Nothing here touches the host outside the temp dirs it creates, and every network address
//! is on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use muster_controller::fleet::ControllerOptions;
use muster_controller::serve::{self, Running, ServeOptions};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub mod e2e;

pub use muster_lab::http::{http_get, HttpResponse};
pub use muster_lab::muster::{agent_bin, cli, start_agent, ControllerProc};
pub use muster_lab::process::{bin_dir, find_bin as bin, wait_for, Proc};
pub use muster_lab::qemu as vm;

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

/// A wire enum's name, as the CLI prints it ("unknown" for a value this side does not know).
pub fn outcome_name(v: i32) -> String {
    muster_proto::convert::outcome(v).map_or_else(|_| "unknown".into(), |o| o.to_string())
}

/// See [`outcome_name`].
pub fn state_name(v: i32) -> String {
    muster_proto::convert::generation_state(v).map_or_else(|_| "unknown".into(), |s| s.to_string())
}

/// See [`outcome_name`].
pub fn mode_name(v: i32) -> String {
    muster_proto::convert::apply_mode(v).map_or_else(|_| "unknown".into(), |m| m.to_string())
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
    pub running: Running,
    pub endpoint: String,
    pub mc: muster_machinery::musterconfig::MusterConfig,
    /// Stand-in boot assets (`start_with_boot`), removed with the controller.
    boot_assets: Option<tempfile::TempDir>,
}

/// A machine enrolled by a test: its id, certificate and key.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: String,
    pub cert: String,
    pub key: String,
}

pub type AdminClient = muster_proto::pb::admin_service_client::AdminServiceClient<Channel>;
type AgentClient = muster_proto::pb::agent_service_client::AgentServiceClient<Channel>;

/// A machine's raw agent stream: the sender of what it says, and what it is sent.
pub type AgentStream = (
    tokio::sync::mpsc::Sender<muster_proto::pb::AgentMessage>,
    tonic::Streaming<muster_proto::pb::ControllerMessage>,
);

impl TestController {
    pub async fn start() -> Result<Self> {
        Self::start_with(ControllerOptions::default()).await
    }

    pub async fn start_with(opts: ControllerOptions) -> Result<Self> {
        Self::start_full(opts, false).await
    }

    /// A controller that also serves network boot (`/boot/...`), with stand-in kernel and
    /// initramfs files (the boot scripts only name them).
    pub async fn start_with_boot(opts: ControllerOptions) -> Result<Self> {
        Self::start_full(opts, true).await
    }

    async fn start_full(opts: ControllerOptions, with_boot: bool) -> Result<Self> {
        let assets = tempfile::tempdir()?;
        let boot = if with_boot {
            for f in [muster_machinery::boot::KERNEL, muster_machinery::boot::INITRD] {
                std::fs::write(assets.path().join(f), b"stand-in")?;
            }
            Some(muster_controller::fleet::boot::BootOptions {
                assets: assets.path().to_owned(),
                controller_url: None,
                kernel_args: String::new(),
                proxy_dhcp: None,
                tftp_root: None,
                http_url: None,
            })
        } else {
            None
        };
        let mut f = Self::start_serving(opts, Default::default(), boot).await?;
        f.boot_assets = with_boot.then_some(assets);
        Ok(f)
    }

    /// With these connection limits and, optionally, network boot from `boot`.
    pub async fn start_serving(
        opts: ControllerOptions,
        net: muster_controller::api::limits::NetLimits,
        boot: Option<muster_controller::fleet::boot::BootOptions>,
    ) -> Result<Self> {
        init_crypto();
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("ctl");
        let running = serve::start(ServeOptions {
            data_dir: data_dir.clone(),
            grpc_listen: "127.0.0.1:0".parse()?,
            http_listen: "127.0.0.1:0".parse()?,
            sans: vec![],
            controller: opts,
            boot,
            net,
        })
        .await?;
        let endpoint = format!("https://127.0.0.1:{}", running.ports.grpc.port());
        let mc = muster_machinery::musterconfig::MusterConfig::from_yaml(&std::fs::read_to_string(
            data_dir.join("musterconfig"),
        )?)?;
        Ok(Self { dir, running, endpoint, mc, boot_assets: None })
    }

    async fn serve(
        data_dir: &Path,
        grpc: std::net::SocketAddr,
        controller: ControllerOptions,
    ) -> Result<Running> {
        Self::serve_with(data_dir, grpc, controller, None).await
    }

    async fn serve_with(
        data_dir: &Path,
        grpc: std::net::SocketAddr,
        controller: ControllerOptions,
        boot: Option<muster_controller::fleet::boot::BootOptions>,
    ) -> Result<Running> {
        Ok(serve::start(ServeOptions {
            data_dir: data_dir.to_owned(),
            grpc_listen: grpc,
            http_listen: "127.0.0.1:0".parse()?,
            sans: vec![],
            controller,
            boot,
            net: Default::default(),
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

    pub fn pin(&self) -> Result<muster_machinery::pin::CaPin> {
        Ok(muster_machinery::pin::CaPin::of_cert_pem(&self.mc.ca)?)
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

    /// The machine `query` names, as `muster machine get` shows it.
    pub async fn machine(&self, query: &str) -> Result<muster_proto::pb::Machine> {
        let r = self.admin().await?.get_machine(muster_proto::pb::MachineRef { query: query.into() }).await?;
        Ok(r.into_inner())
    }

    /// Opens `m`'s agent stream as an agent does: `hello` is its first message.
    pub async fn open_stream(&self, m: &Enrolled, hello: muster_proto::pb::Hello) -> Result<AgentStream> {
        use muster_proto::pb;
        let (up, rx) = tokio::sync::mpsc::channel(8);
        up.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await?;
        let down = self
            .machine_agent(m)
            .await?
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((up, down))
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
        self.enroll_key(token, &key, inventory).await
    }

    /// Enrolls `key` with `token` and `inventory`.
    pub async fn enroll_key(
        &self,
        token: &str,
        key: &rcgen::KeyPair,
        inventory: muster_proto::pb::Inventory,
    ) -> Result<std::result::Result<Enrolled, tonic::Status>> {
        let csr = rcgen::CertificateParams::new(vec![])?.serialize_request(key)?.pem()?;
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
            .list_machines(muster_proto::pb::ListMachinesRequest { page_size: 1000, ..Default::default() })
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
