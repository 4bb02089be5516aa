//! systemd units: the unit file, `daemon-reload` when it changed, enabled and started as the
//! config says (restarted when its file changed).

use muster_machinery::config::{MachineConfig, Unit};

use super::files::write_if_differs;
use super::{text, Found, Pass, Resource};
use crate::effects::{Effects, FileState, UnitState};

pub(crate) struct Units;

/// A unit as the node has it.
pub(crate) struct UnitHave {
    /// The unit file, when the config gives its content.
    file: Option<FileState>,
    /// Whether it is enabled and active, or why units cannot be driven here.
    state: Result<UnitState, String>,
}

fn path(u: &Unit) -> String {
    format!("/etc/systemd/system/{}", u.name)
}

impl Resource for Units {
    type Want = Unit;
    type Have = UnitHave;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<Unit, String>)> {
        cfg.units.iter().map(|u| (format!("unit:{}", u.name), Ok(u.clone()))).collect()
    }

    fn observe(fx: &dyn Effects, u: &Unit) -> Result<UnitHave, String> {
        let file = match &u.content {
            Some(_) => fx.read_file(&path(u)).map_err(text)?,
            None => None,
        };
        let state = match fx.systemd() {
            Ok(()) => Ok(fx.unit_state(&u.name).map_err(text)?),
            Err(why) => Err(why),
        };
        Ok(UnitHave { file, state })
    }

    fn converge(fx: &dyn Effects, u: &Unit, have: UnitHave, pass: &Pass<'_>) -> Result<Found, String> {
        let report_only = pass.report_only;
        let mut found = Found::Same;
        if let Some(content) = &u.content {
            found =
                write_if_differs(fx, &path(u), have.file, content.as_bytes(), 0o644, (0, 0), report_only)?;
        }
        let state = match have.state {
            Ok(s) => s,
            // Only the file was asked for: that much is done.
            Err(_) if u.enabled.is_none() && u.started.is_none() => return Ok(found),
            Err(why) => return Ok(Found::Skip(format!("{why}: not enabled or started"))),
        };
        let file_changed = found.differs();
        if file_changed && !report_only {
            fx.systemctl("daemon-reload", None).map_err(text)?;
        }
        let mut verbs = Vec::new();
        match u.enabled {
            Some(true) if !state.enabled => verbs.push("enable"),
            Some(false) if state.enabled => verbs.push("disable"),
            _ => {}
        }
        match u.started {
            Some(true) if !state.active => verbs.push("start"),
            Some(true) if file_changed => verbs.push("restart"),
            Some(false) if state.active => verbs.push("stop"),
            _ => {}
        }
        if !report_only {
            for v in &verbs {
                fx.systemctl(v, Some(&u.name)).map_err(text)?;
            }
        }
        Ok(Found::from(file_changed || !verbs.is_empty()))
    }

    fn claims(_: &dyn Effects, u: &Unit) -> Vec<String> {
        let mut v = vec![format!("unit:{}", u.name)];
        if u.content.is_some() {
            v.push(format!("file:{}", path(u)));
        }
        v
    }
}
