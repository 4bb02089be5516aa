//! The node's hostname: the kernel's (`sethostname(2)`) and `/etc/hostname`, which it is set
//! from at boot.

use muster_machinery::config::MachineConfig;

use super::files::write_if_differs;
use super::{text, Found, Pass, Resource};
use crate::effects::{Effects, FileState};

pub(crate) struct Hostname;

const ETC_HOSTNAME: &str = "/etc/hostname";

impl Resource for Hostname {
    type Want = String;
    /// The kernel's hostname and `/etc/hostname`.
    type Have = (String, Option<FileState>);

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<String, String>)> {
        cfg.hostname.iter().map(|h| ("hostname".to_owned(), Ok(h.clone()))).collect()
    }

    fn observe(fx: &dyn Effects, _: &String) -> Result<(String, Option<FileState>), String> {
        Ok((fx.hostname().map_err(text)?, fx.read_file(ETC_HOSTNAME).map_err(text)?))
    }

    fn converge(
        fx: &dyn Effects,
        want: &String,
        (kernel, file): (String, Option<FileState>),
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let mut differs = kernel != *want;
        if differs && !pass.report_only {
            fx.set_hostname(want).map_err(text)?;
        }
        let content = format!("{want}\n");
        differs |=
            write_if_differs(fx, ETC_HOSTNAME, file, content.as_bytes(), 0o644, (0, 0), pass.report_only)?
                .differs();
        Ok(Found::from(differs))
    }

    fn claims(_: &dyn Effects, _: &String) -> Vec<String> {
        vec!["hostname".into(), format!("file:{ETC_HOSTNAME}")]
    }
}
