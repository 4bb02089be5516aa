//! What applying a config costs the agent: a typical 50-resource config (hostname, 37 files,
//! 9 per-namespace sysctls, an interface over netlink, a user with an SSH key, resolv.conf)
//! applied by the real binary with its real effects inside throwaway namespaces, then a no-op
//! pass by a fresh process (everything but the hostname, sysctls and interface, which live in the
//! namespaces). Reports wall time, CPU (user+sys) and peak RSS per run from the kernel's
//! per-process accounting (`wait4`); these include process start and YAML parsing.
//!
//! The running agent's periodic pass is in-process, so the bench also re-executes itself inside
//! fresh UTS + network + mount namespaces and times `reconcile` there on the full config: the
//! first pass (applies) and then repeated no-op passes over all 50 resources.
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
    /// The agent exited 0: no resource failed.
    ok: bool,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Reaps our child `pid`: its wait status, CPU time (user + system) and peak RSS in KiB, from
/// the kernel's per-process accounting.
fn wait_accounted(pid: libc::pid_t) -> (i32, Duration, i64) {
    let mut status = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child with valid pointers to a status int and a rusage struct.
    #[allow(unsafe_code)]
    let ru = unsafe {
        libc::wait4(pid, &mut status, 0, ru.as_mut_ptr());
        ru.assume_init()
    };
    (status, tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss)
}

// The child is reaped by wait4 (wait_accounted), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run(agent: &Path, cfg: &Path, root: &Path, namespaced: bool) -> Run {
    let start = Instant::now();
    let mut cmd = if namespaced {
        let mut c = Command::new("unshare");
        // No --fork: unshare execs the agent, so the child's accounting is the agent's
        // (plus creating the namespaces, about 3 ms of kernel time here).
        c.args(["--uts", "--net", "--mount", "--propagation", "private"]).arg(agent);
        c
    } else {
        Command::new(agent)
    };
    let child = cmd
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
    let (status, cpu, max_rss_kib) = wait_accounted(pid);
    let wall = start.elapsed();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Run {
        wall,
        cpu,
        max_rss_kib,
        writes: report["writes"].as_u64().unwrap_or(0),
        resources: report["resources"].as_array().map_or(0, Vec::len),
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

/// Runs `cmd` and returns its CPU time and peak RSS from the kernel's accounting.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Option<(Duration, Duration, i64)> {
    let start = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().ok()?;
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    let (status, cpu, max_rss_kib) = wait_accounted(pid);
    (status == 0).then(|| (start.elapsed(), cpu, max_rss_kib))
}

