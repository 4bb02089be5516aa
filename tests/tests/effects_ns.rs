//! The agent's real Linux effects, run inside namespaces this test creates (UTS, network,
//! mount; `unshare`, as root in CI): the hostname is set and read back inside the UTS namespace,
//! a file is written under a temp root with its content, mode and owner, a per-netns sysctl is
//! set, and a second pass writes nothing. This machine's hostname and sysctl are checked
//! unchanged afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned()
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim().to_owned()
}

/// The agent binary, a temp dir, and in it the file root and an output directory for scripts.
fn setup() -> (PathBuf, tempfile::TempDir, PathBuf, PathBuf) {
    let agent = muster_tests::bin("muster-agent").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("root"), tmp.path().join("out"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    (agent, tmp, root, out)
}

/// Runs `script` with `sh` in fresh UTS, network and mount namespaces; it gets the agent, the
/// config, the file root and the output directory as `$1`..`$4`.
fn in_fresh_namespaces(script: &str, agent: &Path, cfg: &Path, root: &Path, out: &Path) {
    let status = Command::new("unshare")
        .args(["--uts", "--net", "--mount", "--propagation", "private", "--fork", "sh", "-c", script, "sh"])
        .arg(agent)
        .arg(cfg)
        .arg(root)
        .arg(out)
        .status()
        .expect("unshare (util-linux)");
    assert!(status.success(), "the namespace run failed (needs root, as in CI): {status}");
}

#[test]
fn hostname_file_and_sysctl_applied_in_namespaces_then_nothing_to_do() {
    let (agent, tmp, root, out) = setup();
    let before = (host_hostname(), host_ip_forward());
    // Whatever the host has, ask the namespace for the other value, so the pass must write it.
    let want_forward = if before.1 == "1" { "0" } else { "1" };
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: muster-ns-test\nfiles:\n  - path: /etc/motd\n    content: \"hello from muster\\n\"\n    mode: \"0640\"\n    owner: \"1000:1001\"\nsysctls:\n  net.ipv4.ip_forward: \"{want_forward}\"\n"
        ),
    )
    .unwrap();
    let script = r#"set -e
"$1" --apply-once "$2" --root "$3" > "$4/pass1.json"
"$1" --apply-once "$2" --root "$3" > "$4/pass2.json"
cat /proc/sys/kernel/hostname > "$4/hostname"
cat /proc/sys/net/ipv4/ip_forward > "$4/ip_forward"
"#;
    in_fresh_namespaces(script, &agent, &cfg, &root, &out);

    let pass1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pass1.json")).unwrap()).unwrap();
    let pass2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pass2.json")).unwrap()).unwrap();
    assert_eq!(pass1["writes"], 3, "{pass1}");
    assert_eq!(pass2["writes"], 0, "a second pass changes nothing: {pass2}");
    assert!(pass2["resources"].as_array().unwrap().iter().all(|r| r["outcome"] == "unchanged"), "{pass2}");

    assert_eq!(std::fs::read_to_string(out.join("hostname")).unwrap().trim(), "muster-ns-test");
    assert_eq!(std::fs::read_to_string(out.join("ip_forward")).unwrap().trim(), want_forward);
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "muster-ns-test\n");
    let motd = root.join("etc/motd");
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "hello from muster\n");
    let meta = std::fs::metadata(&motd).unwrap();
    assert_eq!((meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()), (0o640, 1000, 1001));

    // Nothing leaked out of the namespaces.
    assert_eq!((host_hostname(), host_ip_forward()), before);
}

#[test]
fn invalid_config_is_refused_with_every_error_and_nothing_applied() {
    let agent = muster_tests::bin("muster-agent").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: -bad\nfiles:\n  - path: etc/x\n    content: x\n    mode: \"9\"\n",
    )
    .unwrap();
    let before = host_hostname();
    let out =
        Command::new(&agent).arg("--apply-once").arg(&cfg).arg("--root").arg(tmp.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in ["hostname:", "files[0].path:", "files[0].mode:"] {
        assert!(err.contains(path), "{path} missing in {err}");
    }
    assert!(!tmp.path().join("etc").exists(), "nothing applied");
    assert_eq!(host_hostname(), before);
}

