//! The fleet's admission rules, each pinned by a test that fails if the rule is loosened (these
//! are the gaps mutation testing found, see scripts/mutants.sh): an assignment is refused only
//! when it changes nothing, and moves a machine to another role or cluster only with force;
//! what a node reports about itself is cut back on a character boundary, never past the limit;
//! a registered machine's first config is applied outright (auto), even when it sets up the
//! network, which a later change would try first; a try is confirmed only while the machine's
//! stream is open (it could not hear the confirmation otherwise). Everything runs against a
//! real controller in this process (127.0.0.1, real TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use muster_proto::pb;
use muster_tests::{Enrolled, TestController};
use tokio::sync::mpsc;
use tonic::Code;

fn assign(m: &Enrolled, role: pb::Role, cluster: &str, force: bool) -> pb::AssignRequest {
    pb::AssignRequest { query: m.id.clone(), role: role.into(), cluster: cluster.into(), force }
}

async fn role_and_cluster(f: &TestController, m: &Enrolled) -> (i32, String) {
    let got = f.machine(&m.id).await.unwrap();
    (got.role, got.cluster)
}

/// With force, a machine moves to another role in the same cluster, or to the same role in
/// another cluster; only an assignment that changes nothing is refused as a duplicate (and that
/// refusal does not suggest --force, which would not help).
#[tokio::test]
async fn forced_assignment_moves_role_or_cluster_alone_and_refuses_only_a_no_op() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    admin.assign(assign(&m, pb::Role::Worker, "lab", false)).await.unwrap();

    // Another role, same cluster.
    let got = admin.assign(assign(&m, pb::Role::Controlplane, "lab", true)).await.unwrap().into_inner();
    assert_eq!((got.role, got.cluster.as_str()), (pb::Role::Controlplane as i32, "lab"));
    // Same role, another cluster.
    let got = admin.assign(assign(&m, pb::Role::Controlplane, "other", true)).await.unwrap().into_inner();
    assert_eq!((got.role, got.cluster.as_str()), (pb::Role::Controlplane as i32, "other"));

    // The same assignment again, even forced, is a duplicate.
    for force in [false, true] {
        let err = admin.assign(assign(&m, pb::Role::Controlplane, "other", force)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().ends_with("already has role controlplane in cluster other"), "{err}");
    }
    // Without force, neither a new role in the same cluster nor the same role elsewhere.
    for (role, cluster) in [(pb::Role::Worker, "other"), (pb::Role::Controlplane, "lab")] {
        let err = admin.assign(assign(&m, role, cluster, false)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("pass --force"), "{err}");
    }
    assert_eq!(role_and_cluster(&f, &m).await, (pb::Role::Controlplane as i32, "other".to_string()));
    f.still_serving().await.unwrap();
}

/// What a node says about itself is cut to 128 bytes on a character boundary, never past it:
/// a string whose 128th byte falls inside a character keeps the whole characters before it.
#[tokio::test]
async fn reported_strings_are_cut_back_to_a_character_boundary() {
    let f = TestController::start().await.unwrap();
    // 'a' then two-byte characters: byte 128 is the middle of one.
    let long = format!("a{}", "é".repeat(200));
    let inv = pb::Inventory { cpu_model: long, kernel: "x".repeat(300), ..Default::default() };
    let m = f.enroll_with(&f.token(0, 1).await.unwrap(), inv).await.unwrap().unwrap();
    let got = f.machine(&m.id).await.unwrap();
    let inv = got.inventory.unwrap();
    assert_eq!(inv.cpu_model, format!("a{}", "é".repeat(63)));
    assert_eq!(inv.kernel, "x".repeat(128));
    f.still_serving().await.unwrap();
}

