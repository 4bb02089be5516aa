//! The agent library against a real controller, both in this process on 127.0.0.1:
//! enrollment, reconnect after a controller restart, `unreachable` after missed heartbeats,
//! revocation closing the stream within a second (and a refused renewal taken as revocation),
//! and pending machines waiting for approval.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use muster_agent::{Agent, AgentConfig, AgentStatus, Hints};
use muster_machinery::ApplyMode;
use muster_proto::pb;
use muster_tests::{mode_name, outcome_name, state_name, TestController};
use tokio::sync::{oneshot, watch};

struct RunningAgent {
    status: watch::Receiver<AgentStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), muster_agent::AgentError>>,
    state_dir: std::path::PathBuf,
}

impl RunningAgent {
    async fn wait(&mut self, what: &str, f: impl Fn(&AgentStatus) -> bool) {
        tokio::time::timeout(Duration::from_secs(30), self.status.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the agent: {what}"))
            .unwrap();
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn start_agent(f: &TestController, token: &str, name: &str, heartbeat: Duration) -> RunningAgent {
    start_agent_with(f, token, name, heartbeat, None)
}

fn start_agent_with(
    f: &TestController,
    token: &str,
    name: &str,
    heartbeat: Duration,
    effects: Option<std::sync::Arc<dyn muster_agent::effects::Effects>>,
) -> RunningAgent {
    let state_dir = f.dir.path().join(name);
    let cfg = AgentConfig {
        controller: f.endpoint.clone(),
        token: Some(muster_machinery::token::JoinToken::parse(token).unwrap()),
        ca_pin: Some(f.pin().unwrap()),
        ca_file: None,
        state_dir: state_dir.clone(),
        heartbeat,
        hints: Hints {
            hostname: Some(name.to_owned()),
            uuid: Some(format!("00000000-0000-4000-8000-{:0>12}", name.len())),
        },
        drift_interval: Duration::from_millis(200),
        // A file the test controls, so it can stand in a reboot for staged configs.
        boot_id_file: f.dir.path().join(format!("{name}.boot_id")),
    };
    let (agent, status) = Agent::new(cfg);
    let agent = match effects {
        Some(fx) => agent.with_effects(fx),
        None => agent,
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    RunningAgent { status, stop: Some(tx), task, state_dir }
}

async fn machine(f: &TestController, id: &str) -> pb::Machine {
    f.admin().await.unwrap().get_machine(pb::MachineRef { query: id.into() }).await.unwrap().into_inner()
}

async fn wait_state(f: &TestController, id: &str, state: pb::MachineState, within: Duration) -> pb::Machine {
    let start = Instant::now();
    loop {
        let m = machine(f, id).await;
        if m.state == state as i32 {
            return m;
        }
        assert!(start.elapsed() < within, "machine {id} did not become {state:?} within {within:?}: {m:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_connects_and_gets_its_assignment() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-a", Duration::from_millis(200));
    a.wait("connected with heartbeats acknowledged", |s| s.connected && s.heartbeats_acked > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let m = wait_state(&f, &id, pb::MachineState::Ready, Duration::from_secs(5)).await;
    assert_eq!(m.hostname, "node-a");
    assert!(m.connected);
    f.admin()
        .await
        .unwrap()
        .assign(pb::AssignRequest {
            query: id.clone(),
            role: pb::Role::Worker.into(),
            cluster: "lab".into(),
            force: false,
        })
        .await
        .unwrap();
    a.wait("the assignment pushed down the stream", |s| {
        s.assignment.as_ref().is_some_and(|x| x.cluster == "lab")
    })
    .await;
    // The identity is on disk, private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["key.pem", "cert.pem"] {
        let mode = std::fs::metadata(a.state_dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    a.stop().await;
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_controller_restart_without_a_token() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-r", Duration::from_millis(200));
    a.wait("connected", |s| s.connected && s.heartbeats_acked > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();

    let f = f.restart().await.unwrap();
    let acked_before = a.status.borrow().heartbeats_acked;
    a.wait("reconnected to the new controller", |s| s.connected && s.heartbeats_acked > acked_before + 2)
        .await;
    let m = wait_state(&f, &id, pb::MachineState::Ready, Duration::from_secs(5)).await;
    assert!(m.connected);
    assert_eq!(f.machine_count().await.unwrap(), 1, "the same machine, not a new enrollment");
    a.stop().await;
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_heartbeats_make_a_machine_unreachable() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let heartbeat = Duration::from_millis(500);
    let mut a = start_agent(&f, &token, "node-h", heartbeat);
    a.wait("connected", |s| s.connected && s.heartbeats_acked > 1).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    a.stop().await;
    let stopped = Instant::now();
    // Still ready right after the last heartbeat...
    assert_eq!(machine(&f, &id).await.state, pb::MachineState::Ready as i32);
    // ...and unreachable once 3 intervals have passed without one.
    let m = wait_state(&f, &id, pb::MachineState::Unreachable, Duration::from_secs(5)).await;
    assert!(
        stopped.elapsed() >= heartbeat * 2,
        "not before the heartbeats were missed: {:?}",
        stopped.elapsed()
    );
    assert!(!m.connected);
    assert_eq!(m.health, "unreachable");
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_closes_the_stream_within_a_second() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-x", Duration::from_millis(500));
    a.wait("connected", |s| s.connected && s.heartbeats_acked > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();

    let t0 = Instant::now();
    f.admin().await.unwrap().revoke(pb::MachineRef { query: id.clone() }).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(1), &mut a.task)
        .await
        .expect("the agent must learn of its revocation within 1 s")
        .unwrap();
    let err = result.expect_err("a revoked agent stops with an error");
    assert!(matches!(err, muster_agent::AgentError::Revoked { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    // It threw away the identity that no longer works.
    assert!(!a.state_dir.join("cert.pem").exists());
    assert!(!a.state_dir.join("key.pem").exists());
    assert_eq!(machine(&f, &id).await.state, pb::MachineState::Revoked as i32);
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_certificate_at_seventy_percent_and_stays_connected() {
    // 6 s certificates: renewal due ~4 s after issuance.
    let opts = muster_controller::fleet::ControllerOptions {
        machine_cert_ttl: Duration::from_secs(6),
        ..Default::default()
    };
    let f = TestController::start_with(opts).await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-c", Duration::from_millis(200));
    a.wait("connected", |s| s.connected && s.cert_not_after > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let first = a.status.borrow().cert_not_after;
    let serial = machine(&f, &id).await.cert_serial;
    let t0 = Instant::now();
    a.wait("a renewed certificate", |s| s.cert_not_after > first).await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2) && took <= Duration::from_secs(6), "renewed after {took:?}");
    // Reconnected with the new certificate and still heartbeating; the controller knows it.
    let acked = a.status.borrow().heartbeats_acked;
    a.wait("heartbeats on the new certificate", |s| s.connected && s.heartbeats_acked > acked + 2).await;
    let m = machine(&f, &id).await;
    assert_ne!(m.cert_serial, serial);
    assert_eq!(m.state, pb::MachineState::Ready as i32);
    let on_disk = std::fs::read_to_string(a.state_dir.join("cert.pem")).unwrap();
    assert!(!on_disk.is_empty());
    a.stop().await;
    f.still_serving().await.unwrap();
}

/// A machine revoked while its stream stays open (the fleet's record changes, no session is
/// closed) hears of it from `Renew`: PermissionDenied, which the agent takes as revocation: it
/// wipes its identity and stops with `Revoked`, as when the stream is closed on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_of_a_revoked_machine_reaches_the_agent_as_revoked() {
    let opts = muster_controller::fleet::ControllerOptions {
        machine_cert_ttl: Duration::from_secs(6),
        ..Default::default()
    };
    let f = TestController::start_with(opts).await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-r", Duration::from_millis(200));
    a.wait("connected", |s| s.connected && s.cert_not_after > 0).await;
    let id: muster_machinery::MachineId = a.status.borrow().machine_id.clone().unwrap().parse().unwrap();
    // Revoke in the fleet's record only: the stream stays open, so only Renew can tell.
    f.running
        .controller
        .update_machine(&id, |m| {
            m.revoked = true;
            Ok(())
        })
        .await
        .unwrap();
    assert!(f.running.controller.is_connected(&id), "the stream is still open");
    let result = tokio::time::timeout(Duration::from_secs(15), &mut a.task)
        .await
        .expect("the agent must stop once its renewal is refused")
        .unwrap();
    let err = result.expect_err("a revoked agent stops with an error");
    assert!(
        matches!(&err, muster_agent::AgentError::Revoked { reason, .. } if reason.contains("revoked")),
        "{err}"
    );
    assert!(!a.state_dir.join("cert.pem").exists(), "identity wiped");
    assert!(!a.state_dir.join("key.pem").exists(), "identity wiped");
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_token_lands_pending_until_approved() {
    let f = TestController::start().await.unwrap();
    let token = f
        .admin()
        .await
        .unwrap()
        .create_token(pb::CreateTokenRequest {
            pending: true,
            labels: [("rack".to_string(), "r7".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut a = start_agent(&f, &token, "node-p", Duration::from_millis(200));
    a.wait("connected", |s| s.connected && s.heartbeats_acked > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let m = machine(&f, &id).await;
    assert_eq!(m.state, pb::MachineState::Pending as i32);
    assert_eq!(m.labels.get("rack").map(String::as_str), Some("r7"), "token labels are copied");
    assert!(a.status.borrow().assignment.as_ref().is_some_and(|x| !x.approved));
    f.admin().await.unwrap().approve(pb::MachineRef { query: id.clone() }).await.unwrap();
    a.wait("approval pushed down the stream", |s| s.assignment.as_ref().is_some_and(|x| x.approved)).await;
    wait_state(&f, &id, pb::MachineState::Ready, Duration::from_secs(5)).await;
    a.stop().await;
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_apply_reaches_the_node_and_the_new_hostname_shows() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let node = std::sync::Arc::new(muster_agent::effects::MemoryEffects::default());
    let mut a = start_agent_with(&f, &token, "node-cfg", Duration::from_millis(200), Some(node.clone()));
    a.wait("connected", |s| s.connected).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let yaml = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: renamed-node\nfiles:\n  - path: /etc/motd\n    content: \"hi\\n\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\n";
    let r = f
        .admin()
        .await
        .unwrap()
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Machine.into(),
            target: id.clone(),
            yaml: yaml.into(),
            dry_run: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].generation, 1);
    a.wait("generation 1 applied", |s| s.config_generation == 1).await;
    assert_eq!(*node.hostname.lock().unwrap(), "renamed-node");
    assert_eq!(node.files.lock().unwrap()["/etc/motd"].content, b"hi\n");
    assert_eq!(node.sysctls.lock().unwrap()["net.ipv4.ip_forward"], "1");
    // The controller records what the agent did, and shows the new hostname.
    let start = Instant::now();
    loop {
        let cfg = f
            .admin()
            .await
            .unwrap()
            .get_config(pb::GetConfigRequest { query: id.clone(), rendered: true })
            .await
            .unwrap()
            .into_inner();
        let m = machine(&f, &id).await;
        if cfg.applied_generation == 1 && m.hostname == "renamed-node" {
            assert_eq!(cfg.resources.len(), 3);
            assert!(
                cfg.resources.iter().all(|r| r.outcome == pb::Outcome::Applied as i32),
                "{:?}",
                cfg.resources
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not recorded: {cfg:?} {m:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Persisted for restarts without the controller.
    assert!(std::fs::read_to_string(a.state_dir.join("config.json")).unwrap().contains("renamed-node"));
    a.stop().await;
    f.still_serving().await.unwrap();
}

async fn resources(f: &TestController, id: &str) -> Vec<(String, String)> {
    let c = f
        .admin()
        .await
        .unwrap()
        .get_config(pb::GetConfigRequest { query: id.into(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    c.resources.into_iter().map(|r| (r.resource, outcome_name(r.outcome))).collect()
}

async fn wait_resource(f: &TestController, id: &str, resource: &str, outcome: &str) {
    let start = Instant::now();
    loop {
        let rs = resources(f, id).await;
        if rs.iter().any(|(r, o)| r == resource && o == outcome) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{resource} never {outcome}: {rs:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn apply(f: &TestController, id: &str, yaml: &str) {
    f.admin()
        .await
        .unwrap()
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Machine.into(),
            target: id.into(),
            yaml: yaml.into(),
            dry_run: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_and_reported_or_only_reported() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    // The real effects, with files under a temp root (the config has nothing but a file).
    let root = f.dir.path().join("node-d-root");
    std::fs::create_dir_all(&root).unwrap();
    let node = std::sync::Arc::new(muster_agent::effects::LinuxEffects::new(&root));
    let mut a = start_agent_with(&f, &token, "node-d", Duration::from_millis(200), Some(node));
    a.wait("connected", |s| s.connected).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let yaml = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/motd\n    content: \"managed\\n\"\n";
    apply(&f, &id, yaml).await;
    a.wait("generation 1", |s| s.config_generation == 1).await;
    let motd = root.join("etc/motd");
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "managed\n");

    // Edited behind Muster's back: reported and put back.
    std::fs::write(&motd, "tampered\n").unwrap();
    wait_resource(&f, &id, "file:/etc/motd", "corrected").await;
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "managed\n");
    let text = muster_tests::http_get(f.running.ports.http, "/metrics", &[]).await.unwrap().text();
    let drift = text
        .lines()
        .find(|l| l.starts_with("muster_machine_config_drift{") && l.contains("file:/etc/motd"))
        .unwrap();
    assert!(drift.ends_with(" 1"), "{drift}");

    // With `drift: report`, only reported.
    apply(&f, &id, &format!("{yaml}drift: report\n")).await;
    a.wait("generation 2", |s| s.config_generation == 2).await;
    std::fs::write(&motd, "tampered again\n").unwrap();
    wait_resource(&f, &id, "file:/etc/motd", "drifted").await;
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "tampered again\n", "report only: left as found");
    a.stop().await;
    f.still_serving().await.unwrap();
}

fn host_config(hostname: &str) -> String {
    format!("apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: {hostname}\n")
}

async fn apply_mode(
    f: &TestController,
    id: &str,
    yaml: &str,
    mode: ApplyMode,
    timeout_ms: u64,
) -> pb::MachineConfigResult {
    let r = f
        .admin()
        .await
        .unwrap()
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Machine.into(),
            target: id.into(),
            yaml: yaml.into(),
            mode: Some(pb::ApplyMode::from(mode).into()),
            try_timeout_ms: timeout_ms,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.results.into_iter().next().unwrap()
}

/// Polls the controller's view of a machine's config until `ok` holds.
async fn wait_config(
    f: &TestController,
    id: &str,
    what: &str,
    ok: impl Fn(&pb::GetConfigResponse) -> bool,
) -> pb::GetConfigResponse {
    let start = Instant::now();
    loop {
        let cfg = f
            .admin()
            .await
            .unwrap()
            .get_config(pb::GetConfigRequest { query: id.into(), rendered: true })
            .await
            .unwrap()
            .into_inner();
        if ok(&cfg) {
            return cfg;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: {cfg:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_mode_reverts_unless_confirmed_and_keeps_what_is_confirmed() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let node = std::sync::Arc::new(muster_agent::effects::MemoryEffects::default());
    let mut a = start_agent_with(&f, &token, "node-try", Duration::from_millis(200), Some(node.clone()));
    a.wait("connected", |s| s.connected).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let admin = || async { f.admin().await.unwrap() };

    assert_eq!(apply_mode(&f, &id, &host_config("first"), ApplyMode::Auto, 0).await.generation, 1);
    a.wait("generation 1", |s| s.config_generation == 1).await;

    // A try nobody confirms: applied, then reverted by the agent on its own.
    let r = apply_mode(&f, &id, &host_config("risky"), ApplyMode::Try, 1500).await;
    assert_eq!((r.generation, r.mode, r.try_timeout_ms), (2, Some(pb::ApplyMode::Try as i32), 1500));
    wait_config(&f, &id, "trying generation 2", |c| {
        c.state == pb::GenerationState::Trying as i32 && c.applied_generation == 2
    })
    .await;
    assert_eq!(*node.hostname.lock().unwrap(), "risky");
    let c =
        wait_config(&f, &id, "generation 2 reverted", |c| c.state == pb::GenerationState::Reverted as i32)
            .await;
    assert_eq!(c.applied_generation, 1, "{c:?}");
    assert!(c.error.contains("reverted to generation 1"), "{c:?}");
    assert_eq!(*node.hostname.lock().unwrap(), "first");
    a.wait("running generation 1 again", |s| s.config_generation == 1).await;
    // Too late to confirm.
    let err = admin().await.confirm_config(pb::MachineRef { query: id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("reverted"), "{err:?}");
    // History tells the story.
    let h = admin().await.config_history(pb::MachineRef { query: id.clone() }).await.unwrap().into_inner();
    let states: Vec<(u64, String, String)> =
        h.revisions.iter().map(|r| (r.generation, mode_name(r.mode), state_name(r.state))).collect();
    assert_eq!(
        states,
        [(2, "try".to_string(), "reverted".to_string()), (1, "auto".into(), "applied".into())]
    );

    // A confirmed try stays after its timeout.
    let r = apply_mode(&f, &id, &host_config("kept"), ApplyMode::Try, 1500).await;
    assert_eq!(r.generation, 3);
    wait_config(&f, &id, "trying generation 3", |c| c.state == pb::GenerationState::Trying as i32).await;
    let c = admin().await.confirm_config(pb::MachineRef { query: id.clone() }).await.unwrap().into_inner();
    assert!(c.confirmed);
    wait_config(&f, &id, "generation 3 confirmed on the node", |c| {
        c.state == pb::GenerationState::Applied as i32
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = wait_config(&f, &id, "still generation 3", |c| c.applied_generation == 3).await;
    assert_eq!(c.state, pb::GenerationState::Applied as i32);
    assert_eq!(*node.hostname.lock().unwrap(), "kept");
    // Confirming something that was not tried is refused, clearly.
    apply_mode(&f, &id, &host_config("plain"), ApplyMode::Auto, 0).await;
    let err = admin().await.confirm_config(pb::MachineRef { query: id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not applied in try mode"), "{err:?}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_survives_an_agent_restart_and_still_reverts() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let node = std::sync::Arc::new(muster_agent::effects::MemoryEffects::default());
    let mut a = start_agent_with(&f, &token, "node-tr", Duration::from_millis(200), Some(node.clone()));
    a.wait("connected", |s| s.connected).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    apply_mode(&f, &id, &host_config("before"), ApplyMode::Auto, 0).await;
    a.wait("generation 1", |s| s.config_generation == 1).await;
    apply_mode(&f, &id, &host_config("during"), ApplyMode::Try, 2000).await;
    a.wait("trying generation 2", |s| s.config_generation == 2).await;
    a.stop().await;
    // Restarted (same state dir), the agent keeps the try's deadline and reverts on time.
    let mut a = start_agent_with(&f, &token, "node-tr", Duration::from_millis(200), Some(node.clone()));
    let c = wait_config(&f, &id, "reverted after the restart", |c| {
        c.state == pb::GenerationState::Reverted as i32
    })
    .await;
    assert_eq!(c.applied_generation, 1);
    a.wait("running generation 1", |s| s.config_generation == 1).await;
    assert_eq!(*node.hostname.lock().unwrap(), "before");
    // On reconnect the controller sends generation 2 again; a reverted try is not tried again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*node.hostname.lock().unwrap(), "before");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_config_waits_for_the_next_boot() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let boot_id = f.dir.path().join("node-st.boot_id");
    std::fs::write(&boot_id, "boot-1\n").unwrap();
    let node = std::sync::Arc::new(muster_agent::effects::MemoryEffects::default());
    let mut a = start_agent_with(&f, &token, "node-st", Duration::from_millis(200), Some(node.clone()));
    a.wait("connected", |s| s.connected).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    apply_mode(&f, &id, &host_config("now"), ApplyMode::Auto, 0).await;
    a.wait("generation 1", |s| s.config_generation == 1).await;
    let r = apply_mode(&f, &id, &host_config("after-reboot"), ApplyMode::Staged, 0).await;
    assert_eq!((r.generation, r.mode), (2, Some(pb::ApplyMode::Staged as i32)));
    let c = wait_config(&f, &id, "staged", |c| c.state == pb::GenerationState::Staged as i32).await;
    assert_eq!(c.applied_generation, 1);
    assert_eq!(*node.hostname.lock().unwrap(), "now");
    // An agent restart in the same boot changes nothing...
    a.stop().await;
    let mut a = start_agent_with(&f, &token, "node-st", Duration::from_millis(200), Some(node.clone()));
    a.wait("connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*node.hostname.lock().unwrap(), "now");
    a.stop().await;
    // ...a new boot applies it.
    std::fs::write(&boot_id, "boot-2\n").unwrap();
    let mut a = start_agent_with(&f, &token, "node-st", Duration::from_millis(200), Some(node.clone()));
    a.wait("generation 2 after the reboot", |s| s.config_generation == 2).await;
    assert_eq!(*node.hostname.lock().unwrap(), "after-reboot");
    wait_config(&f, &id, "applied after the reboot", |c| {
        c.state == pb::GenerationState::Applied as i32 && c.applied_generation == 2
    })
    .await;
    a.stop().await;
}
