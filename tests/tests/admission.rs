//! The fleet's admission rules, each pinned by a test that fails if the rule is loosened (these
//! are the gaps mutation testing found, see scripts/mutants.sh): an assignment is refused only
//! when it changes nothing, and moves a machine to another role or cluster only with force.
//! Everything runs against a real controller in this process (127.0.0.1, real TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use muster_proto::pb;
use muster_tests::{Enrolled, TestController};
use tonic::Code;

fn assign(m: &Enrolled, role: pb::Role, cluster: &str, force: bool) -> pb::AssignRequest {
    pb::AssignRequest { query: m.id.clone(), role: role.into(), cluster: cluster.into(), force }
}

async fn role_and_cluster(f: &TestController, m: &Enrolled) -> (i32, String) {
    let got = f
        .admin()
        .await
        .unwrap()
        .get_machine(pb::MachineRef { query: m.id.clone() })
        .await
        .unwrap()
        .into_inner();
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

/// What a node says about itself is cut to 256 bytes on a character boundary, never past it:
/// a hostname whose 256th byte falls inside a character keeps the whole characters before it.
#[tokio::test]
async fn reported_strings_are_cut_back_to_a_character_boundary() {
    let f = TestController::start().await.unwrap();
    // 'a' then two-byte characters: byte 256 is the middle of one.
    let long = format!("a{}", "é".repeat(200));
    let inv = pb::Inventory { hostname: long, cpu_model: "x".repeat(300), ..Default::default() };
    let m = f.enroll_with(&f.token(0, 1).await.unwrap(), inv).await.unwrap().unwrap();
    let got = f
        .admin()
        .await
        .unwrap()
        .get_machine(pb::MachineRef { query: m.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.hostname, format!("a{}", "é".repeat(127)));
    assert_eq!(got.inventory.unwrap().cpu_model, "x".repeat(256));
    f.still_serving().await.unwrap();
}
