//! Network boot, the controller's side: which machine boots what, and the boot token that boot
//! scripts carry. The mechanism (iPXE scripts, assets, ProxyDHCP, TFTP) is the `muster-pxe`
//! crate; this decides per machine.
//!
//! Boot scripts are readable by anyone on the LAN, so the token in them is a *boot token*: it
//! only creates `pending` machines, except machines pre-registered by MAC (see `registration`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_machinery::boot::{INITRD, KERNEL};
use muster_machinery::model::normalize_mac;
use muster_machinery::token::JoinToken;
use muster_machinery::KernelArgs;

use super::admission;
use super::tokens::TokenSpec;
use super::{Controller, FleetError};
use crate::store::check_token;

/// How the controller serves network boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// The directory with `vmlinuz` and `initramfs.img` (a `muster image pxe` bundle).
    pub assets: PathBuf,
    /// The gRPC URL booted agents dial (`https://HOST:PORT`); `None`: this host's name and the
    /// gRPC port.
    pub controller_url: Option<String>,
    /// Kernel parameters before Muster's own.
    pub kernel_args: String,
    /// Serve ProxyDHCP on this interface.
    pub proxy_dhcp: Option<String>,
    /// Serve TFTP (iPXE binaries) from this directory.
    pub tftp_root: Option<PathBuf>,
    /// The HTTP service as machines reach it, for image downloads (`http://HOST:PORT`);
    /// `None`: the controller URL's host and the HTTP port.
    pub http_url: Option<String>,
}

/// What a machine asking to boot gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootDecision {
    /// Boot Muster's image with these kernel parameters; `profile` says why (`registered`,
    /// `known`, `discovery`).
    Boot { profile: &'static str, cmdline: String },
    /// Do not network-boot (the firmware goes on to the next boot device).
    Exit { reason: String },
}

/// The boot token lives in the data dir (0600) so boot scripts survive restarts.
const BOOT_TOKEN_FILE: &str = "boot-token";
const BOOT_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const BOOT_TOKEN_USES: u32 = 1_000_000;

impl Controller {
    /// The boot token for boot scripts: the saved one while it is valid for another day, else
    /// a new one.
    pub async fn ensure_boot_token(&self, data_dir: &Path) -> Result<JoinToken, FleetError> {
        let path = data_dir.join(BOOT_TOKEN_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(tok) = JoinToken::parse(text.trim()) {
                let tomorrow = muster_util::now_ms() + 24 * 3600 * 1000;
                let tokens = self.store().list_tokens().await?;
                let usable = tokens
                    .iter()
                    .any(|t| t.id == tok.id() && t.boot && check_token(t, &tok, tomorrow).is_ok());
                if usable {
                    return Ok(tok);
                }
                tracing::info!(token = tok.id(), "the boot token is no longer usable; making a new one");
            }
        }
        let (tok, _) = self
            .mint_token(TokenSpec {
                ttl: Some(BOOT_TOKEN_TTL),
                uses: Some(BOOT_TOKEN_USES),
                description: "network boot (public on the LAN: pending unless registered)".into(),
                boot: true,
                ..TokenSpec::default()
            })
            .await?;
        muster_util::write_atomic(&path, format!("{tok}\n").as_bytes(), 0o600)
            .map_err(|source| FleetError::Io { path: path.clone(), source })?;
        tracing::info!(token = tok.id(), "created the boot token for network-boot scripts");
        Ok(tok)
    }

