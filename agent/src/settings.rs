//! The agent's settings: command-line flags, else the kernel command line (`muster.controller=`,
//! `muster.token=`, `muster.ca_hash=`, `muster.heartbeat=`), else defaults. Flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use muster_machinery::pin::CaPin;
use muster_machinery::token::JoinToken;
use muster_machinery::KernelArgs;

/// Identity hints that override what the inventory reports, for labs and tests where several
/// agents share one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    pub hostname: Option<String>,
    pub uuid: Option<String>,
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://HOST:PORT` of the controller's gRPC listener.
    pub controller: String,
    /// Join token; needed only until the node has an identity. Its `Debug` hides the secret.
    pub token: Option<JoinToken>,
    pub ca_pin: Option<CaPin>,
    pub ca_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub heartbeat: Duration,
    pub hints: Hints,
    /// How often the applied config is checked against the node (drift).
    pub drift_interval: Duration,
    /// Where this boot's id is read (a staged config applies when it changes).
    pub boot_id_file: PathBuf,
}

/// The kernel's id of the current boot.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// Extra settings of the binary (not needed by the library's loop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Where `/metrics` listens; `None` is off.
    pub metrics_listen: Option<SocketAddr>,
    /// Systemd units or processes that must be running.
    pub service_checks: Vec<String>,
}

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/muster-agent";
/// Default metrics listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:7481";

/// muster-agent: runs on every node. Enrolls with the controller using a join token, keeps one
/// mutual-TLS stream open, reports inventory and health, and serves its own /metrics.
///
/// Every setting can also come from the kernel command line (muster.controller=,
/// muster.token=, muster.ca_hash=, muster.heartbeat=, muster.state_dir=), so a network-booted
/// node needs no files. Flags win over the kernel command line.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "muster-agent", version, about, long_about)]
pub struct Flags {
    /// Controller gRPC endpoint, https://HOST:PORT [kernel: muster.controller=]
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// Join token ID.SECRET; needed only for the first enrollment. A flag's value is visible
    /// to every user in `ps`: prefer --token-file or the environment [kernel: muster.token=]
    #[arg(long, value_name = "TOKEN", env = "MUSTER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the join token from this file (its first line).
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Pin of the controller's CA, sha256:<64 hex>, as printed by `muster-controller init`
    /// [kernel: muster.ca_hash=]
    #[arg(long, value_name = "sha256:HEX")]
    pub ca_hash: Option<String>,
    /// The controller's CA certificate (PEM), instead of or besides the pin.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Where the node's key, certificate and machine id live (created 0700)
    /// [kernel: muster.state_dir=] [default: /var/lib/muster-agent]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Heartbeat interval, 100ms..10m [kernel: muster.heartbeat=] [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub heartbeat: Option<String>,
    /// How often the node is checked against its config for drift [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub drift_interval: Option<String>,
    /// Where the agent serves /metrics, or "off" [default: 0.0.0.0:7481]
    #[arg(long, value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
    /// A systemd unit or process name that must be running, reported as a health check.
    /// Repeatable [kernel: muster.service_checks=a,b]
    #[arg(long = "service-check", value_name = "NAME")]
    pub service_checks: Vec<String>,
    /// Read the boot id from this file (tests stand in a "reboot" by changing it).
    #[arg(long, value_name = "PATH", default_value = BOOT_ID_FILE, hide = true)]
    pub boot_id_file: PathBuf,
    /// Read the kernel command line from this file.
    #[arg(long, value_name = "PATH", default_value = "/proc/cmdline", hide = true)]
    pub cmdline_file: PathBuf,
    /// Report this hostname instead of the system's (labs and tests).
    #[arg(long, value_name = "NAME", hide = true)]
    pub hint_hostname: Option<String>,
    /// Report this SMBIOS UUID instead of the firmware's (labs and tests).
    #[arg(long, value_name = "UUID", hide = true)]
    pub hint_uuid: Option<String>,
    /// Record and report configs from the controller but change nothing on this machine
    /// (`muster lab` uses it while its agents share the host's namespaces).
    #[arg(long)]
    pub no_apply_config: bool,
    /// Root directory for the files a config manages (labs give each node its own).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub config_root: PathBuf,
    /// Refuse sysctls that are not per network namespace (labs, where nodes share a kernel).
    #[arg(long, hide = true)]
    pub namespaced_sysctls_only: bool,
    /// Apply this MachineConfig file once, print a JSON report, and exit (no controller).
    #[arg(long, value_name = "FILE", hide = true)]
    pub apply_once: Option<PathBuf>,
    /// With --apply-once: the root directory managed files are written under.
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub root: PathBuf,
    /// With --apply-once: only report differences, change nothing.
    #[arg(long, hide = true)]
    pub report_only: bool,
}

/// A setting that is missing or malformed; names the flag and the kernel parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} (muster.{kernel}=): {problem}")]
pub struct SettingError {
    pub flag: &'static str,
    pub kernel: &'static str,
    pub problem: String,
}

fn err(flag: &'static str, kernel: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError { flag, kernel, problem: problem.into() }
}

