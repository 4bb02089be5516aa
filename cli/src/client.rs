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

use crate::terminal::escape;

/// The longest one endpoint gets to accept the TCP connection and finish the TLS and HTTP/2
/// set-up (a shorter request timeout shortens it), so a dead endpoint does not hold up the next.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Every call's deadline unless told otherwise (`muster --request-timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
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

/// What went wrong on the way to an endpoint, read from the error chain's types (not its
/// words): each has its own advice, and only a certificate problem is about the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trouble {
    /// Nothing listens there (TCP RST).
    Refused,
    /// No answer in time (TCP, TLS or the call itself).
    TimedOut,
    /// The server's certificate is from this musterconfig's CA but not for the endpoint's host;
    /// the names it is valid for, when rustls says.
    WrongName { presented: Vec<String> },
    /// The server's certificate is not signed by this musterconfig's CA.
    UnknownCa,
    /// The server refused this musterconfig's admin certificate (a TLS alert).
    CertificateRefused,
    /// The other end does not speak TLS: something else listens there.
    NotTls,
    /// The connection was closed or reset under us: the controller is shutting down or, with
    /// TLS 1.3 (where the client's side of the handshake is over first), refused us.
    Closed,
    /// Anything else; the cause says it.
    Other,
}

/// Reads [`Trouble`] from an error and its sources. `std::io::Error` hides the error it wraps
/// from `source()` (rustls' errors travel in one), and an HTTP/2 error the I/O error it holds,
/// so those are looked into as well.
pub fn trouble(e: &(dyn std::error::Error + 'static)) -> Trouble {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(t) = trouble_here(e) {
            return t;
        }
        cur = e.source();
    }
    Trouble::Other
}

/// The TLS alerts with which a server refuses a client certificate (rustls sends
/// `DecryptError` when the signature does not check against a CA of the same name).
const REFUSALS: [rustls::AlertDescription; 8] = {
    use rustls::AlertDescription as A;
    [
        A::BadCertificate,
        A::UnknownCA,
        A::CertificateRequired,
        A::CertificateUnknown,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::UnsupportedCertificate,
        A::DecryptError,
    ]
};

fn trouble_here(e: &(dyn std::error::Error + 'static)) -> Option<Trouble> {
    use rustls::CertificateError as C;
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(match r {
            rustls::Error::InvalidCertificate(C::NotValidForName) => {
                Trouble::WrongName { presented: Vec::new() }
            }
            rustls::Error::InvalidCertificate(C::NotValidForNameContext { presented, .. }) => {
                Trouble::WrongName { presented: presented.clone() }
            }
            rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => Trouble::UnknownCa,
            rustls::Error::AlertReceived(a) if REFUSALS.contains(a) => Trouble::CertificateRefused,
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => Trouble::NotTls,
            _ => Trouble::Other,
        });
    }
    if e.is::<tonic::TimeoutExpired>() || e.is::<tokio::time::error::Elapsed>() {
        return Some(Trouble::TimedOut);
    }
    // An HTTP/2 connection error keeps the I/O error it ended with to itself.
    if let Some(io) = e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io) {
        return trouble_here(io);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(inner) = io.get_ref() {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let t @ (Trouble::Refused
            | Trouble::TimedOut
            | Trouble::WrongName { .. }
            | Trouble::UnknownCa
            | Trouble::CertificateRefused
            | Trouble::NotTls
            | Trouble::Closed) = trouble(inner)
            {
                return Some(t);
            }
            // After the handshake, rustls' error reaches us through HTTP/2, which keeps only an
            // I/O error's kind and text: an alert is then known by exactly rustls' words for it.
            let text = inner.to_string();
            if io.kind() == std::io::ErrorKind::InvalidData
                && REFUSALS.iter().any(|a| rustls::Error::AlertReceived(*a).to_string() == text)
            {
                return Some(Trouble::CertificateRefused);
            }
        }
        use std::io::ErrorKind as K;
        match io.kind() {
            K::ConnectionRefused => return Some(Trouble::Refused),
            K::TimedOut => return Some(Trouble::TimedOut),
            K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof => {
                return Some(Trouble::Closed)
            }
            _ => {}
        }
    }
    None
}

