//! Getting an identity: the CA to trust (a CA file, the CA found by its pin, or the one an
//! earlier enrollment saved), a key made on the node, a CSR, and `Enroll` with the join token.
//! Also whether a saved identity is still usable.

use std::time::{Duration, UNIX_EPOCH};

use crate::agent::{sleep_or_stop, AgentError, Stop};
use crate::backoff::Backoff;
use crate::client::{self, CallError};
use crate::discovery::{self, DiscoveryError};
use crate::identity::{Identity, MachineFile, StateDir};
use crate::renewal::{now_unix_ms, validity};
use crate::settings::AgentConfig;

/// A TLS connection to the controller, verified against the pinned CA.
type PinnedConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The saved identity, unless missing, or expired while a token can replace it.
pub(crate) fn usable_identity(cfg: &AgentConfig, state: &StateDir) -> Result<Option<Identity>, AgentError> {
    let Some(ident) = state.load()? else { return Ok(None) };
    if let Some((_, na)) = validity(&ident.cert_pem) {
        if na <= now_unix_ms() / 1000 {
            let when =
                humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(u64::try_from(na).unwrap_or(0)))
                    .to_string();
            if cfg.token.is_none() {
                return Err(AgentError::Expired(when));
            }
            tracing::warn!(expired = %when, "machine certificate expired; enrolling again with the join token");
            state.wipe()?;
            return Ok(None);
        }
    }
    Ok(Some(ident))
}

/// The CA to trust for enrollment: a CA file (checked against the pin if both are given),
/// else the one the pin finds, with the connection that found it.
async fn trusted_ca(
    cfg: &AgentConfig,
    state: &StateDir,
    stop: &mut Stop,
) -> Result<Option<(String, Option<PinnedConn>)>, AgentError> {
    if let Some(path) = &cfg.ca_file {
        let ca_file = |problem: String| AgentError::CaFile { path: path.display().to_string(), problem };
        let pem = std::fs::read_to_string(path).map_err(|e| ca_file(e.to_string()))?;
        let pin = muster_machinery::pin::CaPin::of_cert_pem(&pem).map_err(|e| ca_file(e.to_string()))?;
        if let Some(want) = cfg.ca_pin {
            if want != pin {
                return Err(ca_file(format!("its pin is {pin}, not the --ca-hash {want}")));
            }
        }
        return Ok(Some((pem, None)));
    }
    let Some(pin) = cfg.ca_pin else {
        // The CA an earlier enrollment verified (kept after a revocation) still authenticates
        // the controller; the join token alone cannot.
        return match state.load_ca()? {
            Some(pem) => {
                tracing::info!(path = %state.ca().display(), "trusting the CA saved by an earlier enrollment");
                Ok(Some((pem, None)))
            }
            None => Err(AgentError::NoTrust),
        };
    };
    let mut backoff = Backoff::reconnect();
    loop {
        match discovery::connect_pinned(&cfg.controller, &pin).await {
            Ok((pem, conn)) => return Ok(Some((pem, Some(conn)))),
            Err(e @ (DiscoveryError::Connect { .. } | DiscoveryError::Handshake { .. })) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "controller not reachable yet");
                if !sleep_or_stop(delay, stop).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Enrolls with the join token. `None` if asked to stop first.
pub(crate) async fn enroll(
    cfg: &AgentConfig,
    state: &StateDir,
    stop: &mut Stop,
) -> Result<Option<Identity>, AgentError> {
    let token = cfg.token.clone().ok_or_else(|| AgentError::NoToken(state.root().display().to_string()))?;
    let Some((ca_pem, mut conn)) = trusted_ca(cfg, state, stop).await? else { return Ok(None) };
    tracing::debug!("controller CA trusted");
    let key_pem = match state.load_key()? {
        Some(k) => k,
        None => {
            let key = client::generate_key().map_err(|e| AgentError::Key(e.to_string()))?;
            let pem = key.serialize_pem();
            state.write_key(&pem)?;
            pem
        }
    };
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| AgentError::Key(e.to_string()))?;
    let csr = client::csr_pem(&key).map_err(|e| AgentError::Key(e.to_string()))?;
    let inventory = crate::inventory::collect(&cfg.hints);
    tracing::debug!("key, CSR and inventory ready; enrolling");
    let token = token.to_string();
    let mut backoff = Backoff::reconnect();
    let resp = loop {
        let url = &cfg.controller;
        let attempt = match conn.take() {
            // The connection discovery verified: one handshake fewer.
            Some(stream) => match client::enroll_over(stream, url, &token, &csr, inventory.clone()).await {
                Err(CallError::Retry(msg)) => {
                    tracing::debug!(error = %msg, "enrolling over the discovery connection failed; using a new one");
                    client::enroll_once(url, &ca_pem, &token, &csr, inventory.clone()).await
                }
                other => other,
            },
            None => client::enroll_once(url, &ca_pem, &token, &csr, inventory.clone()).await,
        };
        match attempt {
            Ok(r) => break r,
            Err(CallError::Retry(msg)) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %msg, retry_in = ?delay, "enrollment did not go through; retrying");
                if !sleep_or_stop(delay, stop).await {
                    return Ok(None);
                }
            }
            Err(CallError::Final(msg) | CallError::Revoked(msg)) => return Err(AgentError::Enroll(msg)),
        }
    };
    let machine = MachineFile {
        machine_id: resp.machine_id.clone(),
        controller: cfg.controller.clone(),
        assignment: None,
    };
    state.write_ca(&ca_pem)?;
    state.write_cert(&resp.certificate_pem)?;
    state.write_machine(&machine)?;
    let st = muster_proto::convert::state(resp.state).map_or("unknown", |s| s.as_str());
    tracing::info!(machine = %resp.machine_id, state = %st, "enrolled");
    Ok(Some(Identity { key_pem, cert_pem: resp.certificate_pem, ca_pem, machine }))
}
