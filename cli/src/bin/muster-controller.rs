//! `muster-controller`: holds the fleet's state and serves the agent and admin APIs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use muster_controller::api::limits::NetLimits;
use muster_controller::fleet::boot::BootOptions;
use muster_controller::fleet::health::Thresholds;
use muster_controller::fleet::ControllerOptions;
use muster_controller::pki::{self, DataDir, Pki};
use muster_controller::serve::{self, ServeOptions};

/// The Muster controller: fleet state, the agents' and operators' gRPC APIs (mutual TLS) and the
/// HTTP endpoints (health, Prometheus metrics and service discovery, network boot).
#[derive(Parser, Debug)]
#[command(name = "muster-controller", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the CA, server and admin certificates and the CLI's musterconfig in a new data dir.
    ///
    /// Prints the CA pin (`sha256:<hex>`) that agents are started with (`--ca-hash`). Refuses to
    /// overwrite an existing CA.
    Init {
        /// Data directory.
        #[arg(long, env = "MUSTER_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// Extra name or IP address for the server certificate (besides localhost, 127.0.0.1,
        /// ::1 and this host's name). Repeatable. Agents must reach the controller by one of them.
        #[arg(long = "san", value_name = "HOST_OR_IP")]
        sans: Vec<String>,
        /// Where the CLI reaches this controller's gRPC listener, written to the musterconfig
        /// (`serve` never rewrites it; edit the musterconfig if the address changes).
        #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:7443", value_parser = parse_endpoint)]
        endpoint: String,
    },
    /// Serve the gRPC and HTTP listeners. An empty data dir is initialised first (its
    /// musterconfig then points at the bound gRPC address); an existing one is used as is.
    ///
    /// Prints `muster-controller listening grpc=ADDR http=ADDR` once both listeners are bound and
    /// writes the same to DATA_DIR/ports.json, so port 0 works for scripts.
    Serve {
        /// Data directory (created and initialised if empty).
        #[arg(long, env = "MUSTER_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// gRPC (mutual TLS) listen address for agents and the CLI.
        #[arg(long, default_value = "0.0.0.0:7443")]
        grpc_listen: SocketAddr,
        /// Plain HTTP listen address (health, metrics, network boot).
        #[arg(long, default_value = "0.0.0.0:7480")]
        http_listen: SocketAddr,
        /// Extra server certificate name, used only when the data dir is initialised. Repeatable.
        #[arg(long = "san", value_name = "HOST_OR_IP")]
        sans: Vec<String>,
        /// Lifetime of machine client certificates; agents renew at ~70% of it.
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        machine_cert_ttl: Duration,
        #[command(flatten)]
        health: HealthArgs,
        #[command(flatten)]
        admission: AdmissionArgs,
        #[command(flatten)]
        net: Box<NetArgs>,
        #[command(flatten)]
        boot: Box<BootArgs>,
    },
    /// Print the CA pin of an initialised data dir.
    Pin {
        #[arg(long, env = "MUSTER_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
    },
    /// Node OS images for install to disk (`muster machine install NAME --image IMAGE`), kept
    /// in DATA_DIR/images and served at http://HOST:HTTP_PORT/images/ while network boot is on.
    /// Run on the controller's host; a running controller sees added images at once.
    #[command(subcommand)]
    Image(ImageCmd),
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Add an image: `muster image os`'s muster-os.raw.gz (or a raw disk image, compressed
    /// here). Replaces an image of the same name (machines installing it now fail their
    /// checksum and report it).
    Add {
        /// The image file.
        file: PathBuf,
        /// Its name [default: the file name up to its first '.'].
        #[arg(long)]
        name: Option<String>,
        #[arg(long, env = "MUSTER_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// Print the image's record as JSON.
        #[arg(long, short = 'o', value_name = "FORMAT", value_parser = ["json"])]
        output: Option<String>,
    },
    /// List the images.
    List {
        #[arg(long, env = "MUSTER_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        #[arg(long, short = 'o', value_name = "FORMAT", value_parser = ["json"])]
        output: Option<String>,
    },
}