/// `1s (--request-timeout)`: a deadline as the operator set it.
fn deadline_words(d: Duration, from_flag: bool) -> String {
    let d = humantime::format_duration(d);
    if from_flag {
        format!("{d} (--request-timeout)")
    } else {
        format!("{d} (the limit for connecting to one endpoint)")
    }
}

/// `cause` with what it means and what to do, for `trouble` on the way to `host`. `deadline`
/// is the one that ran out, if it was a timeout.
fn advise(trouble: &Trouble, cause: String, host: &str, deadline: Option<(Duration, bool)>) -> String {
    match trouble {
        Trouble::Refused => format!(
            "connection refused: nothing listens there (is the controller running, and is this its \
             gRPC port?) ({cause})"
        ),
        Trouble::TimedOut => {
            let within = deadline
                .map_or_else(|| "in time".to_owned(), |(d, f)| format!("within {}", deadline_words(d, f)));
            format!(
                "no answer {within}: the controller is stopped, hung or overloaded, or something \
                 that never answers listens there"
            )
        }
        Trouble::WrongName { presented } => {
            // rustls writes each name as `DnsName("a.example")` or `IpAddress(10.0.0.1)`.
            let names: Vec<&str> = presented
                .iter()
                .map(|n| {
                    let inner = n.split_once('(').and_then(|(_, r)| r.strip_suffix(')')).unwrap_or(n);
                    inner.trim_matches('"')
                })
                .collect();
            let valid_for = if names.is_empty() {
                format!(" ({cause})")
            } else {
                format!(" (it is for {})", names.join(", "))
            };
            format!(
                "the server's certificate is not valid for {host}{valid_for}: the endpoint's host is \
                 not a name it was issued for; point the musterconfig at one that is (a controller's \
                 names are set by `muster-controller init --san`), or this is not the controller"
            )
        }
        Trouble::UnknownCa => format!(
            "the server's certificate is not signed by this musterconfig's CA: the musterconfig \
             belongs to another controller (or an older `muster-controller init` of this one), or \
             another server listens there; use the musterconfig its `muster-controller init` wrote \
             ({cause})"
        ),
        Trouble::CertificateRefused => format!(
            "the controller refused this musterconfig's admin certificate: the musterconfig \
             belongs to another controller (or an older `muster-controller init` of this one); use \
             the musterconfig its `muster-controller init` wrote ({cause})"
        ),
        Trouble::NotTls => format!(
            "the other end does not speak TLS: something other than the controller's gRPC port \
             listens there (its HTTP port?) ({cause})"
        ),
        Trouble::Closed => format!("{cause} ({CLOSED})"),
        Trouble::Other => with_tls_hint(cause),
    }
}

/// Adds what to do for a failure whose error chain said nothing more specific (see
/// [`trouble`]): a connection the controller closed (it is shutting down, or, with TLS 1.3,
/// refused this musterconfig's admin certificate, which only shows on the first call).
pub fn with_tls_hint(cause: String) -> String {
    // hyper's words for a request cancelled because its connection went away: the chain holds
    // no type that says so (hyper's error kinds are private).
    if cause.to_ascii_lowercase().contains("connection closed") {
        format!("{cause} ({CLOSED})")
    } else {
        cause
    }
}

const CLOSED: &str =
    "the controller closed the connection: it is shutting down, or it refused this musterconfig's admin certificate";

/// How long connecting to one endpoint (TCP, TLS, HTTP/2) may take with this request timeout,
/// and whether that is the request timeout itself.
fn connect_limit(request_timeout: Option<Duration>) -> (Duration, bool) {
    match request_timeout {
        Some(d) if d <= CONNECT_TIMEOUT => (d, true),
        _ => (CONNECT_TIMEOUT, false),
    }
}

