//! What applying a config costs the agent: a typical 50-resource config (hostname, 37 files,
//! 9 per-namespace sysctls, an interface over netlink, a user with an SSH key, resolv.conf)
//! applied by the real binary with its real effects inside throwaway namespaces, then a no-op
//! pass (everything but the hostname, sysctls and interface, which live in the namespaces). Reports wall time, CPU (user+sys) and peak RSS per run, from
//! the kernel's per-process accounting (`wait4`). Includes process start and YAML parsing.
//!
//! `cargo build --profile agent -p muster-agent && MUSTER_AGENT_BIN=target/agent/muster-agent cargo bench -p muster-agent --bench apply`
//! (needs root for the namespaces).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Run {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    writes: u64,
    resources: usize,
}

// The child is reaped by wait4 below, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run(agent: &Path, cfg: &Path, root: &Path) -> Run {
    let start = Instant::now();
    let child = Command::new("unshare")
        // No --fork: unshare execs the agent, so the child's accounting is the agent's.
        .args(["--uts", "--net", "--mount", "--propagation", "private"])
        .arg(agent)
        .arg("--apply-once")
        .arg(cfg)
        .arg("--root")
        .arg(root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("unshare");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut out = child.stdout.expect("stdout");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).expect("read");
    let mut status = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child with valid pointers to a status int and a rusage struct.
    #[allow(unsafe_code)]
    let ru = unsafe {
        libc::wait4(pid, &mut status, 0, ru.as_mut_ptr());
        ru.assume_init()
    };
    let wall = start.elapsed();
    let tv =
        |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Run {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss,
        writes: report["writes"].as_u64().unwrap_or(0),
        resources: report["resources"].as_array().map_or(0, Vec::len),
    }
}

