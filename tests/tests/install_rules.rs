//! Install to disk, the controller's rules, over its real gRPC and HTTP listeners (the agent's
//! side is played on a raw stream): who may install what on which disk, what the agent is told
//! and when, the order of an install's states, the boot script that switches to the disk only
//! once the install is reported, and reset.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_controller::fleet::admission::AdmissionOptions;
use muster_controller::fleet::ControllerOptions;
use muster_proto::pb;
use muster_tests::TestController;
use tonic::Code;

const MAC: &str = "52:54:00:00:09:01";

fn inventory() -> pb::Inventory {
    pb::Inventory {
        hostname: "metal".into(),
        nics: vec![pb::Nic { name: "eth0".into(), mac: MAC.into(), addresses: vec![] }],
        disks: vec![
            pb::Disk { name: "vda".into(), size_bytes: 4 << 30, serial: "d0".into(), ..Default::default() },
            pb::Disk {
                name: "sdb".into(),
                size_bytes: 1 << 20,
                serial: "usb".into(),
                removable: true,
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

async fn next_install_msg(down: &mut tonic::Streaming<pb::ControllerMessage>) -> pb::controller_message::Msg {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .expect("a message within 10s")
            .unwrap()
            .expect("the stream stays open");
        match m.msg {
            Some(m @ (pb::controller_message::Msg::Install(_) | pb::controller_message::Msg::Reset(_))) => {
                return m
            }
            _ => continue,
        }
    }
}

fn status(phase: &str, disk: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::InstallStatus(pb::InstallStatus {
            image: "bookworm".into(),
            phase: phase.into(),
            disk: disk.into(),
            write_ms: 5,
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn installs_are_refused_clearly_sent_in_order_switch_the_boot_script_and_reset_forgets_the_machine() {
    let opts = ControllerOptions {
        admission: AdmissionOptions {
            trust_reported_macs: vec!["127.0.0.1/32".parse().unwrap()],
            ..Default::default()
        },
        ..Default::default()
    };
    let f = TestController::start_with_boot(opts).await.unwrap();
    // An image on the controller's host: 3 MiB of raw disk.
    let raw = f.data_dir().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 3 << 20]).unwrap();
    let img = muster_controller::fleet::install::add_image(
        &muster_controller::fleet::install::images_dir(&f.data_dir()),
        &raw,
        "bookworm",
        1,
    )
    .unwrap();
    let mut admin = f.admin().await.unwrap();
    let listed = admin.list_images(pb::ListImagesRequest {}).await.unwrap().into_inner().images;
    assert_eq!(listed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["bookworm"]);

    let token = admin
        .create_token(pb::CreateTokenRequest { pending: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let m = f.enroll_with(&token, inventory()).await.unwrap().unwrap();
    let install = |disk: &str, image: &str| pb::InstallRequest {
        query: m.id.clone(),
        image: image.into(),
        disk: disk.into(),
    };
    // Pending: nothing.
    let e = admin.install(install("/dev/vda", "bookworm")).await.unwrap_err();
    assert!(e.code() == Code::FailedPrecondition && e.message().contains("not approved"), "{e:?}");
    admin.approve(pb::MachineRef { query: m.id.clone() }).await.unwrap();
    let (up, mut down) =
        f.open_stream(&m, pb::Hello { inventory: Some(inventory()), ..Default::default() }).await.unwrap();
    for (disk, image, code, why) in [
        ("size>=1T", "bookworm", Code::FailedPrecondition, "no disk matches"),
        ("serial=usb", "bookworm", Code::FailedPrecondition, "the image needs"),
        ("size>=1M", "bookworm", Code::FailedPrecondition, "several disks"),
        ("colour=red", "bookworm", Code::InvalidArgument, "not a condition"),
        ("/dev/vda", "bullseye", Code::NotFound, "no image \"bullseye\""),
    ] {
        let e = admin.install(install(disk, image)).await.unwrap_err();
        assert!(e.code() == code && e.message().contains(why), "{disk} {image}: {e:?}");
    }
    // Nothing was recorded by the refusals: a reset has nothing to reset.
    let e = admin.reset(pb::ResetRequest { query: m.id.clone(), wipe: true }).await.unwrap_err();
    assert!(e.message().contains("has no install"), "{e:?}");

    let r = admin.install(install("serial=d0", "bookworm")).await.unwrap().into_inner();
    assert_eq!((r.install_state.as_str(), r.install_image.as_str()), ("requested", "bookworm"));
    let pb::controller_message::Msg::Install(i) = next_install_msg(&mut down).await else {
        panic!("not an install")
    };
    assert_eq!((i.disk.as_str(), i.size, i.raw_size), ("serial=d0", img.size, 3 << 20));
    assert_eq!((i.sha256.as_str(), i.raw_sha256.as_str()), (img.sha256.as_str(), img.raw_sha256.as_str()));
    assert!(i.url.ends_with("/images/bookworm.raw.gz"), "{}", i.url);
    // The URL serves the image (with its digest).
    let path = i.url.split_once("/images/").map(|(_, p)| format!("/images/{p}")).unwrap();
    let got = muster_tests::http_get(f.running.ports.http, &path, &[("range", "bytes=0-1")]).await.unwrap();
    assert_eq!(got.status, 206);
    assert_eq!(got.body, vec![0x1f, 0x8b], "a gzip");

    let script = || async {
        muster_tests::http_get(f.running.ports.http, "/boot/machine.ipxe?mac=52-54-00-00-09-01", &[])
            .await
            .unwrap()
            .text()
    };
    up.send(status("writing", "/dev/vda")).await.unwrap();
    for _ in 0..100 {
        if f.machine(&m.id).await.unwrap().install_state == "writing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.machine(&m.id).await.unwrap().install_state, "writing");
    // While writing: no second install, and the machine still network-boots.
    let e = admin.install(install("serial=d0", "bookworm")).await.unwrap_err();
    assert!(e.message().contains("wait for it"), "{e:?}");
    assert!(script().await.contains("kernel /boot/assets/"), "still network boot while writing");
    up.send(status("installed", "/dev/vda")).await.unwrap();
    for _ in 0..100 {
        if f.machine(&m.id).await.unwrap().install_state == "installed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = f.machine(&m.id).await.unwrap();
    assert_eq!(
        (got.install_state.as_str(), got.install_disk.as_str(), got.install_write_ms),
        ("installed", "/dev/vda", 5)
    );
    let s = script().await;
    assert!(s.contains("installed to disk (bookworm on /dev/vda)") && s.trim_end().ends_with("exit"), "{s}");
    // A repeated report changes nothing; an install over an installed machine is refused.
    up.send(status("failed", "")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.machine(&m.id).await.unwrap().install_state, "installed");
    let e = admin.install(install("serial=d0", "bookworm")).await.unwrap_err();
    assert!(e.message().contains("reset --wipe"), "{e:?}");

    // Reset: the agent is told which disk; when it reports, the machine is gone.
    admin.reset(pb::ResetRequest { query: m.id.clone(), wipe: true }).await.unwrap();
    let pb::controller_message::Msg::Reset(r) = next_install_msg(&mut down).await else {
        panic!("not a reset")
    };
    assert_eq!((r.disk.as_str(), r.wipe), ("/dev/vda", true));
    up.send(status("reset", "/dev/vda")).await.unwrap();
    for _ in 0..100 {
        if f.machine_count().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.machine_count().await.unwrap(), 0, "the reset machine is forgotten");
    assert!(script().await.contains("kernel /boot/assets/"), "network boot again");
    f.still_serving().await.unwrap();
}