    /// Decides what the machine with `mac` (and `uuid`) boots. `base_cmdline` carries the
    /// controller URL, CA pin and boot token; `peer` is the address the request came from.
    ///
    /// The script boots the same image with the same command line for every machine; only
    /// `exit` (a registration that boots from its local disk, a revoked machine) differs, and
    /// only when the controller can confirm the requester has that MAC (see
    /// [`super::admission`]). So the answer to anyone else tells nothing about which MACs are
    /// registered or known; `profile` is for the log.
    pub async fn boot_decision(
        &self,
        mac: Option<&str>,
        uuid: Option<&str>,
        base_cmdline: &str,
        peer: Option<IpAddr>,
    ) -> Result<BootDecision, FleetError> {
        let mac = mac.and_then(normalize_mac);
        let uuid = uuid.map(str::to_ascii_lowercase).filter(|u| !u.is_empty());
        let boot = |profile| Ok(BootDecision::Boot { profile, cmdline: base_cmdline.to_owned() });
        let Some(mac) = mac else { return boot("discovery") };
        let regs = self.store().list_registrations().await?;
        let reg = regs.iter().find(|r| r.mac == mac);
        let known: Vec<_> = self
            .machines()
            .into_iter()
            .filter(|m| {
                m.inventory.nics.iter().any(|n| normalize_mac(&n.mac).as_deref() == Some(mac.as_str()))
            })
            .collect();
        let revoked = !known.is_empty() && known.iter().all(|m| m.revoked);
        // Installed: the disk is what boots. Not while resetting: the disk may be wiped already.
        let installed =
            known.iter().find(|m| !m.revoked && m.install.state == crate::store::InstallState::Installed);
        let exit = match reg {
            _ if installed.is_some() => Some(format!(
                "{mac} is installed to disk{}",
                installed
                    .map(|m| format!(" ({} on {})", m.install.image, m.install.device))
                    .unwrap_or_default()
            )),
            Some(r) if r.boot_local => Some(format!("{mac} is registered to boot from its local disk")),
            _ if revoked => Some(format!("machine with {mac} was revoked")),
            _ => None,
        };
        if let Some(reason) = exit {
            let vouched = admission::vouch(&self.inner.opts.admission, peer, std::slice::from_ref(&mac));
            if vouched.evidence.is_some() {
                return Ok(BootDecision::Exit { reason });
            }
            tracing::info!(%mac, peer = ?peer, "would not network-boot this MAC, but cannot confirm the requester has it; answering as for any machine");
            return boot("unconfirmed");
        }
        let uuid_ok =
            |r: &crate::store::Registration| r.uuid.is_empty() || uuid.as_deref() == Some(r.uuid.as_str());
        match reg {
            Some(r) if r.claimed_by.is_empty() && uuid_ok(r) => boot("registered"),
            _ if !known.is_empty() => boot("known"),
            _ => boot("discovery"),
        }
    }
}

/// What every booting machine's script says it boots.
pub const UNIFORM_PROFILE: &str = "muster";

/// The controller as the boot service's policy.
pub struct Policy {
    pub controller: Controller,
    /// Muster's kernel parameters (controller URL, CA pin, boot token), after the extra ones.
    pub cmdline: String,
}

#[async_trait::async_trait]
impl muster_pxe::BootPolicy for Policy {
    async fn decide(
        &self,
        req: &muster_pxe::BootRequest,
    ) -> Result<muster_pxe::BootAction, muster_pxe::BootError> {
        let mac = req.mac.map(|m| m.to_string());
        let d = self
            .controller
            .boot_decision(mac.as_deref(), req.uuid.as_deref(), &self.cmdline, req.remote)
            .await
            .map_err(|e| muster_pxe::BootError(e.to_string()))?;
        Ok(match d {
            BootDecision::Boot { profile, cmdline } => {
                tracing::debug!(mac = ?mac, profile, "boot decision");
                muster_pxe::BootAction::Boot(muster_pxe::BootSpec {
                    // The same words for every machine: the script must not tell which MACs
                    // the controller knows.
                    profile: UNIFORM_PROFILE.into(),
                    kernel: KERNEL.into(),
                    initrd: INITRD.into(),
                    cmdline,
                })
            }
            BootDecision::Exit { reason } => muster_pxe::BootAction::Exit { reason },
        })
    }
}