/// Runs `cmd` and returns its CPU time and peak RSS from the kernel's accounting.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Option<(Duration, Duration, i64)> {
    let start = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().ok()?;
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    let mut status = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child with valid pointers to a status int and a rusage struct.
    #[allow(unsafe_code)]
    let ru = unsafe {
        libc::wait4(pid, &mut status, 0, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv =
        |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    (status == 0).then(|| (start.elapsed(), tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss))
}

/// cloud-init's own cost for the same config, when it is installed (Debian `cloud-init`):
/// importing it, and `cloud-init schema` on equivalent user-data (which applies nothing).
fn cloud_init(dir: &Path) {
    if !Path::new("/usr/bin/cloud-init").exists() {
        println!("cloud-init: not installed (apt-get install cloud-init) - no comparison");
        return;
    }
    let mut ud = String::from("#cloud-config\nhostname: bench-node\nwrite_files:\n");
    for i in 0..40 {
        ud.push_str(&format!(
            "  - path: /etc/muster-bench/file-{i:02}.conf\n    permissions: '0644'\n    content: |\n"
        ));
        for _ in 0..64 {
            ud.push_str("      setting = value\n");
        }
    }
    ud.push_str("bootcmd:\n");
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=2",
        "net.ipv4.conf.default.rp_filter=2",
        "net.ipv4.tcp_syncookies=1",
        "net.core.somaxconn=8192",
        "net.ipv4.ip_local_port_range=20000 60999",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.tcp_keepalive_time=600",
        "net.ipv4.conf.all.accept_redirects=0",
    ] {
        ud.push_str(&format!("  - [sysctl, -w, '{kv}']\n"));
    }
    let file = dir.join("user-data");
    std::fs::write(&file, ud).expect("user-data");
    for (what, mut cmd) in [
        ("import", {
            let mut c = Command::new("/usr/bin/python3");
            c.args(["-c", "import cloudinit.cmd.main, cloudinit.config.schema"]);
            c
        }),
        ("schema", {
            let mut c = Command::new("/usr/bin/cloud-init");
            c.args(["schema", "--config-file"]).arg(&file);
            c
        }),
    ] {
        let runs: Vec<_> = (0..5).filter_map(|_| measure(&mut cmd)).collect();
        if runs.is_empty() {
            println!("cloud-init {what}: failed to run");
            continue;
        }
        println!(
            "cloud-init {what} (same config as user-data): median wall {:.1} ms, CPU {:.1} ms; peak RSS {} KiB",
            median(runs.iter().map(|r| r.0).collect()).as_secs_f64() * 1e3,
            median(runs.iter().map(|r| r.1).collect()).as_secs_f64() * 1e3,
            runs.iter().map(|r| r.2).max().unwrap_or(0)
        );
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let agent = std::env::var_os("MUSTER_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/muster-agent"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg =
        String::from("apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: bench-node\nfiles:\n");
    for i in 0..37 {
        cfg.push_str(&format!(
            "  - path: /etc/muster-bench/file-{i:02}.conf\n    content: \"{}\"\n    mode: \"0644\"\n",
            "setting = value\\n".repeat(64)
        ));
    }
    cfg.push_str("users:\n  - name: ops\n    sshAuthorizedKeys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@bench\"]\n");
    cfg.push_str("network:\n  nameservers: [\"192.168.5.1\"]\n  searchDomains: [lan]\n");
    let net_part = "  interfaces:\n    - name: lo\n      addresses: [\"127.0.0.1/8\"]\n";
    cfg.push_str(net_part);
    cfg.push_str("sysctls:\n");
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "2"),
        ("net.ipv4.conf.default.rp_filter", "2"),
        ("net.ipv4.tcp_syncookies", "1"),
        ("net.core.somaxconn", "8192"),
        ("net.ipv4.ip_local_port_range", "20000 60999"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.tcp_keepalive_time", "600"),
        ("net.ipv4.conf.all.accept_redirects", "0"),
    ] {
        cfg.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    let file = tmp.path().join("config.yaml");
    std::fs::write(&file, &cfg).expect("write config");
    let (mut apply, mut noop) = (Vec::new(), Vec::new());
    let mut rss = (0, 0);
    let mut writes = 0;
    for i in 0..7 {
        let root = tmp.path().join(format!("root-{i}"));
        std::fs::create_dir_all(&root).expect("root");
        // Each run is its own set of namespaces: the first pass applies everything.
        let a = run(&agent, &file, &root);
        assert_eq!(a.resources, 50, "50 resources checked");
        assert!(a.writes >= 45, "the first pass writes (almost) everything: {}", a.writes);
        writes = a.writes;
        // The no-op pass: same files (same root); hostname and sysctls are fresh namespaces,
        // so measure the no-op on files through a config without them.
        apply.push((a.wall, a.cpu));
        rss.0 = rss.0.max(a.max_rss_kib);
        let files_only = tmp.path().join("files-only.yaml");
        let fo: String = cfg
            .lines()
            .take_while(|l| !l.starts_with("sysctls:"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace("hostname: bench-node\n", "")
            .replace(net_part, "");
        std::fs::write(&files_only, fo).expect("write");
        let n = run(&agent, &files_only, &root);
        assert_eq!(n.writes, 0, "the second pass changes nothing");
        noop.push((n.wall, n.cpu));
        rss.1 = rss.1.max(n.max_rss_kib);
    }
    println!("agent {}", agent.display());
    println!(
        "apply 50 resources (hostname, 37 files, 9 sysctls, lo over netlink, a user, resolv.conf; {writes} differed and were written): median wall {:.1} ms, CPU {:.1} ms; peak RSS {} KiB",
        median(apply.iter().map(|x| x.0).collect()).as_secs_f64() * 1e3,
        median(apply.iter().map(|x| x.1).collect()).as_secs_f64() * 1e3,
        rss.0
    );
    println!(
        "no-op pass (37 files, the user, resolv.conf unchanged): median wall {:.1} ms, CPU {:.1} ms; peak RSS {} KiB",
        median(noop.iter().map(|x| x.0).collect()).as_secs_f64() * 1e3,
        median(noop.iter().map(|x| x.1).collect()).as_secs_f64() * 1e3,
        rss.1
    );
    println!("(whole process: start, YAML parse, validation, reconcile; 7 runs each)");
    cloud_init(tmp.path());
}
