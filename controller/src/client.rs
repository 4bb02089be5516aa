//! The admin API client used by the `muster` CLI, tests and benchmarks: finding and loading the
//! musterconfig, and a mutual-TLS channel to the first controller endpoint that answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_proto::musterconfig::MusterConfig;
use muster_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Client-side errors, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no musterconfig found (tried {tried}); create one with `muster-controller init`, start a lab with `muster lab up`, or pass --musterconfig PATH / set MUSTERCONFIG")]
    NoConfig { tried: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("cannot reach the controller: {0}")]
    Unreachable(String),
}

/// Where the musterconfig is: `flag`, else `$MUSTERCONFIG`, else `~/.muster/config`.
pub fn musterconfig_path(flag: Option<&Path>) -> Result<PathBuf, ClientError> {
    resolve_path(
        flag,
        std::env::var_os("MUSTERCONFIG").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

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
    let default = home.map(|h| h.join(".muster/config"));
    match default {
        Some(p) if p.exists() => Ok(p),
        Some(p) => {
            Err(ClientError::NoConfig { tried: format!("--musterconfig, $MUSTERCONFIG, {}", p.display()) })
        }
        None => {
            Err(ClientError::NoConfig { tried: "--musterconfig, $MUSTERCONFIG, ~/.muster/config".into() })
        }
    }
}

/// Reads and checks a musterconfig.
pub fn load_musterconfig(path: &Path) -> Result<MusterConfig, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ClientError::Read { path: path.to_owned(), source })?;
    MusterConfig::from_yaml(&text)
        .map_err(|e| ClientError::Invalid { path: path.to_owned(), problem: e.to_string() })
}

fn host_of(endpoint: &str) -> Option<String> {
    let uri: tonic::transport::Uri = endpoint.parse().ok()?;
    Some(uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned())
}

/// A mutual-TLS channel to the first endpoint that answers.
pub async fn admin_channel(cfg: &MusterConfig) -> Result<(Channel, String), ClientError> {
    let mut failures = Vec::new();
    for ep in &cfg.endpoints {
        let Some(host) = host_of(ep) else {
            failures.push(format!("{ep}: not a URL"));
            continue;
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cfg.ca))
            .identity(Identity::from_pem(&cfg.cert, &cfg.key))
            .domain_name(host);
        let endpoint = match Endpoint::from_shared(ep.clone()).and_then(|e| e.tls_config(tls)) {
            Ok(e) => e.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(30)),
            Err(e) => {
                failures.push(format!("{ep}: {e}"));
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(ch) => return Ok((ch, ep.clone())),
            Err(e) => failures.push(format!("{ep}: {}", muster_util::error_chain(&e))),
        }
    }
    Err(ClientError::Unreachable(failures.join("; ")))
}

/// An admin client on the first endpoint that answers.
pub async fn admin_client(cfg: &MusterConfig) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(admin_channel(cfg).await?.0).max_decoding_message_size(64 * 1024 * 1024))
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
        std::fs::create_dir_all(home.join(".muster")).unwrap();
        std::fs::write(home.join(".muster/config"), "x").unwrap();
        assert_eq!(
            resolve_path(None, Some("".into()), Some(home.clone())).unwrap(),
            home.join(".muster/config")
        );
    }

    #[test]
    fn load_names_the_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("mc");
        std::fs::write(&p, "apiVersion: nope\n").unwrap();
        let e = load_musterconfig(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(load_musterconfig(&t.path().join("missing")).unwrap_err().to_string().contains("missing"));
    }
}
