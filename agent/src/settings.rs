//! The agent's settings. Each one is taken from the first of these that has it:
//!
//! 1. command-line flags (and `MUSTER_TOKEN` in the process environment);
//! 2. the kernel command line (`muster.controller=`, `muster.token=`, `muster.ca_hash=`,
//!    `muster.heartbeat=`, `muster.state_dir=`, `muster.service_checks=`);
//! 3. QEMU's fw_cfg (`opt/muster/controller`, `opt/muster/token`, … the same names; Proxmox
//!    passes them with `args: -fw_cfg name=opt/muster/controller,string=https://…`), read from
//!    `/sys/firmware/qemu_fw_cfg/by_name` (the `qemu_fw_cfg` module);
//! 4. `/etc/muster/agent.env` (`MUSTER_CONTROLLER=…`, `MUSTER_TOKEN=…`, … one per line, the
//!    format of a systemd `EnvironmentFile`), what an image has baked in;
//! 5. defaults.
//!
//! What is specific to this boot or this VM comes before what every clone of an image shares.

use std::collections::BTreeMap;
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
/// The enrollment settings (controller, token, ca_hash, heartbeat, state_dir, service_checks)
/// are taken from the first of: these flags; the kernel command line (muster.controller=, ...),
/// so a network-booted node needs no files; QEMU's fw_cfg (opt/muster/controller, ...), so a VM
/// cloned from a template gets its own; the env file (MUSTER_CONTROLLER=..., ...), what an
/// image has baked in.
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
    /// Settings baked into the node's image: MUSTER_CONTROLLER=, MUSTER_TOKEN=, MUSTER_CA_HASH=,
    /// MUSTER_HEARTBEAT=, MUSTER_STATE_DIR=, MUSTER_SERVICE_CHECKS= (one per line; # comments).
    /// Read last, after the kernel command line and fw_cfg; a missing file is fine.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ENV_FILE)]
    pub env_file: PathBuf,
    /// Where the kernel shows QEMU's fw_cfg entries by name.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_FW_CFG_DIR, hide = true)]
    pub fw_cfg_dir: PathBuf,
    /// Take settings from the flags only: no kernel command line, fw_cfg or env file (labs and
    /// tests, whose agents share the host's).
    #[arg(long, hide = true)]
    pub only_flags: bool,
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

/// Default env file.
pub const DEFAULT_ENV_FILE: &str = "/etc/muster/agent.env";
/// Where Linux shows fw_cfg entries (module `qemu_fw_cfg`).
pub const DEFAULT_FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg/by_name";

/// The settings the kernel command line, fw_cfg and the env file can carry: the key
/// (`muster.KEY=`, `opt/muster/KEY`) and the env file's name.
pub const KEYS: &[(&str, &str)] = &[
    ("controller", "MUSTER_CONTROLLER"),
    ("token", "MUSTER_TOKEN"),
    ("ca_hash", "MUSTER_CA_HASH"),
    ("heartbeat", "MUSTER_HEARTBEAT"),
    ("state_dir", "MUSTER_STATE_DIR"),
    ("service_checks", "MUSTER_SERVICE_CHECKS"),
];

/// A setting that is missing or malformed; names the flag and the kernel parameter, and where
/// a bad value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SettingError {
    pub flag: &'static str,
    /// The kernel parameter's key, or empty for a flag that has none.
    pub kernel: &'static str,
    pub problem: String,
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kernel {
            "" => write!(f, "--{}: {}", self.flag, self.problem),
            k => write!(f, "--{} (muster.{k}=): {}", self.flag, self.problem),
        }
    }
}

fn err(flag: &'static str, kernel: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError { flag, kernel, problem: problem.into() }
}

/// Where a setting's value came from (after the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    KernelCmdline,
    FwCfg(PathBuf),
    EnvFile { path: PathBuf, line: usize },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::KernelCmdline => write!(f, "the kernel command line"),
            Origin::FwCfg(p) => write!(f, "fw_cfg {}", p.display()),
            Origin::EnvFile { path, line } => write!(f, "{} line {line}", path.display()),
        }
    }
}

