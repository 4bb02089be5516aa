//! A real VictoriaMetrics single-node (Debian's `victoria-metrics`, on 127.0.0.1 with its data in a
//! temp dir) runs the README's scrape config as written (only the controller's address swapped in
//! and a 1 s scrape interval put in front) against a real controller with three real agents:
//! through `/sd/prometheus` it discovers exactly the agent targets the controller lists and
//! scrapes each with `up == 1`, and it scrapes the controller's `muster_machine_up == 1` for every
//! machine. Then a config generation that fails on one agent (test agents run with
//! `--no-apply-config`, so every generation they get reports failed) shows up in VictoriaMetrics
//! as `muster_machine_config_failed_resources > 0` for exactly that machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let r = rt.block_on(http_get(addr, path, &[])).ok()?;
    (r.status == 200).then_some(())?;
    serde_json::from_slice(&r.body).ok()
}

/// The README's scrape config: its one ```yaml block with `scrape_configs:` and `/sd/prometheus`.
fn readme_scrape_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let md = std::fs::read_to_string(&path).unwrap();
    let blocks: Vec<&str> = md
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(body, _)| body))
        .filter(|b| b.contains("scrape_configs:") && b.contains("/sd/prometheus"))
        .collect();
    assert_eq!(blocks.len(), 1, "{}: expected one scrape config with /sd/prometheus", path.display());
    blocks[0].to_owned()
}

/// A VictoriaMetrics process, killed by PID when dropped (also when the test fails).
struct VictoriaMetrics {
    proc: Proc,
    addr: SocketAddr,
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        // SIGTERM to this PID, SIGKILL after the grace; reaped either way.
        self.proc.terminate(Duration::from_secs(5));
    }
}

