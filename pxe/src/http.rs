//! The boot service's HTTP routes, to merge into the controller's router.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::assets::{parse_range, AssetError, Assets, RangeRequest};
use crate::script::{entry_script, error_script, machine_script, BootRequest};
use crate::{BootPolicy, Untrusted};

#[derive(Clone)]
struct Boot {
    policy: Arc<dyn BootPolicy>,
    assets: Arc<Assets>,
}

const IPXE: &str = "text/plain; charset=utf-8";

/// `/boot/start.ipxe`, `/boot/machine.ipxe`, `/boot/assets/SHA256SUMS` and
/// `/boot/assets/{name}` (see the crate docs). Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` to have the client address in
/// [`BootRequest::remote`] and the logs (it works without).
pub fn router(policy: Arc<dyn BootPolicy>, assets: Arc<Assets>) -> Router {
    Router::new()
        .route("/boot/start.ipxe", get(start))
        .route("/boot/machine.ipxe", get(machine))
        .route("/boot/assets/SHA256SUMS", get(sums))
        .with_state(Boot { policy, assets: assets.clone() })
        .merge(files_router("/boot/assets", assets))
}

/// `PREFIX/{name}`: the files directly in `assets`' directory, with `Range`, `If-Range`,
/// `If-None-Match` and their SHA-256 (`ETag`, `X-Checksum-Sha256`, `Digest`), as boot assets
/// are served. The controller serves its node OS images (`/images/{name}`) so.
pub fn files_router(prefix: &str, assets: Arc<Assets>) -> Router {
    Router::new().route(&format!("{prefix}/{{name}}"), get(asset).head(asset)).with_state(assets)
}

fn remote_of(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip())
}

async fn start(ext: axum::http::Extensions) -> Response {
    tracing::info!(remote = ?remote_of(&ext), "boot: entry script");
    ([(header::CONTENT_TYPE, IPXE)], entry_script()).into_response()
}

async fn machine(State(b): State<Boot>, ext: axum::http::Extensions, RawQuery(q): RawQuery) -> Response {
    let remote = remote_of(&ext);
    let req = match BootRequest::from_query_str(q.as_deref().unwrap_or(""), remote) {
        Ok(r) => r,
        Err(e) => {
            // The error quotes the client's parameter name: escaped.
            tracing::warn!(?remote, error = %Untrusted(&e.to_string()), "boot: bad request for a machine script");
            return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, IPXE)], error_script(&e.to_string()))
                .into_response();
        }
    };
    let mac = req.mac.map(|m| m.to_string());
    // A policy failure still answers with a script (status 200): iPXE then shows the reason on
    // the machine's console instead of a bare HTTP error, and moves on to the next boot device.
    let script = match b.policy.decide(&req).await {
        Ok(action) => match machine_script(&action) {
            Ok(s) => {
                // BootSpec's Debug hides the command line's secrets (the boot token's).
                tracing::info!(?mac, uuid = ?req.uuid, serial = ?req.serial, arch = ?req.arch, ?remote, ?action, "boot: machine script");
                s
            }
            Err(e) => {
                tracing::warn!(?mac, ?remote, error = %e, "boot: the policy's answer cannot be scripted");
                error_script(&format!("the controller's boot answer is unusable: {e}"))
            }
        },
        Err(e) => {
            tracing::warn!(?mac, uuid = ?req.uuid, ?remote, error = %e, "boot: no decision");
            error_script(&format!("the controller could not decide: {e}"))
        }
    };
    ([(header::CONTENT_TYPE, IPXE)], script).into_response()
}

