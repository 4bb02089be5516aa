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
use tokio_stream::StreamExt;

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
        token: (!token.is_empty()).then(|| muster_machinery::token::JoinToken::parse(token).unwrap()),
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

async fn wait_state(f: &TestController, id: &str, state: pb::MachineState, within: Duration) -> pb::Machine {
    let start = Instant::now();
    loop {
        let m = f.machine(id).await.unwrap();
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
    a.stop().await;

    // A new controller process on the same data dir, and the agent started again with no token:
    // only its saved identity can get it in.
    let f = f.restart().await.unwrap();
    let mut a = start_agent(&f, "", "node-r", Duration::from_millis(200));
    a.wait("reconnected to the new controller", |s| s.connected && s.heartbeats_acked > 2).await;
    assert_eq!(a.status.borrow().machine_id.as_deref(), Some(id.as_str()), "the saved identity");
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
    assert_eq!(f.machine(&id).await.unwrap().state, pb::MachineState::Ready as i32);
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
async fn revoke_closes_the_stream_and_stops_the_agent() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-x", Duration::from_millis(500));
    a.wait("connected", |s| s.connected && s.heartbeats_acked > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();

    f.admin().await.unwrap().revoke(pb::MachineRef { query: id.clone() }).await.unwrap();
    // The stream is closed at once (how fast is measured by muster-bench, not asserted here);
    // heartbeats every 500 ms would take far longer to notice than this allows.
    let result = tokio::time::timeout(Duration::from_secs(10), &mut a.task)
        .await
        .expect("the agent must learn of its revocation from the closed stream")
        .unwrap();
    let err = result.expect_err("a revoked agent stops with an error");
    assert!(matches!(err, muster_agent::AgentError::Revoked { .. }), "{err}");
    // It threw away the identity that no longer works.
    assert!(!a.state_dir.join("cert.pem").exists());
    assert!(!a.state_dir.join("key.pem").exists());
    assert_eq!(f.machine(&id).await.unwrap().state, pb::MachineState::Revoked as i32);
    f.still_serving().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_certificate_at_seventy_percent_and_stays_connected() {
    // 20 s certificates: renewal due 65-70 % into their validity (13-16 s after issuance).
    let ttl = Duration::from_secs(20);
    let opts = muster_controller::fleet::ControllerOptions { machine_cert_ttl: ttl, ..Default::default() };
    let f = TestController::start_with(opts).await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let mut a = start_agent(&f, &token, "node-c", Duration::from_millis(200));
    a.wait("connected with a renewal scheduled", |s| s.connected && s.renew_at > 0).await;
    let id = a.status.borrow().machine_id.clone().unwrap();
    let (first, renew_at) = (a.status.borrow().cert_not_after, a.status.borrow().renew_at);
    let serial = f.machine(&id).await.unwrap().cert_serial;
    // The schedule, from the certificate itself: 65-70 % of its validity (70 %, moved earlier by
    // up to 5 % of jitter), never later.
    let pem = std::fs::read_to_string(a.state_dir.join("cert.pem")).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = p.parse_x509().unwrap();
    let (nb, na) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
    let life = na - nb;
    assert!(
        (nb + life * 65 / 100..=nb + life * 70 / 100).contains(&renew_at),
        "renewal scheduled at {renew_at}, validity {nb}..{na}"
    );
    a.wait("a renewed certificate", |s| s.cert_not_after > first).await;
    // The controller signed the new one no earlier than the schedule and before the old expired.
    let m = f.machine(&id).await.unwrap();
    let signed_ms = m.cert_not_after_unix_ms - i64::try_from(ttl.as_millis()).unwrap();
    assert!(signed_ms >= renew_at * 1000, "renewed at {signed_ms} ms, before its time {renew_at} s");
    assert!(signed_ms < na * 1000, "renewed at {signed_ms} ms, after the old certificate expired ({na} s)");
    assert_ne!(m.cert_serial, serial);
    // Reconnected with the new certificate and still heartbeating; the controller knows it.
    let acked = a.status.borrow().heartbeats_acked;
    a.wait("heartbeats on the new certificate", |s| s.connected && s.heartbeats_acked > acked + 2).await;
    assert_eq!(f.machine(&id).await.unwrap().state, pb::MachineState::Ready as i32);
    let on_disk = std::fs::read_to_string(a.state_dir.join("cert.pem")).unwrap();
    assert_ne!(on_disk, pem, "the new certificate is saved");
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

/// A node that was off while its certificate expired: without a token it stops with a clear
/// error; with one it enrolls again (as a new machine) and connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_needs_a_token_to_enroll_again() {
    let opts = muster_controller::fleet::ControllerOptions {
        machine_cert_ttl: Duration::from_secs(4),
        ..Default::default()
    };
    let f = TestController::start_with(opts).await.unwrap();
    let token = f.token(0, 2).await.unwrap();
    let mut a = start_agent(&f, &token, "node-e", Duration::from_millis(200));
    a.wait("connected", |s| s.connected && s.cert_not_after > 0).await;
    let (id, not_after) = (a.status.borrow().machine_id.clone().unwrap(), a.status.borrow().cert_not_after);
    a.stop().await;
    // Off until the certificate has expired.
    let left = u64::try_from(not_after * 1000 - muster_util::now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(left + 1100)).await;

    let a = start_agent(&f, "", "node-e", Duration::from_millis(200));
    let result = tokio::time::timeout(Duration::from_secs(10), a.task).await.unwrap().unwrap();
    let err = result.expect_err("no token: it cannot come back");
    assert!(matches!(err, muster_agent::AgentError::Expired(_)), "{err}");
    assert!(err.to_string().contains("expired") && err.to_string().contains("join token"), "{err}");

    let mut a = start_agent(&f, &token, "node-e", Duration::from_millis(200));
    a.wait("enrolled again and connected", |s| s.connected && s.heartbeats_acked > 0).await;
    let new_id = a.status.borrow().machine_id.clone().unwrap();
    assert_ne!(new_id, id, "a new enrollment makes a new machine");
    assert_eq!(f.machine(&new_id).await.unwrap().state, pb::MachineState::Ready as i32);
    a.stop().await;
    f.still_serving().await.unwrap();
}

/// A deleted machine's certificate is still valid as X.509, and refused anyway: its open stream
/// is closed, and reconnecting or renewing with it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_machines_certificate_is_refused() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let m = f.enroll(&token).await.unwrap();
    let hello = || {
        tokio_stream::iter([pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                heartbeat_interval_ms: 5000,
                ..Default::default()
            })),
        }])
        .chain(tokio_stream::pending())
    };
    let mut down = f.machine_agent(&m).await.unwrap().connect(hello()).await.unwrap().into_inner();
    assert!(down.message().await.unwrap().is_some(), "welcome");
    f.admin().await.unwrap().delete(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .expect("the stream must close")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without saying why"),
            Err(s) => break s,
        }
    };
    assert_eq!(closed.code(), tonic::Code::PermissionDenied, "{closed:?}");
    assert!(closed.message().contains("deleted"), "{closed:?}");
    let again = f.machine_agent(&m).await.unwrap().connect(hello()).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    let key = rcgen::KeyPair::from_pem(&m.key).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let renew =
        f.machine_agent(&m).await.unwrap().renew(pb::RenewRequest { csr_pem: csr }).await.unwrap_err();
    assert_eq!(renew.code(), tonic::Code::PermissionDenied, "{renew:?}");
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
    let m = f.machine(&id).await.unwrap();
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
        let m = f.machine(&id).await.unwrap();
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

