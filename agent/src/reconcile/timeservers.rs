//! Time servers: a `systemd-timesyncd` drop-in, and a restart of timesyncd when it changes.

use muster_machinery::config::MachineConfig;

use super::files::write_if_differs;
use super::{text, Found, Pass, Resource};
use crate::effects::{Effects, FileState};

const DROP_IN: &str = "/etc/systemd/timesyncd.conf.d/muster.conf";

pub(crate) struct TimeServers;

impl Resource for TimeServers {
    /// The drop-in's text.
    type Want = String;
    type Have = Option<FileState>;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<String, String>)> {
        if cfg.time_servers.is_empty() {
            return Vec::new();
        }
        let text = format!(
            "# Written by muster-agent from the machine config.\n[Time]\nNTP={}\n",
            cfg.time_servers.join(" ")
        );
        vec![("timeservers".into(), Ok(text))]
    }

    fn observe(fx: &dyn Effects, _: &String) -> Result<Option<FileState>, String> {
        fx.read_file(DROP_IN).map_err(text)
    }

    fn converge(
        fx: &dyn Effects,
        want: &String,
        have: Option<FileState>,
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let report_only = pass.report_only;
        let found = write_if_differs(fx, DROP_IN, have, want.as_bytes(), 0o644, (0, 0), report_only)?;
        if found.differs() && !report_only && fx.systemd().is_ok() {
            fx.systemctl("try-restart", Some("systemd-timesyncd.service")).map_err(text)?;
        }
        Ok(found)
    }

    fn claims(_: &dyn Effects, _: &String) -> Vec<String> {
        vec![format!("file:{DROP_IN}")]
    }
}
