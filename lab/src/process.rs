//! Processes the lab and the tests start: where the workspace's binaries are, starting one with
//! its output in a log file, stopping only PIDs that provably run one of Muster's binaries,
//! and a child guard that kills and reaps on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// Where the workspace's binaries are: `$MUSTER_BIN_DIR`, else the directory of this
/// executable (a test binary in `target/<profile>/deps` looks one level up).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MUSTER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A binary of the workspace ([`bin_dir`]), else one on `PATH`; fails with how to build it.
pub fn find_bin(name: &str) -> Result<PathBuf, LabError> {
    let p = bin_dir().join(name);
    if p.exists() {
        return Ok(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(p) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.exists()) {
            return Ok(p);
        }
    }
    Err(LabError::Missing {
        name: name.to_owned(),
        hint: format!(
            "not in {} nor on PATH; build it with `cargo build --workspace --bins`",
            bin_dir().display()
        ),
    })
}

/// `args` with the value after `--token` hidden, for logs.
pub fn redacted(args: &[String]) -> Vec<&str> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide = false;
    for a in args {
        out.push(if hide { "<redacted>" } else { a.as_str() });
        hide = a == "--token";
    }
    out
}

/// Starts `bin ARGS` in its own process group (Ctrl-C reaches only the parent, which stops its
/// children in order) with stdout and stderr in `log` (truncated first).
pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, LabError> {
    let f = std::fs::File::create(log).map_err(LabError::io(format!("creating {}", log.display())))?;
    spawn_to(bin, args, log, f)
}

/// [`spawn`], with the output appended to `log` after what is there (a restarted process keeps
/// its predecessor's log).
pub fn spawn_appending(bin: &Path, args: &[String], log: &Path) -> Result<Child, LabError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(LabError::io(format!("opening {}", log.display())))?;
    spawn_to(bin, args, log, f)
}

fn spawn_to(bin: &Path, args: &[String], log: &Path, f: std::fs::File) -> Result<Child, LabError> {
    use std::os::unix::process::CommandExt;
    tracing::debug!(bin = %bin.display(), args = ?redacted(args), log = %log.display(), "starting");
    let f2 = f.try_clone().map_err(LabError::io(format!("opening {}", log.display())))?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .process_group(0)
        .spawn()
        .map_err(LabError::io(format!("starting {}", bin.display())))
}

/// The last 15 lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// How a process ended, in words: "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = signal_name(sig).map(|n| format!(" ({n})")).unwrap_or_default();
            let core = if status.core_dumped() { ", core dumped" } else { "" };
            format!("was killed by signal {sig}{name}{core}")
        }
        (None, None) => format!("ended ({status})"),
    }
}

/// The name of a common signal.
fn signal_name(sig: libc::c_int) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// When to start a process again after it died: up to `max` times in a row, after a delay that
/// doubles from `base` up to `cap`; a process that ran at least `stable` before it died starts
/// the count afresh (a crash a day never adds up to giving up).
#[derive(Debug, Clone)]
pub struct Restarts {
    max: u32,
    base: Duration,
    cap: Duration,
    stable: Duration,
    count: u32,
}

impl Restarts {
    pub fn new(max: u32, base: Duration, cap: Duration, stable: Duration) -> Self {
        Self { max, base, cap, stable, count: 0 }
    }

    /// After a death of a process that had run for `ran_for`: which restart in a row this is
    /// and how long to wait before it, or `None` when the restarts are used up.
    pub fn next(&mut self, ran_for: Duration) -> Option<(u32, Duration)> {
        if ran_for >= self.stable {
            self.count = 0;
        }
        if self.count >= self.max {
            return None;
        }
        self.count += 1;
        let delay = self.base.saturating_mul(1 << (self.count - 1).min(16)).min(self.cap);
        Some((self.count, delay))
    }

    /// How many restarts in a row are allowed.
    pub fn max(&self) -> u32 {
        self.max
    }
}

/// Whether `pid` is alive and runs one of our binaries (never signal anything else).
pub fn is_ours(pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return false };
    let Some(name) = exe.file_name().map(|n| n.to_string_lossy().into_owned()) else { return false };
    let args: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| b.split(|c| *c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
        .unwrap_or_default();
    ours_by(&name, &args)
}

