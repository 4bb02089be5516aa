//! Every way in that must stay shut, each asserted by name against a real controller (in this
//! process, on 127.0.0.1) with real TLS: no client certificate, another CA's certificate, a
//! machine certificate on the admin API and the reverse, expired, reused, revoked and malformed
//! tokens, revoked machines, tampered CSRs, oversized messages, unknown ids, duplicate
//! assignments. After each, the store is unchanged where it must be and the controller serves on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_machinery::musterconfig::MusterConfig;
use muster_proto::pb;
use muster_proto::pb::admin_service_client::AdminServiceClient;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use muster_tests::{channel, Enrolled, TestController};
use tonic::Code;

fn hello_stream() -> impl futures_stream::Stream<Item = pb::AgentMessage> + Send + 'static {
    futures_stream::once(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            heartbeat_interval_ms: 1000,
            ..Default::default()
        })),
    })
}

mod futures_stream {
    pub use tokio_stream::{once, Stream};
}

#[tokio::test]
async fn no_client_cert_is_rejected() {
    let f = TestController::start().await.unwrap();
    let ch = channel(&f.endpoint, &f.mc.ca, None).await.unwrap();
    let err = AdminServiceClient::new(ch.clone())
        .list_machines(pb::ListMachinesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = AgentServiceClient::new(ch.clone()).connect(hello_stream()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = AgentServiceClient::new(ch).renew(pb::RenewRequest { csr_pem: "x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn cert_from_another_ca_is_rejected() {
    let f = TestController::start().await.unwrap();
    let other = tempfile::tempdir().unwrap();
    let dir = muster_controller::pki::DataDir::new(other.path().join("x"));
    muster_controller::pki::init(&dir, &[], "https://127.0.0.1:1").unwrap();
    let foreign = MusterConfig::from_yaml(&std::fs::read_to_string(dir.musterconfig()).unwrap()).unwrap();
    // Trust our controller's CA (so the server is verified) but present the other CA's admin cert.
    let result = match channel(&f.endpoint, &f.mc.ca, Some((&foreign.cert, &foreign.key))).await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => AdminServiceClient::new(ch)
            .list_machines(pb::ListMachinesRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
    };
    let err = result.expect_err("a certificate from another CA must not get in");
    assert!(err.contains("transport") || err.contains("Unknown") || err.contains("UnknownCA"), "{err}");
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn agent_cert_on_admin_api_is_rejected() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let ch = channel(&f.endpoint, &f.mc.ca, Some((&m.cert, &m.key))).await.unwrap();
    let mut admin = AdminServiceClient::new(ch);
    let err = admin.list_machines(pb::ListMachinesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err =
        admin.create_token(pb::CreateTokenRequest { uses: 100, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = admin
        .assign(pb::AssignRequest {
            query: m.id.clone(),
            role: pb::Role::Controlplane.into(),
            cluster: "c".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn admin_cert_on_agent_api_is_rejected() {
    let f = TestController::start().await.unwrap();
    let ch = channel(&f.endpoint, &f.mc.ca, Some((&f.mc.cert, &f.mc.key))).await.unwrap();
    let err = AgentServiceClient::new(ch).connect(hello_stream()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn expired_token_is_rejected() {
    let f = TestController::start().await.unwrap();
    let t = f.token(1, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = f.enroll(&t).await.expect_err("expired token must fail");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("expired"), "{err}");
    assert_eq!(f.machine_count().await.unwrap(), 0);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn reused_single_use_token_is_rejected() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 0).await.unwrap(); // defaults: single use
    f.enroll(&t).await.unwrap();
    let err = f.enroll(&t).await.expect_err("second use must fail");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("no uses left"), "{err}");
    assert_eq!(f.machine_count().await.unwrap(), 1);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn racing_enrollments_on_a_single_use_token_have_one_winner() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 1).await.unwrap();
    let results = futures::future::join_all((0..6).map(|_| f.enroll(&t))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert_eq!(f.machine_count().await.unwrap(), 1);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn revoked_and_wrong_secret_tokens_are_rejected() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 5).await.unwrap();
    let id = t.split('.').next().unwrap().to_owned();
    // Right id, wrong secret: told only that it is invalid.
    let wrong = format!("{id}.{}", "z".repeat(32));
    let err = f.enroll(&wrong).await.err().unwrap();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid join token"));
    f.admin().await.unwrap().revoke_token(pb::RevokeTokenRequest { id }).await.unwrap();
    let err = f.enroll(&t).await.err().unwrap();
    assert!(err.message().contains("revoked"), "{err}");
    assert_eq!(f.machine_count().await.unwrap(), 0);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn malformed_token_is_rejected() {
    let f = TestController::start().await.unwrap();
    for bad in ["", "nope", "abc123.short", "../../etc/passwd"] {
        let err = f.enroll(bad).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
        assert!(err.message().starts_with("token:"), "{err}");
    }
    assert_eq!(f.machine_count().await.unwrap(), 0);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn revoked_machine_is_rejected() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let mut agent = f.machine_agent(&m).await.unwrap();
    // Before revocation the certificate works.
    agent.connect(hello_stream()).await.unwrap();
    f.admin().await.unwrap().revoke(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let err = agent.connect(hello_stream()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("revoked"), "{err}");
    let key = rcgen::KeyPair::from_pem(&m.key).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let err = agent.renew(pb::RenewRequest { csr_pem: csr }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let listed = f.machine(&m.id).await.unwrap();
    assert_eq!(listed.state, pb::MachineState::Revoked as i32);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn tampered_csr_is_rejected_and_the_token_kept() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 1).await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap();
    let mut der = csr.der().to_vec();
    let n = der.len();
    der[n - 3] ^= 0xff;
    let tampered =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", b64(&der));
    for bad in [
        tampered.as_str(),
        "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = f
            .anon_agent()
            .await
            .unwrap()
            .enroll(pb::EnrollRequest { token: t.clone(), csr_pem: bad.into(), inventory: None })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().starts_with("csr_pem"), "{err}");
    }
    // The token was not used up by the refused requests.
    f.enroll(&t).await.unwrap();
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn csr_asking_for_ca_and_extra_sans_gets_neither() {
    let f = TestController::start().await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "evil.example".to_string()]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "muster:admins");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let r = f
        .anon_agent()
        .await
        .unwrap()
        .enroll(pb::EnrollRequest { token: f.token(0, 1).await.unwrap(), csr_pem: csr, inventory: None })
        .await
        .unwrap()
        .into_inner();
    let pem = x509_pem(&r.certificate_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&pem).unwrap();
    assert!(!cert.is_ca());
    let names = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(format!("{:?}", names[0]).contains(&r.machine_id));
    let org: Vec<_> = cert.subject().iter_organization().map(|o| o.as_str().unwrap().to_owned()).collect();
    assert_eq!(org, ["muster:machines"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    // And the certificate does not open the admin API.
    let m = Enrolled { id: r.machine_id, cert: r.certificate_pem, key: key.serialize_pem() };
    let ch = channel(&f.endpoint, &f.mc.ca, Some((&m.cert, &m.key))).await.unwrap();
    let err =
        AdminServiceClient::new(ch).list_machines(pb::ListMachinesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn oversized_message_is_rejected() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    // A valid enrollment (real token, real CSR), made just over the documented 256 KiB agent
    // limit by its inventory: only the size can refuse it.
    let limit = 256 * 1024;
    let inventory = pb::Inventory { cpu_model: "x".repeat(limit + 1024), ..Default::default() };
    let err = f
        .anon_agent()
        .await
        .unwrap()
        .enroll(pb::EnrollRequest { token: token.clone(), csr_pem: csr.clone(), inventory: Some(inventory) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("too large"), "{err}");
    assert_eq!(f.machine_count().await.unwrap(), 0);
    // The same request within the limit enrolls with the same single-use token: the refusal
    // took nothing.
    let inventory = pb::Inventory { cpu_model: "x".repeat(limit / 2), ..Default::default() };
    f.anon_agent()
        .await
        .unwrap()
        .enroll(pb::EnrollRequest { token, csr_pem: csr, inventory: Some(inventory) })
        .await
        .unwrap();
    assert_eq!(f.machine_count().await.unwrap(), 1);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn unknown_machine_ids_are_not_found() {
    let f = TestController::start().await.unwrap();
    let mut admin = f.admin().await.unwrap();
    for q in ["0123456789abcdef", "nosuchhost", "52:54:00:00:00:01"] {
        let err = admin.get_machine(pb::MachineRef { query: q.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{q}: {err}");
        let err = admin.revoke(pb::MachineRef { query: q.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{q}: {err}");
        let err = admin.delete(pb::MachineRef { query: q.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{q}: {err}");
    }
    let err = admin.get_machine(pb::MachineRef { query: " ".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn duplicate_and_invalid_assignments_change_nothing() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    let assign = |role: pb::Role, cluster: &str, force: bool| pb::AssignRequest {
        query: m.id.clone(),
        role: role.into(),
        cluster: cluster.into(),
        force,
    };
    admin.assign(assign(pb::Role::Worker, "lab", false)).await.unwrap();
    let err = admin.assign(assign(pb::Role::Worker, "lab", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().ends_with("already has role worker in cluster lab"), "{err}");
    // The same assignment again is refused as such, with --force too (nothing to move).
    let err = admin.assign(assign(pb::Role::Worker, "lab", true)).await.unwrap_err();
    assert!(err.message().ends_with("already has role worker in cluster lab"), "{err}");
    // Another role, or the same role in another cluster, needs --force.
    for (role, cluster) in
        [(pb::Role::Controlplane, "other"), (pb::Role::Worker, "other"), (pb::Role::Controlplane, "lab")]
    {
        let err = admin.assign(assign(role, cluster, false)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().ends_with("pass --force to reassign it"), "{role:?} {cluster}: {err}");
    }
    let err = admin.assign(assign(pb::Role::Unspecified, "lab", true)).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("role"), "{err}");
    let err = admin.assign(assign(pb::Role::Worker, "Bad_Name", true)).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("cluster"), "{err}");
    let err = admin
        .assign(pb::AssignRequest { query: m.id.clone(), role: 42, cluster: "lab".into(), force: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let got = admin.get_machine(pb::MachineRef { query: m.id.clone() }).await.unwrap().into_inner();
    assert_eq!((got.role, got.cluster.as_str()), (pb::Role::Worker as i32, "lab"));
    // --force moves it: to another cluster with the same role, then to another role.
    let moved = admin.assign(assign(pb::Role::Worker, "other", true)).await.unwrap().into_inner();
    assert_eq!((moved.role, moved.cluster.as_str()), (pb::Role::Worker as i32, "other"));
    let moved = admin.assign(assign(pb::Role::Controlplane, "other", true)).await.unwrap().into_inner();
    assert_eq!((moved.role, moved.cluster.as_str()), (pb::Role::Controlplane as i32, "other"));
    f.still_serving().await.unwrap();
}

fn x509_pem(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
}

fn b64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            s.push(if i <= c.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

/// A pending machine (enrolled with a public boot token, not approved) hears nothing beyond the
/// welcome: no role, cluster or labels, and none of the config its role and cluster layers hold
/// (a cluster secret included), until `muster approve` releases both.
#[tokio::test]
async fn pending_machine_gets_no_role_config_or_cluster_secrets_until_approved() {
    let f = TestController::start().await.unwrap();
    let mut admin = f.admin().await.unwrap();
    let boot = admin
        .create_token(pb::CreateTokenRequest {
            boot: true,
            labels: [("rack".to_string(), "r1".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let m = f.enroll(&boot).await.unwrap();
    admin
        .assign(pb::AssignRequest {
            query: m.id.clone(),
            role: pb::Role::Worker.into(),
            cluster: "homelab".into(),
            force: false,
        })
        .await
        .unwrap();
    let secret = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/cluster-secret\n    content: \"S3CR3T\\n\"\n";
    admin
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Cluster.into(),
            target: "homelab".into(),
            yaml: secret.into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let (up, mut down) =
        f.open_stream(&m, pb::Hello { heartbeat_interval_ms: 1000, ..Default::default() }).await.unwrap();
    // Everything queued for it on connect arrives before the ack of its first heartbeat.
    up.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq: 7, ..Default::default() })),
    })
    .await
    .unwrap();
    let mut before_ack = Vec::new();
    loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), down.message()).await.unwrap().unwrap().unwrap();
        match msg.msg {
            Some(pb::controller_message::Msg::HeartbeatAck(a)) if a.seq == 7 => break,
            other => before_ack.push(other),
        }
    }
    let text = format!("{before_ack:?}");
    assert!(!text.contains("S3CR3T") && !text.contains("cluster-secret"), "{text}");
    assert!(!before_ack.iter().any(|m| matches!(m, Some(pb::controller_message::Msg::Config(_)))), "{text}");
    let assignment = before_ack
        .iter()
        .find_map(|m| match m {
            Some(pb::controller_message::Msg::Assignment(a)) => Some(a.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(assignment, pb::Assignment { approved: false, ..Default::default() }, "nothing but 'wait'");

    // Approval releases the assignment and the config, over the same stream.
    admin.approve(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let (mut got_assignment, mut got_config) = (None, None);
    while got_assignment.is_none() || got_config.is_none() {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), down.message()).await.unwrap().unwrap().unwrap();
        match msg.msg {
            Some(pb::controller_message::Msg::Assignment(a)) => got_assignment = Some(a),
            Some(pb::controller_message::Msg::Config(c)) => got_config = Some(c),
            _ => {}
        }
    }
    let a = got_assignment.unwrap();
    assert!(
        a.approved && a.cluster == "homelab" && a.labels.get("rack").map(String::as_str) == Some("r1"),
        "{a:?}"
    );
    assert!(got_config.unwrap().yaml.contains("S3CR3T"));
    f.still_serving().await.unwrap();
}