impl VictoriaMetrics {
    fn start(dir: &Path, controller_http: SocketAddr) -> Self {
        let readme = readme_scrape_config();
        let scrape = readme.replace("controller.example:7480", &controller_http.to_string());
        assert!(!scrape.contains("controller.example"), "the README's config has another address:\n{readme}");
        let config = format!("global:\n  scrape_interval: 1s\n{scrape}");
        let config_file = dir.join("scrape.yml");
        std::fs::write(&config_file, &config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new("victoria-metrics");
        cmd.current_dir(dir)
            .arg(format!("-httpListenAddr={addr}"))
            .arg(format!("-storageDataPath={}", dir.join("data").display()))
            .arg(format!("-promscrape.config={}", config_file.display()))
            // The README's config sets no refresh: the flag is VictoriaMetrics' way (default 1m).
            .arg("-promscrape.httpSDCheckInterval=1s")
            // Instant queries see samples as soon as they are searchable, not 30 s later.
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache");
        let proc = Proc::spawn(&mut cmd, dir.join("victoria-metrics.log")).expect(
            "victoria-metrics: install it with `apt-get install victoria-metrics` (tests/run.sh does)",
        );
        Self { proc, addr }
    }

    /// Runs an instant query; (labels, value) per series, or `None` when VictoriaMetrics does not
    /// answer (yet).
    fn query(&self, q: &str) -> Option<Vec<(serde_json::Value, f64)>> {
        // Makes what was scraped so far searchable now instead of after VictoriaMetrics'
        // in-memory buffering (seconds): the endpoint it documents for tests.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(http_get(self.addr, "/internal/force_flush", &[])).ok()?;
        let v = get_json(self.addr, &format!("/api/v1/query?query={}&nocache=1", urlencode(q)))?;
        let series = v["data"]["result"].as_array()?;
        Some(
            series
                .iter()
                .map(|s| {
                    let value = s["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                    (s["metric"].clone(), value)
                })
                .collect(),
        )
    }

    /// Its log, without the line each `/internal/force_flush` adds.
    fn log(&self) -> String {
        let log = self.proc.log_text();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("flushing storage")).collect();
        format!("victoria-metrics log:\n{}", lines.join("\n"))
    }

    /// Polls `q` until `done` accepts its series, panicking after `timeout` with the last answer
    /// and VictoriaMetrics' log (or at once if it exited).
    fn wait_query(
        &mut self,
        what: &str,
        timeout: Duration,
        q: &str,
        done: impl Fn(&[(serde_json::Value, f64)]) -> bool,
    ) -> Vec<(serde_json::Value, f64)> {
        let mut last = None;
        let r = wait_for(what, timeout, || {
            if !self.proc.alive() {
                panic!("victoria-metrics exited: {}", self.log());
            }
            let r = self.query(q)?;
            let ok = done(&r);
            last = Some(r.clone());
            ok.then_some(r)
        });
        r.unwrap_or_else(|e| panic!("{e}\nlast answer to {q}: {last:?}\n{}", self.log()))
    }
}

fn label_set(series: &[(serde_json::Value, f64)], label: &str) -> BTreeSet<String> {
    series.iter().map(|(m, _)| m[label].as_str().unwrap_or_default().to_owned()).collect()
}

#[test]
fn victoriametrics_discovers_and_scrapes_the_fleet_with_the_readme_config_and_sees_a_failed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"), "127.0.0.1:0", "127.0.0.1:0", &[]).unwrap();
    let token = ctl.cli_ok(&["token", "create", "--uses", "3"]).unwrap().trim().to_owned();
    let _agents: Vec<Proc> = (1..=3)
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
    let machines = wait_for("3 ready machines", Duration::from_secs(60), || {
        let ms = ctl.machines().ok()?;
        (ms.len() == 3 && ms.iter().all(|m| m["state"] == "ready")).then_some(ms)
    })
    .unwrap();
    let machine_ids: BTreeSet<String> =
        machines.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    // What the controller hands out for discovery: one target per agent.
    let sd_targets = wait_for("/sd/prometheus to list 3 agents", Duration::from_secs(30), || {
        let sd = get_json(ctl.ports.http, "/sd/prometheus")?;
        let targets: BTreeSet<String> = sd
            .as_array()?
            .iter()
            .flat_map(|g| g["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        (targets.len() == 3).then_some(targets)
    })
    .unwrap();

    let mut vm = VictoriaMetrics::start(tmp.path(), ctl.ports.http);
    let agents_up = vm.wait_query(
        "VictoriaMetrics to scrape every discovered agent target with up == 1",
        Duration::from_secs(60),
        "up{job=\"muster-agents\"} == 1",
        |r| label_set(r, "instance") == sd_targets,
    );
    assert_eq!(agents_up.len(), 3, "{agents_up:?}");
    assert_eq!(
        label_set(&agents_up, "hostname"),
        BTreeSet::from(["node-1".to_owned(), "node-2".to_owned(), "node-3".to_owned()]),
        "SD labels reach VictoriaMetrics"
    );
    assert_eq!(label_set(&agents_up, "machine"), machine_ids, "SD labels reach VictoriaMetrics");
    vm.wait_query(
        "VictoriaMetrics to scrape the controller with up == 1",
        Duration::from_secs(30),
        "up{job=\"muster-controller\"} == 1",
        |r| r.len() == 1,
    );
    vm.wait_query(
        "muster_machine_up == 1 for every machine",
        Duration::from_secs(30),
        "muster_machine_up{job=\"muster-controller\"} == 1",
        |r| r.len() == 3 && label_set(r, "machine") == machine_ids,
    );
    // The agents' own node metrics arrive through discovery too.
    vm.wait_query(
        "every agent's own muster_machine_memory_total_bytes",
        Duration::from_secs(30),
        "muster_machine_memory_total_bytes{job=\"muster-agents\"} > 0",
        |r| label_set(r, "machine") == machine_ids,
    );
    // No machine has a config yet, so none has the series.
    assert_eq!(vm.query("muster_machine_config_failed_resources"), Some(vec![]));

    // A generation for node-2 only, which its agent reports failed. The file would land in the
    // temp dir if an agent ever did apply it.
    let node2 = machines.iter().find(|m| m["hostname"] == "node-2").unwrap();
    let node2_id = node2["id"].as_str().unwrap().to_owned();
    let cfg = tmp.path().join("node-2.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: {}\n    content: \"hello\\n\"\n",
            tmp.path().join("motd").display()
        ),
    )
    .unwrap();
    ctl.cli_ok(&["config", "apply", "node-2", "-f", cfg.to_str().unwrap(), "--mode", "auto"]).unwrap();
    wait_for("the controller to see node-2's generation failed", Duration::from_secs(30), || {
        let ms = ctl.machines().ok()?;
        ms.iter().any(|m| m["id"] == node2_id.as_str() && m["config"]["state"] == "failed").then_some(())
    })
    .unwrap();
    let failed = vm.wait_query(
        "VictoriaMetrics to see muster_machine_config_failed_resources > 0",
        Duration::from_secs(30),
        "muster_machine_config_failed_resources{job=\"muster-controller\"} > 0",
        |r| !r.is_empty(),
    );
    assert_eq!(label_set(&failed, "machine"), BTreeSet::from([node2_id.clone()]), "{failed:?}");
    assert_eq!(label_set(&failed, "hostname"), BTreeSet::from(["node-2".to_owned()]), "{failed:?}");
    // Exactly that machine: no other machine has the series at all.
    let all = vm.query("muster_machine_config_failed_resources").unwrap();
    assert_eq!(label_set(&all, "machine"), BTreeSet::from([node2_id]), "{all:?}");
    // The other machines are still up and scraped.
    assert_eq!(vm.query("muster_machine_up{job=\"muster-controller\"} == 1").unwrap().len(), 3);
    drop(vm);
}
