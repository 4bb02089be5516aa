//! Node health, read cheaply from `/proc` and `statvfs` for every heartbeat: CPU busy share
//! (from `/proc/stat` deltas), load, memory and swap, real filesystems, network counters,
//! uptime, temperatures (hwmon/thermal zones) and service checks (systemd units by their
//! cgroup, or processes by name).
//!
//! Parsers are pure functions over file contents so they are unit-tested without a machine.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use muster_machinery::health as h;

/// Filesystem types that hold no user data.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "pstore",
    "bpf",
    "debugfs",
    "tracefs",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "rpc_pipefs",
    "nsfs",
    "overlay",
    "squashfs",
    "ramfs",
    "efivarfs",
    "selinuxfs",
    "fuse.lxcfs",
    "rootfs",
    "nfsd",
];

/// CPU jiffies from the first line of `/proc/stat`: (busy, total).
pub fn parse_cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user/nice)
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// `/proc/loadavg`: (1, 5, 15 minutes).
pub fn parse_loadavg(s: &str) -> Option<(f64, f64, f64)> {
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// `/proc/meminfo` in bytes: (MemTotal, MemAvailable, SwapTotal, SwapFree).
pub fn parse_meminfo(s: &str) -> (u64, u64, u64, u64) {
    let get = |key: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (get("MemTotal"), get("MemAvailable"), get("SwapTotal"), get("SwapFree"))
}

/// `/proc/net/dev`: per interface (rx bytes, rx errors, tx bytes, tx errors), loopback skipped.
pub fn parse_net_dev(s: &str) -> Vec<h::NetworkCounters> {
    s.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if v.len() < 11 {
                return None;
            }
            Some(h::NetworkCounters {
                interface: name.to_owned(),
                rx_bytes: v[0],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_errors: v[10],
            })
        })
        .collect()
}

/// `/proc/self/mounts`: (device, mount point, type) of real filesystems, each mount point once.
pub fn parse_mounts(s: &str) -> Vec<(String, String, String)> {
    let mut seen = BTreeSet::new();
    s.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            let mnt = unescape_mount(mnt);
            if PSEUDO_FS.contains(&fstype) || !seen.insert(mnt.clone()) {
                return None;
            }
            Some((dev.to_owned(), mnt, fstype.to_owned()))
        })
        .collect()
}

/// Mount points escape space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(char::from(v));
            i += 4;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

/// Size and space available to unprivileged users of the filesystem at `path`.
pub fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs only writes into it, and we read it only when it returned 0.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// What the config (or `--service-check`) says must be running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSpec {
    /// A systemd unit (`k3s.service`, or a bare name when systemd runs).
    Unit(String),
    /// A process, by its command name.
    Process(String),
}

/// Where the collector reads from; tests point it at a fake tree.
#[derive(Debug, Clone)]
pub struct Sources {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    pub run_root: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self { proc_root: "/proc".into(), sys_root: "/sys".into(), run_root: "/run".into() }
    }
}

/// Collects health snapshots; keeps the previous CPU reading to compute a busy share.
#[derive(Debug)]
pub struct Collector {
    src: Sources,
    services: Vec<String>,
    last_cpu: Option<(u64, u64)>,
}