/// What one source says of one key: a value with where it came from, or why it could not be
/// read (an error only if the key is used: flags may make the source irrelevant).
type Entry = Result<(String, Origin), SettingError>;

/// The settings found on this machine outside the flags, by key, in the order they count. An
/// empty value counts as absent.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    layers: Vec<BTreeMap<&'static str, Entry>>,
}

impl Sources {
    /// Reads the kernel command line, fw_cfg and the env file as `flags` name them (nothing
    /// with `--only-flags`). A missing file is no setting; an unreadable or malformed one is an
    /// error when a setting it would give is needed.
    pub fn read(flags: &Flags) -> Self {
        if flags.only_flags {
            return Self::default();
        }
        let mut s = match std::fs::read_to_string(&flags.cmdline_file) {
            Ok(c) => Self::kernel(&c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                let why = format!("reading {}: {e}", flags.cmdline_file.display());
                Self {
                    layers: vec![every_key(|k| SettingError {
                        flag: "cmdline-file",
                        kernel: k,
                        problem: why.clone(),
                    })],
                }
            }
        };
        s.layers.push(read_fw_cfg(&flags.fw_cfg_dir));
        s.layers.push(read_env_file(&flags.env_file));
        s
    }

    /// Only the kernel command line `cmdline`.
    pub fn kernel(cmdline: &str) -> Self {
        let kernel = KernelArgs::parse(cmdline);
        let mut m = BTreeMap::new();
        for (key, _) in KEYS {
            let v = match *key {
                "controller" => kernel.controller.clone(),
                "token" => kernel.token.clone(),
                "ca_hash" => kernel.ca_hash.clone(),
                other => kernel.get(other).map(str::to_owned),
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                m.insert(*key, Ok((v, Origin::KernelCmdline)));
            }
        }
        Self { layers: vec![m] }
    }

    /// The first source's value of `key`, with where it came from; an error if the first source
    /// that might have it could not be read.
    pub fn get(&self, key: &str) -> Result<Option<(String, Origin)>, SettingError> {
        match self.layers.iter().find_map(|l| l.get(key)) {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v.clone())),
            Some(Err(e)) => Err(e.clone()),
        }
    }

    /// Where each setting comes from, for the log (no values: one of them is a secret).
    pub fn origins(&self) -> Vec<(&'static str, String)> {
        KEYS.iter()
            .filter_map(|(k, _)| match self.get(k) {
                Ok(Some((_, o))) => Some((*k, o.to_string())),
                _ => None,
            })
            .collect()
    }
}

