//! The admin API client used by the `muster` CLI, tests and benchmarks: finding and loading the
//! musterconfig, a mutual-TLS channel to the first controller endpoint that answers, and one
//! clear line for every failed call ([`explain`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), muster_cli::client::ClientError> {
//! use muster_cli::client;
//! use muster_proto::pb;
//!
//! // --musterconfig PATH, else $MUSTERCONFIG, else ~/.muster/config.
//! let path = client::musterconfig_path(None)?;
//! let cfg = client::load_musterconfig(&path)?;
//! let mut admin = client::admin_client(&cfg).await?;
//! let machines = admin.list_machines(pb::ListMachinesRequest::default()).await;
//! # let _ = machines;
//! # Ok(()) }
//! ```
//!
//! The rustls crypto provider must be installed once per process before connecting
//! (`rustls::crypto::ring::default_provider().install_default()`), as every Muster binary does
//! first thing in `main`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_machinery::musterconfig::MusterConfig;
use muster_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long one endpoint gets to accept the TCP connection and finish the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-call deadline on the channels made here.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest admin response accepted (a `ListMachines` of a big fleet with inventories).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

const HINT: &str = "create one with `muster-controller init`, start a lab with `muster lab up`, \
                    or pass --musterconfig PATH / set MUSTERCONFIG";

/// Client-side errors, each saying what went wrong and what to do. `Display` is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No `--musterconfig`, no `$MUSTERCONFIG`, and nothing at the default path.
    #[error("no musterconfig found (tried {tried}); {HINT}")]
    NoConfig {
        /// The places looked at, for the message.
        tried: String,
    },
    /// The named musterconfig does not exist.
    #[error("no musterconfig at {}; {HINT}", path.display())]
    Missing { path: PathBuf },
    /// The musterconfig exists but cannot be read.
    #[error("cannot read the musterconfig {}: {cause}", path.display())]
    Read { path: PathBuf, cause: std::io::Error },
    /// The musterconfig cannot be written.
    #[error("cannot write the musterconfig {}: {cause}", path.display())]
    Write { path: PathBuf, cause: std::io::Error },
    /// The musterconfig is not valid (`problem` names the field).
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    /// No endpoint answered; one entry per endpoint, in the order tried.
    #[error("{}", Unreachable(failures))]
    Unreachable { failures: Vec<EndpointFailure> },
}

/// Why one controller endpoint could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFailure {
    /// The endpoint as written in the musterconfig.
    pub endpoint: String,
    /// The cause, with its sources (`tcp connect error: Connection refused (os error 111)`).
    pub cause: String,
}

struct Unreachable<'a>(&'a [EndpointFailure]);

impl fmt::Display for Unreachable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => write!(f, "cannot reach the controller: the musterconfig lists no endpoints"),
            [one] => write!(f, "cannot reach the controller at {}: {}", one.endpoint, one.cause),
            all => {
                write!(f, "cannot reach the controller at any of its {} endpoints: ", all.len())?;
                for (i, e) in all.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{}: {}", e.endpoint, e.cause)?;
                }
                Ok(())
            }
        }
    }
}

/// Where the musterconfig is: `flag` (`--musterconfig PATH`), else `$MUSTERCONFIG` (if set and
/// non-empty), else `~/.muster/config` if it exists. An explicit path is returned even if it does
/// not exist ([`load_musterconfig`] then says so); with none and no default file the error lists
/// the places tried and how to get a musterconfig.
pub fn musterconfig_path(flag: Option<&Path>) -> Result<PathBuf, ClientError> {
    resolve_path(
        flag,
        std::env::var_os("MUSTERCONFIG").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`musterconfig_path`] with the environment passed in (tests never touch the process env).
fn resolve_path(
    flag: Option<&Path>,
    env: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf, ClientError> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(p);
    }
    let default = home.filter(|h| !h.as_os_str().is_empty()).map(|h| h.join(".muster/config"));
    match default {
        Some(p) if p.exists() => Ok(p),
        Some(p) => {
            Err(ClientError::NoConfig { tried: format!("--musterconfig, $MUSTERCONFIG, {}", p.display()) })
        }
        None => Err(ClientError::NoConfig {
            tried: "--musterconfig, $MUSTERCONFIG, ~/.muster/config ($HOME is not set)".into(),
        }),
    }
}

