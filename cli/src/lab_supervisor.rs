//! A running lab's processes, and what a foreground `muster lab up` does with them until it is
//! stopped: it watches them; a controller that dies is reported (how it ended and the end of its
//! log) and started again on the addresses it had, after a growing delay and a bounded number
//! of times in a row, while the agents keep running and reconnect by themselves; a node or
//! VictoriaMetrics that dies is reported. Ctrl-C, SIGTERM or `muster lab down` (which signals
//! the PID this process records in `lab.json`) stop the lab; so do used-up restarts, with the
//! reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use muster_lab::netns;
use muster_lab::process::{describe_exit, spawn_appending, stop_pids, tail, Restarts};

use crate::lab::{read_lab, wait_ports, write_lab};

/// Restarts of a dying controller in a row before the lab gives up.
const MAX_RESTARTS: u32 = 5;
/// The first restart's delay; each next one doubles, up to [`RESTART_CAP`].
const RESTART_BASE: Duration = Duration::from_secs(1);
const RESTART_CAP: Duration = Duration::from_secs(30);
/// A controller that ran this long before dying starts the count afresh.
const STABLE: Duration = Duration::from_secs(60);
/// How often the processes are looked at.
const POLL: Duration = Duration::from_millis(200);

/// How to start the controller again: the same command line on the addresses it bound.
pub(crate) struct ControllerSpec {
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub ctl_dir: PathBuf,
}

/// What a running lab consists of: its processes (the controller first, then the nodes), the
/// relay, VictoriaMetrics, and the network namespaces it made.
#[derive(Default)]
pub(crate) struct Procs {
    pub children: Vec<Child>,
    /// Each node's name and log, in the order of `children[1..]`.
    pub nodes: Vec<(String, PathBuf)>,
    pub relay: Option<Child>,
    pub monitoring: Option<Child>,
    pub namespaces: Vec<String>,
    /// How to restart the controller (known once it has bound its addresses).
    pub restart: Option<ControllerSpec>,
}

