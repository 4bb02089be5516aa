//! The controller's `/metrics` and `/sd/prometheus` against a real controller in this process:
//! the exposition passes `promtool check metrics`, format negotiation and gzip work, service
//! discovery lists ready agents' endpoints with their labels, and a node's health snapshot turns
//! into the health status, reasons and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::time::Duration;

use muster_proto::pb;
use muster_tests::{http_get, promtool_check_metrics, Enrolled, TestController};

/// Opens a stream for `m`, says hello with `metrics_port`, sends one heartbeat carrying `health`
/// and waits for its ack. The stream stays open while the returned guard lives.
async fn connect(
    f: &TestController,
    m: &Enrolled,
    metrics_port: u32,
    health: pb::HealthSnapshot,
) -> tokio::sync::mpsc::Sender<pb::AgentMessage> {
    let hello = pb::Hello {
        inventory: Some(pb::Inventory { hostname: format!("host-{}", &m.id[..4]), ..Default::default() }),
        heartbeat_interval_ms: 5000,
        metrics_port,
    };
    let (tx, mut down) = f.open_stream(m, hello).await.unwrap();
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            health: Some(health),
        })),
    })
    .await
    .unwrap();
    loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), down.message()).await.unwrap().unwrap().unwrap();
        if let Some(pb::controller_message::Msg::HeartbeatAck(a)) = msg.msg {
            assert_eq!(a.seq, 1);
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = down.message().await {} });
    tx
}