/// Reads and checks a musterconfig. Errors name the path, and for an invalid file the field.
pub fn load_musterconfig(path: &Path) -> Result<MusterConfig, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::NotFound {
            ClientError::Missing { path: path.to_owned() }
        } else {
            ClientError::Read { path: path.to_owned(), cause }
        }
    })?;
    MusterConfig::from_yaml(&text).map_err(|e| {
        // The YAML parser adds a multi-line source excerpt; its first line says it all.
        let problem = e.to_string();
        let problem = problem.lines().next().unwrap_or_default().trim_end().to_owned();
        ClientError::Invalid { path: path.to_owned(), problem }
    })
}

/// The host of an `https://HOST:PORT` endpoint, without IPv6 brackets (the TLS server name).
fn host_of(endpoint: &str) -> Option<String> {
    let uri: tonic::transport::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_owned())
}

/// Drops the uninformative `transport error: ` prefix tonic puts before the real cause.
fn cause_of(e: &dyn std::error::Error) -> String {
    let chain = muster_util::error_chain(e);
    match chain.strip_prefix("transport error: ") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => chain,
    }
}

/// Adds what to do when the handshake failed on certificates: a musterconfig from another
/// controller (or an older `init` of this one) has the wrong CA or admin certificate. With TLS
/// 1.3 a refused client certificate only shows on the first call, so callers explaining a failed
/// call's transport error use this too.
pub fn with_tls_hint(cause: String) -> String {
    let c = cause.to_ascii_lowercase();
    if c.contains("certificate") || c.contains("alert") || c.contains("handshake") {
        format!(
            "{cause} (TLS failed: this musterconfig's CA or admin certificate does not belong to \
             this controller; use the musterconfig its `muster-controller init` wrote)"
        )
    } else if c.contains("connection closed") {
        format!(
            "{cause} (the controller closed the connection: it is shutting down, or it refused \
             this musterconfig's admin certificate)"
        )
    } else {
        cause
    }
}

/// A mutual-TLS channel to the first of `cfg.endpoints` that answers, and that endpoint.
///
/// Each endpoint is tried in order with [`CONNECT_TIMEOUT`]; the channel verifies the server
/// against `cfg.ca` for the endpoint's host and presents `cfg.cert`/`cfg.key`. Calls on it time
/// out after [`CALL_TIMEOUT`]. If none answers, the error lists every endpoint and its cause.
pub async fn admin_channel(cfg: &MusterConfig) -> Result<(Channel, String), ClientError> {
    let mut failures = Vec::new();
    for ep in &cfg.endpoints {
        let fail = |cause: String| EndpointFailure { endpoint: ep.clone(), cause };
        let Some(host) = host_of(ep) else {
            failures.push(fail("not an https://HOST:PORT URL".into()));
            continue;
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cfg.ca))
            .identity(Identity::from_pem(&cfg.cert, &cfg.key))
            .domain_name(host);
        let endpoint = match Endpoint::from_shared(ep.clone()).and_then(|e| e.tls_config(tls)) {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT),
            Err(e) => {
                failures.push(fail(cause_of(&e)));
                continue;
            }
        };
        tracing::debug!(endpoint = %ep, "connecting to the controller");
        match endpoint.connect().await {
            Ok(ch) => return Ok((ch, ep.clone())),
            Err(e) => {
                let f = fail(with_tls_hint(cause_of(&e)));
                tracing::debug!(endpoint = %ep, cause = %f.cause, "endpoint did not answer");
                failures.push(f);
            }
        }
    }
    Err(ClientError::Unreachable { failures })
}

