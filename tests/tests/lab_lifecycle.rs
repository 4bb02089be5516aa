//! `muster lab` kept honest about its own processes, with real binaries:
//!
//! - a foreground `lab up` whose controller is killed (`kill -9` of the PID `lab.json`
//!   records, nothing else) says how it died with the end of its log, starts it again on the same
//!   addresses, records the new PID, and the agents (never restarted) reconnect; SIGTERM then
//!   stops every process it recorded;
//! - `lab status` of a detached lab with namespaces lists every process, namespace and endpoint
//!   as up (exit 0, text and `-o json`); after one agent is killed by its recorded PID it says
//!   exactly that agent is down (exit 1); `lab down` leaves no process, namespace or directory;
//! - `lab up --monitoring` runs VictoriaMetrics in the lab's router namespace, prints its UI's
//!   URL on 127.0.0.1 (which answers), and through it `up` is 1 for every lab agent (found through the
//!   controller's `/sd/prometheus`) and the controller; `lab status` shows it; `lab down` stops
//!   it and removes its data with the lab dir.
//!
//! Namespaced labs need root (as in CI); every address outside the lab's own namespaces is on
//! 127.0.0.1, and everything on disk is under a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use muster_lab::process::{is_ours, signal};
use muster_tests::{bin, cli, http_get, wait_for, Proc};

fn muster(args: &[&str], dir: &Path) -> Output {
    Command::new(bin("muster").unwrap()).args(args).arg("--dir").arg(dir).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn lab_json(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).ok()?).ok()
}

fn pid(v: &serde_json::Value) -> u32 {
    u32::try_from(v.as_u64().unwrap()).unwrap()
}

/// The executable's name of a live process.
fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// `muster lab down --dir DIR` when dropped, so a failing test leaves nothing running.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = muster(&["lab", "down"], &self.0);
        }
    }
}

fn status_json(dir: &Path) -> (Option<i32>, serde_json::Value) {
    let o = muster(&["lab", "status", "-o", "json"], dir);
    (o.status.code(), serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o))))
}