/// The controller and agent binaries (a rebuilt binary shows as `NAME (deleted)`), QEMU only
/// while it runs a lab VM, VictoriaMetrics only with a lab's scrape config, and `muster` only
/// while it runs the lab's relay or a foreground `lab up`.
pub fn ours_by(exe_name: &str, args: &[String]) -> bool {
    (exe_name.starts_with("qemu-system")
        && args.windows(2).any(|w| w[0] == "-name" && w[1].starts_with(crate::qemu::LAB_VM_PREFIX)))
        || exe_name.starts_with("muster-controller")
        || exe_name.starts_with("muster-agent")
        || (exe_name.starts_with("victoria-metrics") && crate::victoriametrics::is_labs(args))
        || ((exe_name == "muster" || exe_name.starts_with("muster ("))
            && args.windows(2).any(|w| w[0] == "lab" && (w[1] == "relay" || w[1] == "up")))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a PID the caller recorded (and, for stop_pids, checked is ours).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// SIGTERM, up to 5 s of grace, then SIGKILL, for PIDs that are still ours.
pub fn stop_pids(pids: &[u32]) {
    let ours: Vec<u32> = pids.iter().copied().filter(|p| is_ours(*p)).collect();
    for p in &ours {
        signal(*p, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && ours.iter().any(|p| is_ours(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in ours.iter().filter(|p| is_ours(**p)) {
        signal(*p, libc::SIGKILL);
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, LabError> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(LabError::Timeout { what: what.to_owned(), after: timeout });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Self, LabError> {
        let f = std::fs::File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let f2 = f.try_clone().map_err(LabError::io(format!("creating {}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(LabError::io(format!("spawning {cmd:?}")))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (SIGKILL after). The exit status, or
    /// `None` if it had to be killed.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status once the process has ended by itself, waiting up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_processes_are_ours() {
        let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        assert!(ours_by("muster-controller", &[]));
        assert!(ours_by("muster-agent (deleted)", &[]));
        assert!(ours_by("muster", &s(&["muster", "lab", "relay", "--netns", "x"])));
        assert!(!ours_by("muster", &s(&["muster", "machines"])));
        assert!(ours_by("qemu-system-x86_64", &s(&["-name", "muster-lab-vm-1"])));
        assert!(!ours_by("qemu-system-x86_64", &s(&["-name", "someone-elses-vm"])));
        assert!(!ours_by("sshd", &[]));
        assert!(ours_by("muster", &s(&["muster", "lab", "up", "--dir", "x"])));
        let vm = s(&["victoria-metrics", "-promscrape.config=/l/monitoring/muster-lab-scrape.yml"]);
        assert!(ours_by("victoria-metrics", &vm));
        assert!(!ours_by("victoria-metrics", &s(&["victoria-metrics", "-promscrape.config=/etc/x.yml"])));
    }

    #[test]
    fn exits_are_told_in_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "was killed by signal 9 (SIGKILL)");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(6 | 0x80)),
            "was killed by signal 6 (SIGABRT), core dumped"
        );
    }

    #[test]
    fn restarts_back_off_and_give_up_unless_the_process_was_stable() {
        let s = Duration::from_secs;
        let mut r = Restarts::new(3, s(1), s(3), s(60));
        assert_eq!(r.next(s(0)), Some((1, s(1))));
        assert_eq!(r.next(s(5)), Some((2, s(2))));
        assert_eq!(r.next(s(5)), Some((3, s(3))), "capped");
        assert_eq!(r.next(s(5)), None, "used up");
        assert_eq!(r.next(s(5)), None);
        assert_eq!(r.next(s(60)), Some((1, s(1))), "a stable run starts afresh");
    }

    #[test]
    fn the_token_is_never_logged() {
        let args: Vec<String> =
            ["--controller", "https://x:1", "--token", "abc.def"].map(String::from).to_vec();
        assert_eq!(redacted(&args), ["--controller", "https://x:1", "--token", "<redacted>"]);
    }
}
