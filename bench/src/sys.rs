//! What the benchmarks read about processes from `/proc`, and the open-file limit.
//!
//! `pid` is a decimal process id or `"self"`. Readers return zero / `None` for a process that
//! is gone or a field that is missing: a benchmark report shows a 0 rather than failing.

use anyhow::{bail, Result};

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: &str) -> f64 {
    let (user, system) = cpu_times(pid);
    user + system
}

/// (user, system) CPU seconds a process has used, from `/proc/PID/stat`.
pub fn cpu_times(pid: &str) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0.0) };
    cpu_times_of(&stat, clock_ticks())
}

/// utime and stime of a `/proc/PID/stat` line, in seconds at `hz` ticks per second.
fn cpu_times_of(stat: &str, hz: f64) -> (f64, f64) {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / hz, ticks(12) / hz)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU seconds the whole machine has been busy (all CPUs, everything but idle and iowait), from
/// `/proc/stat`.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    machine_busy_of(&stat, clock_ticks())
}

fn machine_busy_of(stat: &str, hz: f64) -> f64 {
    let Some(cpu) = stat.lines().find_map(|l| l.strip_prefix("cpu ")) else { return 0.0 };
    let f: Vec<f64> = cpu.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user and nice]
    let busy: f64 = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    busy / hz
}

/// (VmRSS, VmHWM) in bytes, from `/proc/PID/status`.
pub fn rss(pid: &str) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (status_kib(&s, "VmRSS:") * 1024, status_kib(&s, "VmHWM:") * 1024)
}

/// The number after `key` in a `/proc/PID/status` text (kB for the memory lines).
fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Context switches (voluntary + involuntary) of all of a process's threads alive now, from
/// `/proc/PID/task/*/status`.
pub fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|s| status_kib(&s, "voluntary_ctxt_switches:") + status_kib(&s, "nonvoluntary_ctxt_switches:"))
        .sum()
}

/// How many file descriptors a process has open (`/proc/PID/fd`).
pub fn open_fds(pid: &str) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A process's soft open-file limit, from `/proc/PID/limits` (`None` when unlimited or unknown).
pub fn nofile_soft_limit(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    limits_nofile(&s)
}

fn limits_nofile(limits: &str) -> Option<u64> {
    limits.lines().find_map(|l| l.strip_prefix("Max open files"))?.split_whitespace().next()?.parse().ok()
}

/// This process's RLIMIT_NOFILE as (soft, hard).
pub fn nofile() -> Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, writable local.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets this process's soft RLIMIT_NOFILE (capped at the hard limit); returns the new soft limit.
/// Children spawned afterwards inherit it.
pub fn set_nofile_soft(soft: u64) -> Result<u64> {
    let (_, hard) = nofile()?;
    let want = libc::rlimit { rlim_cur: soft.min(hard), rlim_max: hard };
    // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local; lowering or raising
    // the soft limit up to the unchanged hard limit needs no privilege and affects no memory.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) };
    if rc != 0 {
        bail!("setrlimit(RLIMIT_NOFILE, {}): {}", want.rlim_cur, std::io::Error::last_os_error());
    }
    Ok(want.rlim_cur)
}

/// Raises the soft open-file limit to the hard limit; returns (soft before, soft now).
pub fn raise_nofile() -> Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    Ok((soft, set_nofile_soft(hard)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parens() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_times_of(stat, 100.0), (2.5, 0.5));
        assert_eq!(cpu_times_of("garbage", 100.0), (0.0, 0.0));
    }

    #[test]
    fn machine_busy_leaves_out_idle_iowait_and_guest() {
        let stat = "cpu  100 10 50 1000 20 5 5 0 7 0\ncpu0 50 5 25 500 10 2 3 0 0 0\n";
        assert!((machine_busy_of(stat, 100.0) - 1.7).abs() < 1e-9);
        assert_eq!(machine_busy_of("", 100.0), 0.0);
    }

    #[test]
    fn limits_and_status_parsing() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(limits_nofile(limits), Some(1024));
        assert_eq!(limits_nofile("Max open files  unlimited unlimited files"), None);
        assert_eq!(status_kib("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\n", "VmRSS:"), 1024);
    }

    #[test]
    fn reads_this_process() {
        let (rss, hwm) = rss("self");
        assert!(rss > 0 && hwm >= rss);
        assert!(cpu_seconds("self") >= 0.0);
        assert!(open_fds("self").is_some_and(|n| n > 0));
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(context_switches("self") > 0);
        let (soft, hard) = nofile().unwrap();
        assert!(soft <= hard);
    }
}
