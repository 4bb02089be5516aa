//! Which machine an operator means: a machine id, a unique id prefix, a hostname or a MAC.

use muster_machinery::model::{normalize_mac, MachineId};

use super::{macs, Controller, FleetError};
use crate::store::MachineRecord;

impl Controller {
    /// Finds the one machine `query` names: id, unique id prefix, hostname or MAC.
    pub fn resolve(&self, query: &str) -> Result<MachineRecord, FleetError> {
        let q = query.trim();
        if q.is_empty() {
            return Err(FleetError::invalid("query", "a machine id, id prefix, hostname or MAC is required"));
        }
        if let Ok(id) = q.parse::<MachineId>() {
            if let Some(m) = self.machine(&id) {
                return Ok(m);
            }
        }
        let all = self.machines();
        // A MAC-shaped query means a MAC: a hostname (which the node chooses) never wins it.
        if let Some(mac) = normalize_mac(q) {
            let found: Vec<&MachineRecord> = all.iter().filter(|m| macs(m).contains(&mac)).collect();
            return match found.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(FleetError::NotFound(format!("no machine has MAC {mac}"))),
                many => Err(ambiguous(q, "MAC", many)),
            };
        }
        let lower = q.to_ascii_lowercase();
        let by_prefix: Vec<&MachineRecord> =
            all.iter().filter(|m| m.id.as_str().starts_with(&lower)).collect();
        let by_name: Vec<&MachineRecord> =
            all.iter().filter(|m| m.hostname.eq_ignore_ascii_case(q)).collect();
        let mut found: Vec<&MachineRecord> = by_prefix.iter().chain(&by_name).copied().collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.dedup_by(|a, b| a.id == b.id);
        match found.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            many => {
                // Matching in two ways (one machine's id prefix, another's hostname) is as
                // ambiguous as two hostnames.
                let by = match (by_prefix.is_empty(), by_name.is_empty()) {
                    (false, false) => "id prefix and hostname",
                    (false, true) => "id prefix",
                    _ => "hostname",
                };
                return Err(ambiguous(q, by, many));
            }
        }
        Err(FleetError::NotFound(format!("no machine matches {q:?} (by id, id prefix, hostname or MAC)")))
    }
}

fn ambiguous(q: &str, by: &'static str, found: &[&MachineRecord]) -> FleetError {
    let ids: Vec<&str> = found.iter().take(5).map(|m| m.id.as_str()).collect();
    FleetError::Ambiguous { query: q.to_owned(), count: found.len(), by, ids: ids.join(", ") }
}
