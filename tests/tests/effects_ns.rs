//! The agent's real Linux effects (`muster-agent --apply-once`), every run inside namespaces this
//! test creates, as root in CI: fresh UTS, network and mount namespaces held open by a process
//! of the test's own ([`Namespaces`], `unshare`), or a network namespace from `ip netns add` with
//! fresh UTS and mount namespaces per run ([`NetNs`]); both are torn down on drop, even when a
//! test fails. Files always go under a temp root. Every agent run's exit status is checked: a
//! failed resource fails the test with the agent's stderr and report.
//!
//! This machine's hostname, sysctl, links and account files are checked unchanged afterwards.
//! Links that need a kernel feature (veth, 802.1Q VLANs) are only created when the feature is
//! loaded or built in: a test never loads a kernel module (that would change this machine's
//! kernel), it fails saying what to run instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned()
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim().to_owned()
}

/// The host's links, to prove the namespace's never show up here.
fn host_links() -> String {
    let out = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file's content, mode, uid and gid.
type FileFacts = (Vec<u8>, u32, u32, u32);

/// This machine's account files with their mode and owner, to prove the agent never wrote them.
fn host_accounts() -> Vec<Option<FileFacts>> {
    ["/etc/passwd", "/etc/group", "/etc/shadow"]
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some((std::fs::read(p).ok()?, meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()))
        })
        .collect()
}

/// A temp dir and in it the (empty) file root the agent manages.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    (tmp, root)
}

/// Runs `cmd`; fails the test with its stderr unless it exits 0. Its stdout.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {} (needs root, as in CI)\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The kernel's build configuration (`/proc/config.gz`, else `/boot/config-RELEASE`), if any.
fn kernel_config(release: &str) -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        let _ = flate2::read::GzDecoder::new(f).read_to_string(&mut text);
    }
    if text.is_empty() {
        text = std::fs::read_to_string(format!("/boot/config-{release}")).unwrap_or_default();
    }
    text
}

