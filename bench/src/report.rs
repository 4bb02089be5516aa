//! What `muster-bench` measured, as text for people or JSON for tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Latency;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub agents: usize,
    pub heartbeat_ms: u64,
    pub window_seconds: f64,
    /// CPUs this machine has; the bench and the controller share them.
    pub cpus: usize,
    /// Whether the bench (and so the controller beside it) is a debug build.
    pub debug_build: bool,
    pub controller: Controller,
    pub enroll: Phase,
    pub connect: Phase,
    pub heartbeats: Heartbeats,
    pub bench: Bench,
    pub machines: Machines,
    /// Everything that went wrong; empty for a clean run.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Controller {
    pub binary: String,
    pub pid: u32,
    pub rss_start_mib: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// (RSS after the window − RSS at start) / agents.
    pub rss_per_agent_kib: f64,
    pub cpu_steady_seconds: f64,
    /// The kernel's share of it (system time: sockets, TCP on loopback, futexes).
    pub cpu_steady_system_seconds: f64,
    /// Steady-state CPU over the window, in % of one core.
    pub cpu_steady_percent: f64,
    pub cpu_per_heartbeat_us: f64,
    /// Context switches of all its threads during the window, per heartbeat sent.
    pub context_switches_per_heartbeat: f64,
    pub open_fds: usize,
    pub nofile_soft_limit: Option<u64>,
    /// Log lines about running out of file descriptors or failing to accept connections.
    pub fd_errors_in_log: usize,
}

