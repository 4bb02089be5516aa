//! A VictoriaMetrics single-node for a lab: Debian's `victoria-metrics` binary, the command line
//! the lab runs it with (data, scrape config and log under one directory), and the mark by which
//! a process is known to be a lab's (its scrape config's file name), so `lab down` stops only
//! that one. The scrape config itself is the caller's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::LabError;

/// The binary's name, as Debian installs it (`/usr/bin/victoria-metrics`).
pub const BIN: &str = "victoria-metrics";
/// Where Debian's package puts it (looked at when it is not on `PATH`).
pub const DEBIAN_PATH: &str = "/usr/bin/victoria-metrics";
/// How to get it.
pub const INSTALL_HINT: &str = "install it with `apt-get install victoria-metrics`";
/// The scrape config's file name in the lab's monitoring directory: the mark of a lab's
/// VictoriaMetrics.
pub const CONFIG_FILE: &str = "muster-lab-scrape.yml";
/// The port it listens on inside a lab namespace.
pub const PORT: u16 = 8428;

/// The `victoria-metrics` binary: on `PATH`, else [`DEBIAN_PATH`]; fails with the install hint.
pub fn find() -> Result<PathBuf, LabError> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(Path::new(DEBIAN_PATH).parent().map(Path::to_path_buf));
    find_in(&dirs)
}

/// [`find`] in `dirs` only.
pub fn find_in(dirs: &[PathBuf]) -> Result<PathBuf, LabError> {
    dirs.iter().map(|d| d.join(BIN)).find(|p| p.is_file()).ok_or_else(|| LabError::Missing {
        name: BIN.to_owned(),
        hint: format!("--monitoring runs Debian's VictoriaMetrics single-node; {INSTALL_HINT}"),
    })
}

/// Whether a process's arguments are those of a lab's VictoriaMetrics ([`args`]).
pub fn is_labs(args: &[String]) -> bool {
    args.iter().any(|a| {
        a.strip_prefix("-promscrape.config=")
            .is_some_and(|p| Path::new(p).file_name().is_some_and(|n| n == CONFIG_FILE))
    })
}

/// The arguments for a VictoriaMetrics on `listen` with everything in `dir`: its data in
/// `dir/data`, the scrape config in `dir/`[`CONFIG_FILE`]. Service discovery is re-read every
/// `sd_interval` (VictoriaMetrics' default is a minute: long for a lab whose nodes come and
/// go), and queries see samples as soon as they are stored instead of 30 s later.
pub fn args(listen: &str, dir: &Path, sd_interval: Duration) -> Vec<String> {
    vec![
        format!("-httpListenAddr={listen}"),
        format!("-storageDataPath={}", dir.join("data").display()),
        format!("-promscrape.config={}", dir.join(CONFIG_FILE).display()),
        format!("-promscrape.httpSDCheckInterval={}s", sd_interval.as_secs().max(1)),
        "-search.latencyOffset=0s".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let empty = tempfile::tempdir().unwrap();
        let e = find_in(&[empty.path().to_path_buf()]).unwrap_err().to_string();
        assert!(e.starts_with("victoria-metrics not found"), "{e}");
        assert!(e.contains("apt-get install victoria-metrics"), "{e}");
    }

    #[test]
    fn the_labs_instance_is_known_by_its_scrape_config() {
        let a = args("10.77.0.1:8428", Path::new("/lab/monitoring"), Duration::from_secs(5));
        assert!(is_labs(&a), "{a:?}");
        assert!(a.contains(&"-storageDataPath=/lab/monitoring/data".to_owned()), "{a:?}");
        assert!(!is_labs(&["-promscrape.config=/etc/prometheus/prometheus.yml".to_owned()]));
    }
}