/// An admin client on the first endpoint that answers (see [`admin_channel`]), accepting
/// responses up to [`MAX_RESPONSE_BYTES`].
pub async fn admin_client(cfg: &MusterConfig) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(admin_channel(cfg).await?.0).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// An admin client with the endpoint it reached, for [`explain`]ing failed calls.
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    pub endpoint: String,
}

impl Admin {
    /// Connects with the musterconfig at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let cfg = load_musterconfig(path)?;
        let (ch, endpoint) = admin_channel(&cfg).await?;
        Ok(Self {
            client: AdminServiceClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES),
            endpoint,
        })
    }

    /// A failed call as one line in the operator's terms.
    pub fn explain(&self, s: tonic::Status) -> CallFailed {
        explain(s, &self.endpoint)
    }
}

/// A failed admin call, explained.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallFailed(pub String);

/// One line per gRPC failure, saying what went wrong in the operator's terms. The controller's
/// own messages (not found, ambiguous query, already assigned, ...) are already written for
/// operators and pass through; transport failures and credential problems are explained.
pub fn explain(s: tonic::Status, endpoint: &str) -> CallFailed {
    use tonic::Code;
    let msg = s.message().to_owned();
    // A status with a source was made on this side of the connection (transport, TLS, timeout).
    let cause = std::error::Error::source(&s).map(muster_util::error_chain);
    let local = cause.is_some() || msg.contains("transport error");
    CallFailed(match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled if local => {
            let detail = match cause {
                Some(c) if !msg.is_empty() && !c.contains(&msg) => format!("{msg}: {c}"),
                Some(c) => c,
                None => msg,
            };
            let detail = detail.strip_prefix("transport error: ").unwrap_or(&detail).to_owned();
            format!("cannot reach the controller at {endpoint}: {}", with_tls_hint(detail))
        }
        Code::Unavailable => format!("the controller at {endpoint} is unavailable: {msg}"),
        Code::Unauthenticated | Code::PermissionDenied => {
            format!("the controller refused this musterconfig's credentials: {msg}")
        }
        Code::DeadlineExceeded => format!("the controller at {endpoint} did not answer in time"),
        Code::Unimplemented => format!(
            "the controller at {endpoint} does not support this call (is it older than this muster?): {msg}"
        ),
        Code::Internal => format!("the controller failed: {msg}"),
        c if msg.is_empty() => format!("the controller answered {c:?} with no message"),
        _ => msg,
    })
}

/// Points the musterconfig at `path` to `endpoint` (the lab does, for its relay).
pub fn set_endpoint(path: &Path, endpoint: &str) -> Result<(), ClientError> {
    let mut mc = load_musterconfig(path)?;
    mc.endpoints = vec![endpoint.to_owned()];
    let yaml =
        mc.to_yaml().map_err(|e| ClientError::Invalid { path: path.to_owned(), problem: e.to_string() })?;
    muster_util::write_atomic(path, yaml.as_bytes(), 0o600)
        .map_err(|cause| ClientError::Write { path: path.to_owned(), cause })
}

