//! `muster config`: apply layers, diff, show, history, rollback, confirm, and offline validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use muster_machinery::config::{self, ConfigError};
use muster_machinery::rollout;
use muster_machinery::{ApplyMode, ConfirmPolicy, Role};
use muster_proto::pb;

use crate::output::{escape, render, rfc3339, Output};
use crate::views::{
    generation_state_name, history_table, layer_history_table, mode_name, outcome_name, LayerRevisionView,
    RevisionView,
};
use crate::{parse_cluster, parse_role, read_input, Ctx};

/// Which layer: a machine's own, a cluster's, a role's, or a role's in one cluster. A machine's
/// config merges them in the order cluster, role, role in its cluster, machine.
#[derive(clap::Args, Debug)]
pub struct ConfigTarget {
    /// Machine id, unique id prefix, hostname or MAC: that machine's own layer.
    id: Option<String>,
    /// The layer of every machine in this cluster (with --role: of that role in this cluster).
    #[arg(long, value_parser = parse_cluster)]
    cluster: Option<String>,
    /// The layer of every machine with this role (with --cluster: only in that cluster).
    #[arg(long, value_parser = parse_role)]
    role: Option<Role>,
}

/// A layer as the API names it: scope, target, cluster (for a role's layer in one cluster).
struct Layer {
    scope: pb::ConfigScope,
    target: String,
    cluster: String,
}

impl ConfigTarget {
    fn layer(&self) -> Result<Layer> {
        let (scope, target, cluster) = match (&self.id, &self.cluster, &self.role) {
            (Some(id), None, None) => (pb::ConfigScope::Machine, id.clone(), String::new()),
            (None, Some(c), None) => (pb::ConfigScope::Cluster, c.clone(), String::new()),
            (None, None, Some(r)) => (pb::ConfigScope::Role, r.to_string(), String::new()),
            (None, Some(c), Some(r)) => (pb::ConfigScope::Role, r.to_string(), c.clone()),
            _ => bail!(
                "name one layer: a machine ID, --cluster NAME, --role ROLE, or --role ROLE --cluster NAME"
            ),
        };
        Ok(Layer { scope, target, cluster })
    }

    fn machine(&self) -> Option<&str> {
        self.id.as_deref().filter(|_| self.cluster.is_none() && self.role.is_none())
    }
}

fn parse_mode(s: &str) -> Result<ApplyMode, String> {
    s.parse()
}

fn parse_try_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 90s, 5m)"))?;
    rollout::try_timeout(Some(d))
}

#[derive(clap::Args, Debug, Default)]
pub struct ModeArgs {
    /// How the new generation is applied: auto (now), try (now; the agent reverts it unless
    /// `muster config confirm` reaches it within --timeout) or staged (on the node's next boot)
    /// [default: try when the network section changes, else auto]
    #[arg(long, value_parser = parse_mode, value_name = "auto|try|staged")]
    mode: Option<ApplyMode>,
    /// How long a try waits for its confirmation before the agent reverts it (1s..1h)
    /// [default: 60s]
    #[arg(long, value_parser = parse_try_timeout, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// How a try is confirmed: auto (by the controller, once the agent has reconnected over the
    /// new config: proof the node still reaches it) or manual (only `muster config confirm`)
    #[arg(long, value_parser = parse_confirm, value_name = "auto|manual", default_value = "auto")]
    confirm: ConfirmPolicy,
}

fn parse_confirm(s: &str) -> Result<ConfirmPolicy, String> {
    s.parse()
}

impl ModeArgs {
    fn mode(&self) -> Option<i32> {
        self.mode.map(|m| pb::ApplyMode::from(m).into())
    }

