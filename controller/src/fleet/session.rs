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

/// Bounds on what a node's reports may hold: enough for any real machine, small enough that a
/// public boot token cannot make the controller hold much per machine.
const MAX_STR: usize = 128;
const MAX_NICS: usize = 32;
const MAX_ADDRESSES: usize = 16;
const MAX_ADDRESS_LEN: usize = 64;
const MAX_ITEMS: usize = 64;
const MAX_DETAIL: usize = 256;
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
    clip_to(s, MAX_STR);
}

pub(super) fn clip_to(s: &mut String, max: usize) {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Bounds what a node says about itself. A hostname that is not a valid one (RFC 1123: letters,
/// digits, hyphens and dots, no control characters) is dropped: it is shown to operators and
/// matched by `muster` lookups.
pub fn sanitize(mut inv: pb::Inventory) -> pb::Inventory {
    if !inv.hostname.is_empty() && inv.hostname.parse::<muster_machinery::config::Hostname>().is_err() {
        tracing::warn!(hostname = ?inv.hostname.chars().take(MAX_STR).collect::<String>(), "a node reported an invalid hostname; ignored");
        inv.hostname.clear();
    }
    for s in [&mut inv.cpu_model, &mut inv.kernel, &mut inv.os, &mut inv.agent_version, &mut inv.arch] {
        clip(s);
    }
    inv.disks.truncate(MAX_ITEMS);
    for d in &mut inv.disks {
        clip(&mut d.name);
        clip(&mut d.model);
    }
    inv.nics.truncate(MAX_NICS);
    for n in &mut inv.nics {
        clip(&mut n.name);
        clip(&mut n.mac);
        n.addresses.truncate(MAX_ADDRESSES);
        n.addresses.iter_mut().for_each(|a| clip_to(a, MAX_ADDRESS_LEN));
    }
    if let Some(s) = &mut inv.smbios {
        for f in [&mut s.uuid, &mut s.serial, &mut s.vendor, &mut s.product] {
            clip(f);
        }
    }
    inv
}

/// Bounds a health snapshot's lists and strings.
pub fn sanitize_health(mut h: HealthSnapshot) -> HealthSnapshot {
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
        clip_to(&mut s.detail, MAX_DETAIL);
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
        // Not approved: the default, with nothing in it.
        pb::Assignment::default()
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
        if let Some(msg) = self.install_msg(&m) {
            let _ = tx.try_send(Ok(msg));
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
        // Agents say hello on every connect: the record is written only when something changed.
        let unchanged = self.machine(id).is_some_and(|m| {
            m.heartbeat_ms == hb
                && m.inventory == inv
                && (inv.hostname.is_empty() || m.hostname == inv.hostname)
        });
        if unchanged {
            return;
        }
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
        let nic =
            pb::Nic { name: "x".repeat(1000), mac: "m".repeat(1000), addresses: vec!["a".repeat(500); 100] };
        let inv = pb::Inventory {
            hostname: "é".repeat(400),
            cpu_model: "é".repeat(400),
            nics: vec![nic; 1000],
            disks: vec![pb::Disk { name: "d".repeat(1000), ..Default::default() }; 1000],
            ..Default::default()
        };
        let s = sanitize(inv);
        assert_eq!(s.hostname, "", "not a hostname");
        assert!(s.cpu_model.len() <= MAX_STR && s.cpu_model.starts_with('é'), "clipped on a char boundary");
        assert_eq!((s.nics.len(), s.disks.len()), (MAX_NICS, MAX_ITEMS));
        assert!(s.nics.iter().all(|n| n.name.len() == MAX_STR && n.addresses.len() == MAX_ADDRESSES));
        assert!(s.nics.iter().flat_map(|n| &n.addresses).all(|a| a.len() == MAX_ADDRESS_LEN));
        use prost::Message;
        assert!(s.encoded_len() < 64 * 1024, "at most {} bytes kept per machine", s.encoded_len());
    }

    #[test]
    fn clipping_backs_off_to_a_char_boundary() {
        // "a" then 2-byte characters: byte 128 falls inside one, so 127 bytes are kept.
        let mut s = format!("a{}", "é".repeat(100));
        clip(&mut s);
        assert_eq!(s.len(), MAX_STR - 1);
        assert!(s.starts_with("aé") && s.ends_with('é'));
        let mut exact = "x".repeat(MAX_STR);
        clip(&mut exact);
        assert_eq!(exact.len(), MAX_STR, "a string of exactly the limit is kept whole");
    }

    #[test]
    fn hostnames_are_checked() {
        for (reported, kept) in [
            ("node-1", "node-1"),
            ("node-1.lab.example", "node-1.lab.example"),
            ("02:00:00:00:13:89", ""),
            ("x\u{1b}]0;pwn\u{7}", ""),
            ("a\nb", ""),
            ("-x", ""),
        ] {
            let s = sanitize(pb::Inventory { hostname: reported.into(), ..Default::default() });
            assert_eq!(s.hostname, kept, "{reported:?}");
        }
    }
}
