//! Enrollment and renewal. A join token admits a machine; the controller assigns its id and
//! signs its certificate from its own records. Whether the machine is approved at once is
//! decided here: a boot token is public, so its machines wait for an operator, unless a
//! registration vouches for them.

use std::net::IpAddr;
use std::time::SystemTime;

use muster_machinery::model::{MachineId, Role, State};
use muster_machinery::token::JoinToken;
use muster_proto::pb;

use super::admission::{self, Vouched};
use super::rollout::Scope;
use super::{Controller, FleetError, Unadmitted};
use crate::pki::{Csr, IssuedCert};
use crate::store::{
    check_token_holder, MachineRecord, Registration, StoreError, TokenRecord, TokenRejection,
};

/// The MACs a machine reports, normalised.
fn reported_macs(inv: &pb::Inventory) -> Vec<String> {
    inv.nics.iter().filter_map(|n| muster_machinery::model::normalize_mac(&n.mac)).collect()
}

/// A machine the controller just admitted.
#[derive(Debug)]
pub struct Enrolled {
    pub machine: MachineRecord,
    pub cert: IssuedCert,
    pub state: State,
}

/// Whether a machine admitted by `t` is approved at once. A boot token is public: its
/// machines wait for an operator (or a registration, which overrides this).
fn approved_by(t: &TokenRecord) -> bool {
    t.auto_accept && !t.boot
}

impl Controller {
    /// Admits a new machine with `token`, in this order: the source address's enrollment rate;
    /// the token (its secret, expiry, revocation), so nothing is signed for a caller without
    /// one; the CSR; a repeat of an enrollment that went through (the same key with the same
    /// token gets the same machine and a new certificate, using no token use); the caps on
    /// pending machines; then signing, and in one store transaction the token use, the machine
    /// and any registration it claims with evidence (see [`super::admission`]).
    pub async fn enroll(
        &self,
        token: &JoinToken,
        csr_pem: &str,
        inventory: pb::Inventory,
        peer: Option<IpAddr>,
    ) -> Result<Enrolled, FleetError> {
        if csr_pem.is_empty() {
            return Err(FleetError::invalid("csr_pem", "a certificate signing request is required"));
        }
        let opts = &self.inner.opts.admission;
        if let Some(peer) = peer {
            if let Err(retry_after_s) = self.inner.enroll_rate.take(opts, peer, std::time::Instant::now()) {
                self.metrics().enrollment("rate_limited");
                return Err(FleetError::RateLimited { peer, retry_after_s });
            }
        }
        let now = SystemTime::now();
        let now_ms = muster_util::unix_ms(now);
        let record = self.store().list_tokens().await?.into_iter().find(|t| t.id == token.id());
        let record = match record.ok_or(TokenRejection::Invalid).and_then(|r| {
            check_token_holder(&r, token, now_ms)?;
            Ok(r)
        }) {
            Ok(r) => r,
            Err(e) => {
                self.metrics().enrollment("rejected_token");
                tracing::info!(token = token.id(), error = %e, "enrollment refused");
                return Err(e.into());
            }
        };
        let csr = Csr::parse(csr_pem).inspect_err(|_| self.metrics().enrollment("rejected_csr"))?;
        if let Some(again) = self.enrolled_before(&record, &csr, now).await? {
            return Ok(again);
        }
        let inventory = super::session::sanitize(inventory);
        let vouched = admission::vouch(opts, peer, &reported_macs(&inventory));
        if !approved_by(&record) {
            self.check_pending_caps(&record, &vouched).await?;
        }
        let id = MachineId::from_random(self.random_bytes()?);
        let cert = self
            .pki()
            .sign_csr(&csr, &id, now, self.inner.opts.machine_cert_ttl)
            .inspect_err(|_| self.metrics().enrollment("rejected_csr"))?;
        let build = {
            let id = id.clone();
            let cert = cert.clone();
            let hostname = inventory.hostname.clone();
            let key_sha256 = csr.key_sha256.clone();
            move |t: &TokenRecord, regs: &mut [Registration]| {
                let mut m = MachineRecord {
                    id,
                    hostname,
                    approved: approved_by(t),
                    revoked: false,
                    role: Role::None,
                    cluster: String::new(),
                    labels: t.labels.clone(),
                    inventory,
                    enrolled_ms: now_ms,
                    last_seen_ms: now_ms,
                    heartbeat_ms: 0,
                    token_id: t.id.clone(),
                    cert_serial: cert.serial_hex.clone(),
                    cert_not_after_ms: muster_util::unix_ms(cert.not_after),
                    config: Default::default(),
                    flag: String::new(),
                    revision: 0,
                    key_sha256,
                    claim: String::new(),
                    install: Default::default(),
                };
                super::registration::claim(&mut m, regs, now_ms, &vouched);
                m
            }
        };
        let m = match self.inner.store.enroll(token, now_ms, Box::new(build)).await {
            Ok(m) => m,
            Err(e) => {
                let result = if matches!(e, StoreError::Token(_)) { "rejected_token" } else { "error" };
                self.metrics().enrollment(result);
                tracing::info!(token = token.id(), error = %e, "enrollment refused");
                return Err(match e {
                    StoreError::Token(t) => FleetError::Token(t),
                    other => FleetError::Store(other),
                });
            }
        };
        self.cache_new(&m);
        if let Some(layer) = m.config.layer.clone() {
            // A registered machine's config: its first generation, sent when it connects.
            if let Err(e) = self
                .apply_layer(
                    Scope::Machine(m.id.clone()),
                    layer,
                    false,
                    "registration".into(),
                    super::rollout::Delivery {
                        mode: Some(muster_machinery::ApplyMode::Auto),
                        ..Default::default()
                    },
                )
                .await
            {
                tracing::warn!(machine = %m.id, error = %e, "the registered config was not applied");
            }
        }
        let state = if m.approved { State::Ready } else { State::Pending };
        self.metrics().enrollment(if m.approved { "accepted" } else { "pending" });
        tracing::info!(machine = %m.id, hostname = %m.hostname, token = token.id(), %state, "machine enrolled");
        Ok(Enrolled { machine: m, cert, state })
    }

