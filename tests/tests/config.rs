//! Config layers, generations and the push down the stream, against a real controller in this
//! process. The "agent" here is a raw stream that records what it is sent and reports status,
//! so nothing is applied to this machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_proto::pb;
use muster_tests::{Enrolled, TestController};
use tokio::sync::mpsc;
use tonic::Code;

struct Stream {
    up: mpsc::Sender<pb::AgentMessage>,
    down: tonic::Streaming<pb::ControllerMessage>,
}

impl Stream {
    async fn open(f: &TestController, m: &Enrolled) -> Self {
        let hello = pb::Hello { heartbeat_interval_ms: 5000, ..Default::default() };
        let (up, down) = f.open_stream(m, hello).await.unwrap();
        Self { up, down }
    }

    /// The next config update pushed to this machine.
    async fn next_config(&mut self) -> pb::ConfigUpdate {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), self.down.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(pb::controller_message::Msg::Config(c)) = m.msg {
                return c;
            }
        }
    }

    async fn report(&self, generation: u64) {
        self.up
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::ConfigStatus(pb::ConfigStatus {
                    generation,
                    state: pb::GenerationState::Applied.into(),
                    resources: vec![pb::ResourceStatus {
                        resource: "hostname".into(),
                        outcome: pb::Outcome::Applied.into(),
                        detail: String::new(),
                    }],
                    error: String::new(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }
}

fn req(scope: pb::ConfigScope, target: &str, yaml: &str, dry_run: bool) -> pb::ApplyConfigRequest {
    pb::ApplyConfigRequest {
        scope: scope.into(),
        target: target.into(),
        yaml: yaml.into(),
        dry_run,
        ..Default::default()
    }
}

const CONFIG: &str = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: node-a\nfiles:\n  - path: /etc/motd\n    content: \"hello\\n\"\nsysctls:\n  net.ipv4.ip_forward: \"1\"\n";

#[tokio::test]
async fn dry_run_apply_push_status_history_and_rollback() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let mut s = Stream::open(&f, &m).await;
    let mut admin = f.admin().await.unwrap();

    // Dry run: a diff, nothing stored.
    let dry =
        admin.apply_config(req(pb::ConfigScope::Machine, &m.id, CONFIG, true)).await.unwrap().into_inner();
    assert_eq!(dry.results.len(), 1);
    let d = &dry.results[0];
    assert!(d.changed && d.generation == 0, "{d:?}");
    assert!(d.diff.contains("+hostname: node-a"), "{}", d.diff);
    let got = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.generation, got.yaml.as_str()), (0, ""));

    // Apply: generation 1, pushed down the open stream.
    let r =
        admin.apply_config(req(pb::ConfigScope::Machine, &m.id, CONFIG, false)).await.unwrap().into_inner();
    assert_eq!(r.results[0].generation, 1);
    let pushed = s.next_config().await;
    assert_eq!(pushed.generation, 1);
    assert!(pushed.yaml.contains("hostname: node-a"), "{}", pushed.yaml);
    s.report(1).await;
    let mut applied = 0;
    for _ in 0..100 {
        let g = admin
            .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
            .await
            .unwrap()
            .into_inner();
        applied = g.applied_generation;
        if applied == 1 {
            assert_eq!(g.resources[0].resource, "hostname");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(applied, 1, "the agent's report is recorded");

    // The same config again: no new generation.
    let same =
        admin.apply_config(req(pb::ConfigScope::Machine, &m.id, CONFIG, false)).await.unwrap().into_inner();
    assert!(!same.results[0].changed && same.results[0].generation == 1);

    // A change: generation 2, then rollback to 1 makes generation 3 with generation 1's content.
    let v2 = CONFIG.replace("node-a", "node-b");
    admin.apply_config(req(pb::ConfigScope::Machine, &m.id, &v2, false)).await.unwrap();
    assert_eq!(s.next_config().await.generation, 2);
    let rb = admin
        .rollback_config(pb::RollbackConfigRequest {
            query: m.id.clone(),
            to_generation: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.results[0].generation, 3);
    let third = s.next_config().await;
    assert_eq!(third.yaml, pushed.yaml);
    let h = admin.config_history(pb::MachineRef { query: m.id.clone() }).await.unwrap().into_inner();
    let gens: Vec<(u64, &str)> = h.revisions.iter().map(|r| (r.generation, r.source.as_str())).collect();
    assert_eq!(gens, [(3, "rollback to 1"), (2, "machine layer"), (1, "machine layer")]);
    let err = admin
        .rollback_config(pb::RollbackConfigRequest {
            query: m.id.clone(),
            to_generation: Some(99),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A reconnecting agent gets the current generation at once.
    drop(s);
    let mut again = Stream::open(&f, &m).await;
    assert_eq!(again.next_config().await.generation, 3);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn invalid_config_lists_every_error_and_changes_nothing() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    admin.apply_config(req(pb::ConfigScope::Machine, &m.id, CONFIG, false)).await.unwrap();
    let bad = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: -x\nfiles:\n  - path: motd\n    content: x\n    mode: \"99\"\n";
    let err = admin.apply_config(req(pb::ConfigScope::Machine, &m.id, bad, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for path in ["hostname:", "files[0].path:", "files[0].mode:"] {
        assert!(err.message().contains(path), "{path}: {}", err.message());
    }
    let got = admin
        .get_config(pb::GetConfigRequest { query: m.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.generation, 1, "generation unchanged");
    assert!(got.yaml.contains("node-a"));
    let err = admin.apply_config(req(pb::ConfigScope::Machine, &m.id, "- a list", false)).await.unwrap_err();
    assert!(err.message().contains("mapping"), "{}", err.message());
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn cluster_and_role_layers_merge_under_the_machine_layer() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 2).await.unwrap();
    let a = f.enroll(&t).await.unwrap();
    let b = f.enroll(&t).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    for (m, role) in [(&a, pb::Role::Worker), (&b, pb::Role::Controlplane)] {
        admin
            .assign(pb::AssignRequest {
                query: m.id.clone(),
                role: role.into(),
                cluster: "lab".into(),
                force: false,
            })
            .await
            .unwrap();
    }
    let cluster = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nsysctls:\n  vm.swappiness: \"10\"\n  net.ipv4.ip_forward: \"1\"\n";
    let r =
        admin.apply_config(req(pb::ConfigScope::Cluster, "lab", cluster, false)).await.unwrap().into_inner();
    assert_eq!(r.results.len(), 2);
    let role = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nsysctls:\n  vm.swappiness: \"1\"\n";
    let r = admin.apply_config(req(pb::ConfigScope::Role, "worker", role, false)).await.unwrap().into_inner();
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].machine_id, a.id);
    let own = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nsysctls:\n  net.ipv4.ip_forward: null\n";
    admin.apply_config(req(pb::ConfigScope::Machine, &a.id, own, false)).await.unwrap();
    let ra = admin
        .get_config(pb::GetConfigRequest { query: a.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    let sysctls = |yaml: &str| muster_machinery::config::parse(yaml).unwrap().0.sysctls;
    let sa = sysctls(&ra.yaml);
    assert_eq!(sa.get("vm.swappiness").map(String::as_str), Some("1"), "the role's value wins: {}", ra.yaml);
    assert!(!sa.contains_key("net.ipv4.ip_forward"), "the machine layer deleted it: {}", ra.yaml);
    assert_eq!(ra.generation, 3);
    let rb = admin
        .get_config(pb::GetConfigRequest { query: b.id.clone(), rendered: true })
        .await
        .unwrap()
        .into_inner();
    let sb = sysctls(&rb.yaml);
    assert_eq!(
        sb.get("net.ipv4.ip_forward").map(String::as_str),
        Some("1"),
        "b keeps the cluster's: {}",
        rb.yaml
    );
    assert_eq!(sb.get("vm.swappiness").map(String::as_str), Some("10"), "b has no worker layer: {}", rb.yaml);
    assert_eq!(rb.generation, 1);
    // Bad target names are refused.
    let err = admin.apply_config(req(pb::ConfigScope::Role, "boss", role, true)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn network_changes_default_to_try_mode_and_others_to_auto() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let m = f.enroll(&token).await.unwrap();
    let mut s = Stream::open(&f, &m).await;
    let mut admin = f.admin().await.unwrap();
    let net = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: n\nnetwork:\n  interfaces:\n    - name: eth0\n      addresses: [\"192.168.5.20/24\"]\n";
    let r = admin.apply_config(req(pb::ConfigScope::Machine, &m.id, net, false)).await.unwrap().into_inner();
    assert_eq!((r.results[0].mode, r.results[0].try_timeout_ms), (Some(pb::ApplyMode::Try as i32), 60_000));
    let c = s.next_config().await;
    assert_eq!(
        (c.generation, c.mode, c.try_timeout_ms, c.confirmed),
        (1, pb::ApplyMode::Try as i32, 60_000, false)
    );
    // Same network, new hostname: auto.
    let r = admin
        .apply_config(req(pb::ConfigScope::Machine, &m.id, &net.replace("hostname: n", "hostname: o"), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].mode, Some(pb::ApplyMode::Auto as i32));
    assert_eq!(s.next_config().await.mode, pb::ApplyMode::Auto as i32);
    // An explicit mode wins; bad modes and timeouts name the field.
    let mut bad = req(pb::ConfigScope::Machine, &m.id, net, false);
    bad.mode = Some(42);
    let e = admin.apply_config(bad).await.unwrap_err();
    assert!(e.message().starts_with("mode: "), "{e:?}");
    let mut bad = req(pb::ConfigScope::Machine, &m.id, net, false);
    bad.try_timeout_ms = 10;
    let e = admin.apply_config(bad).await.unwrap_err();
    assert!(e.message().starts_with("timeout: "), "{e:?}");
}

fn layer_ref(scope: pb::ConfigScope, target: &str, cluster: &str) -> pb::LayerRef {
    pb::LayerRef { scope: scope.into(), target: target.into(), cluster: cluster.into(), ..Default::default() }
}

#[tokio::test]
async fn shared_layers_merge_lists_by_key_keep_history_and_can_be_deleted() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 2).await.unwrap();
    let a = f.enroll(&t).await.unwrap();
    let b = f.enroll(&t).await.unwrap();
    let mut admin = f.admin().await.unwrap();
    for (m, cluster) in [(&a, "lab"), (&b, "prod")] {
        admin
            .assign(pb::AssignRequest {
                query: m.id.clone(),
                role: pb::Role::Worker.into(),
                cluster: cluster.into(),
                force: false,
            })
            .await
            .unwrap();
    }
    let head = "apiVersion: muster/v1alpha1\nkind: MachineConfig\n";
    // A layer for a cluster no machine is in is refused unless asked for.
    let empty = format!("{head}sysctls:\n  vm.swappiness: \"5\"\n");
    let err = admin.apply_config(req(pb::ConfigScope::Cluster, "staging", &empty, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("--allow-empty"), "{}", err.message());
    let mut allowed = req(pb::ConfigScope::Cluster, "staging", &empty, false);
    allowed.allow_empty = true;
    assert!(admin.apply_config(allowed).await.unwrap().into_inner().results.is_empty());

    // The worker role everywhere, then the worker role in lab only; files merge by path.
    let role = format!("{head}files:\n  - path: /etc/a\n    content: a\n  - path: /etc/b\n    content: b\n");
    let r =
        admin.apply_config(req(pb::ConfigScope::Role, "worker", &role, false)).await.unwrap().into_inner();
    assert_eq!(r.results.len(), 2);
    let in_lab =
        format!("{head}files:\n  - path: /etc/b\n    $patch: delete\n  - path: /etc/c\n    content: c\n");
    let mut lab_req = req(pb::ConfigScope::Role, "worker", &in_lab, false);
    lab_req.cluster = "lab".into();
    let r = admin.apply_config(lab_req).await.unwrap().into_inner();
    assert_eq!(r.results.iter().map(|m| m.machine_id.as_str()).collect::<Vec<_>>(), [a.id.as_str()]);
    assert_eq!(paths(&f, a.id.clone()).await, ["/etc/a", "/etc/c"], "lab's worker layer drops b, adds c");
    assert_eq!(paths(&f, b.id.clone()).await, ["/etc/a", "/etc/b"], "prod has only the role layer");

    // The layer, who it is part of, and its history.
    let l = admin.get_layer(layer_ref(pb::ConfigScope::Role, "worker", "lab")).await.unwrap().into_inner();
    assert_eq!((l.key.as_str(), l.revision, l.machines.clone()), ("role/worker@lab", 1, vec![a.id.clone()]));
    assert!(l.yaml.contains("/etc/c"), "{}", l.yaml);
    let v2 = role.replace("content: a", "content: A");
    admin.apply_config(req(pb::ConfigScope::Role, "worker", &v2, false)).await.unwrap();
    let l = admin.get_layer(layer_ref(pb::ConfigScope::Role, "worker", "")).await.unwrap().into_inner();
    assert_eq!(l.revisions.iter().map(|r| r.revision).collect::<Vec<_>>(), [2, 1], "newest first");
    assert!(l.revisions[1].yaml.contains("content: a"), "{}", l.revisions[1].yaml);
    assert_eq!(l.machines.len(), 2);

    // Deleting the lab layer brings b back to a; its history remains.
    let d = admin.delete_layer(layer_ref(pb::ConfigScope::Role, "worker", "lab")).await.unwrap().into_inner();
    assert!(d.results.iter().any(|m| m.machine_id == a.id && m.changed), "{d:?}");
    assert_eq!(paths(&f, a.id.clone()).await, ["/etc/a", "/etc/b"]);
    let l = admin.get_layer(layer_ref(pb::ConfigScope::Role, "worker", "lab")).await.unwrap().into_inner();
    assert!(l.yaml.is_empty(), "{}", l.yaml);
    assert_eq!(
        l.revisions.iter().map(|r| (r.revision, r.deleted)).collect::<Vec<_>>(),
        [(2, true), (1, false)]
    );
    let err = admin.delete_layer(layer_ref(pb::ConfigScope::Role, "worker", "lab")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    f.still_serving().await.unwrap();
}

/// The file paths in a machine's rendered config, in order.
async fn paths(f: &TestController, id: String) -> Vec<String> {
    let y = f
        .admin()
        .await
        .unwrap()
        .get_config(pb::GetConfigRequest { query: id, rendered: true })
        .await
        .unwrap()
        .into_inner()
        .yaml;
    muster_machinery::config::parse(&y).unwrap().0.files.into_iter().map(|f| f.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_leave_the_controller_agreeing_with_its_store() {
    let f = TestController::start().await.unwrap();
    let m = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let admin = f.admin().await.unwrap();
    // Applies and stream opens (each Hello writes the record) racing on one machine: each
    // update finishes in its own order, and the controller's view must be the newest.
    let get = |mut admin: muster_tests::AdminClient| {
        let id = m.id.clone();
        async move {
            let c = admin
                .get_config(pb::GetConfigRequest { query: id, rendered: true })
                .await
                .unwrap()
                .into_inner();
            (c.generation, c.yaml)
        }
    };
    for round in 1..=5u64 {
        let applies =
            (0..20).map(|i| {
                let mut admin = admin.clone();
                let yaml = CONFIG.replace("node-a", &format!("node-{round}-{i}"));
                let id = m.id.clone();
                async move {
                    admin.apply_config(req(pb::ConfigScope::Machine, &id, &yaml, false)).await.map(|_| ())
                }
            });
        let hellos = (0..8).map(|_| async { drop(Stream::open(&f, &m).await) });
        let (applied, _) =
            tokio::join!(futures::future::join_all(applies), futures::future::join_all(hellos));
        assert!(applied.iter().all(Result::is_ok), "{applied:?}");
        assert_eq!(get(admin.clone()).await.0, round * 20, "every apply made a generation, and shows");
    }
    let before = get(admin).await;
    let f = f.restart().await.unwrap();
    let after = get(f.admin().await.unwrap()).await;
    assert_eq!(before, after, "what the controller served is what it had stored");
}
