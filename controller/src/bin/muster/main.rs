//! `muster`: the operator's CLI. See `muster --help`.
//!
//! Results go to stdout (tables for people, `-o json|yaml` for scripts), everything else to
//! stderr; a failure is one `error: ...` line and exit status 1. Output into a closed pipe
//! (`muster machines | head -1`) ends the command quietly.

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

mod lab;
mod lab_qemu;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use muster_controller::client;
use muster_proto::model::{parse_label, validate_cluster_name, Role};
use muster_proto::pb;
use output::{machine_detail, machines_table, render, table, MachineView, Output};
use tonic::transport::Channel;

type Admin = pb::admin_service_client::AdminServiceClient<Channel>;

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
    Token(TokenCmd),
    /// List machines.
    Machines {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Refresh the table every 2 seconds until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
    },
    /// One machine in detail.
    #[command(subcommand)]
    Machine(MachineCmd),
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
    /// Approve a pending machine (enrolled with a --pending token).
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
    Config(ConfigCmd),
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

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token; prints only the token, so `T=$(muster token create)` works.
    Create {
        /// How long it stays valid (e.g. 30m, 1h, 7d) [default: 1h; 30d with --boot]
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// How many machines may enroll with it [default: 1; 1000 with --boot]
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        uses: Option<u32>,
        /// A boot token, to put in network-boot scripts (readable by anyone on the LAN): its
        /// machines always land `pending`, except ones pre-registered with `muster machine register`.
        #[arg(long, conflicts_with = "pending")]
        boot: bool,
        /// A label for machines enrolled with it (key=value). Repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
        /// Machines enrolled with it wait as `pending` until `muster approve`.
        #[arg(long)]
        pending: bool,
        /// A note shown in `muster token list`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (never their secrets).
    List {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a join token by its id: no more machines can enroll with it.
    Revoke {
        /// The token id (the part before the dot; see `muster token list`).
        id: String,
    },
}

#[derive(clap::Args, Debug)]
#[group(required = false, multiple = false)]
struct ConfigTarget {
    /// Machine id, unique id prefix, hostname or MAC: sets that machine's own layer.
    id: Option<String>,
    /// Set the layer of every machine in this cluster instead.
    #[arg(long, value_parser = parse_cluster)]
    cluster: Option<String>,
    /// Set the layer of every machine with this role instead.
    #[arg(long, value_parser = parse_role)]
    role: Option<Role>,
}

impl ConfigTarget {
    fn scope(&self) -> Result<(pb::ConfigScope, String)> {
        match (&self.id, &self.cluster, &self.role) {
            (Some(id), None, None) => Ok((pb::ConfigScope::Machine, id.clone())),
            (None, Some(c), None) => Ok((pb::ConfigScope::Cluster, c.clone())),
            (None, None, Some(r)) => Ok((pb::ConfigScope::Role, r.to_string())),
            _ => bail!("name one target: a machine ID, --cluster NAME or --role ROLE"),
        }
    }
}

/// How a new generation reaches the node.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ApplyMode {
    /// Apply now.
    Auto,
    /// Apply now; the agent reverts unless `muster config confirm` reaches it within --timeout.
    Try,
    /// Apply on the node's next boot.
    Staged,
}

#[derive(clap::Args, Debug)]
struct ModeArgs {
    /// auto, try or staged [default: try when the network section changes, else auto]
    #[arg(long, value_enum)]
    mode: Option<ApplyMode>,
    /// How long a try waits for `muster config confirm` before the agent reverts (1s..1h)
    /// [default: 60s]
    #[arg(long, value_parser = parse_try_timeout, value_name = "DURATION")]
    timeout: Option<std::time::Duration>,
}

