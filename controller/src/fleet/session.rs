//! Agents' streams: who may open one, what they are sent when they connect and whenever their
//! assignment or config changes, and what their hellos and heartbeats record. A node's reports
//! are bounded before they are kept: what a node says about itself is recorded and shown,
//! never trusted.

use std::net::IpAddr;

use muster_machinery::health::HealthSnapshot;
use muster_machinery::model::{MachineId, State};
use muster_proto::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{Controller, FleetError, Live, Session, Unadmitted};
use crate::store::MachineRecord;

const MAX_STR: usize = 256;
const MAX_ITEMS: usize = 256;
const MIN_HEARTBEAT_MS: u32 = 100;
const MAX_HEARTBEAT_MS: u32 = 600_000;

/// The sending half of an agent's stream.
pub type StreamTx = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

/// An open stream, as [`Controller::open_session`] registered it.
pub struct Opened {
    pub conn_id: u64,
    /// Cancelled when the stream must end (a newer stream, revocation, deletion, shutdown).
    pub cancel: CancellationToken,
}

fn clip(s: &mut String) {
    if s.len() > MAX_STR {
        let mut end = MAX_STR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Bounds what a node says about itself.
pub fn sanitize(mut inv: pb::Inventory) -> pb::Inventory {
    for s in [
        &mut inv.hostname,
        &mut inv.cpu_model,
        &mut inv.kernel,
        &mut inv.os,
        &mut inv.agent_version,
        &mut inv.arch,
    ] {
        clip(s);
    }
    inv.disks.truncate(MAX_ITEMS);
    for d in &mut inv.disks {
        clip(&mut d.name);
        clip(&mut d.model);
    }
    inv.nics.truncate(MAX_ITEMS);
    for n in &mut inv.nics {
        clip(&mut n.name);
        clip(&mut n.mac);
        n.addresses.truncate(32);
        n.addresses.iter_mut().for_each(clip);
    }
    if let Some(s) = &mut inv.smbios {
        for f in [&mut s.uuid, &mut s.serial, &mut s.vendor, &mut s.product] {
            clip(f);
        }
    }
    inv
}

/// Bounds a health snapshot's lists and strings.
fn sanitize_health(mut h: HealthSnapshot) -> HealthSnapshot {
    h.filesystems.truncate(MAX_ITEMS);
    for f in &mut h.filesystems {
        clip(&mut f.mount_point);
        clip(&mut f.device);
        clip(&mut f.fs_type);
    }
    h.networks.truncate(MAX_ITEMS);
    h.networks.iter_mut().for_each(|n| clip(&mut n.interface));
    h.temperatures.truncate(MAX_ITEMS);
    h.temperatures.iter_mut().for_each(|t| clip(&mut t.sensor));
    h.services.truncate(MAX_ITEMS);
    for s in &mut h.services {
        clip(&mut s.name);
        clip(&mut s.detail);
    }
    h
}

/// The machine's assignment for its stream. A pending machine learns that it waits for approval
/// and nothing else: no role, cluster or labels (and no config: see `rollout::config_msg`).
pub(super) fn assignment_msg(m: &MachineRecord) -> pb::ControllerMessage {
    let a = if m.approved {
        pb::Assignment {
            role: pb::Role::from(m.role).into(),
            cluster: m.cluster.clone(),
            labels: m.labels.clone().into_iter().collect(),
            approved: true,
        }
    } else {
        pb::Assignment { approved: false, ..Default::default() }
    };
    pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Assignment(a)) }
}

impl Controller {
    /// The machine behind a certificate, if it may still talk to us.
    pub fn admitted(&self, id: &MachineId) -> Result<MachineRecord, FleetError> {
        match self.machine(id) {
            None => Err(FleetError::Unadmitted { id: id.clone(), why: Unadmitted::Deleted }),
            Some(m) if m.revoked => Err(FleetError::Unadmitted { id: id.clone(), why: Unadmitted::Revoked }),
            Some(m) => Ok(m),
        }
    }

