//! Enrollment and renewal. A join token admits a machine; the controller assigns its id and
//! signs its certificate from its own records. Whether the machine is approved at once is
//! decided here: a boot token is public, so its machines wait for an operator, unless a
//! registration vouches for them.

use std::time::SystemTime;

use muster_machinery::model::{MachineId, Role, State};
use muster_machinery::token::JoinToken;
use muster_proto::pb;

use super::rollout::Scope;
use super::{Controller, FleetError, Unadmitted};
use crate::pki::IssuedCert;
use crate::store::{MachineRecord, Registration, StoreError, TokenRecord};

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
    /// Admits a new machine with `token`: signs its CSR (before the token is touched, so a bad
    /// CSR never uses one up), then checks and takes one token use and records the machine in
    /// one store transaction.
    pub async fn enroll(
        &self,
        token: &JoinToken,
        csr_pem: &str,
        inventory: pb::Inventory,
    ) -> Result<Enrolled, FleetError> {
        if csr_pem.is_empty() {
            return Err(FleetError::invalid("csr_pem", "a certificate signing request is required"));
        }
        let inventory = super::session::sanitize(inventory);
        let id = MachineId::from_random(self.random_bytes()?);
        let now = SystemTime::now();
        let cert = match self.pki().sign_machine(csr_pem, &id, now, self.inner.opts.machine_cert_ttl) {
            Ok(c) => c,
            Err(e) => {
                self.metrics().enrollment("rejected_csr");
                return Err(e.into());
            }
        };
        let now_ms = muster_util::unix_ms(now);
        let build = {
            let id = id.clone();
            let cert = cert.clone();
            let hostname = inventory.hostname.clone();
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
                };
                super::registration::claim(&mut m, regs, now_ms);
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
