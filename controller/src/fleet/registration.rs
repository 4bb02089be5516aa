//! Pre-registered machines. Network-boot scripts carry a boot token that anyone on the LAN can
//! read, so a boot token alone only ever creates `pending` machines. An operator who registers a
//! MAC (optionally with the SMBIOS UUID) vouches for the machine that boots with it: its first
//! enrollment is accepted and takes the registered hostname, role, cluster and config, and the
//! registration is consumed. A second machine claiming the same MAC lands `pending`, flagged.

use muster_machinery::model::{is_placeholder_uuid, normalize_mac, validate_cluster_name, Role};

use super::admission::Vouched;
use super::{Controller, FleetError};
use crate::store::{MachineRecord, Registration};

/// A registration as an operator asks for it (checked by [`Controller::register_machine`]).
#[derive(Debug, Clone, Default)]
pub struct NewRegistration {
    pub mac: String,
    pub uuid: String,
    pub hostname: String,
    pub role: Role,
    pub cluster: String,
    /// The machine's own config layer, YAML.
    pub yaml: String,
    pub boot_local: bool,
}

/// Gives machine `m` registration `r`: approved, with its hostname, role, cluster and config.
fn take(m: &mut MachineRecord, r: &mut Registration, now_ms: i64) {
    r.claimed_by = m.id.to_string();
    r.claimed_ms = now_ms;
    m.approved = true;
    m.claim.clear();
    if !r.hostname.is_empty() {
        m.hostname = r.hostname.clone();
    }
    m.role = r.role;
    m.cluster = r.cluster.clone();
    let mut layer = r.layer.clone().unwrap_or_else(|| serde_json::json!({}));
    if let (false, Some(obj)) = (r.hostname.is_empty(), layer.as_object_mut()) {
        obj.entry("hostname").or_insert_with(|| serde_json::Value::String(r.hostname.clone()));
    }
    let is_minimal = layer.as_object().is_some_and(|o| o.is_empty());
    if !is_minimal {
        if let Some(obj) = layer.as_object_mut() {
            obj.entry("apiVersion").or_insert_with(|| "muster/v1alpha1".into());
            obj.entry("kind").or_insert_with(|| "MachineConfig".into());
        }
        m.config.layer = Some(layer);
    }
}

/// Matches a new machine against the registrations by MAC (and UUID when the registration has
/// one). A match whose MAC the controller vouches for (`vouched`: see [`super::admission`]) is
/// claimed: the machine takes the registration. A match without that evidence is only noted
/// (`m.claim`) for an operator to approve: a MAC in an inventory is whatever the client says.
/// A match already claimed by another machine flags this one.
pub(super) fn claim(m: &mut MachineRecord, regs: &mut [Registration], now_ms: i64, vouched: &Vouched) {
    let macs: Vec<String> = m.inventory.nics.iter().filter_map(|n| normalize_mac(&n.mac)).collect();
    let uuid = m.inventory.smbios.as_ref().map(|s| s.uuid.to_ascii_lowercase()).unwrap_or_default();
    let matches = |r: &Registration| macs.contains(&r.mac) && (r.uuid.is_empty() || r.uuid == uuid);
    if let Some(r) =
        regs.iter_mut().find(|r| r.claimed_by.is_empty() && matches(r) && vouched.contains(&r.mac))
    {
        take(m, r, now_ms);
        let evidence = vouched.evidence.map_or("", |e| e.as_str());
        tracing::info!(machine = %m.id, mac = %r.mac, hostname = %m.hostname, evidence, "registered machine enrolled");
    } else if let Some(r) = regs.iter().find(|r| r.claimed_by.is_empty() && matches(r)) {
        m.claim = r.mac.clone();
        m.flag = format!(
            "claims the registration of MAC {} but the controller cannot confirm it is that machine (its address is not on a LAN the controller sees, nor in --trust-reported-macs); `muster approve {}` gives it the registration",
            r.mac, m.id
        );
        tracing::warn!(machine = %m.id, mac = %r.mac, "registration claimed without evidence; waiting for an operator");
    } else if let Some(r) = regs.iter().find(|r| matches(r)) {
        m.approved = false;
        m.flag = format!(
            "claims registered MAC {} that machine {} already used; left pending (a clone or a spoofed MAC?)",
            r.mac, r.claimed_by
        );
        tracing::warn!(machine = %m.id, mac = %r.mac, first = %r.claimed_by, "second claimant of a registration");
    }
}