impl Collector {
    pub fn new(src: Sources, services: Vec<String>) -> Self {
        Self { src, services, last_cpu: None }
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.src.proc_root.join(rel)).unwrap_or_default()
    }

    /// One snapshot. `clock_offset_ms` comes from the heartbeat round trips; `more_services`
    /// (the running config's `serviceChecks`) are checked after the agent's own.
    pub fn collect(&mut self, clock_offset_ms: i64, more_services: &[String]) -> h::HealthSnapshot {
        let cpu = parse_cpu_jiffies(&self.read("stat"));
        let cpu_usage_percent = match (self.last_cpu, cpu) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0) as f64 * 100.0 / (t1 - t0) as f64) as f32
            }
            _ => 0.0,
        };
        self.last_cpu = cpu;
        let (load1, load5, load15) = parse_loadavg(&self.read("loadavg")).unwrap_or_default();
        let (mem_total, mem_avail, swap_total, swap_free) = parse_meminfo(&self.read("meminfo"));
        let uptime =
            self.read("uptime").split_whitespace().next().and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let filesystems = parse_mounts(&self.read("self/mounts"))
            .into_iter()
            .filter_map(|(device, mount_point, fs_type)| {
                let (size, avail) = statvfs(Path::new(&mount_point))?;
                (size > 0).then_some(h::FilesystemUsage {
                    mount_point,
                    device,
                    fs_type,
                    size_bytes: size,
                    available_bytes: avail,
                })
            })
            .collect();
        h::HealthSnapshot {
            cpu_usage_percent,
            load1,
            load5,
            load15,
            memory_total_bytes: mem_total,
            memory_available_bytes: mem_avail,
            swap_total_bytes: swap_total,
            swap_free_bytes: swap_free,
            filesystems,
            networks: parse_net_dev(&self.read("net/dev")),
            uptime_seconds: uptime as u64,
            boot_time_unix: i64::try_from(now).unwrap_or(0) - uptime as i64,
            temperatures: self.temperatures(),
            services: {
                let mut names: Vec<&String> = self.services.iter().collect();
                for s in more_services {
                    if !names.contains(&s) {
                        names.push(s);
                    }
                }
                names.into_iter().map(|s| self.check(s)).collect()
            },
            cpu_count: cpu_count(&self.read("stat")),
            clock_offset_ms,
        }
    }

    fn temperatures(&self) -> Vec<h::Temperature> {
        let mut out = Vec::new();
        let zones = self.src.sys_root.join("class/thermal");
        let Ok(dir) = fs::read_dir(&zones) else { return out };
        let mut entries: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for zone in entries
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("thermal_zone")))
        {
            let milli = fs::read_to_string(zone.join("temp")).ok().and_then(|t| t.trim().parse::<i64>().ok());
            let kind = fs::read_to_string(zone.join("type")).map(|t| t.trim().to_owned()).unwrap_or_default();
            if let Some(m) = milli {
                let name = zone.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(h::Temperature {
                    sensor: if kind.is_empty() { name } else { kind },
                    celsius: m as f32 / 1000.0,
                });
            }
        }
        out
    }

    /// Whether systemd is the init system here.
    fn systemd(&self) -> bool {
        self.src.run_root.join("systemd/system").is_dir()
    }

    fn spec(&self, name: &str) -> ServiceSpec {
        if name.contains('.') || self.systemd() {
            let unit = if name.contains('.') { name.to_owned() } else { format!("{name}.service") };
            ServiceSpec::Unit(unit)
        } else {
            ServiceSpec::Process(name.to_owned())
        }
    }

    /// Checks one service: a unit is up when its cgroup has processes; a process when one
    /// runs with that command name.
    pub fn check(&self, name: &str) -> h::ServiceCheck {
        let (up, detail) = match self.spec(name) {
            ServiceSpec::Unit(unit) if self.systemd() => {
                let procs = self.src.sys_root.join("fs/cgroup/system.slice").join(&unit).join("cgroup.procs");
                match fs::read_to_string(&procs) {
                    Ok(p) if !p.trim().is_empty() => (true, String::new()),
                    Ok(_) => (false, format!("unit {unit} has no running processes")),
                    Err(_) => (false, format!("unit {unit} is not running")),
                }
            }
            ServiceSpec::Unit(unit) => (false, format!("systemd not present; cannot check unit {unit}")),
            ServiceSpec::Process(p) => {
                if self.process_running(&p) {
                    (true, String::new())
                } else {
                    (false, format!("no process named {p}"))
                }
            }
        };
        h::ServiceCheck { name: name.to_owned(), up, detail }
    }

    fn process_running(&self, name: &str) -> bool {
        let Ok(dir) = fs::read_dir(&self.src.proc_root) else { return false };
        dir.filter_map(Result::ok)
            .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
            .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
    }
}

