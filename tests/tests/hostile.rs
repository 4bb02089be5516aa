//! What a public boot token can cost the controller, tried as an attacker on the LAN would:
//! nothing is signed before the token checks out, the same key enrolling again is the same
//! machine (no second token use), pending machines are capped per token and in total,
//! enrollments per source address are rate limited, a pending machine's reports add no metric
//! series, hellos write only on change, and the machine list comes a page at a time without
//! inventories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_controller::fleet::admission::AdmissionOptions;
use muster_controller::fleet::ControllerOptions;
use muster_proto::pb;
use muster_tests::{Enrolled, TestController};
use tonic::Code;

fn inventory(hostname: &str, mac: &str) -> pb::Inventory {
    pb::Inventory {
        hostname: hostname.into(),
        nics: vec![pb::Nic { name: "eth0".into(), mac: mac.into(), addresses: vec!["10.0.0.9/24".into()] }],
        kernel: "6.1.0".into(),
        ..Default::default()
    }
}

fn with(admission: AdmissionOptions) -> ControllerOptions {
    ControllerOptions { admission, ..Default::default() }
}

async fn metrics(f: &TestController) -> String {
    muster_tests::http_get(f.running.ports.http, "/metrics", &[]).await.unwrap().text()
}

/// The value of the first sample whose line starts with `prefix`, or 0.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn boot_token(f: &TestController) -> String {
    let mut admin = f.admin().await.unwrap();
    admin
        .create_token(pb::CreateTokenRequest { boot: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token
}

#[tokio::test]
async fn the_token_is_checked_before_the_csr_and_the_same_key_enrolls_once() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    // A wrong secret with a garbage CSR: refused for the token; the CSR is never looked at.
    let wrong = format!("{}.{}", &token[..token.find('.').unwrap()], "0".repeat(32));
    let mut anon = f.anon_agent().await.unwrap();
    let err = anon
        .enroll(pb::EnrollRequest { token: wrong, csr_pem: "not a csr".into(), inventory: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let m = metrics(&f).await;
    assert_eq!(sample(&m, "muster_enrollments_total{result=\"rejected_csr\"}"), 0.0, "{m}");
    assert_eq!(sample(&m, "muster_enrollments_total{result=\"rejected_token\"}"), 1.0, "{m}");

    // The single-use token enrolls a key; the same key again (the node never got its answer)
    // is the same machine with a new certificate; another key finds the token used up.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let first = f.enroll_key(&token, &key, inventory("n1", "52:54:00:bb:00:01")).await.unwrap().unwrap();
    let again = f.enroll_key(&token, &key, inventory("n1", "52:54:00:bb:00:01")).await.unwrap().unwrap();
    assert_eq!(again.id, first.id, "the same machine");
    assert_ne!(again.cert, first.cert, "a new certificate");
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let err = f.enroll_key(&token, &other, inventory("n2", "52:54:00:bb:00:02")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("no uses left"), "{err:?}");
    assert_eq!(f.machine_count().await.unwrap(), 1);
    // The new certificate works: the machine can open its stream with it.
    let m = Enrolled { id: again.id.clone(), cert: again.cert, key: again.key };
    f.machine_agent(&m).await.unwrap();
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn pending_machines_are_capped_per_token_and_in_total() {
    let f = TestController::start_with(with(AdmissionOptions {
        max_pending: 5,
        max_pending_per_token: 3,
        // MACs reported from loopback count as evidence, for the registered machine below.
        trust_reported_macs: vec!["127.0.0.1/32".parse().unwrap()],
        ..Default::default()
    }))
    .await
    .unwrap();
    let a = boot_token(&f).await;
    let b = boot_token(&f).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            f.enroll_with(&a, inventory("a", &format!("52:54:00:cc:00:0{i}"))).await.unwrap().unwrap().id,
        );
    }
    let err = f.enroll_with(&a, inventory("a", "52:54:00:cc:00:09")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("per token is 3"), "{err:?}");
    for i in 0..2 {
        f.enroll_with(&b, inventory("b", &format!("52:54:00:cd:00:0{i}"))).await.unwrap().unwrap();
    }
    let err = f.enroll_with(&b, inventory("b", "52:54:00:cd:00:09")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("the limit is 5"), "{err:?}");
    // A registered machine is not capped: it claims its registration and is approved. Another
    // machine is not let through by someone else's registration.
    let mut admin = f.admin().await.unwrap();
    for mac in ["52:54:00:dd:00:01", "52:54:00:dd:00:02"] {
        let registration = pb::Registration { mac: mac.into(), ..Default::default() };
        admin
            .register_machine(pb::RegisterMachineRequest { registration: Some(registration), force: false })
            .await
            .unwrap();
    }
    let err = f.enroll_with(&b, inventory("b", "52:54:00:cd:00:07")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    f.enroll_with(&b, inventory("reg", "52:54:00:dd:00:01")).await.unwrap().unwrap();
    assert_eq!(f.machine_count().await.unwrap(), 6, "5 pending and the registered one");
    // A machine approved leaves the queue: one more may wait.
    f.admin().await.unwrap().approve(pb::MachineRef { query: ids[0].clone() }).await.unwrap();
    f.enroll_with(&b, inventory("b", "52:54:00:cd:00:08")).await.unwrap().unwrap();
    // Tokens that approve their machines are not capped.
    let open = f.token(0, 10).await.unwrap();
    f.enroll_with(&open, inventory("ok", "52:54:00:ce:00:01")).await.unwrap().unwrap();
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn enrollments_per_source_address_are_rate_limited() {
    let f = TestController::start_with(with(AdmissionOptions {
        enroll_burst: 3,
        enroll_per_minute: 1,
        ..Default::default()
    }))
    .await
    .unwrap();
    let token = f.token(0, 10).await.unwrap();
    for i in 0..3 {
        f.enroll_with(&token, inventory("n", &format!("52:54:00:dd:00:0{i}"))).await.unwrap().unwrap();
    }
    let err = f.enroll_with(&token, inventory("n", "52:54:00:dd:00:09")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("try again in"), "{err:?}");
    // Even a bad token is counted: guessing costs the same.
    let err =
        f.enroll_with("abcdef.0123456789abcdef0123456789abcdef", inventory("n", "52:54:00:dd:00:08")).await;
    assert_eq!(err.unwrap().unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(sample(&metrics(&f).await, "muster_enrollments_total{result=\"rate_limited\"}"), 2.0);
    f.still_serving().await.unwrap();
}

/// A raw agent stream: a hello, then heartbeats.
struct Stream {
    up: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    _down: tonic::Streaming<pb::ControllerMessage>,
}

impl Stream {
    async fn open(f: &TestController, m: &Enrolled, inv: pb::Inventory) -> Self {
        Self::open_with(f, m, inv, 5000).await
    }

    async fn open_with(f: &TestController, m: &Enrolled, inv: pb::Inventory, heartbeat_ms: u32) -> Self {
        let hello =
            pb::Hello { heartbeat_interval_ms: heartbeat_ms, inventory: Some(inv), ..Default::default() };
        let (up, down) = f.open_stream(m, hello).await.unwrap();
        Self { up, _down: down }
    }

    async fn heartbeat(&self, seq: u64, filesystems: usize) {
        let fs = (0..filesystems)
            .map(|i| pb::FilesystemUsage {
                mount_point: format!("/mnt/{i}"),
                device: format!("/dev/x{i}"),
                fs_type: "ext4".into(),
                size_bytes: 100,
                available_bytes: 50,
            })
            .collect();
        self.up
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                    seq,
                    sent_unix_ms: muster_util::now_ms(),
                    health: Some(pb::HealthSnapshot { filesystems: fs, ..Default::default() }),
                })),
            })
            .await
            .unwrap();
    }
}