/// Every machine in `muster machines -o json` connected and ready, and how many there are.
fn all_connected(mc: &Path) -> Option<usize> {
    let o = cli(mc, &["machines", "-o", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let ms = v.as_array()?;
    ms.iter().all(|m| m["connected"] == true && m["state"] == "ready").then_some(ms.len())
}

#[test]
fn a_foreground_lab_reports_and_restarts_its_killed_controller_and_the_agents_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let _down = Down(lab.clone());
    let mut cmd = Command::new(bin("muster").unwrap());
    cmd.args(["lab", "up", "--nodes", "2", "--isolation", "none", "--heartbeat", "500ms", "--dir"]).arg(&lab);
    let mut up = Proc::spawn(&mut cmd, tmp.path().join("lab-up.out")).unwrap();
    wait_for("the lab to be up", Duration::from_secs(120), || {
        assert!(up.alive(), "lab up ended:\n{}", up.log_text());
        up.log_text().contains("Stop it with Ctrl-C").then_some(())
    })
    .unwrap();
    let before = lab_json(&lab).unwrap();
    assert_eq!(pid(&before["supervisor_pid"]), up.pid(), "{before}");
    let old = pid(&before["controller_pid"]);
    let agents: Vec<u32> = before["agent_pids"].as_array().unwrap().iter().map(pid).collect();
    assert_eq!(agents.len(), 2);
    assert!(exe(old).starts_with("muster-controller") && is_ours(old), "pid {old} is the lab's controller");
    let mc = PathBuf::from(before["musterconfig"].as_str().unwrap());
    assert_eq!(all_connected(&mc), Some(2));

    // kill -9 exactly the PID the lab recorded for its controller.
    signal(old, libc::SIGKILL);
    let said = wait_for("the death and the restart reported", Duration::from_secs(60), || {
        assert!(up.alive(), "lab up ended instead of restarting the controller:\n{}", up.log_text());
        let out = up.log_text();
        out.contains("the lab's controller is running again").then_some(out)
    })
    .unwrap();
    assert!(
        said.contains(&format!("the lab's controller (pid {old}) was killed by signal 9 (SIGKILL)")),
        "{said}"
    );
    assert!(said.contains(&format!("The end of {}:", lab.join("controller.log").display())), "{said}");
    assert!(said.contains("restarting the controller in 1s (restart 1 of at most 5 in a row)"), "{said}");
    let after = lab_json(&lab).unwrap();
    let new = pid(&after["controller_pid"]);
    assert_ne!(new, old);
    assert!(said.contains(&format!("running again (pid {new}, restart 1)")), "{said}");
    assert!(exe(new).starts_with("muster-controller") && is_ours(new), "the new controller runs");
    assert_eq!(after["grpc"], before["grpc"], "on the same address");
    assert_eq!(after["agent_pids"], before["agent_pids"], "agents are never restarted");
    let log = std::fs::read_to_string(lab.join("controller.log")).unwrap();
    assert!(log.contains(&format!("--- muster lab: the controller (pid {old}) was killed")), "kept: {log}");

    wait_for("both agents connected again", Duration::from_secs(90), || {
        (all_connected(&mc)? == 2).then_some(())
    })
    .unwrap();
    assert!(agents.iter().all(|p| is_ours(*p)), "the same agent processes");

    // SIGTERM (as Ctrl-C) stops it all.
    signal(up.pid(), libc::SIGTERM);
    let st = up.wait_exit(Duration::from_secs(30)).expect("lab up stops on SIGTERM");
    assert!(st.success(), "{st}: {}", up.log_text());
    for p in agents.iter().chain([&new]) {
        assert!(!is_ours(*p), "pid {p} left running");
    }
    assert!(lab_json(&lab).is_none(), "lab.json removed");
}

#[test]
fn lab_status_tells_which_processes_and_namespaces_of_a_detached_lab_are_up() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let _down = Down(lab.clone());
    let o = muster(
        &["lab", "up", "--nodes", "2", "--detach", "--isolation", "netns", "--heartbeat", "500ms"],
        &lab,
    );
    assert!(o.status.success(), "{}", text(&o));
    let l = lab_json(&lab).unwrap();
    let agents: Vec<u32> = l["agent_pids"].as_array().unwrap().iter().map(pid).collect();
    let ns: Vec<String> =
        l["netns"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
    assert_eq!(ns.len(), 3, "{l}");

    let (code, s) = status_json(&lab);
    assert_eq!((code, s["state"].as_str()), (Some(0), Some("running")), "{s}");
    let procs: Vec<(String, String, u32, bool)> = s["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["kind"].as_str().unwrap().into(),
                pid(&p["pid"]),
                p["alive"] == true,
            )
        })
        .collect();
    let want = vec![
        ("controller".to_owned(), "controller".to_owned(), pid(&l["controller_pid"]), true),
        ("relay".to_owned(), "relay".to_owned(), pid(&l["relay_pid"]), true),
        ("lab-node-1".to_owned(), "agent".to_owned(), agents[0], true),
        ("lab-node-2".to_owned(), "agent".to_owned(), agents[1], true),
    ];
    assert_eq!(procs, want, "{s}");
    let shown: Vec<(String, bool)> = s["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n["exists"] == true))
        .collect();
    assert_eq!(shown, ns.iter().map(|n| (n.clone(), true)).collect::<Vec<_>>(), "{s}");
    let endpoints: Vec<(&str, &str, bool)> = s["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["url"].as_str().unwrap(), e["reachable"] == true))
        .collect();
    let grpc = format!("https://{}", l["grpc"].as_str().unwrap());
    let http = format!("http://{}", l["http"].as_str().unwrap());
    assert_eq!(
        endpoints,
        [("controller-grpc", grpc.as_str(), true), ("controller-http", http.as_str(), true)],
        "{s}"
    );
    assert_eq!(s["isolation"], "netns");
    assert_eq!(s["down"], serde_json::json!([]));
    let t = muster(&["lab", "status"], &lab);
    assert_eq!(t.status.code(), Some(0), "{}", text(&t));
    assert!(String::from_utf8_lossy(&t.stdout).starts_with(&format!("lab in {}: running\n", lab.display())));

    // One agent dies: killed by the PID the lab recorded for it.
    assert!(exe(agents[1]).starts_with("muster-agent"), "pid {} is lab-node-2's agent", agents[1]);
    signal(agents[1], libc::SIGKILL);
    let s = wait_for("lab status to see lab-node-2 down", Duration::from_secs(30), || {
        let (code, s) = status_json(&lab);
        (s["state"] == "degraded").then_some((code, s))
    })
    .unwrap();
    assert_eq!(s.0, Some(1), "exit 1 when something is down: {}", s.1);
    assert_eq!(s.1["down"], serde_json::json!(["lab-node-2"]), "{}", s.1);
    let alive: Vec<(&str, bool)> = s.1["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["alive"] == true))
        .collect();
    assert_eq!(
        alive,
        [("controller", true), ("relay", true), ("lab-node-1", true), ("lab-node-2", false)],
        "{}",
        s.1
    );
    let t = muster(&["lab", "status"], &lab);
    assert_eq!(t.status.code(), Some(1));
    let out = String::from_utf8_lossy(&t.stdout).into_owned();
    assert!(out.starts_with(&format!("lab in {}: degraded, down: lab-node-2\n", lab.display())), "{out}");
    assert!(
        out.lines().any(|l| l.split_whitespace().eq(["lab-node-2", "agent", &agents[1].to_string(), "down"])),
        "{out}"
    );

    // Down: no process, namespace or directory left.
    let o = muster(&["lab", "down"], &lab);
    assert!(o.status.success(), "{}", text(&o));
    for p in l["agent_pids"].as_array().unwrap().iter().chain([&l["controller_pid"], &l["relay_pid"]]) {
        assert!(!is_ours(pid(p)), "pid {p} left running");
    }
    assert!(ns.iter().all(|n| !Path::new("/run/netns").join(n).exists()), "namespaces left behind");
    assert!(!lab.exists());
    let (code, s) = status_json(&lab);
    assert_eq!((code, s["state"].as_str()), (Some(1), Some("none")), "{s}");
}

/// `up` series from VictoriaMetrics at `base` (http://127.0.0.1:P): (job, hostname, value).
fn up_series(addr: SocketAddr) -> Option<BTreeSet<(String, String, String)>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let r = rt.block_on(http_get(addr, "/api/v1/query?query=up", &[])).ok()?;
    (r.status == 200).then_some(())?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    Some(
        v["data"]["result"]
            .as_array()?
            .iter()
            .map(|s| {
                let m = &s["metric"];
                let label = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
                (label("job"), label("hostname"), s["value"][1].as_str().unwrap_or_default().to_owned())
            })
            .collect(),
    )
}

#[test]
fn lab_monitoring_scrapes_every_agent_and_goes_with_the_lab() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let _down = Down(lab.clone());
    let o = muster(
        &[
            "lab",
            "up",
            "--nodes",
            "2",
            "--detach",
            "--isolation",
            "netns",
            "--monitoring",
            "--heartbeat",
            "500ms",
        ],
        &lab,
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let ui = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Monitoring: VictoriaMetrics UI "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no UI URL printed:\n{stdout}"))
        .to_owned();
    // `/vmui/` where the build has it; Debian's has none, and the lab shows the index page.
    let addr: SocketAddr = ui
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix("/vmui/").or_else(|| r.strip_suffix('/')))
        .unwrap_or_else(|| panic!("{ui}"))
        .parse()
        .unwrap();
    assert!(addr.ip().is_loopback(), "{ui}");
    let l = lab_json(&lab).unwrap();
    assert_eq!(l["monitoring"]["ui"], ui.as_str(), "{l}");
    let vm = pid(&l["monitoring"]["pid"]);
    assert!(exe(vm).starts_with("victoria-metrics") && is_ours(vm), "pid {vm} is the lab's VictoriaMetrics");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let path = &ui[ui.find(&addr.to_string()).unwrap() + addr.to_string().len()..];
    let page = rt.block_on(http_get(addr, path, &[])).unwrap();
    assert_eq!(page.status, 200, "the UI answers at the printed URL");

    let want: BTreeSet<(String, String, String)> = ["lab-node-1", "lab-node-2"]
        .iter()
        .map(|h| ("muster-agents".to_owned(), (*h).to_owned(), "1".to_owned()))
        .chain([("muster-controller".to_owned(), String::new(), "1".to_owned())])
        .collect();
    let mut last = None;
    wait_for("up == 1 for every lab agent and the controller", Duration::from_secs(120), || {
        assert!(is_ours(vm), "VictoriaMetrics exited");
        let got = up_series(addr)?;
        last = Some(got.clone());
        (got == want).then_some(())
    })
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(lab.join("monitoring/victoria-metrics.log")).unwrap_or_default();
        panic!("{e}: last {last:?}\n{log}")
    });

    let (code, s) = status_json(&lab);
    assert_eq!(code, Some(0), "{s}");
    let m = s["processes"].as_array().unwrap().iter().find(|p| p["name"] == "monitoring").unwrap();
    assert_eq!((pid(&m["pid"]), m["alive"].as_bool()), (vm, Some(true)), "{s}");
    let e = s["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "monitoring-ui").unwrap();
    assert_eq!((e["url"].as_str(), e["reachable"].as_bool()), (Some(ui.as_str()), Some(true)), "{s}");
    assert!(lab.join("monitoring/data").is_dir());

    let o = muster(&["lab", "down"], &lab);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!is_ours(vm) && exe(vm).is_empty(), "VictoriaMetrics (pid {vm}) left running");
    assert!(!lab.join("monitoring").exists(), "its data goes with the lab dir");
}
