//! The node OS (`muster image os`) in real VMs under TCG: the qcow2 as a VM template whose
//! clones enroll on first boot from QEMU's fw_cfg (as Proxmox passes `args: -fw_cfg ...`), each
//! taking its MAC's registration (hostname, static address, role), under systemd, with BIOS and
//! with UEFI; a machine config with a kernel module, a sysctl that needs it and a systemd unit
//! applies for real and survives a power cycle.
//!
//! Networking as in `netboot_e2e`: QEMU's restricted user networking, reaching only the
//! controller's loopback ports at 10.0.2.100.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use muster_tests::e2e::{
    agent_deb, build_os, clone_disk, controller_with, os_image, strip_ansi, user_net, wait_machine, Keep,
    BOOT_TIMEOUT, GUEST_GRPC,
};
use muster_tests::vm::{mac, Boot, Vm, VmSpec, GUEST_FWD_ADDR, OVMF_VARS};
use muster_tests::wait_for;

/// A clone of the template: 1 GiB of RAM, a 4 GiB disk (bigger than the image: its root grows),
/// the enrollment settings in fw_cfg.
fn clone_spec(
    dir: &std::path::Path,
    name: &str,
    mac: &str,
    template: &std::path::Path,
    fw_cfg: &[(String, String)],
    ctl: &muster_tests::ControllerProc,
    uefi: bool,
) -> VmSpec {
    let disk = dir.join(format!("{name}.qcow2"));
    clone_disk(template, &disk, "4G").unwrap();
    let mut spec = VmSpec::new(name, mac, Boot::Disk, user_net(ctl, false));
    spec.memory_mb = 1024;
    spec.disks = vec![disk];
    spec.fw_cfg = fw_cfg.to_vec();
    if uefi {
        let vars = dir.join(format!("{name}.vars.fd"));
        std::fs::copy(OVMF_VARS, &vars).expect("OVMF's variable store (apt-get install ovmf)");
        spec.uefi_vars = Some(vars);
    }
    spec
}

