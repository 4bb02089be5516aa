//! Muster's own programs as processes, for the tests and benchmarks: a `muster-controller serve`
//! on loopback in a temp dir (waited for through its `ports.json`), agents started against it,
//! and the `muster` CLI run with its musterconfig. Every address is on 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::process::{find_bin, wait_for, Proc};
use crate::LabError;

/// The addresses a controller bound, as it writes them to `ports.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Ports {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub pid: u32,
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A `muster-controller serve` process on loopback.
pub struct ControllerProc {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub ports: Ports,
}

impl ControllerProc {
    /// Starts a controller on `grpc`/`http` (use port 0 for any) with `data_dir`.
    pub fn start(data_dir: &Path, grpc: &str, http: &str, extra: &[&str]) -> Result<Self, LabError> {
        Self::start_wrapped(&[], data_dir, grpc, http, extra)
    }

    /// [`ControllerProc::start`] under a `wrapper` command that execs the rest (e.g. `prlimit
    /// --nofile=N:N --` or `ip netns exec NS`), so the process it waits for is the controller.
    pub fn start_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        grpc: &str,
        http: &str,
        extra: &[&str],
    ) -> Result<Self, LabError> {
        let ports_file = data_dir.join("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        std::fs::create_dir_all(data_dir)
            .map_err(LabError::io(format!("creating {}", data_dir.display())))?;
        let log = data_dir.with_extension(format!("log.{}", now_nanos()));
        let controller = find_bin("muster-controller")?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(controller);
                c
            }
            None => Command::new(controller),
        };
        cmd.args(["serve", "--grpc-listen", grpc, "--http-listen", http, "--data-dir"])
            .arg(data_dir)
            .args(extra);
        cmd.env("RUST_LOG", "info");
        let mut proc = Proc::spawn(&mut cmd, log)?;
        let ports = wait_for("controller ports.json", Duration::from_secs(60), || {
            if !proc.alive() {
                return Some(Err(LabError::Command {
                    command: "muster-controller serve".into(),
                    detail: format!("exited: {}", proc.log_text()),
                }));
            }
            let text = std::fs::read_to_string(&ports_file).ok()?;
            let p: Ports = serde_json::from_str(&text).ok()?;
            (p.pid == proc.pid()).then_some(Ok(p))
        })??;
        let ctl = Self { proc, data_dir: data_dir.to_owned(), ports };
        // `serve` leaves an existing musterconfig as `init` wrote it: point it at this port.
        point_musterconfig(&ctl.musterconfig(), &ctl.endpoint())?;
        Ok(ctl)
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.grpc.port())
    }

    pub fn musterconfig(&self) -> PathBuf {
        self.data_dir.join("musterconfig")
    }

    pub fn ca_pem(&self) -> Result<String, LabError> {
        let p = self.data_dir.join("ca.crt");
        std::fs::read_to_string(&p).map_err(LabError::io(format!("reading {}", p.display())))
    }

    /// The CA pin agents are started with.
    pub fn pin(&self) -> Result<String, LabError> {
        let pin = muster_machinery::pin::CaPin::of_cert_pem(&self.ca_pem()?).map_err(|e| {
            LabError::Command { command: "reading the controller's CA".into(), detail: e.to_string() }
        })?;
        Ok(pin.to_string())
    }

    /// Runs the `muster` CLI against this controller.
    pub fn cli(&self, args: &[&str]) -> Result<Output, LabError> {
        cli(&self.musterconfig(), args)
    }

    /// Runs the CLI and returns stdout, failing with stderr when it exits non-zero.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String, LabError> {
        let out = self.cli(args)?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("muster {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `muster machines -o json`, parsed.
    pub fn machines(&self) -> Result<Vec<serde_json::Value>, LabError> {
        let text = self.cli_ok(&["machines", "-o", "json"])?;
        let bad = |detail: String| LabError::Command { command: "muster machines -o json".into(), detail };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        v.as_array().cloned().ok_or_else(|| bad(format!("not an array: {v}")))
    }
}

/// `muster-controller init --data-dir DATA_DIR ARGS...`; returns the CA pin it printed.
pub fn init_controller(data_dir: &Path, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(find_bin("muster-controller")?)
        .arg("init")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io("running muster-controller init"))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("muster-controller init {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Points the musterconfig at `path` to `endpoint` (only when it names another).
pub fn point_musterconfig(path: &Path, endpoint: &str) -> Result<(), LabError> {
    use muster_machinery::musterconfig::MusterConfig;
    let bad = |detail: String| LabError::Command { command: format!("editing {}", path.display()), detail };
    let text = std::fs::read_to_string(path).map_err(LabError::io(format!("reading {}", path.display())))?;
    let mut mc = MusterConfig::from_yaml(&text).map_err(|e| bad(e.to_string()))?;
    if mc.endpoints == [endpoint] {
        return Ok(());
    }
    mc.endpoints = vec![endpoint.to_owned()];
    let yaml = mc.to_yaml().map_err(|e| bad(e.to_string()))?;
    muster_util::write_atomic(path, yaml.as_bytes(), 0o600)
        .map_err(LabError::io(format!("writing {}", path.display())))
}

/// Runs `muster --musterconfig PATH args...`.
pub fn cli(musterconfig: &Path, args: &[&str]) -> Result<Output, LabError> {
    Command::new(find_bin("muster")?)
        .arg("--musterconfig")
        .arg(musterconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io("running muster"))
}

/// The agent binary: `$MUSTER_AGENT_BIN` if set (e.g. the size-optimised
/// `target/agent/muster-agent`), else the workspace build.
pub fn agent_bin() -> Result<PathBuf, LabError> {
    match std::env::var_os("MUSTER_AGENT_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => find_bin("muster-agent"),
    }
}

/// A `muster-agent` process for `ctl`, never applying configs to this machine (it shares its
/// namespaces). An empty `token` starts it without one.
pub fn start_agent(
    ctl: &ControllerProc,
    token: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Result<Proc, LabError> {
    let parent = state_dir.parent().unwrap_or(state_dir);
    std::fs::create_dir_all(parent).map_err(LabError::io(format!("creating {}", parent.display())))?;
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(["--controller", &ctl.endpoint(), "--ca-hash", &ctl.pin()?, "--state-dir"])
        .arg(state_dir)
        // Settings from these flags only: not the host's kernel command line, fw_cfg or env file.
        .arg("--only-flags")
        // Test agents run in this machine's namespaces: never apply configs to it.
        .arg("--no-apply-config")
        .args(extra);
    // In the environment, not on the command line, where every user's `ps` would show it.
    if token.is_empty() {
        cmd.env_remove("MUSTER_TOKEN");
    } else {
        cmd.env("MUSTER_TOKEN", token);
    }
    cmd.env("RUST_LOG", "info");
    Proc::spawn(&mut cmd, state_dir.with_extension(format!("log.{}", now_nanos())))
}
