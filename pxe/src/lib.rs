//! Muster's network-boot service: the mechanism, not the policy.
//!
//! - [`router`]: iPXE scripts and boot assets on the controller's HTTP listener.
//!   `GET /boot/start.ipxe` is the entry script every iPXE client chains (from DHCP's boot file
//!   name or ProxyDHCP); it chains `/boot/machine.ipxe?mac=…&uuid=…&serial=…&arch=…`, whose
//!   answer the [`BootPolicy`] decides (boot Muster's kernel + initramfs with a command line, or
//!   `exit` so the firmware goes on to the next boot device). `GET|HEAD /boot/assets/NAME` serves
//!   files from one directory with `Range` and SHA-256 checksums.
//! - [`proxydhcp`]: ProxyDHCP (boot information to PXE clients, no addresses).
//! - [`tftp`]: a read-only TFTP server for iPXE binaries, for PXE ROMs that are not iPXE.
//!
//! The controller implements [`BootPolicy`]; everything here is independent of it.

pub mod assets;
pub mod http;
pub mod proxydhcp;
pub mod script;
pub mod tftp;

pub use assets::Assets;
pub use http::router;
pub use script::{BootAction, BootRequest, BootSpec, MacAddr};

/// Decides what a machine asking to network-boot gets.
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
