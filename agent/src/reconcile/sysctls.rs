//! Kernel parameters under `/proc/sys`.

use muster_machinery::config::MachineConfig;

use super::{text, Found, Pass, Resource};
use crate::effects::Effects;

pub(crate) struct Sysctls;

impl Resource for Sysctls {
    /// Key and value.
    type Want = (String, String);
    type Have = String;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<(String, String), String>)> {
        cfg.sysctls.iter().map(|(k, v)| (format!("sysctl:{k}"), Ok((k.clone(), v.clone())))).collect()
    }

    fn observe(fx: &dyn Effects, (key, _): &(String, String)) -> Result<String, String> {
        fx.sysctl(key).map_err(text)?.ok_or_else(|| format!("no sysctl {key} on this kernel"))
    }

    fn converge(
        fx: &dyn Effects,
        (key, want): &(String, String),
        have: String,
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let report_only = pass.report_only;
        // The kernel prints multi-value sysctls with tabs; compare by words.
        if have.split_whitespace().eq(want.split_whitespace()) {
            return Ok(Found::Same);
        }
        if !report_only {
            fx.set_sysctl(key, want).map_err(text)?;
        }
        Ok(Found::Differs)
    }

    fn claims(_: &dyn Effects, (key, _): &(String, String)) -> Vec<String> {
        vec![format!("sysctl:{key}")]
    }
}