    /// An enrollment that already went through for this key and token (the node did not get
    /// its answer: killed, or the connection dropped): the same machine, a new certificate.
    async fn enrolled_before(
        &self,
        token: &TokenRecord,
        csr: &Csr,
        now: SystemTime,
    ) -> Result<Option<Enrolled>, FleetError> {
        let Some(m) = self
            .machines()
            .into_iter()
            .find(|m| !m.revoked && m.token_id == token.id && m.key_sha256 == csr.key_sha256)
        else {
            return Ok(None);
        };
        let cert = self.pki().sign_csr(csr, &m.id, now, self.inner.opts.machine_cert_ttl)?;
        let (serial, not_after) = (cert.serial_hex.clone(), muster_util::unix_ms(cert.not_after));
        let m = self
            .update_machine(&m.id, move |m| {
                m.cert_serial = serial;
                m.cert_not_after_ms = not_after;
                Ok(())
            })
            .await?;
        self.metrics().enrollment("repeated");
        tracing::info!(machine = %m.id, token = %token.id, "enrollment repeated by the same key; same machine");
        let state = if m.approved { State::Ready } else { State::Pending };
        Ok(Some(Enrolled { machine: m, cert, state }))
    }

    /// Refuses a machine that would wait for approval when too many already do (in total, or
    /// admitted by this token). A registration it claims with evidence approves it: no cap.
    async fn check_pending_caps(&self, token: &TokenRecord, vouched: &Vouched) -> Result<(), FleetError> {
        let opts = &self.inner.opts.admission;
        if !vouched.macs.is_empty() {
            let regs = self.store().list_registrations().await?;
            if regs.iter().any(|r| r.claimed_by.is_empty() && vouched.contains(&r.mac)) {
                return Ok(());
            }
        }
        let pending: Vec<MachineRecord> =
            self.machines().into_iter().filter(|m| !m.approved && !m.revoked).collect();
        let refuse = if pending.len() >= opts.max_pending {
            Some(format!(
                "{} machines are pending approval (the limit is {})",
                pending.len(),
                opts.max_pending
            ))
        } else {
            let of_token = pending.iter().filter(|m| m.token_id == token.id).count();
            (of_token >= opts.max_pending_per_token).then(|| {
                format!(
                    "{of_token} machines admitted by token {} are pending approval (the limit per token is {})",
                    token.id, opts.max_pending_per_token
                )
            })
        };
        match refuse {
            Some(why) => {
                self.metrics().enrollment("rejected_pending_cap");
                tracing::warn!(token = %token.id, "{why}; enrollment refused");
                Err(FleetError::TooManyPending(why))
            }
            None => Ok(()),
        }
    }

    /// Signs a new certificate for the calling machine (same key or a new one: only the CSR's
    /// public key is used), unless it was revoked or deleted meanwhile.
    pub async fn renew(&self, id: &MachineId, csr_pem: &str) -> Result<IssuedCert, FleetError> {
        self.admitted(id)?;
        let cert =
            self.pki().sign_machine(csr_pem, id, SystemTime::now(), self.inner.opts.machine_cert_ttl)?;
        let (serial, not_after) = (cert.serial_hex.clone(), muster_util::unix_ms(cert.not_after));
        let machine = id.clone();
        self.update_machine(id, move |m| {
            if m.revoked {
                return Err(FleetError::Unadmitted { id: machine, why: Unadmitted::Revoked });
            }
            m.cert_serial = serial;
            m.cert_not_after_ms = not_after;
            Ok(())
        })
        .await
        .map_err(|e| match e {
            // Deleted between the check and the write.
            FleetError::Store(StoreError::NotFound { .. }) => {
                FleetError::Unadmitted { id: id.clone(), why: Unadmitted::Deleted }
            }
            other => other,
        })?;
        tracing::info!(machine = %id, "certificate renewed");
        Ok(cert)
    }
}