/// [`load_musterconfig`] then [`admin_client`]: the one call tests and benchmarks need, e.g. with
/// `DATA_DIR/musterconfig` of a controller they started.
pub async fn admin_client_from_file(path: &Path) -> Result<AdminServiceClient<Channel>, ClientError> {
    admin_client(&load_musterconfig(path)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_precedence() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().to_owned();
        let flag = PathBuf::from("/flag");
        assert_eq!(resolve_path(Some(&flag), Some("/env".into()), Some(home.clone())).unwrap(), flag);
        assert_eq!(
            resolve_path(None, Some("/env".into()), Some(home.clone())).unwrap(),
            PathBuf::from("/env")
        );
        let err = resolve_path(None, None, Some(home.clone())).unwrap_err().to_string();
        assert!(err.contains(".muster/config") && err.contains("muster lab up"), "{err}");
        assert!(err.contains("muster-controller init") && err.contains("$MUSTERCONFIG"), "{err}");
        let err = resolve_path(None, None, None).unwrap_err().to_string();
        assert!(err.contains("HOME"), "{err}");
        std::fs::create_dir_all(home.join(".muster")).unwrap();
        std::fs::write(home.join(".muster/config"), "x").unwrap();
        assert_eq!(
            resolve_path(None, Some("".into()), Some(home.clone())).unwrap(),
            home.join(".muster/config"),
            "an empty $MUSTERCONFIG counts as unset"
        );
        assert_eq!(
            resolve_path(Some(&flag), None, Some(home.clone())).unwrap(),
            flag,
            "the flag wins over an existing default"
        );
    }

    #[test]
    fn load_names_the_file_and_the_field() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("mc");
        std::fs::write(&p, "apiVersion: nope\n").unwrap();
        let e = load_musterconfig(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");

        std::fs::write(
            &p,
            "apiVersion: muster/v1alpha1\nkind: MusterConfig\nendpoints: []\nca: x\ncert: x\nkey: x\n",
        )
        .unwrap();
        let e = load_musterconfig(&p).unwrap_err().to_string();
        assert!(e.contains("endpoints"), "{e}");

        let missing = t.path().join("missing");
        let e = load_musterconfig(&missing).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()) && e.contains("muster lab up"), "{e}");

        // A directory: readable name, unreadable content.
        let e = load_musterconfig(t.path()).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the musterconfig"), "{e}");
    }

    #[test]
    fn hosts_of_endpoints() {
        assert_eq!(host_of("https://127.0.0.1:7443").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("https://[::1]:7443").as_deref(), Some("::1"));
        assert_eq!(host_of("https://ctl.example:7443").as_deref(), Some("ctl.example"));
        assert_eq!(host_of("not a url"), None);
    }

    #[test]
    fn unreachable_lists_every_endpoint() {
        let f = |e: &str| EndpointFailure { endpoint: e.into(), cause: "refused".into() };
        let one = ClientError::Unreachable { failures: vec![f("https://a:1")] }.to_string();
        assert_eq!(one, "cannot reach the controller at https://a:1: refused");
        let two = ClientError::Unreachable { failures: vec![f("https://a:1"), f("https://b:2")] }.to_string();
        assert_eq!(
            two,
            "cannot reach the controller at any of its 2 endpoints: https://a:1: refused; https://b:2: refused"
        );
    }

    #[test]
    fn certificate_failures_say_what_to_do() {
        let h = with_tls_hint("invalid peer certificate: BadSignature".into());
        assert!(h.starts_with("invalid peer certificate: BadSignature (TLS failed"), "{h}");
        assert!(h.contains("muster-controller init"), "{h}");
        assert!(with_tls_hint("connection error: received fatal alert: DecryptError".into()).contains("CA"));
        assert_eq!(with_tls_hint("tcp connect error: refused".into()), "tcp connect error: refused");
        assert!(with_tls_hint("operation was canceled: connection closed".into()).contains("refused this"));
    }

    /// A real musterconfig (from `pki::init`) whose endpoints are closed loopback ports: every
    /// one is tried, in order, and each failure is reported.
    #[tokio::test]
    async fn tries_every_endpoint_in_order() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let t = tempfile::tempdir().unwrap();
        let dd = muster_controller::pki::DataDir::new(t.path().join("ctl"));
        muster_controller::pki::init(&dd, &[], "https://127.0.0.1:7443").unwrap();
        let mut cfg = load_musterconfig(&dd.musterconfig()).unwrap();
        let closed = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        cfg.endpoints = vec![closed(), "https://".into(), closed()];
        let Err(ClientError::Unreachable { failures }) = admin_client(&cfg).await else {
            panic!("expected Unreachable")
        };
        assert_eq!(failures.len(), 3);
        assert_eq!(failures.iter().map(|f| f.endpoint.clone()).collect::<Vec<_>>(), cfg.endpoints);
        assert!(failures[0].cause.contains("refused"), "{:?}", failures[0]);
        assert!(!failures[0].cause.starts_with("transport error"), "{:?}", failures[0]);
    }
}
