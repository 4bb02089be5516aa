//! The config rollout on the node: a state machine over the generations the controller sends.
//!
//! - `auto`: applied now, saved as the running generation.
//! - `try`: the running generation is kept in `try.json` with a deadline, the new one applied;
//!   unless a confirmation arrives in time, [`Rollout::revert_if_due`] goes back (a try that cut
//!   the node off the controller comes back by itself). A reverted generation is not tried again.
//! - `staged`: kept in `staged.json`, applied at the first start in a new boot.
//!
//! Between generations, drift passes re-run the reconcilers against the running generation and
//! correct (or with `drift: report` only report) what changed behind Muster's back. Every report
//! is a [`GenerationReport`]; reports made with no stream open wait in the outbox.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_machinery::config::{self, DriftPolicy};
use muster_machinery::rollout::DEFAULT_TRY_TIMEOUT;
use muster_machinery::{ApplyMode, ConfirmPolicy, GenerationState, Outcome};
use tokio::sync::{mpsc, watch, Notify};

use crate::agent::AgentStatus;
use crate::baseline::{Baseline, Recording};
use crate::effects::Effects;
use crate::generations::{boot_id, Generations, PendingTry, SavedConfig, StagedConfig};
use crate::reconcile::{claimed, reconcile, Pass, Report, ResourceStatus};
use crate::renewal::now_unix_ms;

/// A generation as the controller sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub generation: u64,
    /// Rendered MachineConfig YAML.
    pub yaml: String,
    pub mode: ApplyMode,
    /// For a try: how long to wait for confirmation (`None`: the default).
    pub try_timeout: Option<Duration>,
    /// The operator (or the controller, automatically) confirmed this (try) generation.
    pub confirmed: bool,
    /// How a try is confirmed.
    pub confirm: ConfirmPolicy,
}

/// What the agent tells the controller about a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationReport {
    pub generation: u64,
    pub state: GenerationState,
    /// The generation the node runs now (after a revert: the one it went back to).
    pub current_generation: u64,
    /// Why it was not applied at all (invalid, cannot be saved, ...); empty otherwise.
    pub error: String,
    pub resources: Vec<ResourceStatus>,
    /// Sent over a connection opened after the try was applied (proof for automatic
    /// confirmation).
    pub reconnected: bool,
}

impl GenerationReport {
    fn refused(generation: u64, state: GenerationState, running: u64, error: String) -> Self {
        Self {
            generation,
            state,
            current_generation: running,
            error,
            resources: Vec::new(),
            reconnected: false,
        }
    }

    /// Whether the hostname was changed by this pass (the controller then hears the new name).
    pub fn changed_hostname(&self) -> bool {
        self.resources
            .iter()
            .any(|r| r.resource == "hostname" && matches!(r.outcome, Outcome::Applied | Outcome::Restored))
    }
}

/// The config that manages nothing: applying it puts everything back as before Muster.
pub const EMPTY_CONFIG: &str = "apiVersion: muster/v1alpha1\nkind: MachineConfig\n";

/// The rollout state machine of one node.
pub struct Rollout {
    /// How configs reach the node; `None`: configs are recorded and reported, not applied.
    effects: Option<Arc<dyn Effects>>,
    generations: Generations,
    /// What the node had before Muster changed it, restored when a config lets go of it.
    baseline: Baseline,
    boot_id_file: PathBuf,
    status: watch::Sender<AgentStatus>,
    /// The hostname the applied config set (reported instead of a hint).
    config_hostname: Mutex<Option<String>>,
    /// Resources the last drift pass found off (to report only changes).
    last_drift: Mutex<Vec<(String, Outcome)>>,
    /// Wakes the try watcher when a try starts or ends.
    try_wake: Notify,
    /// The report of the try being applied, resent as proof after reconnecting.
    last_try_report: Mutex<Option<GenerationReport>>,
    outbox_tx: mpsc::UnboundedSender<GenerationReport>,
    outbox_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<GenerationReport>>,
}