#[test]
fn template_clones_enroll_with_their_registrations_under_systemd_bios_and_uefi() {
    let tmp = Keep::new();
    let image = os_image().unwrap();
    let template = image.join("muster-os.qcow2");
    let ctl = controller_with(tmp.path(), None, None, &[]).unwrap();
    // One boot token in the template's settings for every clone, as a Proxmox template has.
    let token = ctl.cli_ok(&["token", "create", "--boot"]).unwrap().trim().to_owned();
    let fw_cfg = vec![
        ("opt/muster/controller".to_owned(), format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}")),
        ("opt/muster/token".to_owned(), token),
        ("opt/muster/ca_hash".to_owned(), ctl.pin().unwrap().to_string()),
    ];
    let stamp = format!("muster-unit-ran-{}", std::process::id());
    let nodes = [("node-bios", mac(5, 1), "10.0.2.51", false), ("node-uefi", mac(5, 2), "10.0.2.52", true)];
    for (host, m, addr, _) in &nodes {
        let cfg = tmp.path().join(format!("{host}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "apiVersion: muster/v1alpha1\nkind: MachineConfig\n\
                 network:\n  interfaces:\n    - mac: \"{m}\"\n      addresses: [\"{addr}/24\"]\n\
                 kernelModules:\n  - name: br_netfilter\n\
                 sysctls:\n  net.bridge.bridge-nf-call-iptables: \"1\"\n\
                 units:\n  - name: muster-e2e.service\n    enabled: true\n    started: true\n    content: |\n      \
                 [Unit]\n      Description=Muster e2e unit\n      [Service]\n      Type=oneshot\n      RemainAfterExit=yes\n      \
                 ExecStart=/bin/sh -c 'echo {stamp} > /dev/console; echo ran > /run/muster-e2e'\n      \
                 [Install]\n      WantedBy=multi-user.target\n"
            ),
        )
        .unwrap();
        ctl.cli_ok(&[
            "machine",
            "register",
            "--mac",
            m,
            "--hostname",
            host,
            "--role",
            "worker",
            "--cluster",
            "lab",
            "-f",
            cfg.to_str().unwrap(),
        ])
        .unwrap();
    }
    let mut vms: Vec<Vm> = nodes
        .iter()
        .map(|(host, m, _, uefi)| {
            Vm::start(&clone_spec(tmp.path(), host, m, &template, &fw_cfg, &ctl, *uefi), tmp.path()).unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for ((host, m, addr, _), vm) in nodes.iter().zip(vms.iter_mut()) {
        let got = wait_machine(&ctl, vm, m, &format!("ready as {host}"), |j| {
            j["state"] == "ready" && j["hostname"] == *host && j["role"] == "worker" && j["cluster"] == "lab"
        })
        .unwrap();
        let id = got["id"].as_str().unwrap().to_owned();
        // Its static address (the agent reports its NICs when it connects again over it).
        wait_for(&format!("{host} reports {addr}/24"), BOOT_TIMEOUT, || {
            let j = ctl.cli_ok(&["machine", "get", &id, "-o", "json"]).ok()?;
            j.contains(&format!("\"{addr}/24\"")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial()));
        // The config applied for real: module, sysctl, unit (the unit printed its stamp).
        wait_for(&format!("{host}'s config applied"), BOOT_TIMEOUT, || {
            let out = ctl.cli_ok(&["config", "get", &id, "--rendered"]).ok()?;
            (out.contains("running") && !out.contains("failed")).then_some(out)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial()));
        vm.wait_serial(&stamp, BOOT_TIMEOUT).unwrap();
        let serial = strip_ansi(&vm.serial());
        // systemd started the agent from its .deb's unit; its log went through journald (which
        // forwards to the console in this image).
        assert!(serial.contains("Started muster-agent.service"), "{serial}");
        assert!(
            serial
                .lines()
                .any(|l| l.contains("muster-agent[") && l.contains("setting found: controller from fw_cfg")),
            "{serial}"
        );
        // The root partition grew to the clone's 4 GiB disk.
        assert!(serial.contains("muster-growroot: grew /dev/vda3"), "{serial}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ctl.machines().unwrap().len(), 2, "two clones, two machines");
    let rendered = ctl.cli_ok(&["config", "get", &ids[0], "--rendered"]).unwrap();
    for r in ["module:br_netfilter", "sysctl:net.bridge.bridge-nf-call-iptables", "unit:muster-e2e.service"] {
        assert!(rendered.lines().any(|l| l.contains(r) && !l.contains("failed")), "{r}: {rendered}");
    }

    // Power-cycle the BIOS clone: the same machine comes back with everything it had.
    let spec = {
        let (host, m, _, _) = &nodes[0];
        let mut s = VmSpec::new(host, m, Boot::Disk, user_net(&ctl, false));
        s.memory_mb = 1024;
        s.disks = vec![tmp.path().join(format!("{host}.qcow2"))];
        s.fw_cfg = fw_cfg.clone();
        s.name = format!("{host}-again");
        s
    };
    vms[0].kill();
    let mut vm = Vm::start(&spec, tmp.path()).unwrap();
    vm.wait_serial(&stamp, BOOT_TIMEOUT).unwrap();
    let again = wait_machine(&ctl, &mut vm, &nodes[0].1, "connected again after the power cycle", |j| {
        j["connected"] == true && j["state"] == "ready" && j["hostname"] == "node-bios"
    })
    .unwrap();
    assert_eq!(again["id"], ids[0].as_str());
    assert_eq!(ctl.machines().unwrap().len(), 2, "no new machine after the power cycle");
    let serial = strip_ansi(&vm.serial());
    assert!(serial.contains("muster-growroot: /dev/vda3 already fills its disk"), "{serial}");
}

/// Bare metal's path, in a UEFI VM (OVMF, iPXE's EFI ROM): network boot into the live image,
/// enroll, approve, install the node OS to the empty virtio disk, reboot, boot from the disk
/// (the boot script now says `exit`), come back as the same machine under systemd; then
/// `reset --wipe`: network boot again, a new pending machine.
#[test]
fn network_boot_install_to_disk_boot_from_it_as_the_same_machine_then_reset() {
    let tmp = Keep::new();
    let image = os_image().unwrap();
    let bundle = muster_tests::e2e::pxe_bundle().unwrap();
    let http_url = format!("http://{GUEST_FWD_ADDR}:{}", muster_tests::e2e::GUEST_HTTP);
    let ctl = controller_with(tmp.path(), Some(&bundle), None, &["--boot-http-url", &http_url]).unwrap();
    // The image, added on the controller's host.
    let data = tmp.path().join("controller");
    let out = std::process::Command::new(muster_tests::bin("muster-controller").unwrap())
        .args(["image", "add"])
        .arg(image.join("muster-os.raw.gz"))
        .args(["--name", "bookworm", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "image add: {}", String::from_utf8_lossy(&out.stderr));
    let listed = ctl.cli_ok(&["machine", "images"]).unwrap();
    assert!(listed.contains("bookworm"), "{listed}");

    let m = mac(6, 1);
    let disk = tmp.path().join("metal.qcow2");
    let q = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("4G")
        .output()
        .unwrap();
    assert!(q.status.success(), "{q:?}");
    let vars = tmp.path().join("metal.vars.fd");
    std::fs::copy(OVMF_VARS, &vars).expect("OVMF's variable store (apt-get install ovmf)");
    let mut spec = VmSpec::new("metal", &m, Boot::NetworkThenDisk, user_net(&ctl, true));
    spec.memory_mb = 1024;
    spec.disks = vec![disk];
    spec.uefi_vars = Some(vars);
    spec.allow_reboot = true;
    let mut vm = Vm::start(&spec, tmp.path()).unwrap();
    let pending = wait_machine(&ctl, &mut vm, &m, "pending", |j| j["state"] == "pending").unwrap();
    let id = pending["id"].as_str().unwrap().to_owned();
    // A pending machine installs nothing.
    let e =
        ctl.cli(&["machine", "install", &id, "--disk", "only-non-removable", "--image", "bookworm"]).unwrap();
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("not approved"), "{e:?}");
    ctl.cli_ok(&["approve", &id]).unwrap();
    wait_machine(&ctl, &mut vm, &m, "ready", |j| j["state"] == "ready").unwrap();
    // Refused clearly: no such disk, no such image.
    for (args, why) in [
        (["--disk", "size>=100G", "--image", "bookworm"], "no disk matches"),
        (["--disk", "only-non-removable", "--image", "bullseye"], "no image \"bullseye\""),
    ] {
        let mut a = vec!["machine", "install", id.as_str()];
        a.extend(args);
        let e = ctl.cli(&a).unwrap();
        assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains(why), "{why}: {e:?}");
    }
    let started = std::time::Instant::now();
    ctl.cli_ok(&["machine", "install", &id, "--disk", "serial=muster-disk-0", "--image", "bookworm"])
        .unwrap();
    let get = |id: &str| -> serde_json::Value {
        serde_json::from_str(&ctl.cli_ok(&["machine", "get", id, "-o", "json"]).unwrap()).unwrap()
    };
    wait_for("the install to be recorded", BOOT_TIMEOUT, || {
        let j = get(&id);
        match j["install"]["state"].as_str() {
            Some("installed") => Some(()),
            Some("failed") => panic!("install failed: {j}\n{}", vm.serial()),
            _ => None,
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial()));
    eprintln!("installed in {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(get(&id)["install"]["disk"], "/dev/vda");
    // The agent reboots; the firmware network-boots, is told `exit`, boots the disk: systemd,
    // the installed agent with the identity the installer left.
    vm.wait_serial("took the identity this system's installer left", BOOT_TIMEOUT).unwrap();
    let back = wait_machine(&ctl, &mut vm, &m, "the same machine back from its disk", |j| {
        j["connected"] == true && j["state"] == "ready" && j["id"] == id.as_str()
    })
    .unwrap();
    assert_eq!(back["id"], id.as_str());
    assert_eq!(ctl.machines().unwrap().len(), 1, "no second machine");
    let serial = strip_ansi(&vm.serial());
    assert!(serial.contains("not network-booting this machine"), "the boot script said exit: {serial}");
    assert!(serial.contains("Started muster-agent.service"), "{serial}");
    let kernel = get(&id)["inventory"]["os"].as_str().unwrap_or_default().to_owned();
    assert!(kernel.contains("Debian"), "runs the installed Debian: {kernel}");

    // Reset: the disk is wiped, the machine network-boots again and enrolls as a new machine.
    ctl.cli_ok(&["machine", "reset", &id, "--wipe"]).unwrap();
    let again = wait_machine(&ctl, &mut vm, &m, "a new pending machine after the reset", |j| {
        j["state"] == "pending" && j["id"] != id.as_str()
    })
    .unwrap();
    assert_ne!(again["id"], id.as_str());
    assert_eq!(ctl.machines().unwrap().len(), 1, "the reset machine's record is gone");
}

/// The same inputs (package versions, the agent's package) give the same image, bit for bit:
/// a second build from the same cached root file system into another directory.
#[test]
fn the_same_inputs_give_the_same_image() {
    let image = os_image().unwrap();
    let root = muster_tests::bin_dir().join("muster-e2e");
    let lock = root.join("os.lock");
    // The same package os_image() built from, and its cache (under its lock).
    let deb = agent_deb(&root.join("debian"), Some(&lock)).unwrap();
    let tmp = Keep::new();
    let again = tmp.path().join("os");
    build_os(&deb, &root.join("cache"), &again, Some(&lock)).unwrap();
    let first = std::fs::read_to_string(image.join("SHA256SUMS")).unwrap();
    let second = std::fs::read_to_string(again.join("SHA256SUMS")).unwrap();
    assert_eq!(first, second, "two builds from the same inputs differ");
    assert_eq!(first.lines().count(), 3, "{first}");
}