/// An operator's approval of a machine with a pending claim: it takes the registration if that
/// is still unclaimed (else it is only approved, and flagged).
pub(super) fn approve_claim(m: &mut MachineRecord, regs: &mut [Registration], now_ms: i64) {
    let mac = std::mem::take(&mut m.claim);
    m.approved = true;
    m.flag.clear();
    match regs.iter_mut().find(|r| r.mac == mac) {
        Some(r) if r.claimed_by.is_empty() => {
            take(m, r, now_ms);
            tracing::info!(machine = %m.id, %mac, "registration given by an operator's approval");
        }
        Some(r) => {
            m.flag =
                format!("approved, but registration {mac} was claimed by machine {} meanwhile", r.claimed_by)
        }
        None => m.flag = format!("approved, but registration {mac} was deleted meanwhile"),
    }
}

impl Controller {
    /// Validates and stores a registration (`force`: replacing the MAC's existing one).
    pub async fn register_machine(
        &self,
        r: NewRegistration,
        force: bool,
    ) -> Result<Registration, FleetError> {
        let mac = normalize_mac(&r.mac).ok_or_else(|| {
            FleetError::invalid("mac", format!("{:?} is not a MAC address (like 52:54:00:12:34:56)", r.mac))
        })?;
        let uuid = r.uuid.trim().to_ascii_lowercase();
        if !uuid.is_empty() {
            let hex: String = uuid.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(FleetError::invalid("uuid", format!("{:?} is not a UUID", r.uuid)));
            }
            if is_placeholder_uuid(&uuid) {
                return Err(FleetError::invalid(
                    "uuid",
                    "a placeholder UUID (all zeros or all F) identifies nothing",
                ));
            }
        }
        if !r.hostname.is_empty() {
            r.hostname
                .parse::<muster_machinery::config::Hostname>()
                .map_err(|e| FleetError::invalid("hostname", e.to_string()))?;
        }
        let role = r.role;
        if !r.cluster.is_empty() {
            validate_cluster_name(&r.cluster).map_err(|e| FleetError::invalid("cluster", e.to_string()))?;
        }
        if (role == Role::None) != r.cluster.is_empty() {
            return Err(FleetError::invalid("role", "give both a role and a cluster, or neither"));
        }
        let layer = if r.yaml.trim().is_empty() {
            None
        } else {
            let v = muster_machinery::config::parse_value(&r.yaml)
                .map_err(|e| FleetError::invalid("yaml", e.to_string()))?;
            if let Err(e) = muster_machinery::config::render(&[("registration", &v)]) {
                return Err(FleetError::invalid("yaml", format!("the config is not valid: {e}")));
            }
            Some(v)
        };
        let existing = self.store().list_registrations().await?;
        if let Some(old) = existing.iter().find(|o| o.mac == mac) {
            if !force {
                return Err(FleetError::AlreadyRegistered {
                    mac,
                    claimed_by: (!old.claimed_by.is_empty()).then(|| old.claimed_by.clone()),
                });
            }
        }
        let reg = Registration {
            mac,
            uuid,
            hostname: r.hostname,
            role,
            cluster: r.cluster,
            layer,
            boot_local: r.boot_local,
            created_ms: muster_util::now_ms(),
            claimed_by: String::new(),
            claimed_ms: 0,
        };
        self.store().put_registration(reg.clone()).await?;
        Ok(reg)
    }

    pub async fn list_registrations(&self) -> Result<Vec<Registration>, FleetError> {
        Ok(self.store().list_registrations().await?)
    }

    /// Removes the registration of `mac`.
    pub async fn delete_registration(&self, mac: &str) -> Result<String, FleetError> {
        let mac = normalize_mac(mac)
            .ok_or_else(|| FleetError::invalid("mac", format!("{mac:?} is not a MAC address")))?;
        if self.store().delete_registration(&mac).await? {
            Ok(mac)
        } else {
            Err(FleetError::NotFound(format!("no registration for MAC {mac}")))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use muster_proto::pb;

    fn machine(mac: &str, uuid: &str) -> MachineRecord {
        MachineRecord {
            id: "0123456789abcdef".parse().unwrap(),
            hostname: "discovered".into(),
            approved: false,
            revoked: false,
            role: Role::None,
            cluster: String::new(),
            labels: Default::default(),
            inventory: pb::Inventory {
                nics: vec![pb::Nic { name: "eth0".into(), mac: mac.into(), addresses: vec![] }],
                smbios: Some(pb::Smbios { uuid: uuid.into(), ..Default::default() }),
                ..Default::default()
            },
            enrolled_ms: 0,
            last_seen_ms: 0,
            heartbeat_ms: 0,
            token_id: String::new(),
            cert_serial: String::new(),
            cert_not_after_ms: 0,
            config: Default::default(),
            flag: String::new(),
            revision: 0,
            key_sha256: String::new(),
            claim: String::new(),
            install: Default::default(),
        }
    }

    /// The controller saw `mac` itself (its neighbour table).
    fn seen(mac: &str) -> Vouched {
        Vouched { macs: vec![mac.into()], evidence: Some(super::super::admission::Evidence::Neighbour) }
    }

    fn reg(mac: &str, uuid: &str) -> Registration {
        Registration {
            mac: mac.into(),
            uuid: uuid.into(),
            hostname: "node-a".into(),
            role: Role::Worker,
            cluster: "lab".into(),
            ..Default::default()
        }
    }

    #[test]
    fn first_claimant_takes_the_registration_second_is_flagged() {
        let mut regs = vec![reg("52:54:00:00:00:01", "")];
        let mut a = machine("52:54:00:00:00:01", "");
        claim(&mut a, &mut regs, 5, &seen("52:54:00:00:00:01"));
        assert!(a.approved);
        assert_eq!((a.hostname.as_str(), a.role, a.cluster.as_str()), ("node-a", Role::Worker, "lab"));
        assert_eq!(a.config.layer.as_ref().unwrap()["hostname"], "node-a");
        assert_eq!((regs[0].claimed_by.as_str(), regs[0].claimed_ms), ("0123456789abcdef", 5));
        let mut b = machine("52-54-00-00-00-01", "");
        claim(&mut b, &mut regs, 6, &seen("52:54:00:00:00:01"));
        assert!(!b.approved);
        assert!(b.flag.contains("already used"), "{}", b.flag);
        assert_eq!(b.hostname, "discovered");
    }

    #[test]
    fn a_registered_uuid_must_match_and_unknown_macs_stay_pending() {
        let mut regs = vec![reg("52:54:00:00:00:02", "11111111-2222-3333-4444-555555555555")];
        let mut wrong = machine("52:54:00:00:00:02", "99999999-2222-3333-4444-555555555555");
        claim(&mut wrong, &mut regs, 1, &seen("52:54:00:00:00:02"));
        assert!(!wrong.approved && wrong.flag.is_empty());
        assert!(regs[0].claimed_by.is_empty());
        let mut other = machine("52:54:00:00:00:03", "");
        claim(&mut other, &mut regs, 1, &seen("52:54:00:00:00:03"));
        assert!(!other.approved && other.flag.is_empty());
        let mut right = machine("52:54:00:00:00:02", "11111111-2222-3333-4444-555555555555");
        claim(&mut right, &mut regs, 1, &seen("52:54:00:00:00:02"));
        assert!(right.approved);
    }

    #[test]
    fn a_reported_mac_without_evidence_only_claims_until_an_operator_approves() {
        let mut regs = vec![reg("52:54:00:00:00:04", "")];
        let mut liar = machine("52:54:00:00:00:04", "");
        claim(&mut liar, &mut regs, 1, &Vouched::default());
        assert!(!liar.approved, "a boot token's machine stays pending");
        assert_eq!(
            (liar.role, liar.cluster.as_str(), liar.hostname.as_str()),
            (Role::None, "", "discovered")
        );
        assert!(liar.config.layer.is_none(), "no config, no cluster secrets");
        assert_eq!(liar.claim, "52:54:00:00:00:04");
        assert!(regs[0].claimed_by.is_empty(), "the registration is still there for the real machine");
        // Evidence for another MAC does not count.
        let mut other = machine("52:54:00:00:00:04", "");
        claim(&mut other, &mut regs, 1, &seen("52:54:00:00:00:99"));
        assert!(!other.approved && regs[0].claimed_by.is_empty());
        // The operator approves the claim: the machine takes the registration.
        approve_claim(&mut liar, &mut regs, 9);
        assert!(liar.approved && liar.claim.is_empty() && liar.flag.is_empty());
        assert_eq!(
            (liar.role, liar.cluster.as_str(), liar.hostname.as_str()),
            (Role::Worker, "lab", "node-a")
        );
        assert_eq!(regs[0].claimed_by, "0123456789abcdef");
        // A second approved claimant gets no registration.
        other.claim = "52:54:00:00:00:04".into();
        approve_claim(&mut other, &mut regs, 10);
        assert!(other.approved && other.role == Role::None);
        assert!(other.flag.contains("claimed by machine"), "{}", other.flag);
    }
}
