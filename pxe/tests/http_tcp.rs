//! The boot routes over a real TCP listener, fetched with curl as a client would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::pseudo_random;
use muster_pxe::{router, Assets, BootAction, BootError, BootPolicy, BootRequest, BootSpec};

#[derive(Default)]
struct Stub(Mutex<Vec<BootRequest>>);

#[async_trait::async_trait]
impl BootPolicy for Stub {
    async fn decide(&self, req: &BootRequest) -> Result<BootAction, BootError> {
        self.0.lock().unwrap().push(req.clone());
        if req.mac.map(|m| m.to_string()).as_deref() == Some("52:54:00:00:00:02") {
            return Ok(BootAction::LocalDisk { reason: "installed".into() });
        }
        Ok(BootAction::Boot(BootSpec {
            profile: "discovery".into(),
            kernel: "vmlinuz".into(),
            initrd: "initramfs.img".into(),
            cmdline: "muster.controller=https://10.0.2.2:7443 muster.ca_hash=sha256:ab muster.token=x.y"
                .into(),
        }))
    }
}

async fn curl(args: &[&str]) -> (bool, Vec<u8>) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl (Debian package curl) must be installed");
    (out.status.success(), out.stdout)
}

#[tokio::test]
async fn boot_routes_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = pseudo_random(1 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(dir.path().join("vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.path().join("initramfs.img"), b"initramfs").unwrap();
    let stub = Arc::new(Stub::default());
    let app = router(stub.clone(), Arc::new(Assets::new(dir.path())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });

    let (ok, body) = curl(&[&format!("{base}/boot/start.ipxe")]).await;
    assert!(ok);
    assert!(String::from_utf8(body).unwrap().contains("chain /boot/machine.ipxe?mac=${net0/mac:hexhyp}"));

    // What iPXE sends after expanding the entry script's chain line.
    let url = format!(
        "{base}/boot/machine.ipxe?mac=52%3A54%3A00%3A12%3A34%3A56&uuid=00000000-0000-0000-0000-000000000000&serial=&arch=x86_64"
    );
    let (ok, body) = curl(&["-f", &url]).await;
    let script = String::from_utf8(body).unwrap();
    assert!(ok, "{script}");
    assert!(script.contains("kernel /boot/assets/vmlinuz initrd=initramfs.img muster.controller=https://10.0.2.2:7443 muster.ca_hash=sha256:ab muster.token=x.y"), "{script}");
    let seen = stub.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.mac.unwrap().to_string(), "52:54:00:12:34:56");
    assert_eq!(seen.uuid, None);
    assert_eq!(seen.remote, Some("127.0.0.1".parse().unwrap()));

    let (ok, body) = curl(&[&format!("{base}/boot/machine.ipxe?mac=52-54-00-00-00-02")]).await;
    assert!(ok);
    assert!(String::from_utf8(body).unwrap().contains("sanboot --no-describe --drive 0x80"));

    // A bad MAC: HTTP 400 naming the parameter.
    let (_, body) = curl(&["-w", "%{http_code}", &format!("{base}/boot/machine.ipxe?mac=xx")]).await;
    let body = String::from_utf8(body).unwrap();
    assert!(body.ends_with("400") && body.contains("mac: "), "{body}");

    // The kernel, whole, by range and by HEAD; the relative asset URL resolves like iPXE's.
    let (ok, body) = curl(&[&format!("{base}/boot/assets/vmlinuz")]).await;
    assert!(ok && body == kernel);
    let (ok, body) = curl(&["-r", "1000-1999", &format!("{base}/boot/assets/vmlinuz")]).await;
    assert!(ok && body == kernel[1000..2000]);
    let (ok, body) = curl(&["-r", "-100", &format!("{base}/boot/assets/vmlinuz")]).await;
    assert!(ok && body == kernel[kernel.len() - 100..]);
    let (ok, head) = curl(&["-I", &format!("{base}/boot/assets/vmlinuz")]).await;
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &kernel));
    assert!(
        ok && head.contains("content-length: 1048576") && head.contains(&format!("x-checksum-sha256: {sha}")),
        "{head}"
    );
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    let (_, body) =
        curl(&["-w", "%{http_code}", "-r", "2000000-", &format!("{base}/boot/assets/vmlinuz")]).await;
    assert!(String::from_utf8_lossy(&body).ends_with("416"));
    let (_, body) =
        curl(&["-w", "%{http_code}", "--path-as-is", &format!("{base}/boot/assets/../../etc/passwd")]).await;
    assert!(String::from_utf8_lossy(&body).ends_with("404"));
    let (ok, body) = curl(&[&format!("{base}/boot/assets/SHA256SUMS")]).await;
    assert!(ok);
    assert!(String::from_utf8(body).unwrap().contains(&format!("{sha}  vmlinuz\n")));

    server.abort();
}
