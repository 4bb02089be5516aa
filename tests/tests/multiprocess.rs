//! The foundation scenario with real binaries on loopback: `muster-controller init` → `serve` →
//! `muster token create` → three `muster-agent`s enroll → `muster assign` → `kill -9` of the
//! controller → restart on the same port → the agents reconnect by themselves and every
//! assignment is intact. Judged by what `muster machines -o json` says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_tests::{start_agent, wait_for, ControllerProc};

fn machines_where(
    ctl: &ControllerProc,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Option<Vec<serde_json::Value>> {
    let ms = ctl.machines().ok()?;
    (ms.len() == 3 && ms.iter().all(f)).then_some(ms)
}

#[test]
fn three_agents_enroll_get_roles_and_survive_a_controller_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("controller");

    // init prints the pin; serve then uses the same CA.
    let pin = muster_lab::muster::init_controller(&data, &[]).unwrap();
    assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");

    let mut ctl = ControllerProc::start(&data, "127.0.0.1:0", "127.0.0.1:0", &[]).unwrap();
    assert_eq!(ctl.pin().unwrap(), pin);
    let token = ctl.cli_ok(&["token", "create", "--uses", "3", "--ttl", "10m"]).unwrap().trim().to_owned();
    assert_eq!(token.len(), 39, "token create prints only the token: {token:?}");

    let mut agents: Vec<_> = (1..=3)
        .map(|i| {
            let uuid = format!("00000000-0000-4000-8000-00000000000{i}");
            start_agent(
                &ctl,
                &token,
                &tmp.path().join(format!("node-{i}")),
                &["--heartbeat", "300ms", "--hint-hostname", &format!("node-{i}"), "--hint-uuid", &uuid],
            )
            .unwrap()
        })
        .collect();

    let ready = wait_for("3 ready machines", Duration::from_secs(60), || {
        machines_where(&ctl, |m| m["state"] == "ready")
    });
    let ready =
        ready.unwrap_or_else(|e| panic!("{e}\n{}", agents.iter().map(|a| a.log_text()).collect::<String>()));
    let mut ids: Vec<String> = ready.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    for m in &ready {
        assert!(m["warnings"].as_array().unwrap().is_empty(), "distinct UUIDs give no warnings: {m}");
        assert!(m["last_seen"].as_str().unwrap().contains('T'), "RFC 3339: {m}");
    }

    for i in 1..=3 {
        let role = if i == 1 { "controlplane" } else { "worker" };
        ctl.cli_ok(&["assign", &format!("node-{i}"), "--role", role, "--cluster", "homelab"]).unwrap();
    }

    // kill -9 the controller; the agents keep running.
    let grpc_port = ctl.ports.grpc.port();
    ctl.proc.kill();
    // Each agent notices (and says so), and keeps running.
    for a in agents.iter_mut() {
        wait_for("the agent to notice the controller is gone", Duration::from_secs(30), || {
            a.log_text().contains("connection to the controller lost").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
        assert!(a.alive(), "an agent must keep running while the controller is down:\n{}", a.log_text());
    }

    let ctl = ControllerProc::start(&data, &format!("127.0.0.1:{grpc_port}"), "127.0.0.1:0", &[]).unwrap();
    let back = wait_for("3 machines ready and connected again", Duration::from_secs(60), || {
        machines_where(&ctl, |m| m["state"] == "ready" && m["connected"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agents.iter().map(|a| a.log_text()).collect::<String>()));
    let mut again: Vec<String> = back.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    again.sort();
    assert_eq!(again, ids, "same machines, same ids");
    for m in &back {
        let want = if m["hostname"] == "node-1" { "controlplane" } else { "worker" };
        assert_eq!(m["role"], want, "{m}");
        assert_eq!(m["cluster"], "homelab", "{m}");
    }

    // An agent restarted without a token comes back as the same machine: the old process is
    // gone (and the controller saw its stream end) before the new one starts.
    let node3 = back.iter().find(|m| m["hostname"] == "node-3").unwrap()["id"].as_str().unwrap().to_owned();
    agents[2].kill();
    wait_for("node-3's old stream to end", Duration::from_secs(30), || {
        let ms = ctl.machines().ok()?;
        ms.iter().any(|m| m["id"] == node3.as_str() && m["connected"] == false).then_some(())
    })
    .unwrap();
    let restarted = start_agent(
        &ctl,
        "",
        &tmp.path().join("node-3"),
        &[
            "--heartbeat",
            "300ms",
            "--hint-hostname",
            "node-3",
            "--hint-uuid",
            "00000000-0000-4000-8000-000000000003",
        ],
    )
    .unwrap();
    wait_for("node-3 back without a token", Duration::from_secs(30), || {
        let ms = ctl.machines().ok()?;
        (ms.len() == 3
            && ms
                .iter()
                .any(|m| m["id"] == node3.as_str() && m["connected"] == true && m["state"] == "ready"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", restarted.log_text()));
    // And it is the restarted process that connected, with its saved identity, not a new one.
    let log = restarted.log_text();
    assert!(log.contains("connected to the controller"), "{log}");
    assert!(log.contains(&node3), "the saved machine id: {log}");
    assert!(!log.contains("enrolled"), "no second enrollment: {log}");

    // The token is used up: a fourth agent cannot enroll with it.
    let mut fourth =
        start_agent(&ctl, &token, &tmp.path().join("node-4"), &["--hint-hostname", "node-4"]).unwrap();
    let exited = wait_for("the fourth agent to give up", Duration::from_secs(30), || {
        fourth.child.try_wait().ok().flatten()
    });
    let status = exited.unwrap();
    assert!(!status.success());
    assert!(fourth.log_text().contains("no uses left"), "{}", fourth.log_text());
}
