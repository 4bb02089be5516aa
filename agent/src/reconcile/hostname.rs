//! The node's hostname (`sethostname(2)` and `/etc/hostname`).

use muster_machinery::config::MachineConfig;

use super::{text, Found, Resource};
use crate::effects::Effects;

pub(crate) struct Hostname;

impl Resource for Hostname {
    type Want = String;
    type Have = String;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<String, String>)> {
        cfg.hostname.iter().map(|h| ("hostname".to_owned(), Ok(h.clone()))).collect()
    }

    fn observe(fx: &dyn Effects, _: &String) -> Result<String, String> {
        fx.hostname().map_err(text)
    }

    fn converge(fx: &dyn Effects, want: &String, have: String, report_only: bool) -> Result<Found, String> {
        if have == *want {
            return Ok(Found::Same);
        }
        if !report_only {
            fx.set_hostname(want).map_err(text)?;
        }
        Ok(Found::Differs)
    }
}
