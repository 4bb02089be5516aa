//! `muster-agent`: the node daemon. See `muster-agent --help`.

use std::process::ExitCode;

use clap::Parser;
use muster_agent::settings::{Flags, Sources};
use muster_agent::{Agent, AgentError};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Logs to journald when its socket exists, else to stderr.
fn init_logging() {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::path::Path::new("/run/systemd/journal/socket")
        .exists()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    match journald {
        Some(j) => {
            let _ = tracing_subscriber::registry().with(j.with_filter(filter())).try_init();
        }
        None => {
            use std::io::IsTerminal;
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter());
            let _ = tracing_subscriber::registry().with(fmt).try_init();
        }
    }
}

/// `--apply-once FILE`: reconcile the node with a config file once and print the report.
fn apply_once(file: &std::path::Path, root: &std::path::Path, report_only: bool) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let cfg = match muster_machinery::config::parse(&text) {
        Ok((cfg, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            cfg
        }
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let report = muster_agent::reconcile::reconcile(
        &cfg,
        &muster_agent::effects::LinuxEffects::new(root),
        &muster_agent::reconcile::Pass { report_only, baseline: None },
    );
    match serde_json::to_string_pretty(&report) {
        Ok(j) => println!("{j}"),
        Err(e) => eprintln!("error: {e}"),
    }
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    muster_agent::init_crypto();
    let flags = Flags::parse();
    init_logging();
    if let Some(file) = &flags.apply_once {
        return apply_once(file, &flags.root, flags.report_only);
    }
    let mut sources = Sources::read(&flags);
    // A system installed to disk by Muster: the identity its installer left goes into the state
    // dir (the one its settings name) and the controller's settings into the env file, which
    // is read again then.
    if !flags.only_flags && !flags.no_apply_config {
        let state_dir = match (&flags.state_dir, sources.get("state_dir")) {
            (Some(d), _) => d.clone(),
            (None, Ok(Some((d, _)))) => d.into(),
            (None, _) => muster_agent::settings::DEFAULT_STATE_DIR.into(),
        };
        let root = muster_agent::install::root_device().unwrap_or_default();
        match muster_agent::install::import_identity(
            std::path::Path::new("/sys/class/block"),
            std::path::Path::new("/dev"),
            &root,
            &muster_agent::identity::StateDir::new(state_dir),
            &flags.env_file,
        ) {
            Ok(Some(id)) => {
                tracing::info!(machine = %id, "took the identity this system's installer left: machine {id}");
                sources = Sources::read(&flags);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not take the installer's identity: {e}"),
        }
    }
    for (key, origin) in sources.origins() {
        // The message repeats the fields: the journal shows a message without its fields.
        tracing::info!(setting = key, from = %origin, "setting found: {key} from {origin}");
    }
    let no_apply_config = flags.no_apply_config;
    let config_root = flags.config_root.clone();
    let namespaced_sysctls_only = flags.namespaced_sysctls_only;
    let (cfg, svc) = match flags.resolve_with(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let (agent, status) = Agent::new(cfg);
        let mut agent = agent.with_service_checks(svc.service_checks);
        if !no_apply_config {
            let mut fx = muster_agent::effects::LinuxEffects::new(config_root);
            if namespaced_sysctls_only {
                fx = fx.namespaced_sysctls_only();
            }
            agent = agent
                .with_effects(std::sync::Arc::new(fx))
                .with_disks(muster_agent::effects::LinuxDisks::default());
        }
        if let Some(addr) = svc.metrics_listen {
            match muster_agent::metrics::spawn(addr, agent.collector(), status.clone()).await {
                Ok(bound) => {
                    tracing::info!(%bound, "serving /metrics");
                    agent = agent.with_metrics_port(bound.port());
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot serve /metrics; continuing without"),
            }
        }
        agent.run(muster_util::shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ AgentError::Revoked { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
        Err(e) if e.is_settings() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
