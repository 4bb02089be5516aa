//! A real Prometheus (Debian's `prometheus`, on 127.0.0.1 with its data in a temp dir) scrapes a
//! real controller and discovers three real agents through `/sd/prometheus`: its query API shows
//! `up == 1` for every agent target and `muster_machine_up == 1` for every machine. Then one
//! agent is killed: the controller turns it `unreachable` once its heartbeats are missed (not
//! before) and Prometheus sees `muster_machine_up` go to 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use muster_tests::{http_get, start_agent, wait_for, ControllerProc, Proc};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; returns (labels, value) per series.
fn query(prom: std::net::SocketAddr, q: &str) -> Vec<(serde_json::Value, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Ok(r) = rt.block_on(http_get(prom, &format!("/api/v1/query?query={}", urlencode(q)), &[])) else {
        return vec![];
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else { return vec![] };
    v["data"]["result"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["metric"].clone(),
                        s["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn start_prometheus(dir: &Path, controller_http: std::net::SocketAddr) -> (Proc, std::net::SocketAddr) {
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: muster-controller\n    static_configs:\n      - targets: [\"{controller_http}\"]\n  - job_name: muster-agents\n    http_sd_configs:\n      - url: http://{controller_http}/sd/prometheus\n        refresh_interval: 1s\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--web.enable-lifecycle");
    let p = Proc::spawn(&mut cmd, dir.join("prometheus.log"))
        .expect("prometheus (Debian package; tests/run.sh installs it)");
    (p, addr)
}

#[test]
fn prometheus_discovers_and_scrapes_the_fleet_and_sees_a_dead_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"), "127.0.0.1:0", "127.0.0.1:0", &[]).unwrap();
    let token = ctl.cli_ok(&["token", "create", "--uses", "3"]).unwrap().trim().to_owned();
    let heartbeat = Duration::from_secs(1);
    let mut agents: Vec<Proc> = (1..=3)
        .map(|i| {
            start_agent(
                &ctl,
                &token,
                &tmp.path().join(format!("node-{i}")),
                &[
                    "--heartbeat",
                    "1s",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--hint-hostname",
                    &format!("node-{i}"),
                    "--hint-uuid",
                    &format!("00000000-0000-4000-8000-00000000000{i}"),
                ],
            )
            .unwrap()
        })
        .collect();
    wait_for("3 ready machines", Duration::from_secs(60), || {
        let ms = ctl.machines().ok()?;
        (ms.len() == 3 && ms.iter().all(|m| m["state"] == "ready")).then_some(())
    })
    .unwrap();

    let (mut prom, prom_addr) = start_prometheus(tmp.path(), ctl.ports.http);
    let found =
        wait_for("Prometheus to scrape 3 agent targets with up == 1", Duration::from_secs(90), || {
            let r = query(prom_addr, "up{job=\"muster-agents\"} == 1");
            (r.len() == 3).then_some(r)
        });
    let found = found.unwrap_or_else(|e| panic!("{e}\n{}", prom.log_text()));
    let mut hosts: Vec<String> =
        found.iter().map(|(m, _)| m["hostname"].as_str().unwrap_or_default().to_owned()).collect();
    hosts.sort();
    assert_eq!(hosts, ["node-1", "node-2", "node-3"], "SD labels reach Prometheus");
    wait_for("muster_machine_up == 1 for 3 machines", Duration::from_secs(60), || {
        (query(prom_addr, "muster_machine_up{job=\"muster-controller\"} == 1").len() == 3).then_some(())
    })
    .unwrap();
    // The agents' own node metrics arrive through discovery too, and pass promtool.
    assert_eq!(query(prom_addr, "muster_machine_memory_total_bytes{job=\"muster-agents\"} > 0").len(), 3);
    let target = found[0].0["instance"].as_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let agent_text = rt.block_on(http_get(target, "/metrics", &[])).unwrap().text();
    assert!(agent_text.contains("muster_agent_connected 1"), "{agent_text}");
    muster_tests::promtool_check_metrics(&agent_text).unwrap();

    // Kill one agent: unreachable once its heartbeats are missed, and Prometheus sees it.
    agents[1].kill();
    let killed = Instant::now();
    wait_for("node-2 unreachable", Duration::from_secs(30), || {
        let ms = ctl.machines().ok()?;
        ms.iter().any(|m| m["hostname"] == "node-2" && m["state"] == "unreachable").then_some(())
    })
    .unwrap();
    let took = killed.elapsed();
    assert!(took >= 2 * heartbeat, "unreachable after {took:?}: before two heartbeats were even missed");
    wait_for("Prometheus to see muster_machine_up == 0 for node-2", Duration::from_secs(30), || {
        let r = query(prom_addr, "muster_machine_up{hostname=\"node-2\"} == 0");
        (r.len() == 1).then_some(())
    })
    .unwrap();
    assert_eq!(query(prom_addr, "muster_machine_up == 1").len(), 2);
    prom.terminate(Duration::from_secs(5));
}
