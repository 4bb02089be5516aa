//! Fleet state behind a trait, so the embedded SQLite default and an etcd backend (for HA) are
//! interchangeable. Records are whole documents; every change is one transaction, and
//! read-modify-write goes through [`Store::update_machine`] / [`Store::update_token`] so a
//! backend can make it atomic (a SQLite transaction, an etcd compare-and-swap).

mod metered;
mod sqlite;

use async_trait::async_trait;
use muster_machinery::model::{Labels, MachineId, Role};
use muster_machinery::token::JoinToken;
use muster_machinery::{ApplyMode, ConfirmPolicy, GenerationState, Outcome};
use muster_proto::pb;
use serde::{Deserialize, Serialize};

pub use metered::MeteredStore;
pub use sqlite::SqliteStore;

/// A join token as stored: the secret is only ever kept as a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the whole token.
    #[serde(with = "hex_bytes")]
    pub digest: Vec<u8>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub labels: Labels,
    /// Machines enrolled with it are approved at once (else they land `pending`).
    pub auto_accept: bool,
    pub revoked: bool,
    #[serde(default)]
    pub description: String,
    /// A boot token: put in network-boot scripts, so public to the LAN. It only ever creates
    /// `pending` machines, except for pre-registered ones.
    #[serde(default)]
    pub boot: bool,
}

/// A machine as the controller records it. Its state is derived (see `server`), not stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: MachineId,
    pub hostname: String,
    pub approved: bool,
    pub revoked: bool,
    pub role: Role,
    pub cluster: String,
    pub labels: Labels,
    pub inventory: pb::Inventory,
    pub enrolled_ms: i64,
    pub last_seen_ms: i64,
    pub heartbeat_ms: u32,
    pub token_id: String,
    pub cert_serial: String,
    pub cert_not_after_ms: i64,
    #[serde(default)]
    pub config: ConfigState,
    /// Why the controller flagged the machine for an operator's look (e.g. it claimed a
    /// registration another machine had already consumed); empty when nothing is wrong.
    #[serde(default)]
    pub flag: String,
    /// Counts the record's updates, so a copy can tell which of two is newer.
    #[serde(default)]
    pub revision: u64,
    /// SHA-256 (hex) of the public key it enrolled with: the same key enrolling again with the
    /// same token is the same machine (a node that never got its certificate retries).
    #[serde(default)]
    pub key_sha256: String,
    /// The MAC of a registration the machine claimed without evidence that it is that machine;
    /// `muster approve` gives it the registration. Empty: none.
    #[serde(default)]
    pub claim: String,
    /// Install to disk: what the operator asked for and where it stands.
    #[serde(default)]
    pub install: InstallRecord,
}

/// Where a machine's install to disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstallState {
    /// No install asked for.
    #[default]
    None,
    /// Asked for; sent to the agent when it is connected.
    Requested,
    /// The agent is downloading and writing.
    Writing,
    /// Written, verified, identity in place: the machine boots from its disk.
    Installed,
    /// The agent could not install (the error says why); the disk was not switched to.
    Failed,
    /// A reset was asked for; the agent wipes and reboots.
    Resetting,
}

impl InstallState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Requested => "requested",
            Self::Writing => "writing",
            Self::Installed => "installed",
            Self::Failed => "failed",
            Self::Resetting => "resetting",
        }
    }
}

/// A machine's install target and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InstallRecord {
    pub state: InstallState,
    /// The image's name among the controller's images.
    pub image: String,
    /// The disk as the operator selected it (a path or a selector).
    pub disk: String,
    /// The device the agent wrote (`/dev/vda`).
    pub device: String,
    pub error: String,
    /// A reset wipes the disk (else it only forgets the install).
    pub wipe: bool,
    pub updated_ms: i64,
    pub download_ms: u64,
    pub write_ms: u64,
    pub verify_ms: u64,
}

/// A machine's config: its own layer, the current rendered generation, history, and what the
/// agent last reported.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigState {
    /// The machine's own layer (merged last), if any.
    pub layer: Option<serde_json::Value>,
    /// 0 until the first config.
    pub generation: u64,
    /// Rendered YAML of `generation`.
    pub rendered: String,
    /// Oldest first, at most [`MAX_REVISIONS`].
    pub revisions: Vec<ConfigRevision>,
    /// The generation the agent last reported as applied.
    pub applied_generation: u64,
    pub resources: Vec<ResourceRecord>,
    /// Why the agent did not apply the current generation, if it said so.
    pub error: String,
    /// How the current generation is applied.
    pub mode: ApplyMode,
    /// Try mode's confirmation timeout.
    pub try_timeout_ms: u64,
    /// How the current (try) generation is confirmed.
    pub confirm: ConfirmPolicy,
    /// The operator returned the node to how it was before Muster (`rollback --to 0`): it gets
    /// the empty config, whatever its layers say, until a config is applied to it again.
    pub released: bool,
    /// The operator confirmed the current (try) generation.
    pub confirmed: bool,
    /// Where the current generation stands on the node, as the agent last said (`pending`
    /// until it reports).
    pub state: GenerationState,
    /// When the agent said it started trying the current generation (for its deadline).
    pub trying_since_ms: i64,
}

