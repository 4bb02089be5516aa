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
        let lower = q.to_ascii_lowercase();
        let mac = normalize_mac(q);
        type Matcher<'a> = Box<dyn Fn(&MachineRecord) -> bool + 'a>;
        let matchers: [(&str, Matcher<'_>); 3] = [
            ("id prefix", Box::new(|m: &MachineRecord| m.id.as_str().starts_with(&lower))),
            ("hostname", Box::new(|m: &MachineRecord| m.hostname.eq_ignore_ascii_case(q))),
            ("MAC", Box::new(|m: &MachineRecord| mac.as_ref().is_some_and(|mac| macs(m).contains(mac)))),
        ];
        for (what, f) in matchers {
            let found: Vec<&MachineRecord> = all.iter().filter(|m| f(m)).collect();
            match found.len() {
                0 => continue,
                1 => return Ok(found[0].clone()),
                n => {
                    let ids: Vec<&str> = found.iter().take(5).map(|m| m.id.as_str()).collect();
                    return Err(FleetError::Ambiguous {
                        query: q.to_owned(),
                        count: n,
                        by: what,
                        ids: ids.join(", "),
                    });
                }
            }
        }
        Err(FleetError::NotFound(format!("no machine matches {q:?} (by id, id prefix, hostname or MAC)")))
    }
}