/// The real Linux effects for files under a temp root, and nothing else: every effect that
/// would reach beyond the root (hostname, sysctls, network, modules, units) fails.
struct FilesOnly(muster_agent::effects::LinuxEffects);

fn refused(what: &str) -> muster_agent::effects::EffectError {
    muster_agent::effects::EffectError {
        what: what.into(),
        source: std::io::Error::other("refused by the test: it runs in the host's namespaces"),
    }
}

impl muster_agent::effects::Effects for FilesOnly {
    fn hostname(&self) -> Result<String, muster_agent::effects::EffectError> {
        Err(refused("hostname"))
    }
    fn set_hostname(&self, _: &str) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("set_hostname"))
    }
    fn read_file(
        &self,
        path: &str,
    ) -> Result<Option<muster_agent::effects::FileState>, muster_agent::effects::EffectError> {
        self.0.read_file(path)
    }
    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), muster_agent::effects::EffectError> {
        self.0.write_file(path, content, mode, uid, gid)
    }
    fn resolve_owner(
        &self,
        user: &str,
        group: Option<&str>,
    ) -> Result<(u32, u32), muster_agent::effects::EffectError> {
        self.0.resolve_owner(user, group)
    }
    fn remove_file(&self, path: &str) -> Result<(), muster_agent::effects::EffectError> {
        self.0.remove_file(path)
    }
    fn exists(&self, path: &str) -> Result<bool, muster_agent::effects::EffectError> {
        self.0.exists(path)
    }
    fn remove_empty_dir(&self, path: &str) -> Result<(), muster_agent::effects::EffectError> {
        self.0.remove_empty_dir(path)
    }
    fn unload_module(&self, _: &str) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("unload_module"))
    }
    fn sysctl(&self, _: &str) -> Result<Option<String>, muster_agent::effects::EffectError> {
        Err(refused("sysctl"))
    }
    fn set_sysctl(&self, _: &str, _: &str) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("set_sysctl"))
    }
    fn network(&self) -> Result<muster_agent::effects::NetState, muster_agent::effects::EffectError> {
        Err(refused("network"))
    }
    fn change_network(
        &self,
        _: &muster_agent::effects::NetChange,
    ) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("change_network"))
    }
    fn kernel_owned(&self) -> Result<(), String> {
        Err("refused by the test".into())
    }
    fn module_loaded(&self, _: &str) -> Result<bool, muster_agent::effects::EffectError> {
        Err(refused("module_loaded"))
    }
    fn load_module(&self, _: &str, _: &[String]) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("load_module"))
    }
    fn systemd(&self) -> Result<(), String> {
        Err("refused by the test".into())
    }
    fn unit_state(
        &self,
        _: &str,
    ) -> Result<muster_agent::effects::UnitState, muster_agent::effects::EffectError> {
        Err(refused("unit_state"))
    }
    fn systemctl(&self, _: &str, _: Option<&str>) -> Result<(), muster_agent::effects::EffectError> {
        Err(refused("systemctl"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_and_reported_or_only_reported() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    // The real file effects under a temp root; everything node-wide is refused (this test runs
    // in the host's namespaces).
    let root = f.dir.path().join("node-d-root");
    std::fs::create_dir_all(&root).unwrap();
    let node = std::sync::Arc::new(FilesOnly(muster_agent::effects::LinuxEffects::new(&root)));
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
            // These tests confirm (or not) by hand.
            confirm: Some(pb::ConfirmPolicy::Manual.into()),
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
    let trying =
        wait_config(&f, &id, "trying generation 3", |c| c.state == pb::GenerationState::Trying as i32).await;
    let deadline = trying.try_deadline_unix_ms;
    assert!(deadline > 0, "{trying:?}");
    let c = admin().await.confirm_config(pb::MachineRef { query: id.clone() }).await.unwrap().into_inner();
    assert!(c.confirmed);
    wait_config(&f, &id, "generation 3 confirmed on the node", |c| {
        c.state == pb::GenerationState::Applied as i32
    })
    .await;
    a.wait("no try pending on the node", |s| s.trying.is_none()).await;
    // Past the deadline it had: nothing reverted it.
    let left = u64::try_from(deadline - muster_util::now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(left + 200)).await;
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
    apply_mode(&f, &id, &host_config("during"), ApplyMode::Try, 4000).await;
    a.wait("trying generation 2", |s| s.config_generation == 2 && s.trying == Some(2)).await;
    let try_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.state_dir.join("try.json")).unwrap()).unwrap();
    let deadline = try_file["deadline_unix_ms"].as_i64().unwrap();
    a.stop().await;
    // Restarted (same state dir): before the deadline the try is still what the node runs...
    let mut a = start_agent_with(&f, &token, "node-tr", Duration::from_millis(200), Some(node.clone()));
    a.wait("the try still pending after the restart", |s| s.trying == Some(2)).await;
    assert_eq!(*node.hostname.lock().unwrap(), "during");
    assert!(muster_util::now_ms() < deadline, "checked before the deadline");
    // ...and at the deadline it reverts, connected or not.
    let c = wait_config(&f, &id, "reverted after the restart", |c| {
        c.state == pb::GenerationState::Reverted as i32
    })
    .await;
    assert!(muster_util::now_ms() >= deadline, "not before its deadline");
    assert_eq!(c.applied_generation, 1);
    a.wait("running generation 1", |s| s.config_generation == 1 && s.trying.is_none()).await;
    assert_eq!(*node.hostname.lock().unwrap(), "before");
    // The controller sends generation 2 again on every connect; a reverted try is not tried again.
    a.stop().await;
    let mut a = start_agent_with(&f, &token, "node-tr", Duration::from_millis(200), Some(node.clone()));
    a.wait("generation 2 received again", |s| s.config_updates >= 1).await;
    assert_eq!(*node.hostname.lock().unwrap(), "before");
    assert_eq!(a.status.borrow().config_generation, 1);
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
    a.wait("connected, with generation 2 received again", |s| s.connected && s.config_updates >= 1).await;
    assert_eq!(*node.hostname.lock().unwrap(), "now");
    assert_eq!(a.status.borrow().config_generation, 1);
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