/// Who may enroll, and how fast: what a public boot token can cost, and what counts as evidence
/// that an enrolling client has the MAC a registration names.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Admission")]
struct AdmissionArgs {
    /// Machines waiting for approval, at most (further enrollments that would wait are refused).
    #[arg(long, default_value_t = 1000)]
    max_pending: usize,
    /// Machines one token admitted that wait for approval, at most.
    #[arg(long, default_value_t = 200)]
    max_pending_per_token: usize,
    /// Enrollments one source address may make per minute (and at once).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    enroll_rate: u32,
    /// Take the MACs that clients in this network report as proof that they have them, for
    /// registrations (repeatable). Without it a registration is only claimed when this host's
    /// own neighbour (ARP) table maps the client's address to the registered MAC, i.e. the
    /// client is on a LAN this host is on; otherwise the claim waits for `muster approve`. For
    /// routed or NATed networks (QEMU user networking reaches the controller from 127.0.0.1).
    /// Anyone who can connect from such a network can claim a registration by naming its MAC.
    #[arg(long, value_name = "CIDR")]
    trust_reported_macs: Vec<muster_controller::fleet::admission::Cidr>,
}

impl From<AdmissionArgs> for muster_controller::fleet::admission::AdmissionOptions {
    fn from(a: AdmissionArgs) -> Self {
        Self {
            max_pending: a.max_pending,
            max_pending_per_token: a.max_pending_per_token,
            enroll_burst: a.enroll_rate,
            enroll_per_minute: a.enroll_rate,
            trust_reported_macs: a.trust_reported_macs,
        }
    }
}

/// Network boot: iPXE scripts, kernel and initramfs on the HTTP listener; optionally ProxyDHCP
/// and TFTP. Off unless --boot-assets is given.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Network boot")]
struct BootArgs {
    /// Serve network boot from this PXE bundle (`muster image pxe --out DIR`): iPXE clients
    /// chain http://HOST:HTTP_PORT/boot/start.ipxe.
    #[arg(long, value_name = "DIR")]
    boot_assets: Option<PathBuf>,
    /// The gRPC URL booted agents dial [default: https://<this host's name>:<gRPC port>]
    #[arg(long, value_name = "URL", requires = "boot_assets")]
    boot_controller_url: Option<String>,
    /// Kernel parameters for booted nodes, before Muster's own.
    #[arg(long, value_name = "ARGS", default_value = "console=tty0 console=ttyS0", requires = "boot_assets")]
    boot_kernel_args: String,
    /// Answer PXE clients on this interface with boot information (ProxyDHCP: no addresses,
    /// so it works beside the LAN's own DHCP server).
    #[arg(long, value_name = "IFACE", requires = "boot_assets")]
    proxy_dhcp: Option<String>,
    /// Serve iPXE binaries over TFTP (port 69) from this directory, for PXE ROMs that are not
    /// iPXE (Debian's `ipxe` package: /usr/lib/ipxe).
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "/usr/lib/ipxe", requires = "boot_assets")]
    tftp: Option<PathBuf>,
    /// This HTTP service's URL as machines reach it, for node OS image downloads (install to
    /// disk) [default: http://<the controller URL's host>:<HTTP port>]
    #[arg(long, value_name = "URL", requires = "boot_assets")]
    boot_http_url: Option<String>,
}

impl BootArgs {
    fn options(self) -> Result<Option<BootOptions>> {
        let Some(assets) = self.boot_assets else { return Ok(None) };
        if !assets.is_dir() {
            anyhow::bail!(
                "--boot-assets {}: not a directory (build one with `muster image pxe --out DIR`)",
                assets.display()
            );
        }
        if let Some(u) = &self.boot_controller_url {
            if !u.starts_with("https://") {
                anyhow::bail!("--boot-controller-url {u:?}: must be https://HOST:PORT");
            }
        }
        if let Some(u) = &self.boot_http_url {
            if !u.starts_with("http://") && !u.starts_with("https://") {
                anyhow::bail!("--boot-http-url {u:?}: must be http://HOST:PORT");
            }
        }
        Ok(Some(BootOptions {
            assets,
            controller_url: self.boot_controller_url,
            kernel_args: self.boot_kernel_args,
            proxy_dhcp: self.proxy_dhcp,
            tftp_root: self.tftp,
            http_url: self.boot_http_url,
        }))
    }
}