/// cloud-init's fixed cost for the same config, when it is installed (Debian `cloud-init`):
/// importing it, and `cloud-init schema` on equivalent user-data. Neither applies anything, so
/// every line printed here says so: these are not apply times and must not be read beside
/// "apply 50 resources" as one.
fn cloud_init(dir: &Path) {
    if !Path::new("/usr/bin/cloud-init").exists() {
        println!(
            "cloud-init import/validation only (applies nothing): not installed (apt-get install cloud-init) - not measured"
        );
        return;
    }
    let mut ud = String::from("#cloud-config\nhostname: bench-node\nwrite_files:\n");
    for i in 0..37 {
        ud.push_str(&format!(
            "  - path: /etc/muster-bench/file-{i:02}.conf\n    permissions: '0644'\n    content: |\n"
        ));
        for _ in 0..64 {
            ud.push_str("      setting = value\n");
        }
    }
    ud.push_str("users:\n  - name: ops\n    ssh_authorized_keys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@bench\"]\n");
    ud.push_str(
        "manage_resolv_conf: true\nresolv_conf:\n  nameservers: [192.168.5.1]\n  searchdomains: [lan]\n",
    );
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
    // Each label says on its own line that cloud-init applied nothing.
    const IMPORT: &str = "cloud-init import only (applies nothing): python3 importing cloudinit.cmd.main and cloudinit.config.schema";
    const SCHEMA: &str = "cloud-init schema validation only (applies nothing): `cloud-init schema` on the same config as user-data";
    for (what, mut cmd) in [
        (IMPORT, {
            let mut c = Command::new("/usr/bin/python3");
            c.args(["-c", "import cloudinit.cmd.main, cloudinit.config.schema"]);
            c
        }),
        (SCHEMA, {
            let mut c = Command::new("/usr/bin/cloud-init");
            c.args(["schema", "--config-file"]).arg(&file);
            c
        }),
    ] {
        let runs: Vec<_> = (0..5).filter_map(|_| measure(&mut cmd)).collect();
        if runs.is_empty() {
            println!("{what}: failed to run");
            continue;
        }
        println!(
            "{what}: median wall {:.1} ms, CPU {:.1} ms; peak RSS {} KiB (0 resources applied - not comparable with \"apply 50 resources\")",
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

/// The namespaces this process is in, as `uts:[…] net:[…]`.
fn namespaces() -> String {
    ["uts", "net"]
        .iter()
        .map(|n| {
            std::fs::read_link(format!("/proc/self/ns/{n}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_now() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    #[allow(unsafe_code)]
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Inside the fresh namespaces: reconcile in-process, as the running agent's periodic pass does.
fn inner(cfg: &Path, root: &Path, host_ns: &str) {
    // Refuse to touch anything unless the namespaces really are new ones.
    let here = namespaces();
    assert!(
        here.split(' ').zip(host_ns.split(' ')).all(|(a, b)| !a.is_empty() && a != b),
        "not in fresh namespaces ({here} vs host {host_ns}); refusing to apply"
    );
    let text = std::fs::read_to_string(cfg).expect("config");
    let (cfg, _) = muster_machinery::config::parse(&text).expect("valid config");
    let fx = muster_agent::effects::LinuxEffects::new(root);
    let (w, c) = (Instant::now(), cpu_now());
    let first = muster_agent::reconcile::reconcile(&cfg, &fx, &muster_agent::reconcile::Pass::default());
    let (apply_wall, apply_cpu) = (w.elapsed(), cpu_now() - c);
    assert!(!first.failed(), "first pass failed: {:?}", first.resources);
    let mut noop = Vec::new();
    for _ in 0..200 {
        let (w, c) = (Instant::now(), cpu_now());
        let r = muster_agent::reconcile::reconcile(&cfg, &fx, &muster_agent::reconcile::Pass::default());
        noop.push((w.elapsed(), cpu_now() - c));
        assert_eq!(
            r.writes,
            0,
            "a no-op pass writes nothing: {:?}",
            r.resources
                .iter()
                .filter(|s| !matches!(s.outcome, muster_machinery::Outcome::Unchanged))
                .collect::<Vec<_>>()
        );
        assert_eq!(r.resources.len(), 50);
    }
    let wall = median(noop.iter().map(|x| x.0).collect());
    // CPU from getrusage has clock-tick granularity on some kernels: take the mean.
    let cpu = noop.iter().map(|x| x.1).sum::<Duration>() / noop.len() as u32;
    println!(
        "{}",
        serde_json::json!({
            "apply_wall_us": apply_wall.as_micros() as u64, "apply_cpu_us": apply_cpu.as_micros() as u64,
            "apply_writes": first.writes,
            "noop_wall_us": wall.as_micros() as u64, "noop_cpu_us": cpu.as_micros() as u64,
        })
    );
}

fn in_process(cfg: &Path, root: &Path) {
    let me = std::env::current_exe().expect("current exe");
    let out = Command::new("unshare")
        .args(["--uts", "--net", "--mount", "--propagation", "private"])
        .arg(me)
        .env("MUSTER_BENCH_INNER", cfg)
        .env("MUSTER_BENCH_ROOT", root)
        .env("MUSTER_BENCH_HOST_NS", namespaces())
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout);
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) else {
        println!("in-process passes: failed: {}", String::from_utf8_lossy(&out.stderr));
        return;
    };
    let ms = |k: &str| v[k].as_f64().unwrap_or(0.0) / 1e3;
    println!(
        "in-process first pass, 50 resources ({} written): wall {:.2} ms, CPU {:.2} ms",
        v["apply_writes"],
        ms("apply_wall_us"),
        ms("apply_cpu_us")
    );
    println!(
        "in-process no-op pass, all 50 resources (the running agent's periodic pass): median wall {:.2} ms, mean CPU {:.2} ms (200 passes)",
        ms("noop_wall_us"),
        ms("noop_cpu_us")
    );
}

fn main() {
    if let (Some(cfg), Some(root), Some(ns)) = (
        std::env::var_os("MUSTER_BENCH_INNER"),
        std::env::var_os("MUSTER_BENCH_ROOT"),
        std::env::var("MUSTER_BENCH_HOST_NS").ok(),
    ) {
        return inner(Path::new(&cfg), Path::new(&root), &ns);
    }
    // Relative to the workspace (cargo runs benches from the package's directory).
    let agent = std::env::var_os("MUSTER_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/muster-agent"));
    let agent = if agent.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(agent)
    } else {
        agent
    };
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
        let a = run(&agent, &file, &root, true);
        assert_eq!(a.resources, 50, "50 resources checked");
        assert!(a.ok, "the agent applied every resource");
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
        // Files, the user and resolv.conf only: no namespaces needed.
        let n = run(&agent, &files_only, &root, false);
        assert_eq!(n.writes, 0, "the second pass changes nothing");
        assert!(n.ok, "the no-op pass failed nothing");
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
    let root = tmp.path().join("root-in-process");
    std::fs::create_dir_all(&root).expect("root");
    in_process(&file, &root);
    cloud_init(tmp.path());
}