impl ModeArgs {
    fn mode(&self) -> String {
        match self.mode {
            None => String::new(),
            Some(ApplyMode::Auto) => "auto".into(),
            Some(ApplyMode::Try) => "try".into(),
            Some(ApplyMode::Staged) => "staged".into(),
        }
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

fn parse_try_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 90s, 5m)"))?;
    if !(std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600)).contains(&d) {
        return Err("must be between 1s and 1h".into());
    }
    Ok(d)
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Set a config layer and push the result to the machines it affects. Layers merge as
    /// cluster, then role, then machine (RFC 7386: maps merge, lists replace, null deletes).
    Apply {
        #[command(flatten)]
        target: ConfigTarget,
        /// The layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
        /// Show what would change (a unified diff per machine) and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Keep a generation applied in try mode (else its agent reverts it when the timeout ends).
    Confirm {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
    },
    /// Show the unified diff of the rendered config a file would produce; changes nothing.
    Diff {
        #[command(flatten)]
        target: ConfigTarget,
        /// The layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Show a machine's own layer, or with --rendered the merged config and what its agent reported.
    Get {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Show the merged config (cluster, role and machine layers) and the agent's report.
        #[arg(long)]
        rendered: bool,
    },
    /// A machine's config generations, newest first.
    History {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Restore a machine's own layer as of an earlier generation (as a new generation).
    Rollback {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Generation to return to [default: the one before the current]
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Check a MachineConfig file without a controller: every error with its field path, then
    /// warnings. Exits 1 if there are errors.
    Validate {
        /// The YAML file, or - for standard input.
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the JSON Schema of MachineConfig (for editor completion and checks).
    Schema,
}

#[derive(Subcommand, Debug)]
enum MachineCmd {
    /// Show a machine with its full inventory.
    Get {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Pre-register a machine that will network-boot: its first enrollment (even with a public
    /// boot token) is accepted and takes this hostname, role, cluster and config. The
    /// registration is used up then; a second machine with the same MAC lands pending, flagged.
    Register {
        /// The MAC address it boots from (52:54:00:12:34:56).
        #[arg(long)]
        mac: String,
        /// Its SMBIOS UUID too, if known: both must match.
        #[arg(long)]
        uuid: Option<String>,
        /// The hostname it gets.
        #[arg(long)]
        hostname: Option<String>,
        /// Its role (needs --cluster).
        #[arg(long, value_parser = parse_role, requires = "cluster")]
        role: Option<Role>,
        /// Its cluster (needs --role).
        #[arg(long, value_parser = parse_cluster, requires = "role")]
        cluster: Option<String>,
        /// Its own config layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Boot it from its local disk: its boot script says `exit` instead of booting Muster.
        #[arg(long)]
        boot_local: bool,
        /// Replace an existing registration of the MAC.
        #[arg(long)]
        force: bool,
    },
    /// List registrations, used and unused.
    Registrations {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a registration by MAC.
    Unregister {
        /// The registered MAC address.
        mac: String,
    },
}

/// What an empty fleet looks like in a table (on stderr, like kubectl's "No resources found").
const NO_MACHINES: &str =
    "no machines yet (create a join token with `muster token create` and start agents with it)";

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse::<Role>().map_err(|e| e.to_string())
}

fn parse_cluster(s: &str) -> Result<String, String> {
    validate_cluster_name(s).map(|()| s.to_owned()).map_err(|e| e.to_string())
}

fn parse_label_arg(s: &str) -> Result<(String, String), String> {
    parse_label(s).map_err(|e| e.to_string())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(366 * 24 * 3600) {
        return Err("must be between 1s and 366d".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // -v: our own debug logs; -vv: everything's (tonic, hyper, rustls). RUST_LOG overrides.
    let level = match cli.verbose {
        0 => "warn",
        1 => "warn,muster=debug,muster_controller=debug",
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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One line per gRPC failure, saying what went wrong in the operator's terms. The controller's
/// own messages (not found, ambiguous query, already assigned, ...) are already written for
/// operators and pass through; transport failures and credential problems are explained.
fn explain(s: tonic::Status, endpoint: &str) -> anyhow::Error {
    use tonic::Code;
    let msg = s.message().to_owned();
    // A status with a source was made on this side of the connection (transport, TLS, timeout).
    let cause = std::error::Error::source(&s).map(muster_util::error_chain);
    let local = cause.is_some() || msg.contains("transport error");
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled if local => {
            let detail = match cause {
                Some(c) if !msg.is_empty() && !c.contains(&msg) => format!("{msg}: {c}"),
                Some(c) => c,
                None => msg,
            };
            let detail = detail.strip_prefix("transport error: ").unwrap_or(&detail).to_owned();
            anyhow::anyhow!("cannot reach the controller at {endpoint}: {}", client::with_tls_hint(detail))
        }
        Code::Unavailable => anyhow::anyhow!("the controller at {endpoint} is unavailable: {msg}"),
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow::anyhow!("the controller refused this musterconfig's credentials: {msg}")
        }
        Code::DeadlineExceeded => anyhow::anyhow!("the controller at {endpoint} did not answer in time"),
        Code::Unimplemented => anyhow::anyhow!(
            "the controller at {endpoint} does not support this call (is it older than this muster?): {msg}"
        ),
        Code::Internal => anyhow::anyhow!("the controller failed: {msg}"),
        _ if msg.is_empty() => anyhow::anyhow!("the controller answered {:?} with no message", s.code()),
        _ => anyhow::anyhow!("{msg}"),
    }
}

async fn connect(cli: &Cli) -> Result<(Admin, String)> {
    let path = client::musterconfig_path(cli.musterconfig.as_deref())?;
    tracing::debug!(path = %path.display(), "using musterconfig");
    let cfg = client::load_musterconfig(&path)?;
    let (ch, ep) = client::admin_channel(&cfg).await?;
    Ok((
        pb::admin_service_client::AdminServiceClient::new(ch)
            .max_decoding_message_size(client::MAX_RESPONSE_BYTES),
        ep,
    ))
}

async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Image(_) = &cli.cmd {
        let Cmd::Image(cmd) = cli.cmd else { bail!("unreachable") };
        // Building takes seconds of blocking work: off the async threads.
        return tokio::task::spawn_blocking(move || muster_images::run_command(cmd))
            .await
            .map_err(|e| anyhow::anyhow!("image builder: {e}"))?
            .map_err(anyhow::Error::from);
    }
    match &cli.cmd {
        Cmd::Completion { shell } => {
            // Into a buffer first: clap_complete panics if it cannot write.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "muster", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            return Ok(());
        }
        Cmd::Lab(cmd) => return lab::run(cmd).await,
        Cmd::Config(ConfigCmd::Schema) => {
            outln!("{}", serde_json::to_string_pretty(&muster_proto::config::json_schema())?);
            return Ok(());
        }
        Cmd::Config(ConfigCmd::Validate { file }) => return validate_config(file),
        _ => {}
    }
    if let Cmd::Config(cmd) = &cli.cmd {
        let (mut admin, ep) = connect(&cli).await?;
        return config_cmd(&mut admin, &ep, cmd).await;
    }
    let (mut admin, ep) = connect(&cli).await?;
    let e = |s| explain(s, &ep);
    match cli.cmd {
        Cmd::Token(TokenCmd::Create { ttl, uses, labels, pending, description, boot }) => {
            let r = admin
                .create_token(pb::CreateTokenRequest {
                    ttl_ms: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    uses: uses.unwrap_or(0),
                    labels: labels.into_iter().collect(),
                    pending,
                    description,
                    boot,
                })
                .await
                .map_err(e)?
                .into_inner();
            outln!("{}", r.token);
        }
        Cmd::Token(TokenCmd::List { output }) => {
            let tokens = admin.list_tokens(pb::ListTokensRequest {}).await.map_err(e)?.into_inner().tokens;
            #[derive(serde::Serialize)]
            struct T {
                id: String,
                created: Option<String>,
                expires: Option<String>,
                uses_total: u32,
                uses_left: u32,
                labels: std::collections::BTreeMap<String, String>,
                pending: bool,
                /// A boot token (public in boot scripts; machines land pending unless registered).
                boot: bool,
                revoked: bool,
                description: String,
            }
            let now = SystemTime::now();
            if output == Output::Table && tokens.is_empty() {
                eprintln!("no join tokens (create one with `muster token create`)");
            } else if output == Output::Table {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        let status = if t.revoked {
                            "revoked"
                        } else if t.uses_left == 0 {
                            "used"
                        } else if t.expires_unix_ms <= output::now_ms(now) {
                            "expired"
                        } else {
                            "valid"
                        };
                        vec![
                            t.id.clone(),
                            status.into(),
                            format!("{}/{}", t.uses_left, t.uses_total),
                            output::relative(t.expires_unix_ms, now),
                            match (t.boot, t.auto_accept) {
                                (true, _) => "boot".into(),
                                (false, true) => "no".into(),
                                (false, false) => "yes".into(),
                            },
                            t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    table(
                        &["ID", "STATUS", "USES LEFT", "EXPIRES", "PENDING", "LABELS", "DESCRIPTION"],
                        &rows
                    )
                );
            } else {
                let v: Vec<T> = tokens
                    .into_iter()
                    .map(|t| T {
                        id: t.id,
                        created: output::rfc3339(t.created_unix_ms),
                        expires: output::rfc3339(t.expires_unix_ms),
                        uses_total: t.uses_total,
                        uses_left: t.uses_left,
                        labels: t.labels.into_iter().collect(),
                        pending: !t.auto_accept,
                        boot: t.boot,
                        revoked: t.revoked,
                        description: t.description,
                    })
                    .collect();
                out!("{}", render(&v, output)?);
            }
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            let t = admin.revoke_token(pb::RevokeTokenRequest { id }).await.map_err(e)?.into_inner();
            outln!("token {} revoked", t.id);
        }
        Cmd::Machines { output, watch } => loop {
            let ms = admin.list_machines(pb::ListMachinesRequest {}).await.map_err(e)?.into_inner().machines;
            match output {
                Output::Table => {
                    if watch {
                        out!(
                            "\x1b[2J\x1b[H{} machines at {}\n\n",
                            ms.len(),
                            humantime::format_rfc3339_seconds(SystemTime::now())
                        );
                    }
                    if ms.is_empty() && !watch {
                        eprintln!("{NO_MACHINES}");
                    } else {
                        out!("{}", machines_table(&ms, SystemTime::now()));
                    }
                }
                o => {
                    let v: Vec<MachineView> = ms.iter().map(|m| MachineView::new(m, false)).collect();
                    out!("{}", render(&v, o)?);
                }
            }
            if !watch {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        },
        Cmd::Machine(MachineCmd::Get { id, output }) => {
            let m = admin.get_machine(pb::MachineRef { query: id }).await.map_err(e)?.into_inner();
            match output {
                Output::Table => out!("{}", machine_detail(&m, SystemTime::now())),
                o => out!("{}", render(&MachineView::new(&m, true), o)?),
            }
        }
        Cmd::Machine(MachineCmd::Register {
            mac,
            uuid,
            hostname,
            role,
            cluster,
            file,
            boot_local,
            force,
        }) => {
            let yaml = match &file {
                Some(f) => read_input(f)?,
                None => String::new(),
            };
            let r = admin
                .register_machine(pb::RegisterMachineRequest {
                    registration: Some(pb::Registration {
                        mac,
                        uuid: uuid.unwrap_or_default(),
                        hostname: hostname.unwrap_or_default(),
                        role: role.map_or(pb::Role::Unspecified, pb::Role::from).into(),
                        cluster: cluster.unwrap_or_default(),
                        yaml,
                        boot_local,
                        ..Default::default()
                    }),
                    force,
                })
                .await
                .map_err(e)?
                .into_inner();
            outln!(
                "registered {}{}: its first enrollment is accepted{}",
                r.mac,
                if r.hostname.is_empty() { String::new() } else { format!(" as {}", r.hostname) },
                if r.boot_local { " (boots from its local disk)" } else { "" }
            );
        }
        Cmd::Machine(MachineCmd::Registrations { output }) => {
            let regs = admin
                .list_registrations(pb::ListRegistrationsRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .registrations;
            #[derive(serde::Serialize)]
            struct R<'a> {
                mac: &'a str,
                uuid: &'a str,
                hostname: &'a str,
                role: String,
                cluster: &'a str,
                boot_local: bool,
                created: Option<String>,
                claimed_by: &'a str,
                claimed: Option<String>,
                yaml: &'a str,
            }
            let view: Vec<R<'_>> = regs
                .iter()
                .map(|r| R {
                    mac: &r.mac,
                    uuid: &r.uuid,
                    hostname: &r.hostname,
                    role: Role::from(pb::Role::try_from(r.role).unwrap_or_default()).to_string(),
                    cluster: &r.cluster,
                    boot_local: r.boot_local,
                    created: output::rfc3339(r.created_unix_ms),
                    claimed_by: &r.claimed_by,
                    claimed: (r.claimed_unix_ms > 0).then(|| output::rfc3339(r.claimed_unix_ms)).flatten(),
                    yaml: &r.yaml,
                })
                .collect();
            if output != Output::Table {
                out!("{}", render(&view, output)?);
            } else if view.is_empty() {
                eprintln!("no registrations (add one with `muster machine register --mac M`)");
            } else {
                let rows: Vec<Vec<String>> = view
                    .iter()
                    .map(|r| {
                        vec![
                            r.mac.into(),
                            r.hostname.into(),
                            if r.cluster.is_empty() {
                                String::new()
                            } else {
                                format!("{}/{}", r.cluster, r.role)
                            },
                            if r.boot_local { "local".into() } else { "network".into() },
                            if r.claimed_by.is_empty() { "-".into() } else { r.claimed_by.into() },
                        ]
                    })
                    .collect();
                out!("{}", table(&["MAC", "HOSTNAME", "CLUSTER/ROLE", "BOOT", "CLAIMED BY"], &rows));
            }
        }
        Cmd::Machine(MachineCmd::Unregister { mac }) => {
            let r = admin.delete_registration(pb::MachineRef { query: mac }).await.map_err(e)?.into_inner();
            outln!("registration {} removed", r.id);
        }
        Cmd::Assign { id, role, cluster, force } => {
            let m = admin
                .assign(pb::AssignRequest { query: id, role: pb::Role::from(role).into(), cluster, force })
                .await
                .map_err(e)?
                .into_inner();
            outln!("machine {} ({}) assigned role {role} in cluster {}", m.id, m.hostname, m.cluster);
        }
        Cmd::Approve { id } => {
            let m = admin.approve(pb::MachineRef { query: id }).await.map_err(e)?.into_inner();
            outln!("machine {} ({}) approved", m.id, m.hostname);
        }
        Cmd::Revoke { id } => {
            let m = admin.revoke(pb::MachineRef { query: id }).await.map_err(e)?.into_inner();
            outln!("machine {} ({}) revoked; it must enroll again with a new token", m.id, m.hostname);
        }
        Cmd::Delete { id } => {
            let r = admin.delete(pb::MachineRef { query: id }).await.map_err(e)?.into_inner();
            outln!("machine {} deleted", r.id);
        }
        Cmd::Health { id, output } => {
            let ms = match id {
                Some(id) => {
                    vec![admin.get_machine(pb::MachineRef { query: id }).await.map_err(e)?.into_inner()]
                }
                None => {
                    admin.list_machines(pb::ListMachinesRequest {}).await.map_err(e)?.into_inner().machines
                }
            };
            if output == Output::Table && ms.is_empty() {
                eprintln!("{NO_MACHINES}");
            } else if output == Output::Table {
                let rows: Vec<Vec<String>> = ms
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.hostname.clone(),
                            m.health.clone(),
                            if m.health_reasons.is_empty() {
                                "-".into()
                            } else {
                                m.health_reasons.join("; ")
                            },
                        ]
                    })
                    .collect();
                out!("{}", table(&["ID", "HOSTNAME", "HEALTH", "REASONS"], &rows));
            } else {
                #[derive(serde::Serialize)]
                struct H<'a> {
                    id: &'a str,
                    hostname: &'a str,
                    health: &'a str,
                    reasons: &'a [String],
                    snapshot: Option<&'a pb::HealthSnapshot>,
                }
                let v: Vec<H<'_>> = ms
                    .iter()
                    .map(|m| H {
                        id: &m.id,
                        hostname: &m.hostname,
                        health: &m.health,
                        reasons: &m.health_reasons,
                        snapshot: m.health_snapshot.as_ref(),
                    })
                    .collect();
                out!("{}", render(&v, output)?);
            }
        }
        Cmd::Completion { .. } | Cmd::Lab(_) | Cmd::Config(_) | Cmd::Image(_) => bail!("unreachable"),
    }
    Ok(())
}

fn read_input(file: &std::path::Path) -> Result<String> {
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

async fn config_cmd(admin: &mut Admin, ep: &str, cmd: &ConfigCmd) -> Result<()> {
    let e = |s| explain(s, ep);
    let apply = match cmd {
        ConfigCmd::Apply { target, file, dry_run, mode } => {
            Some((target, file, *dry_run, mode.mode(), mode.timeout_ms()))
        }
        ConfigCmd::Diff { target, file } => Some((target, file, true, String::new(), 0)),
        _ => None,
    };
    match cmd {
        _ if apply.is_some() => {
            let Some((target, file, dry_run, mode, try_timeout_ms)) = apply else { bail!("unreachable") };
            let (scope, target) = target.scope()?;
            let yaml = read_input(file)?;
            let r = admin
                .apply_config(pb::ApplyConfigRequest {
                    scope: scope.into(),
                    target,
                    yaml,
                    dry_run,
                    mode,
                    try_timeout_ms,
                })
                .await
                .map_err(e)?
                .into_inner();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if r.results.is_empty() {
                outln!(
                    "no machines are affected yet{}",
                    if dry_run { "" } else { "; the layer is saved for machines that join" }
                );
            }
            for m in &r.results {
                if dry_run {
                    if m.changed {
                        outln!("machine {} ({}):\n{}", m.machine_id, m.hostname, m.diff);
                    } else {
                        outln!("machine {} ({}): no change", m.machine_id, m.hostname);
                    }
                } else if m.changed {
                    outln!(
                        "machine {} ({}): generation {}{}",
                        m.machine_id,
                        m.hostname,
                        m.generation,
                        mode_note(m)
                    );
                } else {
                    outln!(
                        "machine {} ({}): unchanged at generation {}",
                        m.machine_id,
                        m.hostname,
                        m.generation
                    );
                }
            }
        }
        ConfigCmd::Get { id, rendered } => {
            let r = admin
                .get_config(pb::GetConfigRequest { query: id.clone(), rendered: *rendered })
                .await
                .map_err(e)?
                .into_inner();
            if *rendered {
                outln!(
                    "# machine {}: generation {} ({}, {}), running {}",
                    r.machine_id,
                    r.generation,
                    if r.mode.is_empty() { "auto" } else { &r.mode },
                    r.state,
                    r.applied_generation
                );
                if r.try_deadline_unix_ms > 0 {
                    outln!(
                        "# trying: reverts at {} unless `muster config confirm {}`",
                        output::rfc3339(r.try_deadline_unix_ms).unwrap_or_default(),
                        r.machine_id
                    );
                }
                for res in &r.resources {
                    outln!(
                        "# {} {}{}",
                        res.resource,
                        res.outcome,
                        if res.detail.is_empty() { String::new() } else { format!(": {}", res.detail) }
                    );
                }
                if !r.error.is_empty() {
                    outln!("# error: {}", r.error);
                }
            }
            if r.yaml.is_empty() {
                eprintln!("(no {} config)", if *rendered { "rendered" } else { "machine-level" });
            } else {
                out!("{}", r.yaml);
            }
        }
        ConfigCmd::History { id, output } => {
            let r = admin.config_history(pb::MachineRef { query: id.clone() }).await.map_err(e)?.into_inner();
            if *output == Output::Table {
                let rows: Vec<Vec<String>> = r
                    .revisions
                    .iter()
                    .map(|v| {
                        vec![
                            v.generation.to_string(),
                            output::rfc3339(v.created_unix_ms).unwrap_or_default(),
                            v.source.clone(),
                            if v.mode.is_empty() { "auto".into() } else { v.mode.clone() },
                            v.state.clone(),
                            if v.generation == r.applied_generation { "*".into() } else { String::new() },
                        ]
                    })
                    .collect();
                out!("{}", table(&["GENERATION", "CREATED", "SOURCE", "MODE", "STATE", "RUNNING"], &rows));
            } else {
                #[derive(serde::Serialize)]
                struct Rev<'a> {
                    generation: u64,
                    created: Option<String>,
                    source: &'a str,
                    mode: &'a str,
                    state: &'a str,
                    /// The generation the node runs now.
                    running: bool,
                    yaml: &'a str,
                }
                let v: Vec<Rev<'_>> = r
                    .revisions
                    .iter()
                    .map(|v| Rev {
                        generation: v.generation,
                        created: output::rfc3339(v.created_unix_ms),
                        source: &v.source,
                        mode: if v.mode.is_empty() { "auto" } else { &v.mode },
                        state: &v.state,
                        running: v.generation == r.applied_generation,
                        yaml: &v.yaml,
                    })
                    .collect();
                out!("{}", render(&v, *output)?);
            }
        }
        ConfigCmd::Rollback { id, to, mode } => {
            let r = admin
                .rollback_config(pb::RollbackConfigRequest {
                    query: id.clone(),
                    to_generation: to.unwrap_or(0),
                    mode: mode.mode(),
                    try_timeout_ms: mode.timeout_ms(),
                })
                .await
                .map_err(e)?
                .into_inner();
            for m in &r.results {
                outln!(
                    "machine {} ({}): generation {}{}",
                    m.machine_id,
                    m.hostname,
                    m.generation,
                    if m.changed { mode_note(m) } else { " (unchanged)".into() }
                );
            }
        }
        ConfigCmd::Confirm { id } => {
            let r = admin.confirm_config(pb::MachineRef { query: id.clone() }).await.map_err(e)?.into_inner();
            outln!("machine {}: generation {} confirmed; the agent keeps it", r.machine_id, r.generation);
        }
        ConfigCmd::Apply { .. } | ConfigCmd::Diff { .. } | ConfigCmd::Validate { .. } | ConfigCmd::Schema => {
        }
    }
    Ok(())
}

/// How a new generation is applied, for the apply/rollback summary line.
fn mode_note(m: &pb::MachineConfigResult) -> String {
    match m.mode.as_str() {
        "try" => format!(
            " (try: the agent reverts it unless `muster config confirm {}` within {})",
            m.machine_id,
            humantime::format_duration(std::time::Duration::from_millis(m.try_timeout_ms))
        ),
        "staged" => " (staged: applies on the node's next boot)".into(),
        _ => String::new(),
    }
}

/// `muster config validate`: prints every problem; fails if any is an error.
fn validate_config(file: &std::path::Path) -> Result<()> {
    let text = read_input(file)?;
    match muster_proto::config::parse(&text) {
        Ok((_, warnings)) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            outln!("{}: valid", file.display());
            Ok(())
        }
        Err(muster_proto::config::ConfigError::Invalid(errors)) => {
            for e in &errors {
                outln!("{}: {e}", file.display());
            }
            bail!("{} has {} error{}", file.display(), errors.len(), if errors.len() == 1 { "" } else { "s" })
        }
        Err(e) => bail!("{}: {e}", file.display()),
    }
}

#[cfg(test)]
mod tests {
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
    fn token_create_defaults() {
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
        let msg = |s: tonic::Status| explain(s, ep).to_string();
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
        assert!(msg(tonic::Status::invalid_argument("")).contains("InvalidArgument"));
        for m in [msg(tonic::Status::internal("boom\nsecond line")), msg(tonic::Status::unimplemented("x"))] {
            assert!(!m.is_empty());
        }
    }
}