/// What one client may hold on the listeners. Connection caps default to shares of the
/// open-files limit (gRPC half of it, HTTP a quarter; one client address a quarter of a
/// listener's cap), so idle HTTP clients cannot starve agents of descriptors.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Connection limits")]
struct NetArgs {
    /// Connections the gRPC listener holds at once [default: half the open-files limit]
    #[arg(long, value_name = "N")]
    grpc_max_connections: Option<usize>,
    /// gRPC connections from one client address (an IPv6 /64) at once; 0: no such cap, e.g. for
    /// agents behind one NAT address [default: a quarter of --grpc-max-connections]
    #[arg(long, value_name = "N")]
    grpc_max_connections_per_address: Option<usize>,
    /// Connections the HTTP listener holds at once [default: a quarter of the open-files limit]
    #[arg(long, value_name = "N")]
    http_max_connections: Option<usize>,
    /// HTTP connections from one client address at once; 0: no such cap [default: a quarter of
    /// --http-max-connections]
    #[arg(long, value_name = "N")]
    http_max_connections_per_address: Option<usize>,
    /// gRPC: time from connecting to a finished TLS handshake and HTTP/2 preface.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// gRPC: a connection without a call in progress for this long is closed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    grpc_idle_timeout: Duration,
    /// HTTP: time from connecting, or from the end of the previous response, to a complete
    /// request head (bounds idle and slow-header connections).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// HTTP: a response the client does not read for this long ends its connection.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    http_write_timeout: Duration,
    /// HTTP: the largest request head (request line and headers); larger gets 431.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    http_max_header_bytes: usize,
}

impl From<NetArgs> for NetLimits {
    fn from(a: NetArgs) -> Self {
        NetLimits {
            grpc_max_connections: a.grpc_max_connections,
            grpc_max_per_address: a.grpc_max_connections_per_address,
            http_max_connections: a.http_max_connections,
            http_max_per_address: a.http_max_connections_per_address,
            handshake_timeout: a.tls_handshake_timeout,
            grpc_idle_timeout: a.grpc_idle_timeout,
            http_header_timeout: a.http_header_timeout,
            http_write_timeout: a.http_write_timeout,
            http_max_header_bytes: a.http_max_header_bytes,
            ..NetLimits::default()
        }
    }
}

/// Health model thresholds: when a machine turns `degraded` or `unhealthy`.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Health thresholds")]
struct HealthArgs {
    /// A filesystem fuller than this (percent) makes the machine degraded.
    #[arg(long, default_value_t = 90.0, value_parser = percent)]
    health_disk_percent: f64,
    /// ... and fuller than this, unhealthy.
    #[arg(long, default_value_t = 98.0, value_parser = percent)]
    health_disk_critical_percent: f64,
    /// Memory use above this (percent) makes the machine degraded.
    #[arg(long, default_value_t = 95.0, value_parser = percent)]
    health_memory_percent: f64,
    /// ... and above this, unhealthy.
    #[arg(long, default_value_t = 99.0, value_parser = percent)]
    health_memory_critical_percent: f64,
    /// A 1-minute load above this many times the CPU count makes the machine degraded.
    #[arg(long, default_value_t = 2.0)]
    health_load_per_cpu: f64,
    /// A clock offset to the controller larger than this makes the machine degraded.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    health_clock_skew: Duration,
    /// A client certificate expiring sooner than this makes the machine degraded.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    health_cert_expiry_warning: Duration,
}

impl From<HealthArgs> for Thresholds {
    fn from(a: HealthArgs) -> Self {
        Thresholds {
            disk_degraded_percent: a.health_disk_percent,
            disk_unhealthy_percent: a.health_disk_critical_percent,
            memory_degraded_percent: a.health_memory_percent,
            memory_unhealthy_percent: a.health_memory_critical_percent,
            load_per_cpu: a.health_load_per_cpu,
            clock_skew: a.health_clock_skew,
            cert_expiry_warning: a.health_cert_expiry_warning,
        }
    }
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err("must be between 0 and 100".into());
    }
    Ok(v)
}