/// Enrollment or stream set-up of every agent.
#[derive(Debug, Default, Serialize)]
pub struct Phase {
    pub ok: usize,
    pub failed: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// Per agent: from starting its connection to its certificate (enroll) or welcome (connect).
    pub latency: Latency,
    pub controller_cpu_seconds: f64,
    pub bench_cpu_seconds: f64,
    /// Distinct errors with how often each happened, most frequent first (at most 5).
    pub errors: Vec<(String, usize)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Heartbeats {
    /// Sent during the window.
    pub sent: u64,
    pub per_second: f64,
    /// Round trips of the acked ones among them.
    pub rtt: Latency,
    /// Sent during the window but not acked by the end of the grace period after it.
    pub lost: u64,
    /// Streams that ended before the bench stopped them.
    pub streams_dropped: usize,
    pub stream_errors: Vec<(String, usize)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Bench {
    pub keygen_seconds: f64,
    pub cpu_steady_seconds: f64,
    pub cpu_steady_percent: f64,
    pub rss_mib: f64,
    pub nofile_soft_limit: u64,
    /// CPU used during the window by everything on this machine but the bench and the
    /// controller, in % of one core: other load skews the numbers.
    pub others_cpu_percent: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Machines {
    pub total: usize,
    pub by_state: BTreeMap<String, usize>,
    pub connected: usize,
    pub list_ms: f64,
}

/// The `n` most frequent of `errors`, with counts.
pub fn top_errors(errors: impl IntoIterator<Item = String>, n: usize) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in errors {
        *counts.entry(e).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn lat(l: &Latency) -> String {
    format!("p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms", l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms)
}

fn errors(s: &mut String, errs: &[(String, usize)]) {
    for (e, n) in errs {
        let _ = writeln!(s, "              {n}× {e}");
    }
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let c = &self.controller;
        let _ = writeln!(
            s,
            "muster-bench: {} agents, heartbeat every {} ms, {:.0} s window; {} CPUs shared by bench and controller{}",
            self.agents,
            self.heartbeat_ms,
            self.window_seconds,
            self.cpus,
            if self.debug_build { " (DEBUG BUILD: not representative)" } else { "" }
        );
        let _ = writeln!(s, "controller:   {} (pid {})", c.binary, c.pid);
        let e = &self.enroll;
        let _ = writeln!(
            s,
            "enroll        {} ok, {} failed in {:.2} s = {:.1} enrollments/s ({} in flight)",
            e.ok, e.failed, e.seconds, e.per_second, e.concurrency
        );
        let _ = writeln!(s, "  latency     {}", lat(&e.latency));
        let _ = writeln!(
            s,
            "  CPU         controller {:.2} s ({:.2} ms per enrollment), bench {:.2} s; keys + CSRs made beforehand in {:.2} s",
            e.controller_cpu_seconds,
            e.controller_cpu_seconds * 1e3 / e.ok.max(1) as f64,
            e.bench_cpu_seconds,
            self.bench.keygen_seconds
        );
        errors(&mut s, &e.errors);
        let k = &self.connect;
        let _ = writeln!(
            s,
            "connect       {} streams up, {} failed in {:.2} s = {:.1}/s ({} in flight; mTLS handshake + Connect + welcome)",
            k.ok, k.failed, k.seconds, k.per_second, k.concurrency
        );
        let _ = writeln!(s, "  latency     {}", lat(&k.latency));
        let _ = writeln!(
            s,
            "  CPU         controller {:.2} s, bench {:.2} s",
            k.controller_cpu_seconds, k.bench_cpu_seconds
        );
        errors(&mut s, &k.errors);
        let h = &self.heartbeats;
        let _ = writeln!(
            s,
            "heartbeats    {} sent in the window ({:.1}/s), {} acked, {} lost, {} streams dropped",
            h.sent, h.per_second, h.rtt.count, h.lost, h.streams_dropped
        );
        let _ = writeln!(s, "  round trip  {}", lat(&h.rtt));
        errors(&mut s, &h.stream_errors);
        let _ = writeln!(
            s,
            "controller    RSS {:.1} MiB after the window (VmHWM {:.1} MiB; {:.1} MiB at start = {:.1} KiB per agent)",
            c.rss_mib, c.peak_rss_mib, c.rss_start_mib, c.rss_per_agent_kib
        );
        let _ = writeln!(
            s,
            "  CPU steady  {:.2} s ({:.2} s user, {:.2} s system) = {:.1}% of one core = {:.1} µs per heartbeat \
             ({:.1} context switches per heartbeat)",
            c.cpu_steady_seconds,
            c.cpu_steady_seconds - c.cpu_steady_system_seconds,
            c.cpu_steady_system_seconds,
            c.cpu_steady_percent,
            c.cpu_per_heartbeat_us,
            c.context_switches_per_heartbeat
        );
        let _ = writeln!(
            s,
            "  fds         {} open, soft limit {}{}",
            c.open_fds,
            c.nofile_soft_limit.map_or("unlimited".to_owned(), |l| l.to_string()),
            if c.fd_errors_in_log > 0 {
                format!("; {} fd/accept errors in its log", c.fd_errors_in_log)
            } else {
                String::new()
            }
        );
        let b = &self.bench;
        let _ = writeln!(
            s,
            "bench         CPU steady {:.2} s = {:.1}% of one core; RSS {:.1} MiB; fd soft limit {}",
            b.cpu_steady_seconds, b.cpu_steady_percent, b.rss_mib, b.nofile_soft_limit
        );
        let _ = writeln!(
            s,
            "other load    {:.1}% of one core used by other processes during the window",
            b.others_cpu_percent
        );
        let m = &self.machines;
        let states: Vec<String> = m.by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let _ = writeln!(
            s,
            "machines      {} listed: {}; {} connected (ListMachines took {:.1} ms)",
            m.total,
            if states.is_empty() { "none".to_owned() } else { states.join(", ") },
            m.connected,
            m.list_ms
        );
        if self.problems.is_empty() {
            let _ = writeln!(s, "no problems");
        } else {
            let _ = writeln!(s, "PROBLEMS:");
            for p in &self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_errors_counts_and_orders() {
        let errs = ["b", "a", "b", "c", "b", "a"].map(String::from);
        assert_eq!(top_errors(errs, 2), vec![("b".to_owned(), 3), ("a".to_owned(), 2)]);
    }

    #[test]
    fn text_of_an_empty_report() {
        let t = Report::default().text();
        assert!(t.contains("no problems"));
        assert!(t.contains("0 listed: none"));
    }
}