impl Procs {
    /// After start-up: on failure, removes everything and returns the error; detached, leaves
    /// the lab running; else supervises it until it is stopped, then stops the processes
    /// (newest first), removes the namespaces and `lab.json`, and keeps the logs. Fails (after
    /// stopping everything) when the controller could not be kept running.
    pub(crate) async fn hold(&mut self, dir: &Path, started: Result<()>, detach: bool) -> Result<()> {
        if let Err(e) = started {
            self.kill_all();
            netns::teardown(&self.namespaces);
            let _ = std::fs::remove_file(dir.join("lab.json"));
            return Err(e);
        }
        if detach {
            outln!("Running in the background; stop it with `muster lab down`.");
            return Ok(());
        }
        // `lab down` from another shell asks this process to stop the lab.
        if let Some(mut lab) = read_lab(dir) {
            lab.supervisor_pid = Some(std::process::id());
            if let Err(e) = write_lab(dir, &lab) {
                eprintln!("warning: {e:#}; `muster lab down` cannot stop this lab cleanly");
            }
        }
        // Never fail from here on before the children are stopped, whatever happens to stdout.
        let _ = crate::output::emit(&format!(
            "Stop it with Ctrl-C (or `muster lab down` from another shell). A controller that dies \
             is restarted (up to {MAX_RESTARTS} times in a row).\n"
        ));
        let outcome = self.supervise(dir).await;
        let mut pids: Vec<u32> = self.children.iter().map(Child::id).rev().collect();
        pids.extend(self.relay.as_ref().map(Child::id));
        pids.extend(self.monitoring.as_ref().map(Child::id));
        stop_pids(&pids);
        for c in self.all_mut() {
            let _ = c.wait();
        }
        netns::teardown(&self.namespaces);
        let _ = std::fs::remove_file(dir.join("lab.json"));
        let _ = crate::output::emit(&format!(
            "lab stopped (state and logs kept in {}; `muster lab down` removes them)\n",
            dir.display()
        ));
        outcome
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Child> {
        self.children.iter_mut().chain(self.relay.iter_mut()).chain(self.monitoring.iter_mut())
    }

    fn kill_all(&mut self) {
        for c in self.all_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Watches the lab until Ctrl-C or SIGTERM (`Ok`), or until the controller cannot be kept
    /// running (`Err` with why).
    async fn supervise(&mut self, dir: &Path) -> Result<()> {
        let stop = muster_util::shutdown_signal();
        tokio::pin!(stop);
        let mut restarts = Restarts::new(MAX_RESTARTS, RESTART_BASE, RESTART_CAP, STABLE);
        let mut since = Instant::now();
        let mut reported = vec![false; self.children.len()];
        let mut monitoring_reported = false;
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(POLL) => {}
            }
            for (i, (name, log)) in self.nodes.iter().enumerate() {
                let Some(child) = self.children.get_mut(i + 1) else { continue };
                if let (false, Ok(Some(status))) = (reported[i + 1], child.try_wait()) {
                    reported[i + 1] = true;
                    eprintln!(
                        "{name} (pid {}) {}; it is not restarted. The end of {}:\n{}",
                        child.id(),
                        describe_exit(status),
                        log.display(),
                        tail(log)
                    );
                }
            }
            if let (false, Some(Ok(Some(status)))) =
                (monitoring_reported, self.monitoring.as_mut().map(Child::try_wait))
            {
                monitoring_reported = true;
                let log = dir.join("monitoring/victoria-metrics.log");
                eprintln!(
                    "VictoriaMetrics {}; it is not restarted. The end of {}:\n{}",
                    describe_exit(status),
                    log.display(),
                    tail(&log)
                );
            }
            let Ok(Some(status)) = self.children[0].try_wait() else { continue };
            let how = describe_exit(status);
            let pid = self.children[0].id();
            let Some(spec) = &self.restart else {
                bail!("the lab's controller (pid {pid}) {how}; stopping the lab");
            };
            let ran = since.elapsed();
            eprintln!(
                "the lab's controller (pid {pid}) {how} after {}. The end of {}:\n{}",
                humantime::format_duration(Duration::from_secs(ran.as_secs())),
                spec.log.display(),
                tail(&spec.log)
            );
            let Some((n, delay)) = restarts.next(ran) else {
                bail!(
                    "the lab's controller {how} again after {} restarts in a row; stopping the lab \
                     (its log: {})",
                    restarts.max(),
                    spec.log.display()
                );
            };
            eprintln!(
                "restarting the controller in {} (restart {n} of at most {} in a row); the agents \
                 keep running and reconnect",
                humantime::format_duration(delay),
                restarts.max()
            );
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&spec.log) {
                let _ = writeln!(f, "--- muster lab: the controller (pid {pid}) {how}; restart {n} ---");
            }
            let child = match spawn_appending(&spec.bin, &spec.args, &spec.log) {
                Ok(c) => c,
                Err(e) => bail!("restarting the lab's controller: {e}; stopping the lab"),
            };
            self.children[0] = child;
            since = Instant::now();
            let up = tokio::select! {
                () = &mut stop => return Ok(()),
                r = wait_ports(&spec.ctl_dir, &spec.log, &mut self.children[0]) => r,
            };
            match up {
                Ok(_) => {
                    let pid = self.children[0].id();
                    if let Some(mut lab) = read_lab(dir) {
                        lab.controller_pid = pid;
                        if let Err(e) = write_lab(dir, &lab) {
                            eprintln!("warning: {e:#}");
                        }
                    }
                    eprintln!("the lab's controller is running again (pid {pid}, restart {n})");
                }
                // Ended again (seen on the next look) or never came up: that counts as a death.
                Err(e) => {
                    eprintln!("the restarted controller did not come up: {e:#}");
                    if matches!(self.children[0].try_wait(), Ok(None)) {
                        let _ = self.children[0].kill();
                        let _ = self.children[0].wait();
                    }
                }
            }
        }
    }
}