/// A mutual-TLS channel to the first of `cfg.endpoints` that answers, and that endpoint, with
/// the default request timeout ([`DEFAULT_REQUEST_TIMEOUT`]); see [`admin_channel_within`].
pub async fn admin_channel(cfg: &MusterConfig) -> Result<(Channel, String), ClientError> {
    admin_channel_within(cfg, Some(DEFAULT_REQUEST_TIMEOUT)).await
}

/// A mutual-TLS channel to the first of `cfg.endpoints` that answers, and that endpoint.
///
/// Each endpoint is tried in order; connecting to one (TCP, TLS handshake, HTTP/2) gives up after
/// `request_timeout` or [`CONNECT_TIMEOUT`], whichever is shorter, so a dead endpoint does not
/// hold up the next. The channel verifies the server against `cfg.ca` for the endpoint's host and
/// presents `cfg.cert`/`cfg.key`. Every call on it fails after `request_timeout` (`None`: calls
/// wait as long as the controller takes). If no endpoint answers, the error lists each one with
/// what went wrong there.
pub async fn admin_channel_within(
    cfg: &MusterConfig,
    request_timeout: Option<Duration>,
) -> Result<(Channel, String), ClientError> {
    let (limit, from_flag) = connect_limit(request_timeout);
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
            .domain_name(host.clone())
            // For reconnects later on; the first connect is bounded by `limit` below, which
            // must run out first so its failure is the one reported (tonic's own handshake
            // timeout is not a type that can be recognised).
            .timeout(limit * 2);
        let endpoint = match Endpoint::from_shared(ep.clone()).and_then(|e| e.tls_config(tls)) {
            Ok(e) => {
                let e = e.connect_timeout(limit);
                match request_timeout {
                    Some(d) => e.timeout(d),
                    None => e,
                }
            }
            Err(e) => {
                failures.push(fail(cause_of(&e)));
                continue;
            }
        };
        tracing::debug!(endpoint = %ep, limit = ?limit, "connecting to the controller");
        // The connector's own limits cover TCP and TLS; this one covers the whole set-up.
        let cause = match tokio::time::timeout(limit, endpoint.connect()).await {
            Ok(Ok(ch)) => return Ok((ch, ep.clone())),
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %ep, error = ?e, "connecting failed");
                advise(&trouble(&e), cause_of(&e), &host, Some((limit, from_flag)))
            }
            Err(elapsed) => advise(&trouble(&elapsed), String::new(), &host, Some((limit, from_flag))),
        };
        // rustls quotes the server's certificate: not this program's text.
        let cause = escape(&cause).into_owned();
        tracing::debug!(endpoint = %ep, %cause, "endpoint did not answer");
        failures.push(fail(cause));
    }
    Err(ClientError::Unreachable { failures })
}

/// An admin client on the first endpoint that answers (see [`admin_channel`]), accepting
/// responses up to [`MAX_RESPONSE_BYTES`].
pub async fn admin_client(cfg: &MusterConfig) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(admin_channel(cfg).await?.0).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// An admin client with the endpoint it reached and the request timeout it uses, for
/// [`explain`]ing failed calls.
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    pub endpoint: String,
    /// Every call's deadline (`None`: none).
    pub request_timeout: Option<Duration>,
}

impl Admin {
    /// Connects with the musterconfig at `path` and the default request timeout.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::connect_within(path, Some(DEFAULT_REQUEST_TIMEOUT)).await
    }

    /// Connects with the musterconfig at `path`; connecting and every call give up after
    /// `request_timeout` (see [`admin_channel_within`]).
    pub async fn connect_within(path: &Path, request_timeout: Option<Duration>) -> Result<Self, ClientError> {
        let cfg = load_musterconfig(path)?;
        let (ch, endpoint) = admin_channel_within(&cfg, request_timeout).await?;
        Ok(Self {
            client: AdminServiceClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES),
            endpoint,
            request_timeout,
        })
    }

    /// A failed call as one line in the operator's terms.
    pub fn explain(&self, s: tonic::Status) -> CallFailed {
        explain(s, &self.endpoint, self.request_timeout)
    }
}

/// A failed admin call, explained.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallFailed(pub String);

