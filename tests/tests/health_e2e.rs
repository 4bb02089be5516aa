//! Health reasons from a real agent's own collection, end to end: the controller's disk threshold
//! is lowered so a real filesystem of this machine counts as full, and a checked process (a copy
//! of `sleep` under a unique name, started by the test) is stopped. The machine turns `degraded`
//! with exactly those reasons, in `muster health` and in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use muster_tests::{http_get, start_agent, wait_for, ControllerProc, Proc};

#[test]
fn stopped_service_and_full_disk_make_a_machine_degraded() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(
        &tmp.path().join("ctl"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--health-disk-percent",
            "0.001",
            // Only the disk and the service are under test: this machine's load and memory
            // must not add reasons of their own (CI runs busy).
            "--health-load-per-cpu",
            "1000000",
            "--health-memory-percent",
            "100",
            "--health-memory-critical-percent",
            "100",
        ],
    )
    .unwrap();
    // A process only this test runs, under a name nothing else has.
    let name = format!("mchk{}", std::process::id());
    let exe = tmp.path().join(&name);
    std::fs::copy("/bin/sleep", &exe).unwrap();
    let mut checked = Proc::spawn(Command::new(&exe).arg("600"), tmp.path().join("checked.log")).unwrap();
    let token = ctl.cli_ok(&["token", "create"]).unwrap().trim().to_owned();
    let _agent = start_agent(
        &ctl,
        &token,
        &tmp.path().join("node"),
        &[
            "--heartbeat",
            "300ms",
            "--service-check",
            &name,
            "--hint-hostname",
            "node-h",
            "--metrics-listen",
            "off",
        ],
    )
    .unwrap();

    let reasons = |ctl: &ControllerProc| -> Option<(String, Vec<String>)> {
        let out = ctl.cli_ok(&["health", "node-h", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let m = v.as_array()?.first()?.clone();
        let reasons = m["reasons"].as_array()?.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect();
        Some((m["health"].as_str()?.to_owned(), reasons))
    };
    // Running: only the disk reason.
    let (health, rs) =
        wait_for("a health report", Duration::from_secs(30), || reasons(&ctl).filter(|(_, r)| !r.is_empty()))
            .unwrap();
    assert_eq!(health, "degraded");
    assert!(rs.iter().all(|r| r.starts_with("filesystem ") && r.ends_with("% full")), "{rs:?}");

    checked.kill();
    let (health, rs) = wait_for("the stopped service to be reported", Duration::from_secs(30), || {
        reasons(&ctl).filter(|(_, r)| r.iter().any(|x| x.starts_with("service ")))
    })
    .unwrap();
    assert_eq!(health, "degraded");
    assert!(rs.contains(&format!("service {name} is down (no process named {name})")), "{rs:?}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let text = rt.block_on(http_get(ctl.ports.http, "/metrics", &[])).unwrap().text();
    assert!(text.contains("muster_machine_service_up{"), "{text}");
    let line =
        text.lines().find(|l| l.starts_with("muster_machine_service_up{") && l.contains(&name)).unwrap();
    assert!(line.ends_with(" 0"), "{line}");
    let degraded = text
        .lines()
        .find(|l| {
            l.starts_with("muster_machine_health{")
                && l.contains("node-h")
                && l.contains("status=\"degraded\"")
        })
        .unwrap();
    assert!(degraded.ends_with(" 1"), "{degraded}");
}

/// `serviceChecks` in a machine's config are checked like the agent's own --service-check: a
/// named process that is not running makes the machine degraded; a config without it clears
/// the reason.
#[test]
fn service_checks_in_the_machine_config_drive_health() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(
        &tmp.path().join("ctl"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--health-disk-percent",
            "100",
            "--health-load-per-cpu",
            "1000000",
            "--health-memory-percent",
            "100",
        ],
    )
    .unwrap();
    let token = ctl.cli_ok(&["token", "create"]).unwrap().trim().to_owned();
    let _agent = start_agent(
        &ctl,
        &token,
        &tmp.path().join("node"),
        &["--heartbeat", "300ms", "--hint-hostname", "node-s", "--metrics-listen", "off"],
    )
    .unwrap();
    let name = format!("mcfg{}", std::process::id());
    let service_reasons = |ctl: &ControllerProc| -> Option<Vec<String>> {
        let out = ctl.cli_ok(&["health", "node-s", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let m = v.as_array()?.first()?.clone();
        m["snapshot"].is_object().then_some(())?;
        Some(
            m["reasons"]
                .as_array()?
                .iter()
                .filter_map(|r| r.as_str().filter(|r| r.starts_with("service ")).map(str::to_owned))
                .collect(),
        )
    };
    wait_for("a health report", Duration::from_secs(30), || service_reasons(&ctl)).unwrap();
    let cfg = tmp.path().join("checks.yaml");
    std::fs::write(
        &cfg,
        format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\nserviceChecks: [{name}]\n"),
    )
    .unwrap();
    ctl.cli_ok(&["config", "apply", "node-s", "-f", cfg.to_str().unwrap()]).unwrap();
    let rs = wait_for("the config's service check reported", Duration::from_secs(30), || {
        service_reasons(&ctl).filter(|r| !r.is_empty())
    })
    .unwrap();
    assert_eq!(rs, [format!("service {name} is down (no process named {name})")]);
    std::fs::write(&cfg, "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: node-s\n").unwrap();
    ctl.cli_ok(&["config", "apply", "node-s", "-f", cfg.to_str().unwrap()]).unwrap();
    wait_for("the check gone with the config", Duration::from_secs(30), || {
        service_reasons(&ctl).filter(|r| r.is_empty())
    })
    .unwrap();
}