/// A pre-registered machine's first generation is applied outright, though it configures the
/// network (which would make an operator's change a try that reverts unless confirmed): the
/// node just booted into it, there is nothing to go back to.
#[tokio::test]
async fn a_registered_machines_first_config_is_auto_even_with_a_network_section() {
    // The test's client connects from loopback: trusted here as evidence of the MAC it reports.
    let f = TestController::start_with(muster_controller::fleet::ControllerOptions {
        admission: muster_controller::fleet::admission::AdmissionOptions {
            trust_reported_macs: vec!["127.0.0.1/32".parse().unwrap()],
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let mut admin = f.admin().await.unwrap();
    let yaml = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: eth0\n      addresses: [\"192.168.5.20/24\"]\n";
    admin
        .register_machine(pb::RegisterMachineRequest {
            registration: Some(pb::Registration {
                mac: "52:54:00:ad:00:01".into(),
                hostname: "node-reg".into(),
                yaml: yaml.into(),
                ..Default::default()
            }),
            force: false,
        })
        .await
        .unwrap();
    let boot = admin
        .create_token(pb::CreateTokenRequest { boot: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let inv = pb::Inventory {
        hostname: "localhost".into(),
        nics: vec![pb::Nic { name: "eth0".into(), mac: "52:54:00:ad:00:01".into(), addresses: vec![] }],
        ..Default::default()
    };
    let m = f.enroll_with(&boot, inv).await.unwrap().unwrap();
    let cfg = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert!(cfg.yaml.contains("192.168.5.20/24"), "{}", cfg.yaml);
    assert_eq!((cfg.generation, cfg.mode), (1, pb::ApplyMode::Auto as i32), "{cfg:?}");
    f.still_serving().await.unwrap();
}

/// An agent's stream, raw: what it is sent, and the sender of what it says.
async fn open_stream(
    f: &TestController,
    m: &Enrolled,
) -> (mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>) {
    f.open_stream(m, pb::Hello { heartbeat_interval_ms: 5000, ..Default::default() }).await.unwrap()
}

/// Polls the admin API until `check` holds for the machine (10 s at most).
async fn wait_machine(f: &TestController, m: &Enrolled, what: &str, check: impl Fn(&pb::Machine) -> bool) {
    let start = Instant::now();
    loop {
        let got = f.machine(&m.id).await.unwrap();
        if check(&got) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The operator's confirmation of a try is refused while the machine is not connected: the
/// agent would not hear it and revert anyway, while the controller recorded it as kept.
#[tokio::test]
async fn a_try_is_confirmed_only_while_the_machine_is_connected() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    wait_machine(&f, &m, "never connected", |g| !g.connected).await;
    let (up, mut down) = open_stream(&f, &m).await;
    let mut admin = f.admin().await.unwrap();
    admin
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Machine.into(),
            target: m.id.clone(),
            yaml: "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: tried\n".into(),
            mode: Some(pb::ApplyMode::Try.into()),
            confirm: Some(pb::ConfirmPolicy::Manual.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), down.message()).await.unwrap().unwrap().unwrap();
        if matches!(msg.msg, Some(pb::controller_message::Msg::Config(ref c)) if c.generation == 1) {
            break;
        }
    }
    let status = pb::ConfigStatus {
        generation: 1,
        current_generation: 1,
        state: pb::GenerationState::Trying.into(),
        ..Default::default()
    };
    up.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::ConfigStatus(status)) }).await.unwrap();
    wait_machine(&f, &m, "trying, connected", |g| {
        g.connected && g.config_state == pb::GenerationState::Trying as i32
    })
    .await;

    // The stream ends: the machine is no longer connected, and its try cannot be confirmed.
    drop((up, down));
    wait_machine(&f, &m, "disconnected", |g| !g.connected).await;
    let err = admin.confirm_config(pb::MachineRef { query: m.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("not connected"), "{err}");
    let cfg = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!cfg.confirmed, "{cfg:?}");

    // Back on a stream, it can be.
    let _stream = open_stream(&f, &m).await;
    wait_machine(&f, &m, "reconnected", |g| g.connected).await;
    let cfg = admin.confirm_config(pb::MachineRef { query: m.id.clone() }).await.unwrap().into_inner();
    assert!(cfg.confirmed, "{cfg:?}");
    f.still_serving().await.unwrap();
}