/// One line per gRPC failure, saying what went wrong in the operator's terms. The controller's
/// own messages (not found, ambiguous query, already assigned, ...) are already written for
/// operators and pass through (with control characters escaped: they may quote what a node
/// reported); transport failures, deadlines and credential problems are explained.
/// `request_timeout` is the calls' deadline, named when it runs out.
pub fn explain(s: tonic::Status, endpoint: &str, request_timeout: Option<Duration>) -> CallFailed {
    use tonic::Code;
    let msg = s.message().to_owned();
    let host = host_of(endpoint).unwrap_or_default();
    let within = |d: Option<Duration>| {
        d.map_or_else(|| "in time".to_owned(), |d| format!("within {}", deadline_words(d, true)))
    };
    // tonic's own client-side deadline comes back as Cancelled with no source.
    let timed_out = s.code() == Code::Cancelled && msg == tonic::TimeoutExpired(()).to_string();
    // A status with a source was made on this side of the connection (transport, TLS, timeout).
    let source = std::error::Error::source(&s);
    tracing::debug!(status = ?s, source = ?source, "call failed");
    let cause = source.map(muster_util::error_chain);
    let local = cause.is_some() || msg.contains("transport error");
    CallFailed(match s.code() {
        _ if timed_out => format!("the controller at {endpoint} did not answer {}", within(request_timeout)),
        Code::Unavailable | Code::Unknown | Code::Cancelled if local => {
            let detail = match cause {
                Some(c) if !msg.is_empty() && !c.contains(&msg) => format!("{msg}: {c}"),
                Some(c) => c,
                None => msg,
            };
            let detail = detail.strip_prefix("transport error: ").unwrap_or(&detail).to_owned();
            let t = source.map_or(Trouble::Other, trouble);
            let deadline = request_timeout.map(|d| (d, true));
            let advice = advise(&t, detail, &host, deadline);
            format!("cannot reach the controller at {endpoint}: {}", escape(&advice))
        }
        Code::Unavailable => format!("the controller at {endpoint} is unavailable: {}", escape(&msg)),
        Code::Unauthenticated | Code::PermissionDenied => {
            format!("the controller refused this musterconfig's credentials: {}", escape(&msg))
        }
        Code::DeadlineExceeded => {
            format!("the controller at {endpoint} did not answer {}", within(request_timeout))
        }
        Code::Unimplemented => format!(
            "the controller at {endpoint} does not support this call (is it older than this muster?): {}",
            escape(&msg)
        ),
        Code::Internal => format!("the controller failed: {}", escape(&msg)),
        c if msg.is_empty() => format!("the controller answered {c:?} with no message"),
        _ => escape(&msg).into_owned(),
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
    fn closed_connections_say_what_to_do() {
        assert_eq!(with_tls_hint("tcp connect error: refused".into()), "tcp connect error: refused");
        assert!(with_tls_hint("operation was canceled: connection closed".into()).contains("refused this"));
    }

    /// The kinds of trouble come from the error's types, wherever in the chain (and inside an
    /// `io::Error`, where rustls' errors travel), never from its words.
    #[test]
    fn trouble_is_read_from_the_chain() {
        use rustls::{AlertDescription, CertificateError};
        let wrapped = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let table: Vec<(Box<dyn std::error::Error + Send + Sync>, Trouble)> = vec![
            (Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)), Trouble::Refused),
            (Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)), Trouble::TimedOut),
            (Box::new(tonic::TimeoutExpired(())), Trouble::TimedOut),
            (
                Box::new(wrapped(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))),
                Trouble::WrongName { presented: vec![] },
            ),
            (
                Box::new(wrapped(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))),
                Trouble::UnknownCa,
            ),
            (
                Box::new(wrapped(rustls::Error::InvalidCertificate(CertificateError::BadSignature))),
                Trouble::UnknownCa,
            ),
            (
                Box::new(wrapped(rustls::Error::AlertReceived(AlertDescription::UnknownCA))),
                Trouble::CertificateRefused,
            ),
            (
                Box::new(wrapped(rustls::Error::AlertReceived(AlertDescription::DecryptError))),
                Trouble::CertificateRefused,
            ),
            (
                Box::new(wrapped(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))),
                Trouble::NotTls,
            ),
            (Box::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)), Trouble::Closed),
            (Box::new(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)), Trouble::Closed),
            // Through HTTP/2 only the kind and rustls' exact text of the alert are left.
            (
                Box::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    rustls::Error::AlertReceived(AlertDescription::DecryptError).to_string(),
                )),
                Trouble::CertificateRefused,
            ),
            // Words alone mean nothing.
            (Box::new(std::io::Error::other("certificate alert handshake refused")), Trouble::Other),
            (
                Box::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "received fatal alert: Whatever",
                )),
                Trouble::Other,
            ),
        ];
        for (e, want) in table {
            let text = e.to_string();
            // Also one level down, as tonic's transport error holds it.
            let outer = tonic::Status::from_error(Box::new(std::io::Error::other(e)));
            assert_eq!(std::error::Error::source(&outer).map_or(Trouble::Other, trouble), want, "{text}");
        }
    }

    /// A TLS server on 127.0.0.1 that presents a certificate for `names` signed by `issuer`.
    async fn tls_server(names: &[&str], issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        let der_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der_key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        format!("https://127.0.0.1:{port}")
    }

    /// The CA of the data dir `dd` as an rcgen issuer.
    fn issuer_of(dd: &muster_controller::pki::DataDir) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dd.ca_key()).unwrap()).unwrap();
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(dd.ca_cert()).unwrap(), key).unwrap()
    }

    /// Every way of not reaching the controller, on real sockets: each says what happened, and
    /// only a certificate from another CA is blamed on the CA.
    #[tokio::test]
    async fn each_failure_to_connect_says_what_happened() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let t = tempfile::tempdir().unwrap();
        let dd = muster_controller::pki::DataDir::new(t.path().join("ctl"));
        muster_controller::pki::init(&dd, &[], "https://127.0.0.1:7443").unwrap();
        let other = muster_controller::pki::DataDir::new(t.path().join("other"));
        muster_controller::pki::init(&other, &[], "https://127.0.0.1:7443").unwrap();
        let cfg = load_musterconfig(&dd.musterconfig()).unwrap();

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        // Accepts (the kernel completes the handshake) and never says a word.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_ep = format!("https://127.0.0.1:{}", silent.local_addr().unwrap().port());
        // Something that is not TLS: an HTTP server's answer to anything.
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_ep = format!("https://127.0.0.1:{}", http.local_addr().unwrap().port());
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut tcp, _)) = http.accept().await {
                let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
            }
        });
        let wrong_name = tls_server(&["elsewhere.example"], &issuer_of(&dd)).await;
        let wrong_ca = tls_server(&["127.0.0.1", "localhost"], &issuer_of(&other)).await;

        let table = [
            (&closed, "connection refused: nothing listens there", false),
            (&silent_ep, "no answer within 400ms (--request-timeout)", false),
            (&http_ep, "the other end does not speak TLS", false),
            (
                &wrong_name,
                "certificate is not valid for 127.0.0.1 (it is for elsewhere.example): the endpoint's host",
                false,
            ),
            (&wrong_ca, "not signed by this musterconfig's CA", true),
        ];
        for (ep, want, about_ca) in table {
            let mut c = cfg.clone();
            c.endpoints = vec![ep.clone()];
            // Only a hang fails here, not slowness.
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                admin_channel_within(&c, Some(Duration::from_millis(400))),
            )
            .await
            .unwrap_or_else(|_| panic!("{ep}: still connecting after 20s with a 400ms request timeout"));
            let Err(ClientError::Unreachable { failures }) = r else { panic!("{ep}: expected Unreachable") };
            let cause = &failures[0].cause;
            assert!(cause.contains(want), "{ep}: {cause:?} does not say {want:?}");
            assert_eq!(cause.contains("CA"), about_ca, "{ep}: {cause}");
        }
        drop(silent);
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