    fn confirm(&self) -> Option<i32> {
        Some(pb::ConfirmPolicy::from(self.confirm).into())
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Set a config layer and push the result to the machines it affects. Layers merge as
    /// cluster, role, role in cluster, machine: maps merge key by key and `null` deletes a key
    /// (RFC 7386); lists of named things merge by their key (files by path, users, units and
    /// kernelModules by name, interfaces by name or mac, vlans by id) and an item with
    /// `$patch: delete` removes its namesake; other lists replace.
    Apply {
        #[command(flatten)]
        target: ConfigTarget,
        /// The layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
        /// Show what would change (a unified diff per machine) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Save a cluster or role layer even though no machine has it yet.
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Delete a layer (a machine's own, a cluster's or a role's) and push the result to the
    /// machines it was part of. Its history stays.
    Delete {
        #[command(flatten)]
        target: ConfigTarget,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Keep a generation applied in try mode (else its agent reverts it when the timeout ends).
    Confirm {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
    },
    /// Show the unified diff of the rendered config a file would produce; changes nothing.
    /// Exits 1 when something would change (as `kubectl diff` does), 0 when nothing would.
    Diff {
        #[command(flatten)]
        target: ConfigTarget,
        /// The layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Show a layer: a machine's own (with --rendered, the merged config and what its agent
    /// reported), a cluster's or a role's (with the machines it is part of).
    Get {
        #[command(flatten)]
        target: ConfigTarget,
        /// A machine's merged config (all its layers) and its agent's report.
        #[arg(long)]
        rendered: bool,
    },
    /// A machine's config generations, or a cluster's or role's layer revisions; newest first.
    History {
        #[command(flatten)]
        target: ConfigTarget,
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Restore a machine's own layer as of an earlier generation (as a new generation), or with
    /// --to 0 the node as it was before Muster: every file, value, address and route Muster
    /// changed goes back, until a config is applied to it again.
    Rollback {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Generation to return to; 0 is before Muster [default: the one before the current]
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

/// How a new generation is applied, for the apply/rollback summary line.
fn mode_note(m: &pb::MachineConfigResult, confirm: ConfirmPolicy) -> String {
    let window = humantime::format_duration(Duration::from_millis(m.try_timeout_ms));
    match m.mode.map(muster_proto::convert::apply_mode) {
        Some(Ok(ApplyMode::Try)) if confirm == ConfirmPolicy::Auto => format!(
            " (try: confirmed once the agent reconnects over it; reverted by the agent if that does not happen within {window})"
        ),
        Some(Ok(ApplyMode::Try)) => format!(
            " (try: the agent reverts it unless `muster config confirm {}` within {window})",
            m.machine_id
        ),
        Some(Ok(ApplyMode::Staged)) => " (staged: applies on the node's next boot)".into(),
        Some(Ok(ApplyMode::Auto) | Err(_)) | None => String::new(),
    }
}

impl ConfigCmd {
    pub async fn run(self, ctx: &Ctx) -> Result<()> {
        match self {
            ConfigCmd::Schema => {
                outln!("{}", serde_json::to_string_pretty(&config::json_schema())?);
                Ok(())
            }
            ConfigCmd::Validate { file } => validate(&file),
            ConfigCmd::Apply { target, file, dry_run, allow_empty, mode } => {
                apply(ctx, &target, &file, dry_run, allow_empty, &mode).await.map(|_| ())
            }
            ConfigCmd::Diff { target, file } => {
                if apply(ctx, &target, &file, true, true, &ModeArgs::default()).await? {
                    return Err(crate::Exit(1).into());
                }
                Ok(())
            }
            ConfigCmd::Delete { target, mode } => delete(ctx, &target, &mode).await,
            ConfigCmd::Get { target, rendered } => match target.machine() {
                Some(id) => get(ctx, id.to_owned(), rendered).await,
                None if rendered => {
                    bail!("--rendered is for a machine: a cluster or role layer is one part of it")
                }
                None => get_layer(ctx, &target).await,
            },
            ConfigCmd::History { target, output } => match target.machine() {
                Some(id) => history(ctx, id.to_owned(), output).await,
                None => layer_history(ctx, &target, output).await,
            },
            ConfigCmd::Rollback { id, to, mode } => {
                let mut a = ctx.admin().await?;
                let req = pb::RollbackConfigRequest {
                    query: id,
                    to_generation: to,
                    mode: mode.mode(),
                    try_timeout_ms: mode.timeout_ms(),
                    confirm: mode.confirm(),
                };
                let r = a.client.rollback_config(req).await.map_err(|s| a.explain(s))?.into_inner();
                for m in &r.results {
                    outln!(
                        "machine {} ({}): generation {}{}",
                        m.machine_id,
                        escape(&m.hostname),
                        m.generation,
                        if m.changed { mode_note(m, mode.confirm) } else { " (unchanged)".into() }
                    );
                }
                Ok(())
            }
            ConfigCmd::Confirm { id } => {
                let mut a = ctx.admin().await?;
                let r = a
                    .client
                    .confirm_config(pb::MachineRef { query: id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("machine {}: generation {} confirmed; the agent keeps it", r.machine_id, r.generation);
                Ok(())
            }
        }
    }
}

/// Applies (or with `dry_run` diffs) a layer; whether any machine's config changed (would change).
async fn apply(
    ctx: &Ctx,
    target: &ConfigTarget,
    file: &Path,
    dry_run: bool,
    allow_empty: bool,
    how: &ModeArgs,
) -> Result<bool> {
    let Layer { scope, target, cluster } = target.layer()?;
    let yaml = read_input(file)?;
    let mut a = ctx.admin().await?;
    let req = pb::ApplyConfigRequest {
        scope: scope.into(),
        target,
        yaml,
        dry_run,
        mode: how.mode(),
        try_timeout_ms: how.timeout_ms(),
        confirm: how.confirm(),
        cluster,
        allow_empty,
    };
    let r = a.client.apply_config(req).await.map_err(|s| a.explain(s))?.into_inner();
    print_results(&r, dry_run, how)?;
    Ok(r.results.iter().any(|m| m.changed))
}

fn print_results(r: &pb::ApplyConfigResponse, dry_run: bool, how: &ModeArgs) -> Result<()> {
    for w in &r.warnings {
        eprintln!("warning: {}", escape(w));
    }
    if r.results.is_empty() {
        outln!(
            "no machines are affected yet{}",
            if dry_run { "" } else { "; the layer is saved for machines that join" }
        );
    }
    for m in &r.results {
        match (dry_run, m.changed) {
            (true, true) => outln!("machine {} ({}):\n{}", m.machine_id, escape(&m.hostname), m.diff),
            (true, false) => outln!("machine {} ({}): no change", m.machine_id, escape(&m.hostname)),
            (false, true) => {
                outln!(
                    "machine {} ({}): generation {}{}",
                    m.machine_id,
                    escape(&m.hostname),
                    m.generation,
                    mode_note(m, how.confirm)
                )
            }
            (false, false) => {
                outln!(
                    "machine {} ({}): unchanged at generation {}",
                    m.machine_id,
                    escape(&m.hostname),
                    m.generation
                )
            }
        }
    }
    Ok(())
}

async fn delete(ctx: &Ctx, target: &ConfigTarget, how: &ModeArgs) -> Result<()> {
    let Layer { scope, target, cluster } = target.layer()?;
    let mut a = ctx.admin().await?;
    let req = pb::LayerRef {
        scope: scope.into(),
        target: target.clone(),
        cluster,
        mode: how.mode(),
        try_timeout_ms: how.timeout_ms(),
        confirm: how.confirm(),
    };
    let r = a.client.delete_layer(req).await.map_err(|s| a.explain(s))?.into_inner();
    outln!("layer {target} deleted");
    print_results(&r, false, how)
}

async fn history(ctx: &Ctx, id: String, output: Output) -> Result<()> {
    let mut a = ctx.admin().await?;
    let r =
        a.client.config_history(pb::MachineRef { query: id }).await.map_err(|s| a.explain(s))?.into_inner();
    let revs: Vec<RevisionView<'_>> =
        r.revisions.iter().map(|v| RevisionView::new(v, r.applied_generation)).collect();
    match output {
        Output::Table => out!("{}", history_table(&revs)),
        o => out!("{}", render(&revs, o)?),
    }
    Ok(())
}

async fn fetch_layer(ctx: &Ctx, target: &ConfigTarget) -> Result<pb::LayerResponse> {
    let Layer { scope, target, cluster } = target.layer()?;
    let mut a = ctx.admin().await?;
    let req = pb::LayerRef { scope: scope.into(), target, cluster, ..Default::default() };
    Ok(a.client.get_layer(req).await.map_err(|s| a.explain(s))?.into_inner())
}

async fn get_layer(ctx: &Ctx, target: &ConfigTarget) -> Result<()> {
    let l = fetch_layer(ctx, target).await?;
    outln!(
        "# layer {}: revision {}, part of {} machine(s){}",
        l.key,
        l.revision,
        l.machines.len(),
        if l.machines.is_empty() { String::new() } else { format!(": {}", escape(&l.machines.join(", "))) }
    );
    if l.yaml.is_empty() {
        eprintln!("(layer {} is not set)", l.key);
    } else {
        out!("{}", l.yaml);
    }
    Ok(())
}

async fn layer_history(ctx: &Ctx, target: &ConfigTarget, output: Output) -> Result<()> {
    let l = fetch_layer(ctx, target).await?;
    let revs: Vec<LayerRevisionView<'_>> = l.revisions.iter().map(LayerRevisionView::new).collect();
    match output {
        Output::Table if revs.is_empty() => eprintln!("layer {} has no history", l.key),
        Output::Table => out!("{}", layer_history_table(&revs)),
        o => out!("{}", render(&revs, o)?),
    }
    Ok(())
}

async fn get(ctx: &Ctx, id: String, rendered: bool) -> Result<()> {
    let mut a = ctx.admin().await?;
    let r = a
        .client
        .get_config(pb::GetConfigRequest { query: id, rendered })
        .await
        .map_err(|s| a.explain(s))?
        .into_inner();
    if rendered {
        outln!(
            "# machine {}: generation {} ({}, {}), running {}",
            r.machine_id,
            r.generation,
            mode_name(r.mode),
            generation_state_name(r.state),
            r.applied_generation
        );
        if r.try_deadline_unix_ms > 0 {
            outln!(
                "# trying: reverts at {} unless `muster config confirm {}`",
                rfc3339(r.try_deadline_unix_ms).unwrap_or_default(),
                r.machine_id
            );
        }
        for res in &r.resources {
            outln!(
                "# {} {}{}",
                escape(&res.resource),
                outcome_name(res.outcome),
                if res.detail.is_empty() { String::new() } else { format!(": {}", escape(&res.detail)) }
            );
        }
        if !r.error.is_empty() {
            outln!("# error: {}", escape(&r.error));
        }
    }
    if r.yaml.is_empty() {
        eprintln!("(no {} config)", if rendered { "rendered" } else { "machine-level" });
    } else {
        out!("{}", r.yaml);
    }
    Ok(())
}

/// `muster config validate`: prints every problem; fails if any is an error.
fn validate(file: &Path) -> Result<()> {
    let text = read_input(file)?;
    match config::parse(&text) {
        Ok((_, warnings)) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            outln!("{}: valid", file.display());
            Ok(())
        }
        Err(ConfigError::Invalid(errors)) => {
            for e in &errors {
                outln!("{}: {e}", file.display());
            }
            bail!("{} has {} error{}", file.display(), errors.len(), if errors.len() == 1 { "" } else { "s" })
        }
        Err(e) => bail!("{}: {e}", file.display()),
    }
}