fn default_data_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid.
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    match std::env::var_os("HOME") {
        Some(home) if !root => PathBuf::from(home).join(".muster/controller"),
        _ => PathBuf::from("/var/lib/muster"),
    }
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let ok = s.strip_prefix("https://").is_some_and(|rest| {
        rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    });
    if ok {
        Ok(s.to_owned())
    } else {
        Err("must look like https://HOST:PORT".into())
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(366 * 24 * 3600) {
        return Err("must be between 1m and 366d".into());
    }
    Ok(d)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    use std::io::IsTerminal;
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    raise_fd_limit();
    match cli.cmd {
        Cmd::Init { data_dir, sans, endpoint } => {
            let dir = DataDir::new(&data_dir);
            let out = pki::init(&dir, &sans, &endpoint)
                .with_context(|| format!("initialising {}", data_dir.display()))?;
            println!("{}", out.pin);
            eprintln!("CA, server and admin certificates written to {}", data_dir.display());
            eprintln!("CLI config: {} (export MUSTERCONFIG={0})", out.musterconfig.display());
            eprintln!("Start agents with: --ca-hash {}", out.pin);
            Ok(())
        }
        Cmd::Pin { data_dir } => {
            let pki = Pki::load(&DataDir::new(&data_dir)).context("loading the CA")?;
            println!("{}", pki.pin);
            Ok(())
        }
        Cmd::Image(ImageCmd::Add { file, name, data_dir, output }) => {
            use muster_controller::fleet::install;
            let name = match name {
                Some(n) => n,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.split('.').next())
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .context("pass --name: the file name gives none")?,
            };
            let dir = install::images_dir(&data_dir);
            let m = install::add_image(&dir, &file, &name, muster_util::now_ms())
                .with_context(|| format!("adding {} as image {name:?}", file.display()))?;
            if output.is_some() {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "image {} added: {} ({} bytes, sha256 {}), writes {} bytes (sha256 {})",
                    m.name,
                    dir.join(&m.file).display(),
                    m.size,
                    m.sha256,
                    m.raw_size,
                    m.raw_sha256
                );
            }
            Ok(())
        }
        Cmd::Image(ImageCmd::List { data_dir, output }) => {
            use muster_controller::fleet::install;
            let images = install::list_images(&install::images_dir(&data_dir))?;
            if output.is_some() {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                println!("{:<20} {:>14} {:>14}  SHA256", "NAME", "SIZE", "WRITES");
                for m in images {
                    println!("{:<20} {:>14} {:>14}  {}", m.name, m.size, m.raw_size, m.sha256);
                }
            }
            Ok(())
        }
        Cmd::Serve {
            data_dir,
            grpc_listen,
            http_listen,
            sans,
            machine_cert_ttl,
            health,
            admission,
            net,
            boot,
        } => {
            let boot = boot.options()?;
            let rt =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(async move {
                let running = serve::start(ServeOptions {
                    data_dir: data_dir.clone(),
                    grpc_listen,
                    http_listen,
                    sans,
                    controller: ControllerOptions {
                        machine_cert_ttl,
                        thresholds: Thresholds::from(health),
                        admission: admission.into(),
                    },
                    boot,
                    net: NetLimits::from(*net),
                })
                .await
                .with_context(|| format!("starting the controller with data dir {}", data_dir.display()))?;
                println!(
                    "muster-controller listening grpc={} http={}",
                    running.ports.grpc, running.ports.http
                );
                println!("ca-hash {}", running.pin);
                running.wait(shutdown_signal()).await.context("controller stopped")
            })
        }
    }
}

/// Raises the soft open-files limit to the hard limit: every connected agent holds a socket.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit struct.
    #[allow(unsafe_code)]
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max && {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0
        }
    };
    if raised {
        tracing::debug!(from = lim.rlim_cur, to = lim.rlim_max, "raised the open-files limit");
    }
}

async fn shutdown_signal() {
    muster_util::shutdown_signal().await;
    tracing::info!("shutting down");
}
