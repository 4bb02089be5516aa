//! Kernel modules, loaded with their parameters (only by an agent that owns its kernel).

use muster_machinery::config::{KernelModule, MachineConfig};

use super::{text, Found, Pass, Resource};
use crate::effects::Effects;

pub(crate) struct Modules;

impl Resource for Modules {
    type Want = KernelModule;
    /// Loaded already.
    type Have = bool;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<KernelModule, String>)> {
        cfg.kernel_modules.iter().map(|m| (format!("module:{}", m.name), Ok(m.clone()))).collect()
    }

    fn observe(fx: &dyn Effects, m: &KernelModule) -> Result<bool, String> {
        fx.module_loaded(&m.name).map_err(text)
    }

    fn converge(fx: &dyn Effects, m: &KernelModule, loaded: bool, pass: &Pass<'_>) -> Result<Found, String> {
        let report_only = pass.report_only;
        if loaded {
            return Ok(Found::Same);
        }
        if let Err(why) = fx.kernel_owned() {
            return Ok(Found::Skip(why));
        }
        if !report_only {
            fx.load_module(&m.name, &m.parameters).map_err(text)?;
        }
        Ok(Found::Differs)
    }

    fn claims(_: &dyn Effects, m: &KernelModule) -> Vec<String> {
        vec![format!("module:{}", m.name)]
    }
}
