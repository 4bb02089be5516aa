//! `muster`: the operator's CLI. See `muster --help`.
//!
//! Results go to stdout (tables for people, `-o json|yaml` for scripts), everything else to
//! stderr; a failure is one `error: ...` line and exit status 1. Output into a closed pipe
//! (`muster machines | head -1`) ends the command quietly. One module per command group
//! (`tokens`, `machines`, `config`, `lab`), the views in `views`.

/// `print!` that returns a broken pipe as an error instead of panicking (use inside functions
/// returning `anyhow::Result`).
macro_rules! out {
    ($($t:tt)*) => { $crate::output::emit(&format!($($t)*))? };
}

/// `println!` counterpart of [`out!`].
macro_rules! outln {
    () => { $crate::output::emit("\n")? };
    ($($t:tt)*) => { $crate::output::emit(&format!("{}\n", format_args!($($t)*)))? };
}

mod config;
mod lab;
mod lab_monitoring;
mod lab_qemu;
mod lab_status;
mod lab_supervisor;
mod machines;
mod output;
mod tokens;
mod views;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use muster_cli::client::{self, Admin};
use muster_machinery::model::{parse_label, validate_cluster_name, Role};
use output::Output;

/// muster: run your fleet. List machines, hand out join tokens, assign roles, approve and revoke
/// nodes, watch their health, or start a local lab.
///
/// The controller is found through a musterconfig (written by `muster-controller init`):
/// --musterconfig PATH, else $MUSTERCONFIG, else ~/.muster/config.
#[derive(Parser, Debug)]
#[command(name = "muster", version, about, long_about)]
struct Cli {
    /// Path of the musterconfig (controller endpoints, CA, admin certificate)
    /// [default: $MUSTERCONFIG, else ~/.muster/config]
    #[arg(long, global = true, value_name = "PATH")]
    musterconfig: Option<PathBuf>,
    /// How long to wait for the controller before giving up (connecting and each call);
    /// 0 waits as long as it takes.
    ///
    /// Connecting to one endpoint gives up after this or 5s, whichever is shorter, so the next
    /// endpoint is tried; every call then gets this long. A stopped or unreachable controller
    /// fails with the endpoint and the deadline named. Not to be confused with --timeout, the
    /// try window of `muster config apply`.
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_request_timeout)]
    request_timeout: RequestTimeout,
    /// More log output on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Join tokens that let new machines enroll.
    #[command(subcommand)]
    Token(tokens::TokenCmd),
    /// List machines.
    Machines(machines::ListArgs),
    /// One machine in detail, and registrations of machines that will network-boot.
    #[command(subcommand)]
    Machine(machines::MachineCmd),
    /// Give a machine its role in a cluster.
    Assign {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// The machine's role: controlplane or worker.
        #[arg(long, value_parser = parse_role, value_name = "ROLE")]
        role: Role,
        /// Cluster name (a DNS label: lowercase letters, digits and '-').
        #[arg(long, value_parser = parse_cluster)]
        cluster: String,
        /// Reassign a machine that already has a role or cluster.
        #[arg(long)]
        force: bool,
    },
    /// Approve a pending machine (enrolled with a --pending or boot token).
    Approve {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
    },
    /// Revoke a machine's certificates: its stream closes at once and every later call is
    /// refused. It must enroll again with a new token.
    Revoke {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
    },
    /// Forget a machine (its certificates stop working too).
    Delete {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
    },
    /// Health of the fleet, or of one machine, with the reasons.
    Health {
        /// Machine id, unique id prefix, hostname or MAC (all machines if omitted).
        id: Option<String>,
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Machine configs: apply layers, diff, history, rollback, offline validation.
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Print a shell completion script, e.g. `source <(muster completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// A controller and agents on this machine, for trying Muster out.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Build node images with the agent baked in: a PXE bundle or a bootable ISO (no root needed).
    #[command(subcommand)]
    Image(muster_images::ImageCommand),
}

/// Ends the command with this exit status and nothing more to say (e.g. `config diff` found
/// differences: exit 1, as `kubectl diff`).
#[derive(Debug)]
pub(crate) struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// `--request-timeout`: a duration, or 0 for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestTimeout(Option<Duration>);

/// kubectl's form: a humantime duration (`1s`, `2m`, `1m30s`), `0` for no deadline.
fn parse_request_timeout(s: &str) -> Result<RequestTimeout, String> {
    if s.trim() == "0" {
        return Ok(RequestTimeout(None));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 10s, 2m; 0 for no deadline)"))?;
    Ok(RequestTimeout(Some(d).filter(|d| !d.is_zero())))
}

/// What every command may need: where the controller is, and how long to wait for it.
#[derive(Debug)]
pub(crate) struct Ctx {
    musterconfig: Option<PathBuf>,
    request_timeout: Option<Duration>,
}

impl Ctx {
    /// An admin client on the musterconfig's controller.
    pub(crate) async fn admin(&self) -> Result<Admin> {
        let path = client::musterconfig_path(self.musterconfig.as_deref())?;
        tracing::debug!(path = %path.display(), timeout = ?self.request_timeout, "using musterconfig");
        self.admin_at(&path).await
    }

    /// An admin client with the musterconfig at `path` (the lab's own).
    pub(crate) async fn admin_at(&self, path: &Path) -> Result<Admin> {
        Ok(Admin::connect_within(path, self.request_timeout).await?)
    }
}

pub(crate) fn parse_role(s: &str) -> Result<Role, String> {
    s.parse::<Role>().map_err(|e| e.to_string())
}

pub(crate) fn parse_cluster(s: &str) -> Result<String, String> {
    validate_cluster_name(s).map(|()| s.to_owned()).map_err(|e| e.to_string())
}

pub(crate) fn parse_label_arg(s: &str) -> Result<(String, String), String> {
    parse_label(s).map_err(|e| e.to_string())
}

/// A file's text, or standard input's for `-`.
pub(crate) fn read_input(file: &Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    }
    Ok(text)
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // -v: our own debug logs; -vv: everything's (tonic, hyper, rustls). RUST_LOG overrides.
    let level = match cli.verbose {
        0 => "warn",
        1 => "warn,muster=debug,muster_cli=debug",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing more to say to anyone.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Exit>().is_some() => {
            ExitCode::from(e.downcast_ref::<Exit>().map_or(1, |x| x.0))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx { musterconfig: cli.musterconfig, request_timeout: cli.request_timeout.0 };
    match cli.cmd {
        Cmd::Token(c) => c.run(&ctx).await,
        Cmd::Machines(args) => machines::list(&ctx, args).await,
        Cmd::Machine(c) => c.run(&ctx).await,
        Cmd::Assign { id, role, cluster, force } => {
            machines::Verb::Assign { id, role, cluster, force }.run(&ctx).await
        }
        Cmd::Approve { id } => machines::Verb::Approve { id }.run(&ctx).await,
        Cmd::Revoke { id } => machines::Verb::Revoke { id }.run(&ctx).await,
        Cmd::Delete { id } => machines::Verb::Delete { id }.run(&ctx).await,
        Cmd::Health { id, output } => machines::health(&ctx, id, output).await,
        Cmd::Config(c) => c.run(&ctx).await,
        Cmd::Completion { shell } => {
            // Into a buffer first: clap_complete panics if it cannot write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "muster", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Cmd::Lab(c) => lab::run(&c, &ctx).await,
        Cmd::Image(cmd) => {
            // Building takes seconds of blocking work: off the async threads.
            tokio::task::spawn_blocking(move || muster_images::run_command(cmd))
                .await
                .map_err(|e| anyhow::anyhow!("image builder: {e}"))?
                .map_err(anyhow::Error::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn arguments_are_checked_before_any_call() {
        let bad = [
            vec!["muster", "assign", "x", "--role", "master", "--cluster", "c"],
            vec!["muster", "assign", "x", "--role", "worker", "--cluster", "Bad_Name"],
            vec!["muster", "token", "create", "--label", "no-equals"],
            vec!["muster", "token", "create", "--ttl", "soon"],
            vec!["muster", "token", "create", "--uses", "0"],
        ];
        for args in bad {
            let e = Cli::try_parse_from(&args).unwrap_err().to_string();
            assert!(e.contains("invalid value"), "{args:?}: {e}");
        }
        assert!(Cli::try_parse_from(["muster", "assign", "x", "--role", "worker", "--cluster", "homelab"])
            .is_ok());
    }

    #[test]
    fn errors_name_the_flag() {
        let e = Cli::try_parse_from(["muster", "assign", "x", "--role", "master", "--cluster", "c"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--role") && e.contains("controlplane"), "{e}");
        let e = Cli::try_parse_from(["muster", "token", "create", "--label", "a=b", "--label", "=x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--label"), "{e}");
        let e =
            Cli::try_parse_from(["muster", "lab", "up", "--provisioner", "vbox"]).unwrap_err().to_string();
        assert!(e.contains("--provisioner") && e.contains("qemu"), "{e}");
    }

    #[test]
    fn request_timeout_is_global_in_kubectls_form() {
        let rt = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.request_timeout.0);
        assert_eq!(rt(&["muster", "machines"]).unwrap(), Some(Duration::from_secs(30)), "default");
        assert_eq!(
            rt(&["muster", "machines", "--request-timeout", "1s"]).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            rt(&["muster", "--request-timeout", "2m", "health"]).unwrap(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(rt(&["muster", "machines", "--request-timeout", "0"]).unwrap(), None, "0: no deadline");
        assert_eq!(rt(&["muster", "machines", "--request-timeout", "0s"]).unwrap(), None);
        let e = rt(&["muster", "machines", "--request-timeout", "soon"]).unwrap_err().to_string();
        assert!(e.contains("--request-timeout") && e.contains("0 for no deadline"), "{e}");
        // --timeout stays the try window of config apply, beside it.
        let c = Cli::try_parse_from([
            "muster",
            "config",
            "apply",
            "n1",
            "-f",
            "x.yaml",
            "--mode",
            "try",
            "--timeout",
            "90s",
            "--request-timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(c.request_timeout.0, Some(Duration::from_secs(5)));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--request-timeout <DURATION>") && help.contains("0 waits"), "{help}");
        assert!(help.contains("[default: 30s]"), "{help}");
    }

    #[test]
    fn token_create_defaults() {
        use crate::tokens::TokenCmd;
        let Cmd::Token(TokenCmd::Create { ttl, uses, labels, pending, .. }) =
            Cli::try_parse_from(["muster", "token", "create"]).unwrap().cmd
        else {
            panic!("not token create")
        };
        assert_eq!((ttl, uses, labels.len(), pending), (None, None, 0, false));
        let Cmd::Token(TokenCmd::Create { ttl, uses, labels, pending, .. }) = Cli::try_parse_from([
            "muster",
            "token",
            "create",
            "--ttl",
            "15m",
            "--uses",
            "3",
            "--label",
            "muster.dev/lab=true",
            "--pending",
        ])
        .unwrap()
        .cmd
        else {
            panic!("not token create")
        };
        assert_eq!(ttl, Some(Duration::from_secs(900)));
        assert_eq!(uses, Some(3));
        assert_eq!(labels, vec![("muster.dev/lab".to_owned(), "true".to_owned())]);
        assert!(pending);
    }

    #[test]
    fn every_verb_explains_itself() {
        fn walk(c: &clap::Command, path: &str) {
            for sub in c.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
                let p = format!("{path} {}", sub.get_name());
                assert!(sub.get_about().is_some(), "`{p}` has no help text");
                for a in sub.get_arguments().filter(|a| !a.is_hide_set() && a.get_id() != "help") {
                    assert!(a.get_help().is_some(), "`{p}` argument {} has no help text", a.get_id());
                }
                walk(sub, &p);
            }
        }
        walk(&Cli::command(), "muster");
    }

    #[test]
    fn statuses_become_one_clear_line() {
        let ep = "https://127.0.0.1:7443";
        let msg = |s: tonic::Status| muster_cli::client::explain(s, ep, None).to_string();
        assert_eq!(
            msg(tonic::Status::not_found("no machine matches \"x\"")),
            "no machine matches \"x\"",
            "the controller's own words pass through"
        );
        let local = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        let m = msg(local);
        assert!(m.starts_with("cannot reach the controller at https://127.0.0.1:7443: "), "{m}");
        assert!(m.contains("connection refused"), "{m}");
        let m = msg(tonic::Status::unavailable("store backend is down"));
        assert_eq!(m, "the controller at https://127.0.0.1:7443 is unavailable: store backend is down");
        assert!(msg(tonic::Status::permission_denied("admins only")).contains("credentials"));
        assert!(msg(tonic::Status::deadline_exceeded("")).contains("did not answer in time"));
        // With a deadline, it is named; tonic's own client-side timeout says the same.
        let within = |s: tonic::Status| {
            muster_cli::client::explain(s, ep, Some(Duration::from_millis(1500))).to_string()
        };
        let want =
            "the controller at https://127.0.0.1:7443 did not answer within 1s 500ms (--request-timeout)";
        assert_eq!(within(tonic::Status::deadline_exceeded("")), want);
        assert_eq!(within(tonic::Status::cancelled(tonic::TimeoutExpired(()).to_string())), want);
        assert_eq!(within(tonic::Status::cancelled("stream reset")), "stream reset");
        // What the controller says may quote a node: no raw control characters.
        assert_eq!(
            msg(tonic::Status::not_found("no machine matches \"\u{1b}]0;x\u{7}\n\"")),
            "no machine matches \"\\u{1b}]0;x\\u{7}\\n\""
        );
        assert_eq!(
            msg(tonic::Status::invalid_argument("")),
            "the controller answered InvalidArgument with no message"
        );
        assert_eq!(msg(tonic::Status::internal("boom")), "the controller failed: boom");
        assert_eq!(
            msg(tonic::Status::unimplemented("x")),
            "the controller at https://127.0.0.1:7443 does not support this call (is it older than this muster?): x"
        );
    }
}