/// A shared config layer (a cluster's or a role's) with its history.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LayerRecord {
    /// The layer now; `None` once deleted (the history stays).
    pub value: Option<serde_json::Value>,
    /// Oldest first, at most [`MAX_REVISIONS`].
    pub revisions: Vec<LayerRevision>,
}

/// One version of a shared layer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LayerRevision {
    /// 1, 2, ... per layer.
    pub revision: u64,
    pub created_ms: i64,
    /// `None`: the layer was deleted.
    pub value: Option<serde_json::Value>,
}

impl LayerRecord {
    /// The record after setting (or with `None` deleting) the layer at `now_ms`.
    pub fn with(mut self, value: Option<serde_json::Value>, now_ms: i64) -> Self {
        let revision = self.revisions.last().map_or(1, |r| r.revision + 1);
        self.revisions.push(LayerRevision { revision, created_ms: now_ms, value: value.clone() });
        let excess = self.revisions.len().saturating_sub(MAX_REVISIONS);
        self.revisions.drain(..excess);
        self.value = value;
        self
    }
}

/// How many revisions a machine (or a layer) keeps.
pub const MAX_REVISIONS: usize = 50;

/// One generation of a machine's config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConfigRevision {
    pub generation: u64,
    pub created_ms: i64,
    pub source: String,
    pub rendered: String,
    /// The machine's own layer at the time (what a rollback restores).
    pub layer: Option<serde_json::Value>,
    #[serde(default)]
    pub mode: ApplyMode,
    /// What the agent last said about this generation (`pending`: nothing yet).
    #[serde(default)]
    pub state: GenerationState,
}

/// A machine expected to network-boot, registered ahead of time by its MAC (and optionally
/// SMBIOS UUID). Its first enrollment, even with a public boot token, is accepted and takes the
/// registered hostname, role, cluster and config; the registration is then consumed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Registration {
    /// Lower-case, colon-separated.
    pub mac: String,
    /// Lower-case; empty: any.
    pub uuid: String,
    pub hostname: String,
    pub role: Role,
    pub cluster: String,
    /// The machine's own config layer.
    pub layer: Option<serde_json::Value>,
    /// Boot from the local disk instead of the network (the boot script says `exit`).
    pub boot_local: bool,
    pub created_ms: i64,
    /// The machine that consumed it (empty: not yet).
    pub claimed_by: String,
    pub claimed_ms: i64,
}

/// One resource as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResourceRecord {
    pub resource: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Why a join token was not accepted. Only `Invalid` is said to a caller that does not hold the