#[test]
fn kill_9_mid_apply_leaves_no_half_written_file_and_a_restart_converges() {
    let agent = muster_tests::bin("muster-agent").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // Many files of 64 KiB: the first pass takes long enough to be killed in the middle.
    let body = "x".repeat(64 * 1024);
    let mut cfg = String::from("apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n");
    for i in 0..400 {
        cfg.push_str(&format!("  - path: /srv/data/f{i:03}\n    content: \"{body}\"\n"));
    }
    let file = tmp.path().join("many.yaml");
    std::fs::write(&file, &cfg).unwrap();
    let run = || {
        Command::new("unshare")
            // No --fork: unshare execs the agent, so the child's PID is the agent's.
            .args(["--uts", "--net", "--mount", "--propagation", "private"])
            .arg(&agent)
            .arg("--apply-once")
            .arg(&file)
            .arg("--root")
            .arg(&root)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let data = root.join("srv/data");
    let mut child = run();
    // Kill as soon as some files exist, while others are still to come.
    let start = std::time::Instant::now();
    while std::fs::read_dir(&data).map(|d| d.count()).unwrap_or(0) < 20
        && start.elapsed() < std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill(); // SIGKILL

    let _ = child.wait();
    let written: Vec<_> = std::fs::read_dir(&data).unwrap().filter_map(Result::ok).collect();
    let complete = written.iter().filter(|e| e.file_name().to_string_lossy().starts_with('f')).count();
    assert!(complete < 400, "the kill came too late to prove anything ({complete} files)");
    for e in &written {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('f') {
            assert_eq!(
                std::fs::metadata(e.path()).unwrap().len(),
                body.len() as u64,
                "{name} is half-written"
            );
        }
    }
    // A restart converges, and the pass after that writes nothing.
    let out = run().wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["writes"].as_u64().unwrap() as usize,
        400 - complete,
        "only the missing files were written"
    );
    let again: serde_json::Value = serde_json::from_slice(&run().wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(again["writes"], 0);
    for i in 0..400 {
        assert_eq!(std::fs::read_to_string(data.join(format!("f{i:03}"))).unwrap(), body);
    }
}

/// The host's links, to prove the namespace's never show up here.
fn host_links() -> String {
    let out = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn static_address_route_and_mtu_over_netlink_in_a_network_namespace_then_nothing_to_do() {
    let (agent, tmp, root, out) = setup();
    let links_before = host_links();
    let cfg = tmp.path().join("net.yaml");
    // Modules and units are declared too: an agent that manages a subtree (not `/`) owns neither
    // the kernel nor systemd, so they must come back skipped with the reason, never applied.
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: lo\n      addresses: [\"127.0.0.1/8\"]\n    - name: mv0\n      mtu: 1400\n      addresses: [\"192.168.5.20/24\", \"fd00:5::20/64\"]\n      routes:\n        - {to: \"10.0.0.0/8\", via: \"192.168.5.1\"}\n        - {to: \"0.0.0.0/0\", via: \"192.168.5.1\", metric: 50}\n  nameservers: [\"192.168.5.1\"]\nkernelModules:\n  - name: muster_never_loaded\nunits:\n  - name: muster-test.service\n    content: \"[Service]\\nExecStart=/bin/true\\n\"\n    enabled: true\n",
    )
    .unwrap();
    // `lo` starts down: bringing it up makes the kernel add 127.0.0.1/8 and ::1 by itself.
    let script = r#"set -e
ip link add mv0 type veth peer name mv1
ip addr add 172.16.0.9/24 dev mv0
ip link set mv1 up
"$1" --apply-once "$2" --root "$3" > "$4/pass1.json" || true
"$1" --apply-once "$2" --root "$3" > "$4/pass2.json" || true
ip -o addr show dev mv0 > "$4/addrs"
ip route show dev mv0 > "$4/routes"
ip -o link show dev mv0 > "$4/link"
ip -o addr show dev lo > "$4/lo"
"#;
    in_fresh_namespaces(script, &agent, &cfg, &root, &out);
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let pass1: serde_json::Value = serde_json::from_str(&read("pass1.json")).unwrap();
    let pass2: serde_json::Value = serde_json::from_str(&read("pass2.json")).unwrap();
    let outcome = |p: &serde_json::Value, res: &str| {
        p["resources"].as_array().unwrap().iter().find(|r| r["resource"] == res).cloned().unwrap()
    };
    assert_eq!(outcome(&pass1, "interface:mv0")["outcome"], "applied", "{pass1}");
    assert_eq!(outcome(&pass1, "resolv.conf")["outcome"], "applied", "{pass1}");
    let module = outcome(&pass1, "module:muster_never_loaded");
    assert_eq!(module["outcome"], "skipped", "{pass1}");
    assert!(module["detail"].as_str().unwrap().contains("modules are not loaded"), "{module}");
    let unit = outcome(&pass1, "unit:muster-test.service");
    assert_eq!(unit["outcome"], "skipped", "{pass1}");
    assert!(unit["detail"].as_str().unwrap().contains("systemd not present"), "{unit}");
    assert!(root.join("etc/systemd/system/muster-test.service").exists(), "the unit file is still written");

    let addrs = read("addrs");
    assert!(addrs.contains("192.168.5.20/24") && addrs.contains("fd00:5::20/64"), "{addrs}");
    assert!(!addrs.contains("172.16.0.9"), "an address not in the config is removed: {addrs}");
    let routes = read("routes");
    assert!(routes.contains("10.0.0.0/8 via 192.168.5.1 proto static"), "{routes}");
    assert!(routes.contains("default via 192.168.5.1 proto static metric 50"), "{routes}");
    assert!(read("link").contains("mtu 1400"), "{}", read("link"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap().lines().last(),
        Some("nameserver 192.168.5.1")
    );

    assert_eq!(pass2["writes"], 0, "a second pass changes nothing: {pass2}");
    assert_eq!(outcome(&pass2, "interface:mv0")["outcome"], "unchanged", "{pass2}");
    assert_eq!(outcome(&pass1, "interface:lo")["outcome"], "applied", "brought up: {pass1}");
    assert_eq!(outcome(&pass2, "interface:lo")["outcome"], "unchanged", "{pass2}");
    let lo = read("lo");
    assert!(
        lo.contains("127.0.0.1/8") && lo.contains("::1/128"),
        "the kernel's loopback addresses stay: {lo}"
    );
    assert_eq!(host_links(), links_before, "nothing leaked onto this machine's links");
    assert!(!std::path::Path::new("/sys/module/muster_never_loaded").exists());
}