impl Flags {
    /// Merges flags over the kernel command line and checks every value.
    pub fn resolve(self, cmdline: &str) -> Result<(AgentConfig, ServiceSettings), SettingError> {
        let kernel = KernelArgs::parse(cmdline);
        let k = |name: &str| match name {
            "controller" => kernel.controller.clone(),
            "token" => kernel.token.clone(),
            "ca_hash" => kernel.ca_hash.clone(),
            other => kernel.get(other).map(str::to_owned),
        };

        let controller = self
            .controller
            .or_else(|| k("controller"))
            .ok_or_else(|| err("controller", "controller", "required: the controller's https://HOST:PORT"))?;
        let uri: tonic::transport::Uri = controller
            .parse()
            .map_err(|e| err("controller", "controller", format!("{controller:?}: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(err(
                "controller",
                "controller",
                format!("{controller:?} must look like https://HOST:PORT"),
            ));
        }
        let from_file = match &self.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| err("token-file", "token", format!("{}: {e}", p.display())))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("token-file", "token", format!("{} is empty", p.display())))
            .map(Some)?,
            None => None,
        };
        let token = self
            .token
            .or(from_file)
            .or_else(|| k("token"))
            .filter(|t| !t.is_empty())
            .map(|t| JoinToken::parse(&t).map_err(|e| err("token", "token", e.to_string())))
            .transpose()?;
        let ca_pin = self
            .ca_hash
            .or_else(|| k("ca_hash"))
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<CaPin>().map_err(|e| err("ca-hash", "ca_hash", e.to_string())))
            .transpose()?;
        let state_dir =
            self.state_dir.or_else(|| k("state_dir").map(PathBuf::from)).unwrap_or(DEFAULT_STATE_DIR.into());
        let heartbeat = match self.heartbeat.or_else(|| k("heartbeat")) {
            None => Duration::from_secs(5),
            Some(s) => {
                let d = humantime::parse_duration(&s)
                    .map_err(|e| err("heartbeat", "heartbeat", format!("{s:?}: {e}")))?;
                if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
                    return Err(err("heartbeat", "heartbeat", format!("{s:?} is outside 100ms..10m")));
                }
                d
            }
        };
        let drift_interval = match &self.drift_interval {
            None => Duration::from_secs(30),
            Some(s) => {
                let d = humantime::parse_duration(s)
                    .map_err(|e| err("drift-interval", "drift_interval", format!("{s:?}: {e}")))?;
                if d < Duration::from_millis(100) {
                    return Err(err("drift-interval", "drift_interval", "must be at least 100ms"));
                }
                d
            }
        };
        let metrics_listen = match self.metrics_listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN) {
            "off" | "" => None,
            s => Some(s.parse().map_err(|e| err("metrics-listen", "metrics_listen", format!("{s:?}: {e}")))?),
        };
        let mut service_checks = self.service_checks;
        if service_checks.is_empty() {
            if let Some(v) = k("service_checks") {
                service_checks = v.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            }
        }
        Ok((
            AgentConfig {
                controller,
                token,
                ca_pin,
                ca_file: self.ca_file,
                state_dir,
                heartbeat,
                hints: Hints { hostname: self.hint_hostname, uuid: self.hint_uuid },
                drift_interval,
                boot_id_file: self.boot_id_file,
            },
            ServiceSettings { metrics_listen, service_checks },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    const TOKEN: &str = "abc123.0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn flags_win_over_the_kernel_cmdline() {
        let cmdline = format!(
            "muster.controller=https://k:1 muster.token={TOKEN} muster.ca_hash={PIN} muster.heartbeat=2s"
        );
        let flags = Flags { controller: Some("https://flag:2".into()), ..Default::default() };
        let (cfg, svc) = flags.resolve(&cmdline).unwrap();
        assert_eq!(cfg.controller, "https://flag:2");
        assert_eq!(cfg.token.map(|t| t.to_string()).as_deref(), Some(TOKEN), "from the kernel");
        assert_eq!(cfg.heartbeat, Duration::from_secs(2));
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(svc.metrics_listen, Some("0.0.0.0:7481".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases = [
            (Flags::default(), "--controller"),
            (Flags { controller: Some("http://x:1".into()), ..Default::default() }, "--controller"),
            (
                Flags {
                    controller: Some("https://x:1".into()),
                    token: Some("nope".into()),
                    ..Default::default()
                },
                "--token",
            ),
            (
                Flags {
                    controller: Some("https://x:1".into()),
                    ca_hash: Some("md5:1".into()),
                    ..Default::default()
                },
                "--ca-hash",
            ),
            (
                Flags {
                    controller: Some("https://x:1".into()),
                    heartbeat: Some("1ms".into()),
                    ..Default::default()
                },
                "--heartbeat",
            ),
            (
                Flags {
                    controller: Some("https://x:1".into()),
                    metrics_listen: Some("x".into()),
                    ..Default::default()
                },
                "--metrics-listen",
            ),
        ];
        for (flags, want) in cases {
            let e = flags.resolve("").unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let flags = Flags {
            controller: Some("https://x:1".into()),
            metrics_listen: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(flags.resolve("").unwrap().1.metrics_listen, None);
    }

    #[test]
    fn the_token_can_come_from_a_file_kept_out_of_ps() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        let flags = Flags {
            controller: Some("https://x:1".into()),
            token_file: Some(file.clone()),
            ..Default::default()
        };
        let (cfg, _) = flags.resolve("muster.token=other.0123456789abcdefghijklmnopqrstuv").unwrap();
        assert_eq!(cfg.token.map(|t| t.to_string()).as_deref(), Some(TOKEN), "the file wins over the kernel");
        std::fs::write(&file, "\n").unwrap();
        let flags =
            Flags { controller: Some("https://x:1".into()), token_file: Some(file), ..Default::default() };
        assert!(flags.resolve("").unwrap_err().to_string().starts_with("--token-file"));
        let both = Flags::try_parse_from(["muster-agent", "--token", TOKEN, "--token-file", "/x"]);
        assert!(both.is_err(), "one or the other");
    }
}
