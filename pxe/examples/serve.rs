//! The boot service on its own, for trying it against real firmware: every machine gets the
//! same kernel, initramfs and command line.
//!
//! ```sh
//! cargo run -p muster-pxe --example serve -- --http 0.0.0.0:8080 --assets DIR \
//!     [--cmdline 'console=ttyS0'] [--proxy-dhcp IFACE --url http://IP:8080/boot/start.ipxe] \
//!     [--tftp /usr/lib/ipxe]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use muster_pxe::{BootAction, BootError, BootPolicy, BootRequest, BootSpec};

struct Everyone(String);

#[async_trait::async_trait]
impl BootPolicy for Everyone {
    async fn decide(&self, _req: &BootRequest) -> Result<BootAction, BootError> {
        Ok(BootAction::Boot(BootSpec {
            profile: "example".into(),
            kernel: "vmlinuz".into(),
            initrd: "initramfs.img".into(),
            cmdline: self.0.clone(),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info,muster_pxe=debug").init();
    let mut args = std::env::args().skip(1);
    let (mut http, mut assets, mut cmdline, mut iface, mut url, mut tftp) =
        ("127.0.0.1:8080".to_owned(), ".".to_owned(), String::new(), None, None, None);
    while let Some(a) = args.next() {
        let mut v = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--http" => http = v()?,
            "--assets" => assets = v()?,
            "--cmdline" => cmdline = v()?,
            "--proxy-dhcp" => iface = Some(v()?),
            "--url" => url = Some(v()?),
            "--tftp" => tftp = Some(v()?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let app = muster_pxe::router(Arc::new(Everyone(cmdline)), Arc::new(muster_pxe::Assets::new(assets)));
    let listener = tokio::net::TcpListener::bind(&http).await?;
    let local = listener.local_addr()?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(iface) = iface {
        let cfg = muster_pxe::ProxyDhcpConfig {
            iface,
            server_ip: None,
            http_boot_url: url.unwrap_or(format!("http://{local}/boot/start.ipxe")),
            tftp_bios_file: muster_pxe::proxydhcp::IPXE_BIOS_FILE.into(),
            tftp_efi_file: muster_pxe::proxydhcp::IPXE_EFI_FILE.into(),
        };
        let p = muster_pxe::ProxyDhcp::bind(&cfg)?;
        tasks.spawn(async move { p.serve(std::future::pending::<()>()).await.map_err(|e| e.to_string()) });
    }
    if let Some(root) = tftp {
        let t = muster_pxe::TftpServer::bind(root, SocketAddr::new(local.ip(), 69)).await?;
        tasks.spawn(async move { t.serve(std::future::pending::<()>()).await.map_err(|e| e.to_string()) });
    }
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    tasks.spawn(async move { axum::serve(listener, app).await.map_err(|e| e.to_string()) });
    tracing::info!(%local, "boot service up");
    if let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