/// Waits (bounded) until `/metrics` satisfies `f`.
async fn wait_metrics(ctl: &TestController, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(ctl).await;
        if f(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_pending_machine_adds_no_series_and_hellos_write_only_on_change() {
    let f = TestController::start().await.unwrap();
    let token = boot_token(&f).await;
    let inv = inventory("pend", "52:54:00:ee:00:01");
    let m = f.enroll_with(&token, inv.clone()).await.unwrap().unwrap();
    let s = Stream::open(&f, &m, inv.clone()).await;
    let fs_series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("muster_machine_filesystem_size_bytes{") && l.contains(&m.id))
            .count()
    };
    // Heartbeats with 64 filesystems each: the machine is seen, its reports add no series.
    s.heartbeat(1, 64).await;
    let text = wait_metrics(&f, "the heartbeat recorded", |t| {
        t.lines()
            .any(|l| l.starts_with("muster_machine_last_heartbeat_timestamp_seconds{") && l.contains(&m.id))
    })
    .await;
    assert_eq!(fs_series(&text), 0, "a pending machine's filesystems are not series");
    // Approved: they are (clipped to what the controller keeps).
    f.admin().await.unwrap().approve(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    s.heartbeat(2, 500).await;
    let text = wait_metrics(&f, "the filesystems as series", |t| fs_series(t) > 0).await;
    assert_eq!(fs_series(&text), 64, "clipped");

    // The same hello again: no write. A changed one: one write.
    let writes =
        |t: &str| sample(t, "muster_store_operation_duration_seconds_count{operation=\"update_machine\"}");
    let before = writes(&metrics(&f).await);
    drop(s);
    let s = Stream::open(&f, &m, inv.clone()).await;
    s.heartbeat(3, 1).await;
    wait_metrics(&f, "the reconnect seen", |t| {
        sample(t, "muster_grpc_requests_total{service=\"AgentService\",method=\"Connect\",code=\"OK\"}")
            >= 2.0
    })
    .await;
    // Hellos are handled in order with heartbeats on the stream: once the heartbeat shows, the
    // hello was handled.
    wait_metrics(&f, "the heartbeat after the hello", |t| fs_series(t) == 1).await;
    assert_eq!(writes(&metrics(&f).await), before, "an unchanged hello writes nothing");
    drop(s);
    let mut changed = inv.clone();
    changed.kernel = "6.12.0".into();
    let s = Stream::open(&f, &m, changed).await;
    s.heartbeat(4, 2).await;
    wait_metrics(&f, "the changed hello written", |t| writes(t) == before + 1.0).await;
    // The same inventory with another heartbeat interval is a change too.
    drop(s);
    let mut changed = inv.clone();
    changed.kernel = "6.12.0".into();
    let s = Stream::open_with(&f, &m, changed, 7000).await;
    s.heartbeat(5, 3).await;
    wait_metrics(&f, "the new interval written", |t| writes(t) == before + 2.0).await;
    drop(s);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn machines_are_listed_a_page_at_a_time_without_inventory() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 5).await.unwrap();
    let mut want = Vec::new();
    for i in 0..5 {
        want.push(
            f.enroll_with(&token, inventory("n", &format!("52:54:00:ff:00:0{i}"))).await.unwrap().unwrap().id,
        );
    }
    want.sort();
    let mut admin = f.admin().await.unwrap();
    let mut got = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let r = admin
            .list_machines(pb::ListMachinesRequest { page_size: 2, page_token })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(r.machines.len() <= 2);
        assert!(r.machines.iter().all(|m| m.inventory.is_none() && !m.macs.is_empty()), "{:?}", r.machines);
        got.extend(r.machines.into_iter().map(|m| m.id));
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!((got, pages), (want.clone(), 3));
    // One machine has its inventory.
    let one = admin.get_machine(pb::MachineRef { query: want[0].clone() }).await.unwrap().into_inner();
    assert_eq!(one.inventory.unwrap().kernel, "6.1.0");
    // The CLI's list reads every page.
    let all = muster_cli::list::all_machines(&mut admin).await.unwrap();
    assert_eq!(all.len(), 5);
    f.still_serving().await.unwrap();
}

#[tokio::test]
async fn the_data_dir_and_the_database_are_the_controllers_alone() {
    use std::os::unix::fs::PermissionsExt;
    muster_tests::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ctl");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A database left readable by an older version.
    std::fs::write(data.join("state.db"), b"").unwrap();
    std::fs::set_permissions(data.join("state.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let running = muster_controller::serve::start(muster_controller::serve::ServeOptions {
        data_dir: data.clone(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        controller: Default::default(),
        boot: None,
        net: Default::default(),
    })
    .await
    .unwrap();
    // A write, so the WAL exists.
    running.controller.store().list_tokens().await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    for f in ["state.db", "state.db-wal", "state.db-shm", "ports.json", "ca.key", "musterconfig"] {
        let p = data.join(f);
        if p.exists() || f != "state.db-shm" {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    running.stop().await.unwrap();
}