fn snapshot(fs_avail: u64) -> pb::HealthSnapshot {
    pb::HealthSnapshot {
        cpu_usage_percent: 25.0,
        cpu_count: 2,
        load1: 0.5,
        memory_total_bytes: 1 << 30,
        memory_available_bytes: 1 << 29,
        filesystems: vec![pb::FilesystemUsage {
            mount_point: "/".into(),
            device: "/dev/vda1".into(),
            fs_type: "ext4".into(),
            size_bytes: 100 << 20,
            available_bytes: fs_avail,
        }],
        networks: vec![pb::NetworkCounters {
            interface: "eth0".into(),
            rx_bytes: 1234,
            tx_bytes: 99,
            ..Default::default()
        }],
        services: vec![pb::ServiceCheck { name: "k3s".into(), up: true, detail: String::new() }],
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_metrics_pass_promtool_and_show_the_fleet() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 2).await.unwrap();
    let a = f.enroll(&t).await.unwrap();
    let b = f.enroll(&t).await.unwrap();
    let _ga = connect(&f, &a, 9100, snapshot(50 << 20)).await;
    let _gb = connect(&f, &b, 0, snapshot(50 << 20)).await;
    f.admin()
        .await
        .unwrap()
        .assign(pb::AssignRequest {
            query: a.id.clone(),
            role: pb::Role::Worker.into(),
            cluster: "lab".into(),
            force: false,
        })
        .await
        .unwrap();

    let r = http_get(f.running.ports.http, "/metrics", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    promtool_check_metrics(&text).unwrap();
    let a_labels =
        format!("machine=\"{}\",hostname=\"host-{}\",cluster=\"lab\",role=\"worker\"", a.id, &a.id[..4]);
    for want in [
        format!("muster_machine_up{{{a_labels}}} 1"),
        format!("muster_machine_health{{{a_labels},status=\"healthy\"}} 1"),
        format!("muster_machine_cpu_usage_ratio{{{a_labels}}} 0.25"),
        format!("muster_machine_network_receive_bytes_total{{{a_labels},device=\"eth0\"}} 1234"),
        format!("muster_machine_service_up{{{a_labels},service=\"k3s\"}} 1"),
        "muster_machines{state=\"ready\"} 2".to_string(),
        "muster_connected_agents 2".to_string(),
        "muster_enrollments_total{result=\"accepted\"} 2".to_string(),
        "# TYPE muster_grpc_requests_total counter".to_string(),
        "muster_grpc_requests_total{service=\"AgentService\",method=\"Enroll\",code=\"OK\"} 2".to_string(),
        "# TYPE muster_store_operation_duration_seconds histogram".to_string(),
        "muster_machine_last_heartbeat_timestamp_seconds{".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn metrics_negotiate_openmetrics_and_gzip() {
    let f = TestController::start().await.unwrap();
    f.token(0, 1).await.unwrap(); // one gRPC call, so its counter has a series
    let r = http_get(
        f.running.ports.http,
        "/metrics",
        &[("Accept", "application/openmetrics-text;version=1.0.0")],
    )
    .await
    .unwrap();
    assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    let om = r.text();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE muster_grpc_requests counter"), "{om}");

    let r = http_get(f.running.ports.http, "/metrics", &[("Accept-Encoding", "gzip")]).await.unwrap();
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&r.body[..]).read_to_string(&mut plain).unwrap();
    assert!(plain.contains("# TYPE muster_machines gauge"), "{plain}");
    promtool_check_metrics(&plain).unwrap();
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn service_discovery_lists_ready_agents_with_labels() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 3).await.unwrap();
    let a = f.enroll(&t).await.unwrap();
    let b = f.enroll(&t).await.unwrap();
    let c = f.enroll(&t).await.unwrap();
    let _ga = connect(&f, &a, 9100, snapshot(50 << 20)).await;
    let _gb = connect(&f, &b, 9101, snapshot(50 << 20)).await;
    let _gc = connect(&f, &c, 0, snapshot(50 << 20)).await; // serves no metrics: not listed
    let mut admin = f.admin().await.unwrap();
    admin
        .assign(pb::AssignRequest {
            query: a.id.clone(),
            role: pb::Role::Controlplane.into(),
            cluster: "lab".into(),
            force: false,
        })
        .await
        .unwrap();

    let r = http_get(f.running.ports.http, "/sd/prometheus", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let groups: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let ga = groups.iter().find(|g| g["labels"]["machine"] == a.id.as_str()).unwrap();
    assert_eq!(ga["targets"], serde_json::json!(["127.0.0.1:9100"]));
    assert_eq!(ga["labels"]["cluster"], "lab");
    assert_eq!(ga["labels"]["role"], "controlplane");
    assert_eq!(ga["labels"]["hostname"], format!("host-{}", &a.id[..4]));

    let r =
        http_get(f.running.ports.http, "/sd/prometheus?cluster=lab&role=controlplane", &[]).await.unwrap();
    let only: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(only.as_array().unwrap().len(), 1);
    let r = http_get(f.running.ports.http, "/sd/prometheus?cluster=nope", &[]).await.unwrap();
    assert_eq!(r.text(), "[]");
    let r = http_get(f.running.ports.http, "/sd/prometheus?bogus=1", &[]).await.unwrap();
    assert_eq!(r.status, 400);

    // A revoked machine drops out of discovery.
    admin.revoke(pb::MachineRef { query: b.id.clone() }).await.unwrap();
    let r = http_get(f.running.ports.http, "/sd/prometheus", &[]).await.unwrap();
    let after: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(after.as_array().unwrap().len(), 1);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn health_snapshot_drives_status_reasons_and_metrics() {
    let f = TestController::start().await.unwrap();
    let t = f.token(0, 1).await.unwrap();
    let a = f.enroll(&t).await.unwrap();
    let mut bad = snapshot(5 << 20); // 95% full
    bad.services[0].up = false;
    bad.services[0].detail = "inactive".into();
    let _g = connect(&f, &a, 0, bad).await;
    let m = f.machine(&a.id).await.unwrap();
    assert_eq!(m.health, "degraded");
    assert_eq!(m.health_reasons, ["filesystem / is 95% full", "service k3s is down (inactive)"]);
    let text = http_get(f.running.ports.http, "/metrics", &[]).await.unwrap().text();
    assert!(text.contains(&format!("muster_machine_health{{machine=\"{}\"", a.id)), "{text}");
    let degraded = text
        .lines()
        .find(|l| l.starts_with("muster_machine_health{") && l.contains("status=\"degraded\""))
        .unwrap();
    assert!(degraded.ends_with(" 1"), "{degraded}");
    f.still_serving().await.unwrap();
}

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Every `muster_*` metric name in `text` (PromQL expressions).
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("muster_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let boundary = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if boundary {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// A fully populated snapshot, so every node metric family has a series.
fn full_snapshot() -> pb::HealthSnapshot {
    let mut s = snapshot(50 << 20);
    s.swap_total_bytes = 1 << 30;
    s.swap_free_bytes = 1 << 29;
    s.uptime_seconds = 100;
    s.boot_time_unix = 1_700_000_000;
    s.temperatures = vec![pb::Temperature { sensor: "cpu".into(), celsius: 40.0 }];
    s
}

#[test]
fn alert_rules_pass_promtool_and_the_vmrule_matches() {
    let rules = repo_file("deploy/prometheus/muster-rules.yaml");
    let out = std::process::Command::new("promtool").arg("check").arg("rules").arg(&rules).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let plain: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    let vm: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo_file("deploy/victoriametrics/muster-vmrule.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(vm["kind"], "VMRule");
    assert_eq!(
        vm["spec"]["groups"], plain["groups"],
        "the VMRule must carry the same groups as the rule file"
    );
}

#[tokio::test]
async fn dashboard_and_rules_reference_only_metrics_that_exist() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/muster-fleet.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "muster-fleet");
    let mut exprs = String::new();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() > 10);
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push_str(t["expr"].as_str().unwrap_or_default());
            exprs.push('\n');
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        exprs.push_str(v["definition"].as_str().unwrap_or_default());
        exprs.push('\n');
    }
    exprs.push_str(&std::fs::read_to_string(repo_file("deploy/prometheus/muster-rules.yaml")).unwrap());

    // A fleet where every family has series: a connected machine with a full snapshot, an
    // accepted and a refused enrollment, admin and store calls.
    let f = TestController::start().await.unwrap();
    let a = f.enroll(&f.token(0, 1).await.unwrap()).await.unwrap();
    let _g = connect(&f, &a, 9100, full_snapshot()).await;
    assert!(f.enroll("abc123.0123456789abcdefghijklmnopqrstuv").await.is_err());
    // ...with a config, so the config families have series too.
    f.admin()
        .await
        .unwrap()
        .apply_config(pb::ApplyConfigRequest {
            scope: pb::ConfigScope::Machine.into(),
            target: a.id.clone(),
            yaml: "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: m\n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let text = http_get(f.running.ports.http, "/metrics", &[]).await.unwrap().text();
    let exposed: std::collections::BTreeSet<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let names = referenced_metrics(&exprs);
    assert!(names.len() > 15, "{names:?}");
    for name in &names {
        assert!(
            exposed.contains(name.as_str()),
            "{name} is referenced but not exposed; exposed: {exposed:?}"
        );
    }
    f.still_serving().await.unwrap();
}