/// Whether this kernel has `module` (Kconfig symbol `config`) without loading anything: loaded,
/// or built in. Otherwise why not and what to do about it.
fn kernel_has(module: &str, config: &str) -> Result<(), String> {
    if Path::new("/sys/module").join(module).exists() {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_owned();
    let builtin =
        std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin")).unwrap_or_default();
    let ko = format!("{module}.ko");
    if builtin.lines().any(|l| l.rsplit('/').next() == Some(ko.as_str())) {
        return Ok(());
    }
    let kconfig = kernel_config(&release);
    let (not_set, set) = (format!("# {config} is not set"), format!("{config}="));
    let setting = kconfig.lines().find_map(|l| if l == not_set { Some("n") } else { l.strip_prefix(&set) });
    match setting {
        Some("y") => Ok(()),
        Some("n") => Err(format!(
            "this kernel ({release}) is built without {config}: it has no {module}, so `modprobe \
             {module}` cannot help. Run this test on a kernel with {config}=y, or =m after `modprobe \
             {module}` as root. (The test never loads kernel modules itself: that would change this \
             machine's kernel.)"
        )),
        _ => Err(format!(
            "the kernel module {module} is neither loaded (no /sys/module/{module}) nor built into \
             this kernel ({release}): run `modprobe {module}` as root (install the kernel's modules \
             package if modprobe cannot find it), then run this test again. (The test never loads \
             kernel modules itself: that would change this machine's kernel.)"
        )),
    }
}

/// Fails the test, with the command to run, unless this kernel has `module` already.
#[track_caller]
fn require_kernel(module: &str, config: &str) {
    if let Err(why) = kernel_has(module, config) {
        panic!("{why}");
    }
}

/// Namespaces an agent runs in.
trait Enter {
    /// `program` run inside the namespaces.
    fn command(&self, program: impl AsRef<OsStr>) -> Command;

    /// `muster-agent --apply-once CFG --root ROOT` inside the namespaces; `root` must be in a
    /// temp dir, never a real root.
    #[track_caller]
    fn agent(&self, cfg: &Path, root: &Path) -> Command {
        let tmp = std::env::temp_dir();
        assert!(root.starts_with(&tmp) && root != tmp, "the agent's root must be in a temp dir: {root:?}");
        let mut c = self.command(muster_tests::bin("muster-agent").unwrap());
        // `--root`, not `--config-root`: the latter is the daemon's flag, ignored by --apply-once,
        // which would then manage `/`.
        c.arg("--apply-once").arg(cfg).arg("--root").arg(root);
        c
    }
}

/// Fresh UTS, network and mount namespaces (`unshare`), held open by a `sleep` of this test's
/// until dropped (killed by its PID, even when the test fails). Commands enter them with
/// `nsenter`, so a hostname or sysctl set by one run is seen by the next.
struct Namespaces {
    holder: Child,
}

impl Namespaces {
    #[track_caller]
    fn new() -> Self {
        let mut holder = Command::new("unshare")
            .args(["--uts", "--net", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", "echo ready && exec sleep infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let stdout = holder.stdout.take().unwrap();
        let ns = Namespaces { holder };
        // "ready" comes after the namespaces exist; before it, nsenter would enter the host's.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "unshare could not create namespaces (needs root, as in CI)");
        for kind in ["uts", "net", "mnt"] {
            let here = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
            let there = std::fs::read_link(format!("/proc/{}/ns/{kind}", ns.holder.id())).unwrap();
            assert_ne!(here, there, "the {kind} namespace is this machine's: refusing to run in it");
        }
        ns
    }

    /// Runs `script` with `sh -eu` inside; fails the test with its stderr unless it succeeds.
    #[track_caller]
    fn sh(&self, script: &str) -> String {
        run_ok(self.command("sh").args(["-euc", script]))
    }
}

impl Enter for Namespaces {
    /// `nsenter` execs `program` (no fork): the child's PID is the program's.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--uts", "--net", "--mount", "--no-fork", "--"])
            .arg(program);
        c
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A network namespace made with `ip netns add`, deleted on drop (even when the test fails).
/// Commands run in it get fresh UTS and mount namespaces too.
struct NetNs {
    name: String,
}

impl NetNs {
    #[track_caller]
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ns = NetNs {
            name: format!("muster-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        };
        run_ok(Command::new("ip").args(["netns", "add", &ns.name]));
        ns
    }

    /// `ip -n NS ARGS`; fails the test with its stderr unless it succeeds.
    #[track_caller]
    fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
}

impl Enter for NetNs {
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .args(["unshare", "--uts", "--mount", "--propagation", "private", "--"])
            .arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip").args(["netns", "del", &self.name]).output() {
            Ok(o) if o.status.success() => {}
            other => eprintln!("could not delete network namespace {}: {other:?}", self.name),
        }
    }
}

/// Runs one agent pass; fails the test unless the agent exits 0 (it exits 1 when a resource
/// failed, 2 on a config it refuses), with its stderr and report. The report.
#[track_caller]
fn apply(mut cmd: Command) -> serde_json::Value {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the agent failed ({}): {cmd:?}\n--- stderr:\n{}\n--- report:\n{report}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{report}"))
}

/// The report's entry for `resource`.
#[track_caller]
fn outcome(report: &serde_json::Value, resource: &str) -> serde_json::Value {
    report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == resource)
        .cloned()
        .unwrap_or_else(|| panic!("no {resource} in {report}"))
}

#[track_caller]
fn assert_nothing_to_do(report: &serde_json::Value) {
    assert_eq!(report["writes"], 0, "a second pass changes nothing: {report}");
    let resources = report["resources"].as_array().unwrap();
    assert!(!resources.is_empty(), "{report}");
    assert!(resources.iter().all(|r| r["outcome"] == "unchanged"), "{report}");
}

/// The hostname is set inside the UTS namespace (and written to the temp root's /etc/hostname),
/// a file is written under the temp root with its content, mode and numeric owner, a per-netns
/// sysctl is set, a second pass writes nothing; the host's hostname and sysctl are unchanged.
#[test]
fn hostname_file_and_sysctl_applied_in_namespaces_then_nothing_to_do() {
    let (tmp, root) = setup();
    let before = (host_hostname(), host_ip_forward());
    let ns = Namespaces::new();
    // Whatever the namespace starts with, ask for the other value, so the pass must write it.
    let want_forward = if ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim() == "1" { "0" } else { "1" };
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: muster-ns-test\nfiles:\n  - path: /etc/motd\n    content: \"hello from muster\\n\"\n    mode: \"0640\"\n    owner: \"1000:1001\"\nsysctls:\n  net.ipv4.ip_forward: \"{want_forward}\"\n"
        ),
    )
    .unwrap();
    let pass1 = apply(ns.agent(&cfg, &root));
    let pass2 = apply(ns.agent(&cfg, &root));
    assert_eq!(pass1["writes"], 3, "{pass1}");
    assert_nothing_to_do(&pass2);

    assert_eq!(ns.sh("cat /proc/sys/kernel/hostname").trim(), "muster-ns-test");
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), want_forward);
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "muster-ns-test\n");
    let motd = root.join("etc/motd");
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "hello from muster\n");
    let meta = std::fs::metadata(&motd).unwrap();
    assert_eq!((meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()), (0o640, 1000, 1001));

    // Nothing leaked out of the namespaces.
    assert_eq!((host_hostname(), host_ip_forward()), before);
}