/// token's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("invalid join token")]
    Invalid,
    #[error("join token has expired")]
    Expired,
    #[error("join token has been revoked")]
    Revoked,
    #[error("join token has no uses left (single-use tokens work once)")]
    Exhausted,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id:?} exists already")]
    Duplicate { kind: &'static str, id: String },
    /// The update function declined to change the record; its caller knows why.
    #[error("the update was declined")]
    Aborted,
    #[error(transparent)]
    Token(#[from] TokenRejection),
    #[error("corrupt {kind} record {id:?}: {reason}")]
    Corrupt { kind: &'static str, id: String, reason: String },
    #[error("state store: {0}")]
    Backend(String),
}

/// A read-modify-write step, run inside the backend's transaction. An error (usually
/// [`StoreError::Aborted`]) rolls it back and is returned as is.
pub type UpdateFn<T> = Box<dyn FnOnce(&mut T) -> Result<(), StoreError> + Send>;
/// Builds the machine record from the token that admitted it and the registrations (which it
/// may mark claimed; changed ones are saved in the same transaction).
pub type BuildFn = Box<dyn FnOnce(&TokenRecord, &mut [Registration]) -> MachineRecord + Send>;

/// Changes a machine together with the registrations (see
/// [`Store::update_machine_with_registrations`]).
pub type ClaimFn = Box<dyn FnOnce(&mut MachineRecord, &mut [Registration]) -> Result<(), StoreError> + Send>;

/// The controller's state store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError>;
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    async fn update_token(&self, id: &str, f: UpdateFn<TokenRecord>) -> Result<TokenRecord, StoreError>;
    /// In one transaction: check `token` (digest in constant time, expiry, revocation, uses),
    /// take one use, and insert the machine `build` makes. Two racing callers of a single-use
    /// token: exactly one succeeds.
    async fn enroll(
        &self,
        token: &JoinToken,
        now_ms: i64,
        build: BuildFn,
    ) -> Result<MachineRecord, StoreError>;
    async fn get_machine(&self, id: &MachineId) -> Result<Option<MachineRecord>, StoreError>;
    async fn list_machines(&self) -> Result<Vec<MachineRecord>, StoreError>;
    async fn update_machine(
        &self,
        id: &MachineId,
        f: UpdateFn<MachineRecord>,
    ) -> Result<MachineRecord, StoreError>;
    async fn delete_machine(&self, id: &MachineId) -> Result<(), StoreError>;
    /// Records heartbeat times in one batch (missing machines are skipped).
    async fn record_last_seen(&self, seen: Vec<(MachineId, i64)>) -> Result<(), StoreError>;
    /// A shared config layer (`cluster/NAME`, `role/NAME`, `role/NAME@CLUSTER`) with its history.
    async fn get_layer(&self, key: &str) -> Result<Option<LayerRecord>, StoreError>;
    /// Sets (or with `None` deletes) a shared config layer at `now_ms`, keeping its history.
    async fn put_layer(
        &self,
        key: &str,
        layer: Option<serde_json::Value>,
        now_ms: i64,
    ) -> Result<LayerRecord, StoreError>;
    /// Every shared layer by key (deleted ones too, for their history).
    async fn list_layers(&self) -> Result<Vec<(String, LayerRecord)>, StoreError>;
    /// In one transaction: load machine `id` and every registration, let `f` change them, and
    /// save what changed (an error from `f` rolls everything back).
    async fn update_machine_with_registrations(
        &self,
        id: &MachineId,
        f: ClaimFn,
    ) -> Result<MachineRecord, StoreError>;
    /// Inserts or replaces the registration for `r.mac`.
    async fn put_registration(&self, r: Registration) -> Result<(), StoreError>;
    async fn list_registrations(&self) -> Result<Vec<Registration>, StoreError>;
    /// Removes the registration for `mac`; false if there was none.
    async fn delete_registration(&self, mac: &str) -> Result<bool, StoreError>;
}

/// Checks a presented token against its record at `now_ms`.
pub fn check_token(record: &TokenRecord, token: &JoinToken, now_ms: i64) -> Result<(), TokenRejection> {
    check_token_holder(record, token, now_ms)?;
    if record.uses_left == 0 {
        return Err(TokenRejection::Exhausted);
    }
    Ok(())
}

/// Checks that the presenter holds a live token (its secret, not revoked, not expired), whatever
/// its uses left.
pub fn check_token_holder(
    record: &TokenRecord,
    token: &JoinToken,
    now_ms: i64,
) -> Result<(), TokenRejection> {
    if !token.matches_digest(&record.digest) {
        return Err(TokenRejection::Invalid);
    }
    if record.revoked {
        return Err(TokenRejection::Revoked);
    }
    if record.expires_ms <= now_ms {
        return Err(TokenRejection::Expired);
    }
    Ok(())
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken::parse("abc123.0123456789abcdefghijklmnopqrstuv").unwrap()
    }

    fn record(t: &JoinToken) -> TokenRecord {
        TokenRecord {
            id: t.id().into(),
            digest: t.digest().to_vec(),
            created_ms: 0,
            expires_ms: 1000,
            uses_total: 1,
            uses_left: 1,
            labels: Labels::new(),
            auto_accept: true,
            revoked: false,
            description: String::new(),
            boot: false,
        }
    }

    #[test]
    fn token_checks() {
        let t = token();
        let r = record(&t);
        assert_eq!(check_token(&r, &t, 999), Ok(()));
        assert_eq!(check_token(&r, &t, 1000), Err(TokenRejection::Expired));
        let wrong = JoinToken::parse("abc123.0123456789abcdefghijklmnopqrstuw").unwrap();
        assert_eq!(check_token(&r, &wrong, 0), Err(TokenRejection::Invalid));
        // A wrong secret learns nothing more, even about a revoked or used token.
        let mut used = r.clone();
        used.uses_left = 0;
        used.revoked = true;
        assert_eq!(check_token(&used, &wrong, 0), Err(TokenRejection::Invalid));
        assert_eq!(check_token(&used, &t, 0), Err(TokenRejection::Revoked));
        used.revoked = false;
        assert_eq!(check_token(&used, &t, 0), Err(TokenRejection::Exhausted));
    }
}