/// Sets up network boot for a started controller: the boot token, the policy and the routes.
pub async fn routes(
    controller: &Controller,
    data_dir: &Path,
    opts: &BootOptions,
    grpc_port: u16,
    http_port: u16,
) -> Result<axum::Router, FleetError> {
    for f in [KERNEL, INITRD] {
        if !opts.assets.join(f).is_file() {
            return Err(FleetError::invalid(
                "boot_assets",
                format!(
                    "{} has no {f}: build a bundle with `muster image pxe --out DIR`",
                    opts.assets.display()
                ),
            ));
        }
    }
    let token = controller.ensure_boot_token(data_dir).await?;
    let url = opts
        .controller_url
        .clone()
        .unwrap_or_else(|| format!("https://{}:{grpc_port}", crate::pki::local_hostname()));
    let cmdline = KernelArgs::enrollment(&url, &controller.pki().pin.to_string(), &token.to_string())
        .after(&opts.kernel_args);
    tracing::info!(assets = %opts.assets.display(), controller_url = %url, "serving network boot at /boot/start.ipxe");
    let policy = std::sync::Arc::new(Policy { controller: controller.clone(), cmdline });
    // Node OS images for install to disk, beside the boot assets.
    let http_url = opts.http_url.clone().unwrap_or_else(|| {
        let host = url.strip_prefix("https://").and_then(|r| r.rsplit_once(':')).map(|(h, _)| h.to_owned());
        format!("http://{}:{http_port}", host.unwrap_or_else(crate::pki::local_hostname))
    });
    let dir = super::install::images_dir(data_dir);
    tracing::info!(images = %dir.display(), url = %http_url, "serving node OS images at /images/");
    controller.set_images(super::install::Images { dir: dir.clone(), base_url: http_url });
    Ok(muster_pxe::router(policy, std::sync::Arc::new(muster_pxe::Assets::new(&opts.assets)))
        .merge(muster_pxe::http::files_router("/images", std::sync::Arc::new(muster_pxe::Assets::new(dir)))))
}

/// The optional UDP services of network boot, bound at start-up so that a port in use or a
/// missing interface fails `serve` at once rather than later.
#[derive(Default)]
pub struct Listeners {
    pub proxy_dhcp: Option<muster_pxe::ProxyDhcp>,
    pub tftp: Option<muster_pxe::TftpServer>,
}

/// The TFTP port (iPXE binaries for PXE ROMs).
pub const TFTP_PORT: u16 = 69;

/// Binds ProxyDHCP (its answers point iPXE at `http://<iface address>:<http_port>/boot/start.ipxe`)
/// and TFTP when the options ask for them. TFTP listens on the boot interface's address when
/// ProxyDHCP names one (where its answers send PXE ROMs), else on every address.
pub async fn listeners(b: &BootOptions, http_port: u16) -> Result<Listeners, muster_pxe::PxeError> {
    let mut out = Listeners::default();
    let mut tftp_ip = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    if let Some(iface) = &b.proxy_dhcp {
        let ip = muster_pxe::proxydhcp::iface_ipv4(iface)?;
        tftp_ip = ip.into();
        let cfg = muster_pxe::ProxyDhcpConfig {
            iface: iface.clone(),
            server_ip: Some(ip),
            http_boot_url: format!("http://{ip}:{http_port}/boot/start.ipxe"),
            tftp_bios_file: muster_pxe::proxydhcp::IPXE_BIOS_FILE.into(),
            tftp_efi_file: muster_pxe::proxydhcp::IPXE_EFI_FILE.into(),
        };
        // It logs what it serves once it runs.
        out.proxy_dhcp = Some(muster_pxe::ProxyDhcp::bind(&cfg)?);
    }
    if let Some(root) = &b.tftp_root {
        let addr = std::net::SocketAddr::new(tftp_ip, TFTP_PORT);
        out.tftp = Some(muster_pxe::TftpServer::bind(root.clone(), addr).await?);
    }
    Ok(out)
}