async fn sums(State(b): State<Boot>) -> Response {
    match b.assets.sha256sums().await {
        Ok(s) => text(StatusCode::OK, s),
        Err(e) => {
            tracing::warn!(error = %e, "boot: listing assets");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

fn text(status: StatusCode, msg: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg).into_response()
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

async fn asset(
    State(assets): State<Arc<Assets>>,
    method: Method,
    ext: axum::http::Extensions,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let remote = remote_of(&ext);
    let mut a = match assets.open(&name).await {
        Ok(a) => a,
        Err(e @ (AssetError::NotFound(_) | AssetError::InvalidName(_))) => {
            tracing::info!(?remote, asset = %Untrusted(&name), "boot: no such asset");
            return text(StatusCode::NOT_FOUND, format!("{e}\n"));
        }
        Err(e) => {
            tracing::warn!(?remote, error = %e, "boot: reading an asset");
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
    };
    let len = a.len;
    let hex = a.sha256_hex();
    let etag = format!("\"{hex}\"");
    let mut common = HeaderMap::new();
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    set(&mut common, header::ETAG, &etag);
    set(&mut common, "x-checksum-sha256", &hex);
    set(
        &mut common,
        "digest",
        &format!("sha-256={}", base64::engine::general_purpose::STANDARD.encode(a.sha256)),
    );

    let header_str = |n: header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(inm) = header_str(header::IF_NONE_MATCH) {
        if inm.trim() == "*" || inm.split(',').any(|t| t.trim().trim_start_matches("W/") == etag) {
            return (StatusCode::NOT_MODIFIED, common).into_response();
        }
    }
    // A Range applies only if the client's copy (If-Range) is still current.
    let if_range_ok = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    // RFC 9110: a malformed Range is ignored (the whole asset), an end past the end is clamped,
    // a start past the end is 416.
    let range = match header_str(header::RANGE).filter(|_| if_range_ok) {
        None => RangeRequest::Full,
        Some(h) => parse_range(h, len),
    };
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial { first, last } => {
            set(&mut common, header::CONTENT_RANGE, &format!("bytes {first}-{last}/{len}"));
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable: the asset has {len} bytes\n"),
            );
            r.headers_mut().extend(common);
            set(r.headers_mut(), header::CONTENT_RANGE, &format!("bytes */{len}"));
            return r;
        }
    };
    tracing::info!(?remote, asset = %Untrusted(&name), %method, start, bytes = count, "boot: asset");
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        if start > 0 {
            if let Err(e) = a.file.seek(std::io::SeekFrom::Start(start)).await {
                tracing::warn!(error = %e, asset = %Untrusted(&name), "boot: seeking in an asset");
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("asset {name:?}: {e}\n"));
            }
        }
        let reader = a.file.take(count);
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024))
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.extend(common);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    set(h, header::CONTENT_LENGTH, &count.to_string());
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{BootAction, BootError, BootSpec};
    use axum::http::Request;
    use std::sync::Mutex;
    use tower_service::Service;

    #[derive(Default)]
    struct Stub {
        seen: Mutex<Vec<BootRequest>>,
    }

    #[async_trait::async_trait]
    impl BootPolicy for Stub {
        async fn decide(&self, req: &BootRequest) -> Result<BootAction, BootError> {
            self.seen.lock().unwrap().push(req.clone());
            match req.serial.as_deref() {
                Some("fail") => Err(BootError("store unavailable".into())),
                Some("disk") => Ok(BootAction::Exit { reason: "installed".into() }),
                Some("token") => Ok(BootAction::Boot(BootSpec {
                    profile: "discovery".into(),
                    kernel: "vmlinuz".into(),
                    initrd: "initramfs.img".into(),
                    cmdline: "console=ttyS0 muster.token=abc123.s3cr3tS3CR3T muster.ca_hash=sha256:ab".into(),
                })),
                Some("evil") => Ok(BootAction::Boot(BootSpec {
                    profile: "x".into(),
                    kernel: "vmlinuz".into(),
                    initrd: "initramfs.img".into(),
                    cmdline: "a\nshell".into(),
                })),
                _ => Ok(BootAction::Boot(BootSpec {
                    profile: if req.mac.is_some() { "machine".into() } else { "discovery".into() },
                    kernel: "vmlinuz".into(),
                    initrd: "initramfs.img".into(),
                    cmdline: "console=ttyS0 muster.token=t".into(),
                })),
            }
        }
    }

    const KERNEL: &[u8] = b"0123456789abcdefghij";

    fn app() -> (Router, Arc<Stub>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), KERNEL).unwrap();
        std::fs::write(d.path().join("initramfs.img"), b"initrd").unwrap();
        let stub = Arc::new(Stub::default());
        (router(stub.clone(), Arc::new(Assets::new(d.path()))), stub, d)
    }

    async fn call(
        r: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = r.clone().call(b.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, bytes.to_vec())
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
    }

    #[tokio::test]
    async fn scripts() {
        let (r, stub, _d) = app();
        let (s, h, b) = call(&r, "GET", "/boot/start.ipxe", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
        assert_eq!(String::from_utf8(b).unwrap(), entry_script());

        let (s, _, b) =
            call(&r, "GET", "/boot/machine.ipxe?mac=52-54-00-12-34-56&uuid=&serial=&arch=x86_64", &[]).await;
        let b = String::from_utf8(b).unwrap();
        assert_eq!(s, StatusCode::OK);
        assert!(b.contains("booting profile machine"), "{b}");
        assert!(
            b.contains("kernel /boot/assets/vmlinuz initrd=initramfs.img console=ttyS0 muster.token=t"),
            "{b}"
        );
        let seen = stub.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!((seen.uuid, seen.serial, seen.arch.as_deref()), (None, None, Some("x86_64")));

        let (_, _, b) = call(&r, "GET", "/boot/machine.ipxe", &[]).await;
        assert!(String::from_utf8(b).unwrap().contains("booting profile discovery"));

        let (s, _, b) = call(&r, "GET", "/boot/machine.ipxe?serial=disk", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(String::from_utf8(b).unwrap().ends_with("this machine: installed\nexit\n"));

        // Bad input: 400 naming the parameter; the policy is not asked.
        let n = stub.seen.lock().unwrap().len();
        let (s, _, b) = call(&r, "GET", "/boot/machine.ipxe?mac=52%3A54", &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8(b).unwrap().contains("echo Muster: mac: "));
        assert_eq!(stub.seen.lock().unwrap().len(), n);

        // Policy failure or an unscriptable answer: 200 with a script that says so and exits.
        for (serial, what) in [("fail", "could not decide: store unavailable"), ("evil", "cmdline")] {
            let (s, _, b) = call(&r, "GET", &format!("/boot/machine.ipxe?serial={serial}"), &[]).await;
            let b = String::from_utf8(b).unwrap();
            assert_eq!(s, StatusCode::OK);
            assert!(b.contains(what) && b.ends_with("exit 1\n") && !b.contains("\nshell"), "{b}");
        }
    }

    #[tokio::test]
    async fn assets_with_ranges_and_checksums() {
        let (r, _, _d) = app();
        let (s, h, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[]).await;
        assert_eq!((s, b.as_slice()), (StatusCode::OK, KERNEL));
        assert_eq!(h[header::ACCEPT_RANGES], "bytes");
        assert_eq!(h[header::CONTENT_LENGTH], "20");
        assert_eq!(h[header::ETAG].to_str().unwrap(), format!("\"{}\"", sha(KERNEL)));
        assert_eq!(h["x-checksum-sha256"].to_str().unwrap(), sha(KERNEL));
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, KERNEL).as_ref());
        assert_eq!(h["digest"].to_str().unwrap(), format!("sha-256={b64}"));

        let (s, h, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=2-5")]).await;
        assert_eq!((s, b.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"2345"[..]));
        assert_eq!(h[header::CONTENT_RANGE], "bytes 2-5/20");
        assert_eq!(h[header::CONTENT_LENGTH], "4");
        let (s, h, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=-3")]).await;
        assert_eq!((s, b.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"hij"[..]));
        assert_eq!(h[header::CONTENT_RANGE], "bytes 17-19/20");
        let (s, _, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=15-")]).await;
        assert_eq!((s, b.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"fghij"[..]));
        let (s, h, _) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=20-")]).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h[header::CONTENT_RANGE], "bytes */20");
        let (s, _, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=0-1,4-5")]).await;
        assert_eq!((s, b.as_slice()), (StatusCode::OK, KERNEL));
        // If-Range with another version: the whole file.
        let (s, _, b) =
            call(&r, "GET", "/boot/assets/vmlinuz", &[("range", "bytes=0-1"), ("if-range", "\"old\"")]).await;
        assert_eq!((s, b.len()), (StatusCode::OK, 20));

        let (s, h, b) = call(&r, "HEAD", "/boot/assets/vmlinuz", &[]).await;
        assert_eq!((s, b.len()), (StatusCode::OK, 0));
        assert_eq!(h[header::CONTENT_LENGTH], "20");
        assert_eq!(h["x-checksum-sha256"].to_str().unwrap(), sha(KERNEL));
        let (s, h, _) = call(&r, "HEAD", "/boot/assets/vmlinuz", &[("range", "bytes=0-9")]).await;
        assert_eq!(
            (s, &h[header::CONTENT_LENGTH]),
            (StatusCode::PARTIAL_CONTENT, &HeaderValue::from_static("10"))
        );

        let etag = format!("\"{}\"", sha(KERNEL));
        let (s, _, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("if-none-match", &etag)]).await;
        assert_eq!((s, b.len()), (StatusCode::NOT_MODIFIED, 0));

        for bad in [
            "/boot/assets/..%2Fetc%2Fpasswd",
            "/boot/assets/.hidden",
            "/boot/assets/nope",
            "/boot/assets/a%2Fb",
        ] {
            assert_eq!(call(&r, "GET", bad, &[]).await.0, StatusCode::NOT_FOUND, "{bad}");
        }
        assert_eq!(call(&r, "GET", "/boot/assets/../../etc/passwd", &[]).await.0, StatusCode::NOT_FOUND);

        let (s, _, b) = call(&r, "GET", "/boot/assets/SHA256SUMS", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            format!("{}  initramfs.img\n{}  vmlinuz\n", sha(b"initrd"), sha(KERNEL))
        );
    }

    #[tokio::test]
    async fn untrusted_names_cannot_forge_log_lines() {
        let (r, _, _d) = app();
        let log = muster_util::test_log::global();
        let (s, _, _) = call(&r, "GET", "/boot/assets/x%0aFORGED", &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) =
            call(&r, "GET", "/boot/machine.ipxe?x%0aFORGED%1b[2J=1&x%0aFORGED%1b[2J=2", &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let text = log.text();
        assert!(!text.lines().any(|l| l.starts_with("FORGED")), "a forged log line:\n{text}");
        assert!(!text.contains('\u{1b}'), "a terminal escape reached the log:\n{text}");
        // Both requests were logged, escaped.
        assert_eq!(text.matches("x\\nFORGED").count(), 2, "{text}");
    }

    #[tokio::test]
    async fn the_boot_token_secret_is_not_logged() {
        let (r, _, _d) = app();
        let log = muster_util::test_log::global();
        let (s, _, b) = call(&r, "GET", "/boot/machine.ipxe?mac=52-54-00-12-34-56&serial=token", &[]).await;
        assert_eq!(s, StatusCode::OK);
        // The machine gets the whole token; the log only its id.
        assert!(String::from_utf8(b).unwrap().contains("muster.token=abc123.s3cr3tS3CR3T"));
        let text = log.text();
        assert!(
            text.contains("boot: machine script") && text.contains("muster.token=abc123.<redacted>"),
            "{text}"
        );
        assert!(!text.contains("s3cr3t") && !text.contains("S3CR3T"), "the secret was logged:\n{text}");
    }

    #[tokio::test]
    async fn malformed_ranges_are_ignored_and_long_ones_clamped() {
        let (r, _, _d) = app();
        // Malformed, invalid or another unit (RFC 9110): ignored, 200 with the whole asset.
        for bad in ["bytes=9-3", "items=0-1", "bytes=x-", "bytes=1", "bytes=", "bytes=--5", "bytes=-5-"] {
            let (s, h, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", bad)]).await;
            assert_eq!((s, b.as_slice()), (StatusCode::OK, KERNEL), "{bad}");
            assert!(h.get(header::CONTENT_RANGE).is_none(), "{bad}");
            assert_eq!(h[header::CONTENT_LENGTH], "20", "{bad}");
        }
        // An end past the end of the file: 206 with the bytes there are.
        for (range, first) in [
            ("bytes=15-25", 15),
            ("bytes=5-99999999999999999999999", 5),
            ("bytes=-99999999999999999999999", 0),
        ] {
            let (s, h, b) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", range)]).await;
            assert_eq!((s, b.as_slice()), (StatusCode::PARTIAL_CONTENT, &KERNEL[first..]), "{range}");
            assert_eq!(h[header::CONTENT_RANGE].to_str().unwrap(), format!("bytes {first}-19/20"), "{range}");
            assert_eq!(h[header::CONTENT_LENGTH].to_str().unwrap(), (20 - first).to_string(), "{range}");
        }
        // A start past the end: 416 with the length.
        for range in ["bytes=20-", "bytes=25-30", "bytes=99999999999999999999999-"] {
            let (s, h, _) = call(&r, "GET", "/boot/assets/vmlinuz", &[("range", range)]).await;
            assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
            assert_eq!(h[header::CONTENT_RANGE], "bytes */20", "{range}");
        }
    }
}