    /// Registers a new stream for `id`, replacing (and so ending) an older one, and queues what
    /// a connecting agent is sent first: welcome, its assignment, its config generation.
    pub fn open_session(
        &self,
        id: &MachineId,
        tx: StreamTx,
        peer_ip: Option<IpAddr>,
    ) -> Result<Opened, FleetError> {
        let m = self.admitted(id)?;
        let conn_id = self.inner.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        {
            let mut live = self.live();
            let l = live
                .get_mut(id)
                .ok_or_else(|| FleetError::Unadmitted { id: id.clone(), why: Unadmitted::Deleted })?;
            l.peer_ip = peer_ip;
            if let Some(old) = l.session.replace(Session { conn_id, tx: tx.clone(), cancel: cancel.clone() })
            {
                old.cancel.cancel();
            }
        }
        self.touch(id, |_| {});
        let state = if m.approved { State::Ready } else { State::Pending };
        let welcome = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Welcome(pb::Welcome {
                machine_id: id.to_string(),
                state: pb::MachineState::from(state).into(),
            })),
        };
        // The channel is new and empty: these cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));
        let _ = tx.try_send(Ok(assignment_msg(&m)));
        if let Some(cfg) = super::rollout::config_msg(&m) {
            let _ = tx.try_send(Ok(cfg));
        }
        tracing::info!(machine = %id, conn = conn_id, "agent connected");
        Ok(Opened { conn_id, cancel })
    }

    /// Forgets a stream that ended (unless a newer one replaced it).
    pub fn close_stream(&self, id: &MachineId, conn_id: u64) {
        let mut live = self.live();
        if let Some(l) = live.get_mut(id) {
            if l.session.as_ref().is_some_and(|s| s.conn_id == conn_id) {
                l.session = None;
            }
        }
        tracing::info!(machine = %id, conn = conn_id, "agent disconnected");
    }

    /// Records a sign of life, and what a hello or heartbeat says.
    fn touch(&self, id: &MachineId, update: impl FnOnce(&mut Live)) {
        let now = muster_util::now_ms();
        if let Some(l) = self.live().get_mut(id) {
            l.last_seen_ms = now;
            l.dirty = true;
            update(l);
        }
    }

    /// A heartbeat, with the agent's latest health snapshot.
    pub fn on_heartbeat(&self, id: &MachineId, health: Option<HealthSnapshot>) {
        self.touch(id, |l| {
            if let Some(h) = health {
                l.health = Some(sanitize_health(h));
            }
        });
    }

    /// A hello: heartbeat interval, metrics port and the inventory (recorded; the hostname
    /// shown is the one the node reports).
    pub async fn on_hello(&self, id: &MachineId, hello: pb::Hello) {
        let hb = hello.heartbeat_interval_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS);
        let port = u16::try_from(hello.metrics_port).unwrap_or(0);
        self.touch(id, |l| {
            l.heartbeat_ms = hb;
            l.metrics_port = port;
        });
        let inv = sanitize(hello.inventory.unwrap_or_default());
        let r = self
            .update_machine(id, move |m| {
                m.heartbeat_ms = hb;
                if !inv.hostname.is_empty() {
                    m.hostname = inv.hostname.clone();
                }
                m.inventory = inv;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(machine = %id, error = %e, "could not record inventory");
        }
    }

    /// Whether the machine's agent has its stream open now.
    pub fn is_connected(&self, id: &MachineId) -> bool {
        self.live().get(id).is_some_and(|l| l.session.is_some())
    }

    /// Ends a machine's open stream with `status` (revocation, deletion, shutdown). Returns
    /// whether one was open.
    pub fn close_session(&self, id: &MachineId, status: Status) -> bool {
        let session = self.live().get_mut(id).and_then(|l| l.session.take());
        match session {
            Some(s) => {
                // try_send: the session's queue may be full of acks; cancelling ends it regardless.
                let _ = s.tx.try_send(Err(status));
                s.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every open stream (at shutdown).
    pub fn close_all_sessions(&self, status: &Status) {
        let ids: Vec<MachineId> = self.live().keys().cloned().collect();
        for id in ids {
            self.close_session(&id, status.clone());
        }
    }

    /// Pushes a message to a machine's open stream, if any.
    pub(super) fn push(&self, id: &MachineId, msg: pb::ControllerMessage) {
        let tx = self.live().get(id).and_then(|l| l.session.as_ref().map(|s| s.tx.clone()));
        if let Some(tx) = tx {
            if tx.try_send(Ok(msg)).is_err() {
                tracing::warn!(machine = %id, "agent stream is backed up; the update will be resent on reconnect");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_bounds_everything() {
        let inv = pb::Inventory {
            hostname: "é".repeat(400),
            nics: vec![pb::Nic { name: "x".repeat(1000), ..Default::default() }; 1000],
            ..Default::default()
        };
        let s = sanitize(inv);
        assert!(s.hostname.len() <= MAX_STR);
        assert_eq!(s.nics.len(), MAX_ITEMS);
        assert!(s.nics.iter().all(|n| n.name.len() == MAX_STR));
    }
}