fn cpu_count(stat: &str) -> u32 {
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    u32::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_load() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_cpu_jiffies(stat), Some((150, 1000)));
        assert_eq!(cpu_count(stat), 2);
        assert_eq!(parse_cpu_jiffies("garbage"), None);
        assert_eq!(parse_loadavg("0.50 0.40 0.30 1/100 42\n"), Some((0.5, 0.4, 0.3)));
        assert_eq!(parse_loadavg("x"), None);
    }

    #[test]
    fn meminfo() {
        let m = "MemTotal:       1000 kB\nMemFree:  1 kB\nMemAvailable:    500 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n";
        assert_eq!(parse_meminfo(m), (1_024_000, 512_000, 0, 0));
        assert_eq!(parse_meminfo(""), (0, 0, 0, 0));
    }

    #[test]
    fn net_dev() {
        let s = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\n  eth0: 1234 10 2 0 0 0 0 0 99 5 3 0 0 0 0 0\n";
        let n = parse_net_dev(s);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].interface.as_str(), n[0].rx_bytes, n[0].rx_errors, n[0].tx_bytes, n[0].tx_errors),
            ("eth0", 1234, 2, 99, 3)
        );
    }

    #[test]
    fn mounts_skip_pseudo_and_duplicates() {
        let s = "proc /proc proc rw 0 0\n/dev/vda1 / ext4 rw 0 0\ntmpfs /run tmpfs rw 0 0\n/dev/vdb /mnt/my\\040disk xfs rw 0 0\n/dev/vda1 / ext4 rw 0 0\n";
        assert_eq!(
            parse_mounts(s),
            vec![
                ("/dev/vda1".into(), "/".into(), "ext4".into()),
                ("/dev/vdb".into(), "/mnt/my disk".into(), "xfs".into())
            ]
        );
    }

    #[test]
    fn collects_from_a_fake_tree_and_checks_services() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        fs::create_dir_all(proc_root.join("self")).unwrap();
        fs::create_dir_all(proc_root.join("net")).unwrap();
        fs::create_dir_all(proc_root.join("4242")).unwrap();
        fs::write(proc_root.join("4242/comm"), "k3s-server\n").unwrap();
        fs::write(proc_root.join("stat"), "cpu  100 0 0 900 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\n").unwrap();
        fs::write(proc_root.join("loadavg"), "1.00 0.50 0.25 1/1 1\n").unwrap();
        fs::write(proc_root.join("meminfo"), "MemTotal: 100 kB\nMemAvailable: 50 kB\n").unwrap();
        fs::write(proc_root.join("uptime"), "100.5 10.0\n").unwrap();
        fs::write(proc_root.join("self/mounts"), format!("/dev/x {} ext4 rw 0 0\n", t.path().display()))
            .unwrap();
        fs::write(proc_root.join("net/dev"), "h\nh\n eth0: 1 0 0 0 0 0 0 0 2 0 0 0 0 0 0 0\n").unwrap();
        let sys_root = t.path().join("sys");
        fs::create_dir_all(sys_root.join("class/thermal/thermal_zone0")).unwrap();
        fs::write(sys_root.join("class/thermal/thermal_zone0/temp"), "42500\n").unwrap();
        fs::write(sys_root.join("class/thermal/thermal_zone0/type"), "x86_pkg_temp\n").unwrap();
        let src = Sources { proc_root: proc_root.clone(), sys_root, run_root: t.path().join("run") };
        let mut c = Collector::new(src, vec!["k3s-server".into(), "kubelet".into()]);
        let s1 = c.collect(0, &[]);
        assert_eq!(s1.cpu_usage_percent, 0.0, "no previous reading yet");
        fs::write(proc_root.join("stat"), "cpu  150 0 0 950 0 0 0 0\ncpu0 150 0 0 950 0 0 0 0\n").unwrap();
        // The config's checks come after the agent's own, each name once.
        let s = c.collect(1500, &["kubelet".into(), "k3s.service".into()]);
        assert_eq!(s.cpu_usage_percent, 50.0);
        assert_eq!((s.load1, s.cpu_count, s.memory_total_bytes, s.uptime_seconds), (1.0, 1, 102_400, 100));
        assert_eq!(s.filesystems.len(), 1);
        assert!(s.filesystems[0].size_bytes > 0);
        assert_eq!(s.networks[0].tx_bytes, 2);
        assert_eq!(s.temperatures, vec![h::Temperature { sensor: "x86_pkg_temp".into(), celsius: 42.5 }]);
        assert_eq!(s.clock_offset_ms, 1500);
        let by_name: Vec<(&str, bool)> = s.services.iter().map(|c| (c.name.as_str(), c.up)).collect();
        assert_eq!(by_name, [("k3s-server", true), ("kubelet", false), ("k3s.service", false)]);
        assert_eq!(s.services[2].detail, "systemd not present; cannot check unit k3s.service");
    }
}
