//! What operators decide about a machine: its role and cluster, its approval, its revocation and
//! its deletion. Every change reaches the machine's open stream at once.

use muster_machinery::model::{validate_cluster_name, Role};
use tonic::Status;

use super::session::assignment_msg;
use super::{Controller, FleetError, Unadmitted};
use crate::store::MachineRecord;

impl Controller {
    /// Gives the machine `query` names its role in `cluster`; `force` moves one that has a role.
    pub async fn assign(
        &self,
        query: &str,
        role: Role,
        cluster: &str,
        force: bool,
    ) -> Result<MachineRecord, FleetError> {
        if role == Role::None {
            return Err(FleetError::invalid("role", "required: controlplane or worker"));
        }
        validate_cluster_name(cluster).map_err(|e| FleetError::invalid("cluster", e.to_string()))?;
        let m = self.resolve(query)?;
        let cluster = cluster.to_owned();
        let updated = self
            .update_machine(&m.id, move |m| {
                if m.revoked {
                    return Err(FleetError::MachineRevoked(m.id.clone()));
                }
                if m.role == role && m.cluster == cluster {
                    return Err(FleetError::AlreadyAssigned { id: m.id.clone(), role, cluster });
                }
                if m.role != Role::None && !force {
                    return Err(FleetError::AssignedElsewhere {
                        id: m.id.clone(),
                        role: m.role,
                        cluster: m.cluster.clone(),
                    });
                }
                m.role = role;
                m.cluster = cluster;
                Ok(())
            })
            .await?;
        self.push(&updated.id, assignment_msg(&updated));
        // Its cluster's and role's config layers now apply to it.
        self.rerender(&updated).await?;
        Ok(updated)
    }

    /// Approves a pending machine. One that claims a registration without evidence takes it
    /// now: the operator vouches for it.
    pub async fn approve(&self, query: &str) -> Result<MachineRecord, FleetError> {
        let m = self.resolve(query)?;
        let now_ms = muster_util::now_ms();
        let check = |m: &MachineRecord| {
            if m.revoked {
                return Err(FleetError::MachineRevoked(m.id.clone()));
            }
            if m.approved && m.claim.is_empty() {
                return Err(FleetError::AlreadyApproved(m.id.clone()));
            }
            Ok(())
        };
        check(&m)?;
        let updated = if m.claim.is_empty() {
            self.update_machine(&m.id, move |m| {
                check(m)?;
                m.approved = true;
                // The operator looked at it.
                m.flag.clear();
                Ok(())
            })
            .await?
        } else {
            self.update_machine_with_registrations(&m.id, move |m, regs| {
                check(m)?;
                super::registration::approve_claim(m, regs, now_ms);
                Ok(())
            })
            .await?
        };
        if !m.claim.is_empty() {
            // Its registration's role, cluster and config now apply to it.
            self.rerender(&updated).await?;
        }
        // Approval releases what waited: the assignment and the config.
        self.push(&updated.id, assignment_msg(&updated));
        if let Some(cfg) = super::rollout::config_msg(&updated) {
            self.push(&updated.id, cfg);
        }
        Ok(updated)
    }

    /// Revokes a machine: its stream closes at once and every later call with its certificates
    /// is refused. Returns the record and whether a stream was open.
    pub async fn revoke(&self, query: &str) -> Result<(MachineRecord, bool), FleetError> {
        let m = self.resolve(query)?;
        let updated = self
            .update_machine(&m.id, |m| {
                if m.revoked {
                    return Err(FleetError::AlreadyRevoked(m.id.clone()));
                }
                m.revoked = true;
                Ok(())
            })
            .await?;
        let why = FleetError::Unadmitted { id: updated.id.clone(), why: Unadmitted::Revoked };
        let closed = self.close_session(&updated.id, Status::permission_denied(why.to_string()));
        Ok((updated, closed))
    }

    /// Forgets a machine; its stream closes and its certificates stop working.
    pub async fn delete(&self, query: &str) -> Result<MachineRecord, FleetError> {
        let m = self.resolve(query)?;
        self.store().delete_machine(&m.id).await?;
        let why = FleetError::Unadmitted { id: m.id.clone(), why: Unadmitted::Deleted };
        self.close_session(&m.id, Status::permission_denied(why.to_string()));
        self.live().remove(&m.id);
        Ok(m)
    }
}