impl Rollout {
    pub fn new(
        effects: Option<Arc<dyn Effects>>,
        state_dir: &std::path::Path,
        boot_id_file: PathBuf,
        status: watch::Sender<AgentStatus>,
    ) -> Self {
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        Self {
            effects,
            generations: Generations::new(state_dir),
            baseline: Baseline::load(state_dir),
            boot_id_file,
            status,
            config_hostname: Mutex::new(None),
            last_drift: Mutex::new(Vec::new()),
            try_wake: Notify::new(),
            last_try_report: Mutex::new(None),
            outbox_tx,
            outbox_rx: tokio::sync::Mutex::new(outbox_rx),
        }
    }

    /// Reports waiting for a stream; the session holds it while it runs.
    pub async fn outbox(&self) -> tokio::sync::MutexGuard<'_, mpsc::UnboundedReceiver<GenerationReport>> {
        self.outbox_rx.lock().await
    }

    fn send_later(&self, r: GenerationReport) {
        // The receiver lives as long as `self`.
        let _ = self.outbox_tx.send(r);
    }

    /// The hostname the running config set, if any.
    pub fn hostname(&self) -> Option<String> {
        self.config_hostname.lock().ok().and_then(|h| h.clone())
    }

    /// Tells watchers (status) which generation is being tried, and wakes the try watcher.
    fn try_changed(&self) {
        let trying = self.generations.pending_try().map(|t| t.generation);
        self.status.send_modify(|s| s.trying = trying);
        self.try_wake.notify_one();
    }

    fn running(&self) -> u64 {
        self.status.borrow().config_generation
    }

    /// Converges to the last config the node was given, without waiting for the controller: a
    /// generation staged for the next boot if this is a new boot, else the running one.
    pub fn converge_at_start(&self) {
        self.try_changed();
        if let Some(st) = self.generations.staged() {
            let now = boot_id(&self.boot_id_file);
            if !now.is_empty() && now != st.boot_id {
                tracing::info!(generation = st.generation, "new boot: applying the staged config");
                let reverted = self.generations.current().map_or(0, |c| c.reverted_generation);
                let saved =
                    SavedConfig { generation: st.generation, yaml: st.yaml, reverted_generation: reverted };
                let report = self.apply_and_save(&saved, GenerationState::Applied);
                if let Err(e) = self.generations.clear_staged() {
                    tracing::warn!(error = %e, "could not clear the staged config");
                }
                self.send_later(report);
                return;
            }
        }
        if let Some(saved) = self.generations.current() {
            let _ = self.apply(&saved);
        }
    }

    /// Reverts tries whose deadline passed unconfirmed; runs for the agent's whole life,
    /// connected or not (a try that cut the node off must still come back).
    pub async fn watch_tries(&self) {
        loop {
            let changed = self.try_wake.notified();
            let Some(t) = self.generations.pending_try() else {
                changed.await;
                continue;
            };
            let left = u64::try_from(t.deadline_unix_ms - now_unix_ms()).unwrap_or(0);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(left)) => {
                    if let Some(report) = self.revert_if_due(now_unix_ms()) {
                        self.send_later(report);
                    }
                }
                () = changed => {}
            }
        }
    }

    /// Goes back from an unconfirmed try whose deadline is at or before `now_ms`.
    pub fn revert_if_due(&self, now_ms: i64) -> Option<GenerationReport> {
        let t = self.generations.pending_try().filter(|t| t.deadline_unix_ms <= now_ms)?;
        Some(self.revert(&t))
    }

    fn revert(&self, t: &PendingTry) -> GenerationReport {
        let secs = t.timeout_ms / 1000;
        // Back to the generation before, or with none, to the node as it was before Muster.
        let prev = match &t.previous {
            Some(prev) => SavedConfig { reverted_generation: t.generation, ..prev.clone() },
            None => {
                SavedConfig { generation: 0, yaml: EMPTY_CONFIG.into(), reverted_generation: t.generation }
            }
        };
        tracing::warn!(
            generation = t.generation,
            back_to = prev.generation,
            "try not confirmed within {secs}s: reverting"
        );
        let report = self.apply_and_save(&prev, GenerationState::Applied);
        let (current, resources) = (prev.generation, report.resources);
        if let Err(e) = self.generations.clear_try() {
            tracing::warn!(error = %e, "could not clear the try");
        }
        self.try_changed();
        if current == 0 {
            self.status.send_modify(|s| s.config_generation = 0);
        }
        GenerationReport {
            generation: t.generation,
            state: GenerationState::Reverted,
            current_generation: current,
            error: format!("not confirmed within {secs}s: reverted to generation {current}"),
            resources,
            reconnected: false,
        }
    }

    /// A generation from the controller, by its mode.
    pub fn on_update(&self, u: Update) -> GenerationReport {
        let current = self.generations.current();
        let running = current.as_ref().map_or(0, |s| s.generation);
        let reverted = current.as_ref().map_or(0, |s| s.reverted_generation);
        let new =
            SavedConfig { generation: u.generation, yaml: u.yaml.clone(), reverted_generation: reverted };
        if let Err(e) = config::parse(&new.yaml) {
            // Nothing is applied or saved; the node keeps what it runs.
            tracing::warn!(generation = u.generation, error = %e, "invalid config not applied");
            return GenerationReport::refused(
                u.generation,
                GenerationState::Failed,
                running,
                format!("invalid config: {e}"),
            );
        }
        match u.mode {
            ApplyMode::Try => self.on_try(u, new, current, running, reverted),
            ApplyMode::Staged if running != u.generation => {
                let st = StagedConfig {
                    generation: u.generation,
                    yaml: new.yaml,
                    boot_id: boot_id(&self.boot_id_file),
                };
                match self.generations.set_staged(&st) {
                    Ok(()) => {
                        tracing::info!(generation = u.generation, "config staged for the next boot");
                        GenerationReport::refused(
                            u.generation,
                            GenerationState::Staged,
                            running,
                            String::new(),
                        )
                    }
                    Err(e) => GenerationReport::refused(
                        u.generation,
                        GenerationState::Failed,
                        running,
                        format!("cannot stage: {e}"),
                    ),
                }
            }
            ApplyMode::Auto | ApplyMode::Staged => {
                // Auto (or a staged generation this boot already runs): now. A newer generation
                // ends any try or staging that came before it.
                if self.generations.pending_try().is_some_and(|t| t.generation < u.generation) {
                    if let Err(e) = self.generations.clear_try() {
                        tracing::warn!(error = %e, "could not clear the try");
                    }
                    self.try_changed();
                }
                if self.generations.staged().is_some_and(|s| s.generation <= u.generation) {
                    if let Err(e) = self.generations.clear_staged() {
                        tracing::warn!(error = %e, "could not clear the staged config");
                    }
                }
                self.apply_and_save(&new, GenerationState::Applied)
            }
        }
    }

    fn on_try(
        &self,
        u: Update,
        new: SavedConfig,
        current: Option<SavedConfig>,
        running: u64,
        reverted: u64,
    ) -> GenerationReport {
        if u.generation == reverted {
            // Tried and reverted already: not again (apply a new generation to retry).
            return GenerationReport::refused(
                u.generation,
                GenerationState::Reverted,
                running,
                format!("reverted earlier (not confirmed in time); running generation {running}"),
            );
        }
        let pending = self.generations.pending_try().filter(|t| t.generation == u.generation);
        if pending.is_some() || running == u.generation {
            if u.confirmed && pending.is_some() {
                tracing::info!(generation = u.generation, "try confirmed");
                if let Err(e) = self.generations.clear_try() {
                    tracing::warn!(error = %e, "could not clear the try");
                }
                self.try_changed();
            }
            return self.apply(&new);
        }
        if u.confirmed {
            // Confirmed before this agent ever tried it (it was away): keep it.
            return self.apply_and_save(&new, GenerationState::Applied);
        }
        let timeout = u.try_timeout.unwrap_or(DEFAULT_TRY_TIMEOUT);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let t = PendingTry {
            generation: u.generation,
            deadline_unix_ms: now_unix_ms().saturating_add(i64::try_from(timeout_ms).unwrap_or(i64::MAX)),
            timeout_ms,
            previous: current.filter(|s| s.generation > 0),
            auto_confirm: u.confirm == ConfirmPolicy::Auto,
        };
        if let Err(e) = self.generations.set_pending_try(&t) {
            tracing::warn!(error = %e, "could not save the try; applying it would risk no revert");
            return GenerationReport::refused(
                u.generation,
                GenerationState::Failed,
                running,
                format!("cannot save the try state: {e}"),
            );
        }
        tracing::info!(generation = u.generation, timeout_ms, "trying a config: reverts unless confirmed");
        self.try_changed();
        let r = self.apply_and_save(&new, GenerationState::Trying);
        if let Ok(mut last) = self.last_try_report.lock() {
            *last = Some(r.clone());
        }
        r
    }

    /// A try waiting for automatic confirmation: the report to send, marked as coming over a
    /// new connection, once the agent has reconnected.
    pub fn proof_of_reach(&self) -> Option<GenerationReport> {
        let t = self.generations.pending_try().filter(|t| t.auto_confirm)?;
        let last =
            self.last_try_report.lock().ok().and_then(|l| l.clone()).filter(|r| r.generation == t.generation);
        let mut r = last.unwrap_or_else(|| GenerationReport {
            generation: t.generation,
            state: GenerationState::Trying,
            current_generation: t.generation,
            error: String::new(),
            resources: Vec::new(),
            reconnected: false,
        });
        r.state = GenerationState::Trying;
        r.reconnected = true;
        Some(r)
    }

    /// Checks the node against the running config: corrects drift, or with `drift: report`
    /// only reports it. A report goes up only when the set of drifted resources changes.
    pub fn drift_pass(&self) -> Option<GenerationReport> {
        let fx = self.effects.as_ref()?;
        let saved = self.generations.current()?;
        if self.running() != saved.generation {
            return None;
        }
        let (cfg, _) = config::parse(&saved.yaml).ok()?;
        let report_only = cfg.drift == Some(DriftPolicy::Report);
        let rec = Recording { fx: fx.as_ref(), baseline: &self.baseline };
        let mut report = reconcile(&cfg, &rec, &Pass { report_only, baseline: Some(&self.baseline) });
        for r in &mut report.resources {
            if r.outcome == Outcome::Applied {
                r.outcome = Outcome::Corrected;
            }
        }
        let off: Vec<(String, Outcome)> = report
            .resources
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::Unchanged | Outcome::Skipped))
            .map(|r| (r.resource.clone(), r.outcome))
            .collect();
        {
            let mut last = self.last_drift.lock().ok()?;
            if *last == off {
                return None;
            }
            last.clone_from(&off);
        }
        if !off.is_empty() {
            tracing::warn!(drifted = ?off.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), report_only, "the node drifted from its config");
        }
        Some(self.report_of(saved.generation, report))
    }

    fn report_of(&self, generation: u64, report: Report) -> GenerationReport {
        let applied = !report.failed() && !report.drifted();
        let trying = self.generations.pending_try().is_some_and(|t| t.generation == generation);
        GenerationReport {
            generation,
            state: match (trying, applied) {
                (true, _) => GenerationState::Trying,
                (false, true) => GenerationState::Applied,
                (false, false) => GenerationState::Failed,
            },
            current_generation: generation,
            error: String::new(),
            resources: report.resources,
            reconnected: false,
        }
    }

    /// Saves `saved` as the running generation, then applies it.
    fn apply_and_save(&self, saved: &SavedConfig, state: GenerationState) -> GenerationReport {
        if let Err(e) = self.generations.set_current(saved) {
            tracing::warn!(error = %e, "could not save the config");
        }
        let mut r = self.apply(saved);
        if r.error.is_empty() && state == GenerationState::Trying {
            r.state = state;
        }
        r
    }

    /// Validates and applies one generation through the effects.
    fn apply(&self, saved: &SavedConfig) -> GenerationReport {
        let fail = |error: String| {
            tracing::warn!(generation = saved.generation, %error, "config not applied");
            GenerationReport::refused(saved.generation, GenerationState::Failed, self.running(), error)
        };
        let cfg = match config::parse(&saved.yaml) {
            Ok((cfg, _)) => cfg,
            Err(e) => return fail(format!("invalid config: {e}")),
        };
        // Service checks only observe: they follow the config even where it is only recorded.
        self.status.send_modify(|s| s.service_checks.clone_from(&cfg.service_checks));
        let Some(fx) = &self.effects else {
            return fail("this agent does not apply configs (started with --no-apply-config)".into());
        };
        // A new generation is applied whatever its drift policy; `drift: report` governs the
        // periodic drift passes, not this. Then whatever it no longer manages goes back to how
        // it was before Muster.
        let rec = Recording { fx: fx.as_ref(), baseline: &self.baseline };
        let mut report = reconcile(&cfg, &rec, &Pass { report_only: false, baseline: Some(&self.baseline) });
        for (key, r) in self.baseline.restore_unclaimed(fx.as_ref(), &claimed(&cfg, fx.as_ref())) {
            report.restored(key, r);
        }
        let applied = !report.failed();
        if applied {
            self.status.send_modify(|s| s.config_generation = saved.generation);
        }
        if let Ok(mut d) = self.last_drift.lock() {
            d.clear();
        }
        // A config without a hostname gives the node's own back (restored from the baseline).
        if let Ok(mut slot) = self.config_hostname.lock() {
            slot.clone_from(&cfg.hostname.as_ref().map(|h| h.to_string()));
        }
        tracing::info!(generation = saved.generation, writes = report.writes, applied, "config reconciled");
        self.report_of(saved.generation, report)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::effects::MemoryEffects;

    struct Node {
        _dir: tempfile::TempDir,
        fx: Arc<MemoryEffects>,
        rollout: Rollout,
        status: watch::Receiver<AgentStatus>,
        boot_id: PathBuf,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let boot_id = dir.path().join("boot_id");
        std::fs::write(&boot_id, "boot-1\n").unwrap();
        let fx = Arc::new(MemoryEffects::default());
        let (tx, status) = watch::channel(AgentStatus::default());
        let rollout = Rollout::new(Some(fx.clone()), dir.path(), boot_id.clone(), tx);
        Node { _dir: dir, fx, rollout, status, boot_id }
    }

    fn cfg(hostname: &str) -> String {
        format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: {hostname}\n")
    }

    fn update(generation: u64, hostname: &str, mode: ApplyMode) -> Update {
        Update {
            generation,
            yaml: cfg(hostname),
            mode,
            try_timeout: None,
            confirmed: false,
            confirm: ConfirmPolicy::Manual,
        }
    }

    impl Node {
        fn hostname(&self) -> String {
            self.fx.hostname.lock().unwrap().clone()
        }
        fn running(&self) -> u64 {
            self.status.borrow().config_generation
        }
        /// A restarted agent on the same node and state dir.
        fn restart(&mut self) {
            let (tx, status) = watch::channel(AgentStatus::default());
            self.rollout = Rollout::new(Some(self.fx.clone()), self._dir.path(), self.boot_id.clone(), tx);
            self.status = status;
        }
    }

    #[test]
    fn auto_applies_and_saves_the_running_generation() {
        let n = node();
        let r = n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        assert_eq!((r.state, r.current_generation), (GenerationState::Applied, 1), "{r:?}");
        assert_eq!((n.hostname(), n.running()), ("a".into(), 1));
        assert_eq!(n.rollout.hostname().as_deref(), Some("a"));
    }

    #[test]
    fn an_invalid_generation_changes_nothing() {
        let n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        let bad = Update { yaml: "hostname: [".into(), ..update(2, "b", ApplyMode::Auto) };
        let r = n.rollout.on_update(bad);
        assert_eq!((r.state, r.current_generation), (GenerationState::Failed, 1));
        assert!(r.error.starts_with("invalid config"), "{}", r.error);
        assert_eq!((n.hostname(), n.running()), ("a".into(), 1));
    }

    #[test]
    fn an_unconfirmed_try_reverts_at_its_deadline_and_is_not_tried_again() {
        let n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        let r = n.rollout.on_update(update(2, "b", ApplyMode::Try));
        assert_eq!(r.state, GenerationState::Trying);
        assert_eq!(n.hostname(), "b");
        assert!(n.rollout.revert_if_due(now_unix_ms()).is_none(), "not before the deadline");
        let r = n.rollout.revert_if_due(now_unix_ms() + 61_000).unwrap();
        assert_eq!((r.generation, r.state, r.current_generation), (2, GenerationState::Reverted, 1));
        assert_eq!((n.hostname(), n.running()), ("a".into(), 1));
        let again = n.rollout.on_update(update(2, "b", ApplyMode::Try));
        assert_eq!(again.state, GenerationState::Reverted, "a reverted generation is not retried");
        assert_eq!(n.hostname(), "a");
    }

    #[test]
    fn a_confirmed_try_stays_and_survives_a_restart() {
        let mut n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        n.rollout.on_update(update(2, "b", ApplyMode::Try));
        n.restart();
        n.rollout.converge_at_start();
        assert_eq!(n.hostname(), "b", "the try is still applied after a restart");
        let r = n.rollout.on_update(Update { confirmed: true, ..update(2, "b", ApplyMode::Try) });
        assert_eq!(r.state, GenerationState::Applied, "{r:?}");
        assert!(n.rollout.revert_if_due(i64::MAX).is_none(), "nothing left to revert");
        assert_eq!(n.hostname(), "b");
    }

    #[test]
    fn a_try_deadline_survives_a_restart() {
        let mut n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        n.rollout.on_update(Update {
            try_timeout: Some(Duration::from_secs(5)),
            ..update(2, "b", ApplyMode::Try)
        });
        n.restart();
        n.rollout.converge_at_start();
        let r = n.rollout.revert_if_due(now_unix_ms() + 6_000).unwrap();
        assert_eq!(r.state, GenerationState::Reverted);
        assert_eq!(n.hostname(), "a");
    }

    #[test]
    fn a_staged_generation_waits_for_the_next_boot() {
        let mut n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        let r = n.rollout.on_update(update(2, "b", ApplyMode::Staged));
        assert_eq!((r.state, r.current_generation), (GenerationState::Staged, 1));
        assert_eq!(n.hostname(), "a");
        n.restart();
        n.rollout.converge_at_start();
        assert_eq!(n.hostname(), "a", "same boot: still waiting");
        std::fs::write(&n.boot_id, "boot-2\n").unwrap();
        n.restart();
        n.rollout.converge_at_start();
        assert_eq!((n.hostname(), n.running()), ("b".into(), 2), "a new boot applies it");
    }

    #[test]
    fn drift_is_corrected_and_reported_once() {
        let n = node();
        n.rollout.on_update(update(1, "a", ApplyMode::Auto));
        assert!(n.rollout.drift_pass().is_none(), "no drift, no report");
        *n.fx.hostname.lock().unwrap() = "changed-by-hand".into();
        let r = n.rollout.drift_pass().unwrap();
        assert_eq!(r.resources[0].outcome, Outcome::Corrected, "{r:?}");
        assert_eq!(n.hostname(), "a");
        let r = n.rollout.drift_pass().unwrap();
        assert_eq!(r.resources[0].outcome, Outcome::Unchanged, "back to normal is reported once");
        assert!(n.rollout.drift_pass().is_none());
    }

    #[test]
    fn without_effects_nothing_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = watch::channel(AgentStatus::default());
        let r = Rollout::new(None, dir.path(), dir.path().join("boot_id"), tx);
        let rep = r.on_update(update(1, "a", ApplyMode::Auto));
        assert_eq!(rep.state, GenerationState::Failed);
        assert!(rep.error.contains("--no-apply-config"), "{}", rep.error);
    }

    fn net_node() -> Node {
        use crate::effects::{Addr, LinkState, NetState, RouteState, PROTO_BOOT, PROTO_KERNEL};
        let n = node();
        let a = |s: &str| {
            let (ip, p) = s.split_once('/').unwrap();
            Addr { ip: ip.parse().unwrap(), prefix: p.parse().unwrap() }
        };
        *n.fx.net.lock().unwrap() = NetState {
            links: vec![LinkState {
                index: 2,
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                mtu: 1500,
                up: true,
                addresses: vec![a("10.0.0.5/24")],
                routes: vec![
                    RouteState { to: a("10.0.0.0/24"), via: None, metric: None, protocol: PROTO_KERNEL },
                    RouteState {
                        to: a("0.0.0.0/0"),
                        via: Some("10.0.0.1".parse().unwrap()),
                        metric: None,
                        protocol: PROTO_BOOT,
                    },
                ],
            }],
        };
        n.fx.files.lock().unwrap().insert(
            "/etc/resolv.conf".into(),
            crate::effects::FileState {
                content: b"nameserver 10.0.0.1\n".to_vec(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        );
        *n.fx.hostname.lock().unwrap() = "before-muster".into();
        n
    }

    fn snapshot(
        n: &Node,
    ) -> (
        String,
        String,
        crate::effects::NetState,
        std::collections::BTreeMap<String, crate::effects::FileState>,
    ) {
        (
            n.fx.hostname.lock().unwrap().clone(),
            n.fx.sysctls.lock().unwrap().get("net.ipv4.ip_forward").cloned().unwrap_or_default(),
            n.fx.net.lock().unwrap().clone(),
            n.fx.files.lock().unwrap().clone(),
        )
    }

    const EVERYTHING: &str = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: managed\nfiles:\n  - path: /etc/motd\n    content: \"hi\\n\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\nnetwork:\n  interfaces:\n    - name: eth0\n      mtu: 9000\n      addresses: [\"10.0.0.9/24\"]\n      routes: [{to: \"10.8.0.0/16\", via: \"10.0.0.254\"}]\n  nameservers: [\"10.0.0.53\"]\n";

    #[test]
    fn the_empty_config_puts_back_everything_as_before_muster_routes_included() {
        let n = net_node();
        n.fx.sysctls.lock().unwrap().insert("net.ipv4.ip_forward".into(), "0".into());
        let before = snapshot(&n);
        let r = n.rollout.on_update(Update { yaml: EVERYTHING.into(), ..update(1, "x", ApplyMode::Auto) });
        assert_eq!(r.state, GenerationState::Applied, "{r:?}");
        assert_ne!(snapshot(&n), before);
        // The address change took the boot default route with it (as the kernel does); it fits
        // the new address, so it is put back at once.
        let routes: Vec<String> =
            n.fx.net.lock().unwrap().links[0].routes.iter().map(|r| r.to.to_string()).collect();
        assert!(routes.contains(&"0.0.0.0/0".to_string()), "{routes:?}");
        // "Before Muster" brings back every file, value, address and route.
        let r = n.rollout.on_update(Update { yaml: EMPTY_CONFIG.into(), ..update(2, "x", ApplyMode::Auto) });
        assert_eq!(r.state, GenerationState::Applied, "{r:?}");
        assert!(r.resources.iter().all(|x| x.outcome == Outcome::Restored), "{r:?}");
        let (h, sysctl, net, files) = snapshot(&n);
        assert_eq!((h, sysctl), (before.0.clone(), before.1.clone()));
        assert_eq!(files, before.3, "motd gone, resolv.conf back");
        let (have, want) = (&net.links[0], &before.2.links[0]);
        assert_eq!((have.mtu, &have.addresses), (want.mtu, &want.addresses));
        let mut hr: Vec<String> =
            have.routes.iter().map(|r| format!("{} {:?} {}", r.to, r.via, r.protocol)).collect();
        let mut wr: Vec<String> =
            want.routes.iter().map(|r| format!("{} {:?} {}", r.to, r.via, r.protocol)).collect();
        hr.sort();
        wr.sort();
        assert_eq!(hr, wr, "routes as before Muster, the boot default route included");
        assert!(n.rollout.baseline.entries().is_empty(), "all restored, nothing left to restore");
    }

    #[test]
    fn a_resource_dropped_from_the_config_goes_back_the_rest_stays() {
        let n = net_node();
        n.rollout.on_update(Update { yaml: EVERYTHING.into(), ..update(1, "x", ApplyMode::Auto) });
        let without_motd = EVERYTHING.replace("files:\n  - path: /etc/motd\n    content: \"hi\\n\"\n", "");
        let r = n.rollout.on_update(Update { yaml: without_motd, ..update(2, "x", ApplyMode::Auto) });
        assert!(!n.fx.files.lock().unwrap().contains_key("/etc/motd"), "dropped: gone as before");
        assert!(
            r.resources.iter().any(|x| x.resource == "file:/etc/motd" && x.outcome == Outcome::Restored),
            "{r:?}"
        );
        assert_eq!(n.hostname(), "managed", "still managed, still as the config says");
    }

    #[test]
    fn an_address_change_keeps_the_links_original_routes_and_a_revert_restores_them() {
        let n = net_node();
        let cfg = |addr: &str| {
            format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: eth0\n      addresses: [\"{addr}\"]\n")
        };
        n.rollout.on_update(Update { yaml: cfg("10.0.0.9/24"), ..update(1, "x", ApplyMode::Auto) });
        let has_default = || n.fx.net.lock().unwrap().links[0].routes.iter().any(|r| r.to.prefix == 0);
        assert!(has_default(), "the default route fits the new address: kept (put back)");
        // A try onto another subnet: the default route cannot work there ...
        n.rollout.on_update(Update { yaml: cfg("192.168.9.9/24"), ..update(2, "x", ApplyMode::Try) });
        assert!(!has_default());
        // ... and the revert brings it back with the old address.
        let r = n.rollout.revert_if_due(now_unix_ms() + 61_000).unwrap();
        assert_eq!(r.state, GenerationState::Reverted);
        assert!(has_default(), "{:?}", n.fx.net.lock().unwrap());
    }

    #[test]
    fn an_unconfirmed_first_try_goes_back_to_before_muster() {
        let n = net_node();
        let before = snapshot(&n);
        n.rollout.on_update(Update { yaml: EVERYTHING.into(), ..update(1, "x", ApplyMode::Try) });
        assert_ne!(snapshot(&n), before);
        let r = n.rollout.revert_if_due(now_unix_ms() + 61_000).unwrap();
        assert_eq!((r.state, r.current_generation), (GenerationState::Reverted, 0));
        assert_eq!(snapshot(&n).0, before.0);
        assert_eq!(snapshot(&n).3, before.3);
        assert_eq!(n.running(), 0);
    }

    #[test]
    fn the_baseline_survives_a_restart() {
        let mut n = net_node();
        n.rollout.on_update(Update { yaml: EVERYTHING.into(), ..update(1, "x", ApplyMode::Auto) });
        n.restart();
        let r = n.rollout.on_update(Update { yaml: EMPTY_CONFIG.into(), ..update(2, "x", ApplyMode::Auto) });
        assert_eq!(r.state, GenerationState::Applied);
        assert_eq!(n.hostname(), "before-muster");
    }
}