/// A config with several errors is refused whole: exit status 2, every error named on stderr,
/// nothing applied (no file under the root, the hostname unchanged). The agent runs inside
/// namespaces, so even a validation regression could only rename the namespace, never this
/// machine.
#[test]
fn invalid_config_is_refused_with_every_error_and_nothing_applied() {
    let (tmp, root) = setup();
    let cfg = tmp.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: -bad\nfiles:\n  - path: etc/x\n    content: x\n    mode: \"9\"\n",
    )
    .unwrap();
    let before = host_hostname();
    let ns = Namespaces::new();
    let ns_before = ns.sh("cat /proc/sys/kernel/hostname");
    let out = ns.agent(&cfg, &root).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a refused config exits 2, this one {}\n--- stderr:\n{err}\n--- stdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    for path in ["hostname:", "files[0].path:", "files[0].mode:"] {
        assert!(err.contains(path), "{path} missing in {err}");
    }
    assert!(std::fs::read_dir(&root).unwrap().next().is_none(), "nothing applied under the root");
    assert_eq!(ns.sh("cat /proc/sys/kernel/hostname"), ns_before, "not even in the namespace");
    assert_eq!(host_hostname(), before);
}

/// A pass killed with SIGKILL in the middle leaves every file it wrote complete (written to a
/// temp file and renamed), a restart writes exactly the missing ones, and the pass after that
/// writes nothing.
#[test]
fn kill_9_mid_apply_leaves_no_half_written_file_and_a_restart_converges() {
    let (tmp, root) = setup();
    // Many files of 64 KiB: the first pass takes long enough to be killed in the middle.
    let body = "x".repeat(64 * 1024);
    let mut cfg = String::from("apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n");
    for i in 0..400 {
        cfg.push_str(&format!("  - path: /srv/data/f{i:03}\n    content: \"{body}\"\n"));
    }
    let file = tmp.path().join("many.yaml");
    std::fs::write(&file, &cfg).unwrap();
    let ns = Namespaces::new();
    let data = root.join("srv/data");
    let stderr = tmp.path().join("killed.stderr");
    // nsenter execs the agent, so the child's PID is the agent's.
    let mut child = ns
        .agent(&file, &root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Kill as soon as some files exist, while others are still to come.
    let start = std::time::Instant::now();
    while std::fs::read_dir(&data).map(|d| d.count()).unwrap_or(0) < 20
        && start.elapsed() < std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the first pass was to be killed mid-apply; it ended {status}\n--- stderr:\n{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );

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
    // A restart converges (taking along the temp file the kill may have left), and the pass
    // after that writes nothing.
    let report = apply(ns.agent(&file, &root));
    let leftovers: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
    assert_eq!(
        report["writes"].as_u64().unwrap() as usize,
        400 - complete,
        "only the missing files were written"
    );
    assert_nothing_to_do(&apply(ns.agent(&file, &root)));
    for i in 0..400 {
        assert_eq!(std::fs::read_to_string(data.join(format!("f{i:03}"))).unwrap(), body);
    }
}

/// Over real netlink in fresh namespaces: a link gets exactly its static addresses (one not in
/// the config removed), its routes (protocol static) and MTU; `lo` is brought up and keeps the
/// kernel's addresses; resolv.conf is written; kernel modules and units are skipped with the
/// reason by an agent that manages a subtree; a second pass changes nothing; no link leaks onto
/// this machine.
#[test]
fn static_address_route_and_mtu_over_netlink_in_a_network_namespace_then_nothing_to_do() {
    require_kernel("veth", "CONFIG_VETH");
    let (tmp, root) = setup();
    let links_before = host_links();
    let cfg = tmp.path().join("net.yaml");
    // Modules and units are declared too: an agent that manages a subtree (not `/`) owns neither
    // the kernel nor systemd, so they must come back skipped with the reason, never applied.
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: lo\n      addresses: [\"127.0.0.1/8\"]\n    - name: mv0\n      mtu: 1400\n      addresses: [\"192.168.5.20/24\", \"fd00:5::20/64\"]\n      routes:\n        - {to: \"10.0.0.0/8\", via: \"192.168.5.1\"}\n        - {to: \"0.0.0.0/0\", via: \"192.168.5.1\", metric: 50}\n  nameservers: [\"192.168.5.1\"]\nkernelModules:\n  - name: muster_never_loaded\nunits:\n  - name: muster-test.service\n    content: \"[Service]\\nExecStart=/bin/true\\n\"\n    enabled: true\n",
    )
    .unwrap();
    let ns = Namespaces::new();
    // `lo` starts down: bringing it up makes the kernel add 127.0.0.1/8 and ::1 by itself.
    ns.sh("ip link add mv0 type veth peer name mv1\nip addr add 172.16.0.9/24 dev mv0\nip link set mv1 up");
    let pass1 = apply(ns.agent(&cfg, &root));
    let pass2 = apply(ns.agent(&cfg, &root));
    assert_eq!(outcome(&pass1, "interface:mv0")["outcome"], "applied", "{pass1}");
    assert_eq!(outcome(&pass1, "resolv.conf")["outcome"], "applied", "{pass1}");
    let module = outcome(&pass1, "module:muster_never_loaded");
    assert_eq!(module["outcome"], "skipped", "{pass1}");
    assert!(module["detail"].as_str().unwrap().contains("modules are not loaded"), "{module}");
    let unit = outcome(&pass1, "unit:muster-test.service");
    assert_eq!(unit["outcome"], "skipped", "{pass1}");
    assert!(unit["detail"].as_str().unwrap().contains("systemd not present"), "{unit}");
    assert!(root.join("etc/systemd/system/muster-test.service").exists(), "the unit file is still written");

    let addrs = ns.sh("ip -o addr show dev mv0");
    assert!(addrs.contains("192.168.5.20/24") && addrs.contains("fd00:5::20/64"), "{addrs}");
    assert!(!addrs.contains("172.16.0.9"), "an address not in the config is removed: {addrs}");
    let routes = ns.sh("ip route show dev mv0");
    assert!(routes.contains("10.0.0.0/8 via 192.168.5.1 proto static"), "{routes}");
    assert!(routes.contains("default via 192.168.5.1 proto static metric 50"), "{routes}");
    let link = ns.sh("ip -o link show dev mv0");
    assert!(link.contains("mtu 1400"), "{link}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap().lines().last(),
        Some("nameserver 192.168.5.1")
    );

    assert_eq!(pass2["writes"], 0, "a second pass changes nothing: {pass2}");
    assert_eq!(outcome(&pass2, "interface:mv0")["outcome"], "unchanged", "{pass2}");
    assert_eq!(outcome(&pass1, "interface:lo")["outcome"], "applied", "brought up: {pass1}");
    assert_eq!(outcome(&pass2, "interface:lo")["outcome"], "unchanged", "{pass2}");
    let lo = ns.sh("ip -o addr show dev lo");
    assert!(
        lo.contains("127.0.0.1/8") && lo.contains("::1/128"),
        "the kernel's loopback addresses stay: {lo}"
    );
    drop(ns);
    assert_eq!(host_links(), links_before, "nothing leaked onto this machine's links");
    assert!(!Path::new("/sys/module/muster_never_loaded").exists());
}

/// Writes `text` at `path` with exactly this mode and owner.
fn seed(path: &Path, text: &str, mode: u32, uid: u32, gid: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// (content, mode, uid, gid) of `path`.
fn file_state(path: &Path) -> (String, u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (std::fs::read_to_string(path).unwrap(), meta.permissions().mode() & 0o7777, meta.uid(), meta.gid())
}

/// Users through the real effects, under a temp root seeded like Debian (passwd and group
/// root:root 0644, shadow root:shadow 0640): the user is added to passwd with its own primary
/// group, joins the extra groups, gets a locked (`!`) shadow entry; every existing entry stays
/// as it was and each account file keeps its mode and owner; `~/.ssh/authorized_keys` is 0600
/// and the user's; a file with a named owner (`svc:adm`) gets the ids from the root's own
/// passwd and group (not this machine's); a second pass reports every resource unchanged; this
/// machine's account files are untouched.
#[test]
fn users_groups_keys_and_named_owners_under_a_temp_root_keep_modes_then_nothing_to_do() {
    let (tmp, root) = setup();
    let host_before = (host_hostname(), host_accounts());
    let etc = root.join("etc");
    let passwd_seed = "root:x:0:0:root:/root:/bin/bash\nsvc:x:1000:1000:service:/srv/svc:/usr/sbin/nologin\n";
    // gid 1001 is taken by a group without a user: the new user's uid and gid differ.
    let group_seed = "root:x:0:\nadm:x:4:\nsudo:x:27:\nshadow:x:42:\nsvc:x:1000:\ndeploy:x:1001:\n";
    let shadow_seed = "root:*:19000:0:99999:7:::\nsvc:!:19000:0:99999:7:::\n";
    seed(&etc.join("passwd"), passwd_seed, 0o644, 0, 0);
    seed(&etc.join("group"), group_seed, 0o644, 0, 0);
    seed(&etc.join("shadow"), shadow_seed, 0o640, 0, 42);
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@lab";
    let cfg = tmp.path().join("users.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nusers:\n  - name: ops\n    groups: [sudo, adm]\n    sshAuthorizedKeys: [\"{key}\"]\nfiles:\n  - path: /srv/svc/app.conf\n    content: \"listen 8080\\n\"\n    mode: \"0640\"\n    owner: \"svc:adm\"\n"
        ),
    )
    .unwrap();
    let ns = Namespaces::new();
    let pass1 = apply(ns.agent(&cfg, &root));
    assert_eq!(outcome(&pass1, "user:ops")["outcome"], "applied", "{pass1}");
    assert_eq!(outcome(&pass1, "file:/srv/svc/app.conf")["outcome"], "applied", "{pass1}");

    // passwd: the existing entries as they were, then the user with fresh ids.
    let (passwd, mode, uid, gid) = file_state(&etc.join("passwd"));
    assert_eq!((mode, uid, gid), (0o644, 0, 0), "passwd keeps its mode and owner");
    let ops = passwd.strip_prefix(passwd_seed).unwrap_or_else(|| panic!("existing entries kept: {passwd}"));
    let f: Vec<&str> = ops.trim_end().split(':').collect();
    assert_eq!((f.len(), f[0], f[1], f[5], f[6]), (7, "ops", "x", "/home/ops", "/bin/sh"), "{passwd}");
    let (ops_uid, ops_gid): (u32, u32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    assert!(ops_uid >= 1000 && ![0, 1000].contains(&ops_uid), "a free uid: {passwd}");
    assert!(ops_gid >= 1000 && ![0, 4, 27, 42, 1000, 1001].contains(&ops_gid), "a free gid: {passwd}");
    assert_eq!(
        passwd,
        format!("{passwd_seed}ops:x:{ops_uid}:{ops_gid}:managed by muster:/home/ops:/bin/sh\n")
    );

    // group: membership in the extra groups, the primary group added, the rest as it was.
    let (group, mode, uid, gid) = file_state(&etc.join("group"));
    assert_eq!((mode, uid, gid), (0o644, 0, 0), "group keeps its mode and owner");
    assert_eq!(
        group,
        format!("root:x:0:\nadm:x:4:ops\nsudo:x:27:ops\nshadow:x:42:\nsvc:x:1000:\ndeploy:x:1001:\nops:x:{ops_gid}:\n")
    );

    // shadow: a locked password; still root:shadow 0640, not the 0600 a new shadow would get.
    let (shadow, mode, uid, gid) = file_state(&etc.join("shadow"));
    assert_eq!((mode, uid, gid), (0o640, 0, 42), "shadow keeps its mode and owner");
    let ops = shadow.strip_prefix(shadow_seed).unwrap_or_else(|| panic!("existing entries kept: {shadow}"));
    assert_eq!(ops.lines().count(), 1, "{shadow}");
    assert_eq!(ops.split(':').take(2).collect::<Vec<_>>(), ["ops", "!"], "password locked: {shadow}");

    let keys = file_state(&root.join("home/ops/.ssh/authorized_keys"));
    assert_eq!(keys, (format!("{key}\n"), 0o600, ops_uid, ops_gid), "authorized_keys");
    let conf = file_state(&root.join("srv/svc/app.conf"));
    assert_eq!(
        conf,
        ("listen 8080\n".to_owned(), 0o640, 1000, 4),
        "svc:adm from the root's passwd and group"
    );

    let pass2 = apply(ns.agent(&cfg, &root));
    assert_nothing_to_do(&pass2);
    drop(ns);
    assert_eq!((host_hostname(), host_accounts()), host_before, "this machine's accounts untouched");
}

/// Removing a route from the config removes Muster's route (protocol `static`) over real
/// netlink, in a network namespace this test creates (`ip netns add`), and nothing else: the
/// route still in the config stays, and so do a route added by hand (`proto boot`, not Muster's)
/// and the kernel's route for the address's subnet; a further pass changes nothing.
#[test]
fn a_removed_route_of_ours_goes_and_others_stay_over_netlink_in_a_network_namespace() {
    require_kernel("veth", "CONFIG_VETH");
    let (tmp, root) = setup();
    let links_before = host_links();
    let ns = NetNs::new();
    ns.ip(&["link", "add", "mt0", "type", "veth", "peer", "name", "mt1"]);
    ns.ip(&["link", "set", "mt1", "up"]);
    let config = |routes: &[&str]| {
        let routes: String =
            routes.iter().map(|to| format!("        - {{to: \"{to}\", via: \"192.168.7.1\"}}\n")).collect();
        format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: mt0\n      addresses: [\"192.168.7.2/24\"]\n      routes:\n{routes}")
    };
    let (two, one) = (tmp.path().join("two-routes.yaml"), tmp.path().join("one-route.yaml"));
    std::fs::write(&two, config(&["10.20.0.0/16", "10.30.0.0/16"])).unwrap();
    std::fs::write(&one, config(&["10.20.0.0/16"])).unwrap();

    let pass1 = apply(ns.agent(&two, &root));
    assert_eq!(outcome(&pass1, "interface:mt0")["outcome"], "applied", "{pass1}");
    let routes = ns.ip(&["route", "show", "dev", "mt0"]);
    for to in ["10.20.0.0/16", "10.30.0.0/16"] {
        assert!(routes.contains(&format!("{to} via 192.168.7.1 proto static")), "{routes}");
    }
    ns.ip(&["route", "add", "10.40.0.0/16", "via", "192.168.7.1", "dev", "mt0", "proto", "boot"]);

    let pass2 = apply(ns.agent(&one, &root));
    let routes = ns.ip(&["route", "show", "dev", "mt0"]);
    assert!(!routes.contains("10.30.0.0/16"), "Muster's removed route is gone: {routes}\n{pass2}");
    assert_eq!(outcome(&pass2, "interface:mt0")["outcome"], "applied", "{pass2}");
    assert!(routes.contains("10.20.0.0/16 via 192.168.7.1 proto static"), "the kept one stays: {routes}");
    // `ip route` leaves out `proto boot` (its default): ask for that protocol's routes.
    let boot = ns.ip(&["route", "show", "dev", "mt0", "proto", "boot"]);
    assert_eq!(boot.trim(), "10.40.0.0/16 via 192.168.7.1", "not Muster's, it stays: {routes}");
    assert!(routes.contains("192.168.7.0/24 proto kernel"), "the kernel's stays: {routes}");

    assert_nothing_to_do(&apply(ns.agent(&one, &root)));
    drop(ns);
    assert_eq!(host_links(), links_before, "nothing leaked onto this machine's links");
}

/// A VLAN declared on a link, over real netlink in a network namespace this test creates. On a
/// kernel with 802.1Q (loaded or built in) it is created as `PARENT.ID` on its parent with its
/// static address, and a second pass changes nothing. On a kernel without it (as on this CI's),
/// the VLAN resource fails with the kernel's reason while its parent interface still applies;
/// the agent never loads a module itself here. (The QEMU network-boot test creates a VLAN on a
/// Debian kernel, where 802.1Q is a module.)
#[test]
fn vlan_over_netlink_in_a_network_namespace_is_created_or_fails_clearly() {
    require_kernel("veth", "CONFIG_VETH");
    let (tmp, root) = setup();
    let links_before = host_links();
    let ns = NetNs::new();
    ns.ip(&["link", "add", "mt0", "type", "veth", "peer", "name", "mt1"]);
    ns.ip(&["link", "set", "mt1", "up"]);
    let cfg = tmp.path().join("vlan.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: mt0\n      addresses: [\"192.168.7.2/24\"]\n      vlans:\n        - id: 42\n          addresses: [\"192.168.42.2/24\"]\n",
    )
    .unwrap();
    if kernel_has("8021q", "CONFIG_VLAN_8021Q").is_ok() {
        let pass1 = apply(ns.agent(&cfg, &root));
        assert_eq!(outcome(&pass1, "vlan:mt0.42")["outcome"], "applied", "{pass1}");
        let link = ns.ip(&["-d", "link", "show", "mt0.42"]);
        assert!(link.contains("mt0.42@mt0") && link.contains("vlan protocol 802.1Q id 42"), "{link}");
        let addrs = ns.ip(&["-o", "addr", "show", "dev", "mt0.42"]);
        assert!(addrs.contains("192.168.42.2/24"), "{addrs}");
        assert_nothing_to_do(&apply(ns.agent(&cfg, &root)));
    } else {
        let out = ns.agent(&cfg, &root).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "a failed resource exits 1: {out:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(outcome(&report, "interface:mt0")["outcome"], "applied", "{report}");
        let vlan = outcome(&report, "vlan:mt0.42");
        assert_eq!(vlan["outcome"], "failed", "{report}");
        let detail = vlan["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("create VLAN 42 as mt0.42"), "the failure names what was tried: {detail}");
        assert!(ns.ip(&["-o", "link", "show"]).lines().all(|l| !l.contains("mt0.42")), "nothing half-made");
    }
    drop(ns);
    assert_eq!(host_links(), links_before, "nothing leaked onto this machine's links");
}
