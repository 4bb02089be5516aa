//! `muster lab` with namespaces, end to end with real binaries: each agent in its own network
//! (veth on a lab bridge), UTS and mount namespace with its own file root. `muster config apply`
//! shows a diff with --dry-run, then applies hostname, file and sysctl inside the node;
//! `muster machines` shows the new hostname; history and rollback work; a sysctl that is not per
//! namespace is refused; a network try that cuts a node off reverts by itself with its route
//! back, one that keeps it reachable confirms itself (history: applied, running); a rollback to
//! before Muster leaves no trace (addresses, MTU, routes, files, hostname as they were); this
//! machine's hostname, sysctls and /etc stay untouched; `lab down` removes every namespace.
//! Needs root (as in CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use muster_tests::{bin, cli, wait_for};

fn muster(mc: &Path, args: &[&str]) -> String {
    let out = cli(mc, args).unwrap();
    assert!(out.status.success(), "muster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default().trim().to_owned()
}

fn machine_json(mc: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&muster(mc, &["machine", "get", id, "-o", "json"])).unwrap()
}

/// Every file under `root` (relative), with its content.
fn files_under(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push((p.strip_prefix(root).unwrap().display().to_string() + "/", Vec::new()));
                todo.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn lab_nodes_apply_config_in_their_own_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let before = (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/net/ipv4/ip_forward"),
        read("/proc/sys/vm/swappiness"),
    );
    let motd_before = std::fs::read("/etc/motd").ok();
    let up = Command::new(bin("muster").unwrap())
        .args([
            "lab",
            "up",
            "--nodes",
            "2",
            "--detach",
            "--isolation",
            "netns",
            "--heartbeat",
            "500ms",
            "--dir",
        ])
        .arg(&lab)
        .output()
        .unwrap();
    let lab_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.join("lab.json")).unwrap_or_else(|_| "{}".into()))
            .unwrap();
    let result = std::panic::catch_unwind(|| {
        assert!(
            up.status.success(),
            "lab up: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        let mc = lab.join("controller/musterconfig");
        // lab-node-2 as it is before Muster changes anything: to compare after "before Muster".
        let pid2 = lab_json["agent_pids"][1].as_u64().unwrap().to_string();
        let in_node2 = |args: &[&str]| {
            let o = Command::new("nsenter").args(["-t", &pid2, "-n", "-u"]).args(args).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let mtu = || {
            let link = in_node2(&["ip", "-o", "link", "show", "eth0"]);
            link.split_whitespace().skip_while(|w| *w != "mtu").nth(1).unwrap_or_default().to_owned()
        };
        let node2_state = || {
            // The broadcast address follows from address and prefix (netlink adds it), and IPv6
            // duplicate detection may still be running: neither is state Muster keeps.
            let addrs: String = in_node2(&["ip", "-o", "addr", "show", "eth0"])
                .lines()
                .map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let mut out = Vec::new();
                    let mut i = 0;
                    while i < w.len() {
                        match w[i] {
                            "brd" => i += 1,
                            "tentative" => {}
                            x => out.push(x),
                        }
                        i += 1;
                    }
                    out.join(" ") + "\n"
                })
                .collect();
            (
                addrs,
                in_node2(&["ip", "route", "show", "table", "main"]),
                mtu(),
                in_node2(&["cat", "/proc/sys/kernel/hostname"]),
                files_under(&lab.join("lab-node-2/root")),
            )
        };
        let node2_before = node2_state();
        let cfg = tmp.path().join("node-a.yaml");
        std::fs::write(
            &cfg,
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: node-a\nfiles:\n  - path: /etc/motd\n    content: \"hello from muster\\n\"\n    mode: \"0644\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\n",
        )
        .unwrap();
        let id = machine_json(&mc, "lab-node-1")["id"].as_str().unwrap().to_owned();
        let diff = muster(&mc, &["config", "apply", "lab-node-1", "-f", cfg.to_str().unwrap(), "--dry-run"]);
        assert!(diff.contains("+hostname: node-a"), "{diff}");
        assert_eq!(machine_json(&mc, &id)["hostname"], "lab-node-1", "a dry run changes nothing");

        muster(&mc, &["config", "apply", "lab-node-1", "-f", cfg.to_str().unwrap()]);
        wait_for("node-a in muster machines", Duration::from_secs(30), || {
            let v: serde_json::Value =
                serde_json::from_str(&muster(&mc, &["machines", "-o", "json"])).ok()?;
            v.as_array()?.iter().any(|m| m["hostname"] == "node-a").then_some(())
        })
        .unwrap();
        let rendered = muster(&mc, &["config", "get", "node-a", "--rendered"]);
        assert!(rendered.contains("generation 1 (auto, applied), running 1"), "{rendered}");

        // Inside the node's own namespaces.
        let pid = lab_json["agent_pids"][0].as_u64().unwrap().to_string();
        let ns = |flag: &str, file: &str| {
            let o = Command::new("nsenter").args(["-t", &pid, flag, "cat", file]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        };
        assert_eq!(ns("-u", "/proc/sys/kernel/hostname"), "node-a");
        assert_eq!(ns("-n", "/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(
            std::fs::read_to_string(lab.join("lab-node-1/root/etc/motd")).unwrap(),
            "hello from muster\n"
        );

        // History and rollback.
        let v2 = tmp.path().join("node-b.yaml");
        std::fs::write(&v2, std::fs::read_to_string(&cfg).unwrap().replace("node-a", "node-b")).unwrap();
        muster(&mc, &["config", "apply", "node-a", "-f", v2.to_str().unwrap()]);
        wait_for("node-b", Duration::from_secs(30), || {
            (machine_json(&mc, &id)["hostname"] == "node-b").then_some(())
        })
        .unwrap();
        let history = muster(&mc, &["config", "history", "node-b"]);
        assert!(history.lines().count() == 3, "{history}");
        muster(&mc, &["config", "rollback", "node-b", "--to", "1"]);
        wait_for("back to node-a", Duration::from_secs(30), || {
            (machine_json(&mc, &id)["hostname"] == "node-a").then_some(())
        })
        .unwrap();
        assert_eq!(ns("-u", "/proc/sys/kernel/hostname"), "node-a");

        // Shared layers: a role's layer in one cluster reaches its machines, diff says whether
        // it would change anything (exit 1 when it would), and deleting the layer takes its file
        // away again.
        muster(&mc, &["assign", "node-a", "--role", "worker", "--cluster", "lab"]);
        let layer = tmp.path().join("worker-lab.yaml");
        std::fs::write(
            &layer,
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/worker-note\n    content: \"workers in lab\\n\"\n",
        )
        .unwrap();
        let typo = cli(&mc, &["config", "apply", "--cluster", "lba", "-f", layer.to_str().unwrap()]).unwrap();
        assert!(!typo.status.success(), "a layer for a cluster nobody is in is refused");
        assert!(String::from_utf8_lossy(&typo.stderr).contains("--allow-empty"), "{typo:?}");
        let l = layer.to_str().unwrap();
        let diff = cli(&mc, &["config", "diff", "--role", "worker", "--cluster", "lab", "-f", l]).unwrap();
        assert_eq!(diff.status.code(), Some(1), "a diff that would change something exits 1: {diff:?}");
        assert!(String::from_utf8_lossy(&diff.stdout).contains("+- path: /etc/worker-note"), "{diff:?}");
        muster(&mc, &["config", "apply", "--role", "worker", "--cluster", "lab", "-f", l]);
        let note = lab.join("lab-node-1/root/etc/worker-note");
        wait_for("the layer's file on node-a", Duration::from_secs(30), || {
            (std::fs::read_to_string(&note).ok()? == "workers in lab\n").then_some(())
        })
        .unwrap();
        let same = cli(&mc, &["config", "diff", "--role", "worker", "--cluster", "lab", "-f", l]).unwrap();
        assert_eq!(same.status.code(), Some(0), "nothing would change: {same:?}");
        let shown = muster(&mc, &["config", "get", "--role", "worker", "--cluster", "lab"]);
        assert!(
            shown.starts_with(&format!("# layer role/worker@lab: revision 1, part of 1 machine(s): {id}")),
            "{shown}"
        );
        assert!(shown.contains("/etc/worker-note"), "{shown}");
        muster(&mc, &["config", "delete", "--role", "worker", "--cluster", "lab"]);
        wait_for("the layer's file gone again", Duration::from_secs(30), || (!note.exists()).then_some(()))
            .unwrap();
        let h: serde_json::Value = serde_json::from_str(&muster(
            &mc,
            &["config", "history", "--role", "worker", "--cluster", "lab", "-o", "json"],
        ))
        .unwrap();
        assert_eq!((h[0]["revision"].as_u64(), h[0]["deleted"].as_bool()), (Some(2), Some(true)), "{h}");

        // A sysctl that is not per network namespace is refused in the lab.
        let sw = tmp.path().join("sw.yaml");
        std::fs::write(
            &sw,
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nsysctls:\n  vm.swappiness: \"7\"\n",
        )
        .unwrap();
        muster(&mc, &["config", "apply", "lab-node-2", "-f", sw.to_str().unwrap()]);
        wait_for("the refusal to be reported", Duration::from_secs(30), || {
            muster(&mc, &["config", "get", "lab-node-2", "--rendered"])
                .contains("sysctl:vm.swappiness failed")
                .then_some(())
        })
        .unwrap();

        // Try mode: a network change that cuts the node off the controller is reverted by the
        // agent within the timeout, and reported once it is back.
        let addrs = || {
            let o = Command::new("nsenter")
                .args(["-t", &pid2, "-n", "ip", "-4", "-o", "addr", "show", "eth0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let net = |addr: &str| {
            format!(
                "apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: eth0\n      addresses: [\"{addr}/24\"]\n      routes: [{{to: \"0.0.0.0/0\", via: \"10.77.0.1\"}}]\n"
            )
        };
        let good = tmp.path().join("net-good.yaml");
        std::fs::write(&good, net("10.77.0.11")).unwrap();
        let out =
            muster(&mc, &["config", "apply", "lab-node-2", "-f", good.to_str().unwrap(), "--mode", "auto"]);
        let g_good: u64 = out
            .split("generation ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        wait_for("the same network applied", Duration::from_secs(30), || {
            muster(&mc, &["config", "get", "lab-node-2", "--rendered"])
                .contains(&format!("running {g_good}"))
                .then_some(())
        })
        .unwrap();
        let bad = tmp.path().join("net-bad.yaml");
        std::fs::write(&bad, net("10.99.0.11")).unwrap();
        let out =
            muster(&mc, &["config", "apply", "lab-node-2", "-f", bad.to_str().unwrap(), "--timeout", "4s"]);
        assert!(
            out.contains("(try: confirmed once the agent reconnects over it"),
            "network changes default to a try: {out}"
        );
        wait_for("the node cut off by its own config", Duration::from_secs(30), || {
            addrs().contains("10.99.0.11").then_some(())
        })
        .unwrap();
        let got = wait_for("the try reverted and reported", Duration::from_secs(90), || {
            let r = muster(&mc, &["config", "get", "lab-node-2", "--rendered"]);
            r.contains("(try, reverted)").then_some(r)
        })
        .unwrap();
        assert!(got.contains(&format!("running {g_good}")), "{got}");
        let back = addrs();
        assert!(back.contains("10.77.0.11/24") && !back.contains("10.99.0.11"), "{back}");
        wait_for("lab-node-2 connected again", Duration::from_secs(60), || {
            let m = machine_json(&mc, "lab-node-2");
            (m["connected"] == true && m["state"] == "ready").then_some(())
        })
        .unwrap();
        let routes = in_node2(&["ip", "route", "show", "default"]);
        assert!(routes.contains("default via 10.77.0.1"), "its route back to the controller: {routes}");

        // A network change that keeps the node reachable confirms itself: the agent reconnects
        // over it and the controller takes that as proof. History says so.
        let moved = tmp.path().join("net-moved.yaml");
        std::fs::write(&moved, net("10.77.0.21").replace("addresses:", "mtu: 1400\n      addresses:"))
            .unwrap();
        let out = muster(
            &mc,
            &["config", "apply", "lab-node-2", "-f", moved.to_str().unwrap(), "--timeout", "30s"],
        );
        let g_moved: u64 = out
            .split("generation ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        let got = wait_for("the try confirmed by itself", Duration::from_secs(60), || {
            let r = muster(&mc, &["config", "get", "lab-node-2", "--rendered"]);
            r.contains(&format!("generation {g_moved} (try, applied), running {g_moved}")).then_some(r)
        })
        .unwrap();
        assert!(!got.contains("trying: reverts at"), "{got}");
        let history = muster(&mc, &["config", "history", "lab-node-2", "-o", "json"]);
        let h: serde_json::Value = serde_json::from_str(&history).unwrap();
        assert_eq!(h[0]["generation"], g_moved, "{history}");
        assert_eq!(
            (h[0]["state"].as_str(), h[0]["running"].as_bool()),
            (Some("applied"), Some(true)),
            "{history}"
        );
        assert!(addrs().contains("10.77.0.21/24"), "{}", addrs());
        assert_eq!(mtu(), "1400");

        // Back to before Muster: addresses, MTU, routes, files and hostname as they were.
        muster(&mc, &["config", "rollback", "lab-node-2", "--to", "0"]);
        wait_for("lab-node-2 as before Muster", Duration::from_secs(60), || {
            (node2_state() == node2_before).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: now {:?}\nbefore {:?}", node2_state(), node2_before));
        wait_for("the release reported applied", Duration::from_secs(60), || {
            let r = muster(&mc, &["config", "get", "lab-node-2", "--rendered"]);
            (r.contains("applied), running") && !r.contains("failed")).then_some(())
        })
        .unwrap();

        // node-a back to before Muster: its own hostname again, on the node (what its UTS
        // namespace started with: this machine's name) and in `muster machines` (the name the
        // lab node reports, not the config's old one).
        muster(&mc, &["config", "rollback", "node-a", "--to", "0"]);
        wait_for("lab-node-1 by its own name again", Duration::from_secs(60), || {
            (machine_json(&mc, &id)["hostname"] == "lab-node-1").then_some(())
        })
        .unwrap();
        assert_eq!(ns("-u", "/proc/sys/kernel/hostname"), before.0);
    });
    let down =
        Command::new(bin("muster").unwrap()).args(["lab", "down", "--dir"]).arg(&lab).output().unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ours: Vec<String> =
        lab_json["netns"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
    assert!(ours.len() == 3, "{ours:?}");
    let listed = String::from_utf8_lossy(&left.stdout);
    assert!(ours.iter().all(|n| !listed.contains(n.as_str())), "namespaces left behind: {listed}");
    // This machine is as it was.
    assert_eq!(
        (
            read("/proc/sys/kernel/hostname"),
            read("/proc/sys/net/ipv4/ip_forward"),
            read("/proc/sys/vm/swappiness")
        ),
        before
    );
    assert_eq!(std::fs::read("/etc/motd").ok(), motd_before);
}