/// The same error for every key.
fn every_key(e: impl Fn(&'static str) -> SettingError) -> BTreeMap<&'static str, Entry> {
    KEYS.iter().map(|(k, _)| (*k, Err(e(k)))).collect()
}

fn read_fw_cfg(dir: &std::path::Path) -> BTreeMap<&'static str, Entry> {
    let mut m = BTreeMap::new();
    if !dir.is_dir() {
        return m;
    }
    for (key, _) in KEYS {
        let p = dir.join("opt/muster").join(key).join("raw");
        let bad = |problem: String| SettingError { flag: "fw-cfg-dir", kernel: "", problem };
        let entry = match std::fs::read(&p) {
            // `file=` entries may end in a newline or a NUL; `string=` ones end in neither.
            Ok(raw) => match String::from_utf8(raw) {
                Ok(v) => Ok((
                    v.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_owned(),
                    Origin::FwCfg(p),
                )),
                Err(_) => Err(bad(format!("{} is not UTF-8 text", p.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(bad(format!("{}: {e}", p.display()))),
        };
        if entry.as_ref().map_or(true, |(v, _)| !v.is_empty()) {
            m.insert(*key, entry);
        }
    }
    m
}

/// Whether the env file at `path` gives `key` (`controller`, `ca_hash`, …) a value, as the
/// agent reads it (an empty value is none; a file that does not parse gives nothing).
pub fn env_file_sets(path: &std::path::Path, key: &str) -> bool {
    matches!(read_env_file(path).get(key), Some(Ok(_)))
}

fn read_env_file(path: &std::path::Path) -> BTreeMap<&'static str, Entry> {
    let mut m = BTreeMap::new();
    let bad = |problem: String| {
        move |_: &'static str| SettingError { flag: "env-file", kernel: "", problem: problem.clone() }
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return m,
        Err(e) => return every_key(bad(format!("{}: {e}", path.display()))),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim().trim_start_matches('\u{feff}');
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        // `export NAME=...` as a shell would take it (an extension: systemd does not).
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return every_key(bad(format!("{}: expected NAME=VALUE", at())));
        };
        let name = name.trim();
        let Some(key) = KEYS.iter().find(|(_, env)| *env == name).map(|(k, _)| *k) else {
            let known: Vec<&str> = KEYS.iter().map(|(_, e)| *e).collect();
            return every_key(bad(format!(
                "{}: unknown setting {name:?} (known: {})",
                at(),
                known.join(", ")
            )));
        };
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        if value.contains('\\') {
            return every_key(bad(format!("{}: backslashes are not supported in values", at())));
        }
        if value.is_empty() {
            m.remove(key);
        } else {
            m.insert(key, Ok((value.to_owned(), Origin::EnvFile { path: path.to_owned(), line: i + 1 })));
        }
    }
    m
}

/// `problem`, said of a value that came from `origin` (flags: nothing added).
fn from(origin: &Option<Origin>, problem: String) -> String {
    match origin {
        Some(o) => format!("{problem} (from {o})"),
        None => problem,
    }
}

impl Flags {
    /// Merges flags over the kernel command line (only) and checks every value.
    pub fn resolve(self, cmdline: &str) -> Result<(AgentConfig, ServiceSettings), SettingError> {
        self.resolve_with(&Sources::kernel(cmdline))
    }

    /// Merges flags over `sources` (see the module's docs for the order) and checks every value.
    pub fn resolve_with(self, sources: &Sources) -> Result<(AgentConfig, ServiceSettings), SettingError> {
        // A flag's value, else the first source's, with where it came from (None: a flag).
        let pick =
            |flag: Option<String>, key: &str| -> Result<Option<(String, Option<Origin>)>, SettingError> {
                match flag {
                    Some(v) => Ok(Some((v, None))),
                    None => Ok(sources.get(key)?.map(|(v, o)| (v, Some(o)))),
                }
            };

        let (controller, origin) = pick(self.controller, "controller")?.ok_or_else(|| {
            err(
                "controller",
                "controller",
                format!(
                    "required: the controller's https://HOST:PORT, as this flag, muster.controller= on \
                     the kernel command line, fw_cfg opt/muster/controller, or MUSTER_CONTROLLER= in {}",
                    self.env_file.display()
                ),
            )
        })?;
        let uri: tonic::transport::Uri = controller
            .parse()
            .map_err(|e| err("controller", "controller", from(&origin, format!("{controller:?}: {e}"))))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(err(
                "controller",
                "controller",
                from(&origin, format!("{controller:?} must look like https://HOST:PORT")),
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
        let token = pick(self.token.or(from_file), "token")?
            .filter(|(t, _)| !t.is_empty())
            .map(|(t, o)| JoinToken::parse(&t).map_err(|e| err("token", "token", from(&o, e.to_string()))))
            .transpose()?;
        let ca_pin = pick(self.ca_hash, "ca_hash")?
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, o)| p.parse::<CaPin>().map_err(|e| err("ca-hash", "ca_hash", from(&o, e.to_string()))))
            .transpose()?;
        let state_dir = pick(self.state_dir.map(|p| p.display().to_string()), "state_dir")?
            .map(|(p, _)| PathBuf::from(p))
            .unwrap_or(DEFAULT_STATE_DIR.into());
        let heartbeat = match pick(self.heartbeat, "heartbeat")? {
            None => Duration::from_secs(5),
            Some((s, o)) => {
                let d = humantime::parse_duration(&s)
                    .map_err(|e| err("heartbeat", "heartbeat", from(&o, format!("{s:?}: {e}"))))?;
                if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
                    return Err(err(
                        "heartbeat",
                        "heartbeat",
                        from(&o, format!("{s:?} is outside 100ms..10m")),
                    ));
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
            if let Some((v, _)) = sources.get("service_checks")? {
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

    /// A machine's settings outside the flags, under a temp dir: a kernel command line, fw_cfg
    /// entries as the kernel shows them, and an env file.
    struct Machine {
        dir: tempfile::TempDir,
    }

    impl Machine {
        fn new() -> Self {
            Self { dir: tempfile::tempdir().unwrap() }
        }
        fn cmdline(&self, text: &str) -> &Self {
            std::fs::write(self.dir.path().join("cmdline"), text).unwrap();
            self
        }
        fn fw_cfg(&self, key: &str, value: &str) -> &Self {
            let d = self.dir.path().join("fw_cfg/opt/muster").join(key);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("raw"), value).unwrap();
            self
        }
        fn env(&self, text: &str) -> &Self {
            std::fs::write(self.dir.path().join("agent.env"), text).unwrap();
            self
        }
        fn flags(&self) -> Flags {
            Flags {
                cmdline_file: self.dir.path().join("cmdline"),
                fw_cfg_dir: self.dir.path().join("fw_cfg"),
                env_file: self.dir.path().join("agent.env"),
                ..Default::default()
            }
        }
        fn resolve(&self, flags: Flags) -> Result<(AgentConfig, ServiceSettings), SettingError> {
            let sources = Sources::read(&flags);
            flags.resolve_with(&sources)
        }
    }

    #[test]
    fn flags_then_kernel_then_fw_cfg_then_the_env_file() {
        let m = Machine::new();
        m.env(&format!(
            "# baked into the image\nMUSTER_CONTROLLER=https://env:1\nMUSTER_TOKEN={TOKEN}\n\
             export MUSTER_HEARTBEAT=\"7s\"\nMUSTER_STATE_DIR='/var/lib/x'\nMUSTER_SERVICE_CHECKS=a,b\n"
        ));
        let (cfg, svc) = m.resolve(m.flags()).unwrap();
        assert_eq!(cfg.controller, "https://env:1");
        assert_eq!(cfg.token.as_ref().map(ToString::to_string).as_deref(), Some(TOKEN));
        assert_eq!(cfg.heartbeat, Duration::from_secs(7), "quotes, and `export` as a shell takes it");
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(svc.service_checks, ["a", "b"]);
        // fw_cfg (this VM's) over the env file (every clone's).
        m.fw_cfg("controller", "https://vm:2\n").fw_cfg("ca_hash", PIN);
        let (cfg, _) = m.resolve(m.flags()).unwrap();
        assert_eq!(cfg.controller, "https://vm:2");
        assert_eq!(cfg.ca_pin.map(|p| p.to_string()).as_deref(), Some(PIN));
        assert_eq!(cfg.heartbeat, Duration::from_secs(7), "what fw_cfg lacks still comes from the file");
        // The kernel command line (this boot's) over fw_cfg.
        m.cmdline("quiet muster.controller=https://boot:3 muster.heartbeat=2s");
        let (cfg, _) = m.resolve(m.flags()).unwrap();
        assert_eq!((cfg.controller.as_str(), cfg.heartbeat), ("https://boot:3", Duration::from_secs(2)));
        // Flags over everything.
        let flags = Flags { controller: Some("https://flag:4".into()), ..m.flags() };
        assert_eq!(m.resolve(flags).unwrap().0.controller, "https://flag:4");
        // --only-flags reads none of them.
        let flags = Flags { controller: Some("https://flag:4".into()), only_flags: true, ..m.flags() };
        let (cfg, svc) = m.resolve(flags).unwrap();
        assert!(cfg.token.is_none() && cfg.ca_pin.is_none() && svc.service_checks.is_empty());
        assert_eq!(cfg.heartbeat, Duration::from_secs(5));
    }

    #[test]
    fn nothing_there_is_no_setting() {
        let m = Machine::new();
        let flags = Flags { controller: Some("https://x:1".into()), ..m.flags() };
        let (cfg, _) = m.resolve(flags).unwrap();
        assert!(cfg.token.is_none());
        assert_eq!(m.resolve(m.flags()).unwrap_err().flag, "controller");
    }

    #[test]
    fn a_bad_value_names_where_it_came_from() {
        let m = Machine::new();
        m.env("MUSTER_CONTROLLER=https://x:1\n\nMUSTER_HEARTBEAT=forever\n");
        let e = m.resolve(m.flags()).unwrap_err().to_string();
        assert!(e.starts_with("--heartbeat (muster.heartbeat=): \"forever\""), "{e}");
        assert!(e.ends_with(&format!("(from {} line 3)", m.dir.path().join("agent.env").display())), "{e}");
        m.fw_cfg("token", "nope");
        let e = m.resolve(m.flags()).unwrap_err().to_string();
        assert!(e.starts_with("--token (muster.token=): "), "{e}");
        assert!(e.contains("(from fw_cfg ") && e.contains("opt/muster/token/raw"), "{e}");
        m.cmdline(&format!("muster.token={TOKEN} muster.ca_hash=md5:1"));
        let e = m.resolve(m.flags()).unwrap_err().to_string();
        assert!(e.ends_with("(from the kernel command line)"), "{e}");
    }

    #[test]
    fn a_malformed_env_file_is_an_error_naming_the_line() {
        let m = Machine::new();
        let path = m.dir.path().join("agent.env");
        for (text, want) in [
            (
                "MUSTER_CONTROLER=https://x:1\n",
                "line 1: unknown setting \"MUSTER_CONTROLER\" (known: MUSTER_CONTROLLER,",
            ),
            ("# ok\nMUSTER_CONTROLLER\n", "line 2: expected NAME=VALUE"),
        ] {
            m.env(text);
            let e = m.resolve(m.flags()).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--env-file: {} {want}", path.display())), "{e}");
        }
    }

    #[test]
    fn empty_values_and_unreadable_sources_only_matter_when_used() {
        let m = Machine::new();
        // An empty kernel argument and an empty env line are absent: the next source counts.
        m.cmdline("muster.token= muster.controller=https://k:1")
            .fw_cfg("token", &format!("{TOKEN}\0"))
            .env("MUSTER_CA_HASH=\n");
        let (cfg, _) = m.resolve(m.flags()).unwrap();
        assert_eq!(cfg.token.map(|t| t.to_string()).as_deref(), Some(TOKEN), "fw_cfg's, its NUL trimmed");
        assert!(cfg.ca_pin.is_none());
        // A malformed env file breaks nothing when the other sources give every setting...
        m.env("; a comment\nMUSTER_HEARTBEAT=1s\\\n");
        let flags = Flags {
            heartbeat: Some("3s".into()),
            ca_hash: Some(PIN.into()),
            state_dir: Some("/s".into()),
            service_checks: vec!["x".into()],
            ..m.flags()
        };
        let (cfg, _) = m.resolve(flags).unwrap();
        assert_eq!(cfg.heartbeat, Duration::from_secs(3));
        // ...and is an error as soon as a setting is looked for in it.
        let e = m.resolve(m.flags()).unwrap_err().to_string();
        assert!(
            e.starts_with("--env-file: ") && e.ends_with("line 2: backslashes are not supported in values"),
            "{e}"
        );
    }
}
