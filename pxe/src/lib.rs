//! Muster's network-boot service: the mechanism, not the policy. One binary (the controller)
//! serves it all; no dnsmasq needed. Depends on no Muster crate: the controller plugs its boot
//! decisions in through [`BootPolicy`].
//!
//! # HTTP ([`router`], on the controller's HTTP listener)
//!
//! | route | what |
//! | --- | --- |
//! | `GET /boot/start.ipxe` | the entry script ([`entry_script`]) every iPXE client chains (from the DHCP boot file name, ProxyDHCP, or an iPXE binary with an embedded script). It chains `/boot/machine.ipxe?mac=${net0/mac:hexhyp}&uuid=${uuid}&serial=…&arch=${buildarch:uristring}` — an absolute path without a host, so no host name has to be known. |
//! | `GET /boot/machine.ipxe` | the per-machine script. The query (URL-decoded here) becomes a [`BootRequest`]; a bad value answers `400` with a message naming the parameter. The [`BootPolicy`] decides a [`BootAction`]: boot a kernel + initramfs with a command line ([`BootSpec`]), `exit` so the firmware goes on to the next boot device, or `sanboot` the first local disk. Rendered by [`machine_script`]. |
//! | `GET,HEAD /boot/assets/{name}` | files directly in one directory ([`Assets`]): single `Range` (`206`, `416`; a malformed one is ignored, an end past the end clamped), `Accept-Ranges`, `ETag: "<sha256 hex>"`, `X-Checksum-Sha256: <hex>`, `Digest: sha-256=<base64>`, `If-None-Match`, `If-Range`; streamed from disk. |
//! | `GET /boot/assets/SHA256SUMS` | `sha256sum`-format list of every servable asset. |
//!
//! When the policy fails, `/boot/machine.ipxe` still answers `200` with a script that prints
//! the error and `exit`s ([`error_script`]): iPXE shows nothing of a non-2xx body, so this is
//! the only way the reason reaches the machine's console; the failure is logged as a warning.
//!
//! The controller mounts it with `Router::merge(muster_pxe::router(policy, assets))`; serve the
//! merged router with `into_make_service_with_connect_info::<SocketAddr>()` to get the client's
//! address into [`BootRequest::remote`] and the logs (it works without).
//!
//! # Mounting it (the controller's side)
//!
//! ```no_run
//! use std::sync::Arc;
//! use muster_pxe::{BootAction, BootError, BootPolicy, BootRequest, BootSpec};
//!
//! struct Policy;
//!
//! #[async_trait::async_trait]
//! impl BootPolicy for Policy {
//!     async fn decide(&self, req: &BootRequest) -> Result<BootAction, BootError> {
//!         Ok(match req.mac {
//!             None => BootAction::Exit { reason: "no MAC address".into() },
//!             Some(_) => BootAction::Boot(BootSpec {
//!                 profile: "discovery".into(),
//!                 kernel: "vmlinuz".into(),
//!                 initrd: "initramfs.img".into(),
//!                 cmdline: "muster.controller=https://10.0.0.1:7443 muster.ca_hash=sha256:… muster.token=…".into(),
//!             }),
//!         })
//!     }
//! }
//!
//! # async fn run(shutdown: impl std::future::Future<Output = ()> + Clone + Send + 'static) -> Result<(), Box<dyn std::error::Error>> {
//! let app = axum::Router::new() // … the controller's own routes …
//!     .merge(muster_pxe::router(Arc::new(Policy), Arc::new(muster_pxe::Assets::new("/var/lib/muster/boot"))));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // Optional: --proxy-dhcp IFACE and --tftp.
//! let cfg = muster_pxe::ProxyDhcpConfig {
//!     iface: "br0".into(),
//!     server_ip: None,
//!     http_boot_url: "http://10.0.0.1:8080/boot/start.ipxe".into(),
//!     tftp_bios_file: muster_pxe::proxydhcp::IPXE_BIOS_FILE.into(),
//!     tftp_efi_file: muster_pxe::proxydhcp::IPXE_EFI_FILE.into(),
//! };
//! let dhcp = muster_pxe::ProxyDhcp::bind(&cfg)?; // bind errors surface at start-up
//! let stop = shutdown.clone();
//! tokio::spawn(async move { dhcp.serve(stop).await });
//! // Bind TFTP to the boot interface's address, not 0.0.0.0.
//! let tftp = muster_pxe::TftpServer::bind("/usr/lib/ipxe", "10.0.0.1:69".parse()?).await?;
//! tokio::spawn(async move { tftp.serve(shutdown).await });
//! # Ok(()) }
//! ```
//!
//! # ProxyDHCP ([`proxydhcp`], optional)
//!
//! Answers PXE clients (option 60 `PXEClient…`) with boot information only — never an address
//! (`yiaddr` 0.0.0.0) — so it coexists with the LAN's own DHCP server: an OFFER on UDP 67 to a
//! DISCOVER, an ACK on UDP 4011 to a REQUEST. iPXE (user class `iPXE`) gets the HTTP URL of
//! `start.ipxe`; PXE ROMs get the iPXE binary over TFTP, by client architecture (option 93).
//! Options are checked before the DHCP library decodes a packet, and a panic while handling one
//! packet drops that packet only ([`proxydhcp::sanitize`], [`proxydhcp::answer_isolated`]).
//!
//! # TFTP ([`tftp`], optional)
//!
//! Read-only TFTP (RFC 1350 + options blksize/tsize/timeout) for the iPXE binaries, e.g. from
//! Debian's `ipxe` package in `/usr/lib/ipxe` (`undionly.kpxe`, `undionly.kkpxe`, `ipxe.efi`,
//! `snponly.efi`), with slots per address and in all, bounded timeouts and deadlines, and a
//! bound on what it sends to an address that has not acknowledged anything ([`TftpLimits`]).
//!
//! # Logs
//!
//! Names and other strings a client sent are logged through [`Untrusted`] (control characters
//! escaped), and a [`BootSpec`]'s `Debug` hides the secrets on its command line
//! ([`script::redact_cmdline`]): a boot token shows only its id.

pub mod assets;
pub mod http;
pub mod proxydhcp;
pub mod script;
pub mod tftp;
pub mod untrusted;

pub use assets::{AssetError, Assets};
pub use http::router;
pub use proxydhcp::{ProxyDhcp, ProxyDhcpConfig};
pub use script::{
    entry_script, error_script, machine_script, redact_cmdline, BootAction, BootRequest, BootSpec, MacAddr,
    QueryError,
};
pub use tftp::{TftpLimits, TftpServer};
pub use untrusted::Untrusted;

/// Decides what a machine asking to network-boot gets. The controller implements it.
#[async_trait::async_trait]
pub trait BootPolicy: Send + Sync + 'static {
    async fn decide(&self, req: &BootRequest) -> Result<BootAction, BootError>;
}

/// Why the policy could not decide (the machine's script says so and exits).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BootError(pub String);

/// Errors of the boot service's listeners.
#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

impl PxeError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        PxeError::Io { what: what.into(), source }
    }
}
