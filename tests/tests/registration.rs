//! Boot tokens and pre-registered machines: a boot token (public in boot scripts) only creates
//! `pending` machines, except a registered MAC's first claimant that the controller can confirm
//! has that MAC (its neighbour table, or a network trusted with `--trust-reported-macs`), which
//! is accepted with the registered hostname, role, cluster and config; a claimant without that
//! evidence waits for an operator's approval; a second claimant is flagged and left pending.
//! The boot script answers every MAC the same unless the requester is confirmed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use muster_controller::fleet::admission::AdmissionOptions;
use muster_controller::fleet::ControllerOptions;
use muster_proto::pb;
use muster_tests::TestController;
use tonic::Code;

/// A controller that takes MACs reported from loopback as evidence (as `--trust-reported-macs
/// 127.0.0.1/32` does): the tests' clients all connect from there.
fn trusting_loopback() -> ControllerOptions {
    ControllerOptions {
        admission: AdmissionOptions {
            trust_reported_macs: vec!["127.0.0.1/32".parse().unwrap()],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn inventory(hostname: &str, mac: &str) -> pb::Inventory {
    pb::Inventory {
        hostname: hostname.into(),
        nics: vec![pb::Nic { name: "eth0".into(), mac: mac.into(), addresses: vec![] }],
        ..Default::default()
    }
}

async fn boot_token(f: &TestController) -> String {
    let r = f
        .admin()
        .await
        .unwrap()
        .create_token(pb::CreateTokenRequest { boot: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let info = r.info.unwrap();
    assert!(info.boot && !info.auto_accept, "{info:?}");
    assert_eq!(info.uses_total, 1000);
    r.token
}

const CONFIG: &str = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/motd\n    content: \"registered\\n\"\n";

#[tokio::test]
async fn a_boot_token_alone_only_makes_pending_machines() {
    let f = TestController::start().await.unwrap();
    let token = boot_token(&f).await;
    let m = f.enroll_with(&token, inventory("stranger", "52:54:00:aa:00:01")).await.unwrap().unwrap();
    let got = f.machine(&m.id).await.unwrap();
    assert_eq!(got.state, pb::MachineState::Pending as i32);
    // Even asking for auto-accept does not make a boot token accept machines.
    let r = f
        .admin()
        .await
        .unwrap()
        .create_token(pb::CreateTokenRequest { boot: true, pending: false, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let m = f.enroll_with(&r.token, inventory("stranger2", "52:54:00:aa:00:02")).await.unwrap().unwrap();
    assert_eq!(f.machine(&m.id).await.unwrap().state, pb::MachineState::Pending as i32);
}

#[tokio::test]
async fn a_registered_machine_is_accepted_with_its_role_hostname_and_config_once() {
    let f = TestController::start_with(trusting_loopback()).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    let reg = admin
        .register_machine(pb::RegisterMachineRequest {
            registration: Some(pb::Registration {
                mac: "52-54-00-AA-00-10".into(),
                hostname: "node-reg".into(),
                role: pb::Role::Worker.into(),
                cluster: "lab".into(),
                yaml: CONFIG.into(),
                ..Default::default()
            }),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.mac, "52:54:00:aa:00:10");
    // Registering the same MAC again needs --force.
    let dup = admin
        .register_machine(pb::RegisterMachineRequest {
            registration: Some(pb::Registration { mac: "52:54:00:aa:00:10".into(), ..Default::default() }),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    let token = boot_token(&f).await;
    let m = f.enroll_with(&token, inventory("localhost", "52:54:00:aa:00:10")).await.unwrap().unwrap();
    let got = f.machine(&m.id).await.unwrap();
    assert_eq!(got.state, pb::MachineState::Ready as i32, "{got:?}");
    assert_eq!((got.hostname.as_str(), got.cluster.as_str()), ("node-reg", "lab"));
    assert_eq!(got.role, pb::Role::Worker as i32);
    // Its config is generation 1, with the registered hostname and file.
    let cfg = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cfg.generation, 1);
    assert!(cfg.yaml.contains("hostname: node-reg") && cfg.yaml.contains("registered"), "{}", cfg.yaml);
    let regs = admin.list_registrations(pb::ListRegistrationsRequest {}).await.unwrap().into_inner();
    assert_eq!(regs.registrations[0].claimed_by, m.id);

    // A second machine with the same MAC: pending, flagged; the first keeps everything.
    let clone = f.enroll_with(&token, inventory("clone", "52:54:00:aa:00:10")).await.unwrap().unwrap();
    let got = f.machine(&clone.id).await.unwrap();
    assert_eq!(got.state, pb::MachineState::Pending as i32);
    assert!(got.warnings.iter().any(|w| w.contains("already used")), "{:?}", got.warnings);
    assert_eq!(got.role, pb::Role::Unspecified as i32);
    // Approving it clears the flag.
    let approved = admin.approve(pb::MachineRef { query: clone.id.clone() }).await.unwrap().into_inner();
    assert!(approved.warnings.iter().all(|w| !w.contains("already used")), "{:?}", approved.warnings);
}

#[tokio::test]
async fn registrations_are_validated_field_by_field_and_can_be_removed() {
    let f = TestController::start().await.unwrap();
    let mut admin = f.admin().await.unwrap();
    let bad = |r: pb::Registration| pb::RegisterMachineRequest { registration: Some(r), force: false };
    for (r, field) in [
        (pb::Registration { mac: "nope".into(), ..Default::default() }, "mac: "),
        (
            pb::Registration { mac: "52:54:00:00:00:01".into(), uuid: "xyz".into(), ..Default::default() },
            "uuid: ",
        ),
        (
            pb::Registration {
                mac: "52:54:00:00:00:01".into(),
                hostname: "-bad-".into(),
                ..Default::default()
            },
            "hostname: ",
        ),
        (
            pb::Registration {
                mac: "52:54:00:00:00:01".into(),
                role: pb::Role::Worker.into(),
                ..Default::default()
            },
            "role: ",
        ),
        (
            pb::Registration {
                mac: "52:54:00:00:00:01".into(),
                yaml: "kind: Nope\n".into(),
                ..Default::default()
            },
            "yaml: ",
        ),
    ] {
        let e = admin.register_machine(bad(r)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{field}: {e:?}");
    }
    admin
        .register_machine(bad(pb::Registration { mac: "52:54:00:00:00:01".into(), ..Default::default() }))
        .await
        .unwrap();
    let r = admin.delete_registration(pb::MachineRef { query: "52:54:00:00:00:01".into() }).await.unwrap();
    assert_eq!(r.into_inner().id, "52:54:00:00:00:01");
    let e =
        admin.delete_registration(pb::MachineRef { query: "52:54:00:00:00:01".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn assigning_a_role_applies_that_roles_config_layer() {
    let f = TestController::start().await.unwrap();
    let mut admin = f.admin().await.unwrap();
    admin
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Role.into(),
            target: "worker".into(),
            yaml: CONFIG.into(),
            // No machine is a worker yet: saved for those that will be.
            allow_empty: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let token = f.token(0, 1).await.unwrap();
    let m = f.enroll(&token).await.unwrap();
    let before =
        admin.get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true }).await.unwrap();
    assert_eq!(before.into_inner().generation, 0);
    admin
        .assign(pb::AssignRequest {
            query: m.id.clone(),
            role: pb::Role::Worker.into(),
            cluster: "lab".into(),
            force: false,
        })
        .await
        .unwrap();
    let after = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.generation, 1);
    assert!(after.yaml.contains("registered"), "{}", after.yaml);
}

/// The controller's boot policy, decided without a VM: an unknown MAC gets the discovery
/// profile, a registered one its image, a claimed registration the image as a known machine, a
/// `boot_local` registration and a revoked machine's MAC `exit` (the firmware boots the next
/// device), and a registration whose UUID does not match is not used.
#[tokio::test]
async fn boot_policy_decides_per_machine() {
    use muster_controller::fleet::boot::BootDecision;
    let f = TestController::start_with(trusting_loopback()).await.unwrap();
    let c = &f.running.controller;
    let mut admin = f.admin().await.unwrap();
    let register = |mac: &str, uuid: &str, boot_local: bool| pb::RegisterMachineRequest {
        registration: Some(pb::Registration {
            mac: mac.into(),
            uuid: uuid.into(),
            hostname: format!("n-{}", &mac[15..]),
            boot_local,
            ..Default::default()
        }),
        force: false,
    };
    let uuid = "11111111-2222-3333-4444-555555555555";
    admin.register_machine(register("52:54:00:00:01:01", "", false)).await.unwrap();
    admin.register_machine(register("52:54:00:00:01:02", "", true)).await.unwrap();
    admin.register_machine(register("52:54:00:00:01:03", uuid, false)).await.unwrap();
    let decide = |mac: &'static str, uuid: Option<&'static str>| async move {
        c.boot_decision(Some(mac), uuid, "CMDLINE", Some("127.0.0.1".parse().unwrap())).await.unwrap()
    };
    let profile = |d: BootDecision| match d {
        BootDecision::Boot { profile, cmdline } => {
            assert_eq!(cmdline, "CMDLINE");
            profile.to_owned()
        }
        BootDecision::Exit { reason } => format!("exit: {reason}"),
    };
    assert_eq!(profile(decide("52:54:00:00:09:09", None).await), "discovery");
    assert_eq!(profile(decide("52:54:00:00:01:01", None).await), "registered");
    assert!(profile(decide("52:54:00:00:01:02", None).await).starts_with("exit: "), "boot_local");
    assert_eq!(profile(decide("52:54:00:00:01:03", Some(uuid)).await), "registered");
    assert_eq!(
        profile(decide("52:54:00:00:01:03", Some("99999999-2222-3333-4444-555555555555")).await),
        "discovery"
    );

    // Claimed: the machine that enrolled with it is known.
    let token = boot_token(&f).await;
    let m = f.enroll_with(&token, inventory("n-01", "52:54:00:00:01:01")).await.unwrap().unwrap();
    assert_eq!(profile(decide("52:54:00:00:01:01", None).await), "known");
    // Revoked: exit, so a revoked node does not come back on its own.
    admin.revoke(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let d = profile(decide("52:54:00:00:01:01", None).await);
    assert!(d.starts_with("exit: ") && d.contains("revoked"), "{d}");
    f.still_serving().await.unwrap();
}

/// The attack: a client anywhere reports a registered MAC in its inventory. Without evidence
/// that it has that MAC it gets nothing of the registration (no role, cluster, hostname or
/// config, so no cluster secrets); the registration stays for the real machine; an operator's
/// approval gives it the registration.
#[tokio::test]
async fn a_reported_mac_alone_never_claims_a_registration() {
    let f = TestController::start().await.unwrap();
    let mut admin = f.admin().await.unwrap();
    admin
        .register_machine(pb::RegisterMachineRequest {
            registration: Some(pb::Registration {
                mac: "52:54:00:aa:00:20".into(),
                hostname: "db-1".into(),
                role: pb::Role::Worker.into(),
                cluster: "prod".into(),
                yaml: CONFIG.into(),
                ..Default::default()
            }),
            force: false,
        })
        .await
        .unwrap();
    let token = boot_token(&f).await;
    let m = f.enroll_with(&token, inventory("attacker", "52:54:00:aa:00:20")).await.unwrap().unwrap();
    let got = f.machine(&m.id).await.unwrap();
    assert_eq!(got.state, pb::MachineState::Pending as i32, "{got:?}");
    assert_eq!((got.role, got.cluster.as_str(), got.hostname.as_str()), (0, "", "attacker"));
    assert!(got.warnings.iter().any(|w| w.contains("muster approve")), "{:?}", got.warnings);
    let cfg = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((cfg.generation, cfg.yaml.as_str()), (0, ""), "no config");
    let regs = admin.list_registrations(pb::ListRegistrationsRequest {}).await.unwrap().into_inner();
    assert_eq!(regs.registrations[0].claimed_by, "", "still there for the real machine");

    // The operator vouches for it: approval gives it the registration.
    let approved = admin.approve(pb::MachineRef { query: m.id.clone() }).await.unwrap().into_inner();
    assert_eq!(approved.state, pb::MachineState::Ready as i32);
    assert_eq!((approved.role, approved.cluster.as_str()), (pb::Role::Worker as i32, "prod"));
    assert_eq!(approved.hostname, "db-1");
    let cfg = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert!(cfg.generation >= 1 && cfg.yaml.contains("registered"), "{}", cfg.yaml);
    let regs = admin.list_registrations(pb::ListRegistrationsRequest {}).await.unwrap().into_inner();
    assert_eq!(regs.registrations[0].claimed_by, m.id);
    f.still_serving().await.unwrap();
}

/// `/boot/machine.ipxe?mac=X` says the same for a registered MAC, a boot-local one, a revoked
/// machine's and an unknown one when the requester is not confirmed to have that MAC: the
/// script tells nobody which MACs the controller knows.
#[tokio::test]
async fn the_boot_script_answers_every_unconfirmed_mac_the_same() {
    let f = TestController::start_with_boot(ControllerOptions::default()).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    for (mac, boot_local) in [("52:54:00:00:02:01", false), ("52:54:00:00:02:02", true)] {
        admin
            .register_machine(pb::RegisterMachineRequest {
                registration: Some(pb::Registration {
                    mac: mac.into(),
                    hostname: "n".into(),
                    boot_local,
                    ..Default::default()
                }),
                force: false,
            })
            .await
            .unwrap();
    }
    let token = f.token(0, 1).await.unwrap();
    let m = f.enroll_with(&token, inventory("gone", "52:54:00:00:02:03")).await.unwrap().unwrap();
    admin.revoke(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let http = f.running.ports.http;
    let script = |mac: &'static str| async move {
        let r = muster_tests::http_get(http, &format!("/boot/machine.ipxe?mac={mac}"), &[]).await.unwrap();
        assert_eq!(r.status, 200);
        r.text()
    };
    let unknown = script("52-54-00-00-02-09").await;
    assert!(unknown.contains("kernel /boot/assets/"), "{unknown}");
    for mac in ["52-54-00-00-02-01", "52-54-00-00-02-02", "52-54-00-00-02-03"] {
        assert_eq!(script(mac).await, unknown, "{mac} is answered like an unknown MAC");
    }
    f.still_serving().await.unwrap();
}

/// A hostname is what the node says: it is validated, and it never wins a lookup by MAC; a
/// name that matches two machines in different ways is refused, not guessed.
#[tokio::test]
async fn lookups_cannot_be_hijacked_by_a_hostname() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 10).await.unwrap();
    let victim = f.enroll_with(&token, inventory("victim", "02:00:00:00:13:89")).await.unwrap().unwrap();
    let mut admin = f.admin().await.unwrap();
    // A MAC-shaped hostname is not a valid hostname: it is dropped.
    let hijack =
        f.enroll_with(&token, inventory("02:00:00:00:13:89", "02:00:00:00:99:99")).await.unwrap().unwrap();
    assert_eq!(f.machine(&hijack.id).await.unwrap().hostname, "", "not a hostname");
    let got =
        admin.get_machine(pb::MachineRef { query: "02:00:00:00:13:89".into() }).await.unwrap().into_inner();
    assert_eq!(got.id, victim.id, "a MAC-shaped query resolves by MAC only");
    // Control characters never make it into a hostname.
    let esc = f
        .enroll_with(&token, inventory("x\u{1b}]0;pwn\u{7}\ny", "02:00:00:00:99:98"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.machine(&esc.id).await.unwrap().hostname, "");
    // A hostname that is another machine's id prefix: ambiguous, refused.
    let prefix = victim.id[..4].to_owned();
    let squatter = f.enroll_with(&token, inventory(&prefix, "02:00:00:00:99:97")).await.unwrap().unwrap();
    assert_eq!(f.machine(&squatter.id).await.unwrap().hostname, prefix);
    let err = admin.approve(pb::MachineRef { query: prefix.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("ambiguous") && err.message().contains(&victim.id), "{err:?}");
    f.still_serving().await.unwrap();
}
