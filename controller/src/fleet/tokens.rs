//! Join tokens: the one place they are minted (for operators and for the boot service), with
//! their defaults and limits, listed and revoked.

use std::time::Duration;

use muster_machinery::model::{validate_label, Labels};
use muster_machinery::token::{self, JoinToken};

use super::{Controller, FleetError};
use crate::store::TokenRecord;

/// Lifetime of a token when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Boot tokens live in boot scripts for a while and serve many machines.
pub const DEFAULT_BOOT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_BOOT_USES: u32 = 1000;
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
pub const MAX_USES: u32 = 1_000_000;
pub const MAX_LABELS: usize = 64;
const MAX_DESCRIPTION: usize = 256;

/// What a new token should be; `None`s take the defaults (which differ for boot tokens).
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub ttl: Option<Duration>,
    pub uses: Option<u32>,
    /// Copied to the machines it admits.
    pub labels: Labels,
    /// Its machines wait as `pending` until approved.
    pub pending: bool,
    pub description: String,
    /// A boot token (public in boot scripts): its machines always land `pending`, except
    /// pre-registered ones.
    pub boot: bool,
}

impl Controller {
    /// Mints a token: checks the spec, stores the digest, returns the secret (shown once).
    pub async fn mint_token(&self, spec: TokenSpec) -> Result<(JoinToken, TokenRecord), FleetError> {
        let ttl = spec.ttl.unwrap_or(if spec.boot { DEFAULT_BOOT_TTL } else { DEFAULT_TTL });
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(FleetError::invalid("ttl", "between 1ms and 366 days"));
        }
        let uses = spec.uses.unwrap_or(if spec.boot { DEFAULT_BOOT_USES } else { 1 });
        if uses == 0 || uses > MAX_USES {
            return Err(FleetError::invalid("uses", format!("between 1 and {MAX_USES}")));
        }
        if spec.labels.len() > MAX_LABELS {
            return Err(FleetError::invalid("labels", format!("at most {MAX_LABELS}")));
        }
        for (k, v) in &spec.labels {
            validate_label(k, v).map_err(|e| FleetError::invalid("labels", e.to_string()))?;
        }
        if spec.description.len() > MAX_DESCRIPTION {
            return Err(FleetError::invalid("description", format!("at most {MAX_DESCRIPTION} bytes")));
        }
        let bytes: [u8; token::ID_LEN + token::SECRET_LEN] = self.random_bytes()?;
        let tok =
            JoinToken::from_random(&bytes).ok_or_else(|| FleetError::Internal("token generation".into()))?;
        let now = muster_util::now_ms();
        let record = TokenRecord {
            id: tok.id().to_owned(),
            digest: tok.digest().to_vec(),
            created_ms: now,
            expires_ms: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            uses_total: uses,
            uses_left: uses,
            labels: spec.labels,
            auto_accept: !spec.pending && !spec.boot,
            revoked: false,
            description: spec.description,
            boot: spec.boot,
        };
        self.store().insert_token(record.clone()).await?;
        Ok((tok, record))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, FleetError> {
        Ok(self.store().list_tokens().await?)
    }

    /// Revokes a token by id: no more machines can enroll with it.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, FleetError> {
        if id.is_empty() {
            return Err(FleetError::invalid("id", "a token id is required"));
        }
        self.update_token(id, |t| {
            if t.revoked {
                return Err(FleetError::TokenAlreadyRevoked(t.id.clone()));
            }
            t.revoked = true;
            Ok(())
        })
        .await
    }
}
