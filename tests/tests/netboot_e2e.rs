//! Network boot end to end, in real VMs: QEMU (TCG) with SeaBIOS and iPXE boots from the
//! controller's HTTP boot service, a Debian kernel with Muster's initramfs starts the agent,
//! and the agent enrolls. Each test judges by what the controller records, fails at once on
//! `Could not boot`/`Kernel panic` in the serial console, kills its VMs (Drop), and keeps the
//! serial log on failure (the temp dir is persisted then).
//!
//! The VMs use QEMU user-mode networking with `restrict=on`: they reach only the controller's
//! loopback ports, forwarded at 10.0.2.100. Nothing leaves this machine. User-mode networking
//! connects every guest to the controller from 127.0.0.1, so the controller cannot see a
//! guest's MAC: these controllers trust MACs reported from loopback (`--trust-reported-macs`),
//! as an operator behind NAT would. The ProxyDHCP test puts a VM on a real bridged LAN with the
//! controller, which confirms the VM's MAC from its own neighbour table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use muster_machinery::KernelArgs;
use muster_tests::e2e::{
    boot_controller, pxe_bundle, strip_ansi, user_net, wait_machine, Keep, BOOT_TIMEOUT, GUEST_GRPC,
};
use muster_tests::vm::{mac, Boot, Net, Vm, VmSpec, GUEST_FWD_ADDR};
use muster_tests::{bin, wait_for};

#[test]
fn registered_vm_netboots_enrolls_takes_role_hostname_and_config_and_survives_a_controller_restart() {
    let tmp = Keep::new();
    let bundle = pxe_bundle().unwrap();
    let ctl = boot_controller(tmp.path(), &bundle, None).unwrap();
    let m = mac(1, 1);
    let motd = format!("booted by muster {}\n", std::process::id());
    let cfg = tmp.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/motd\n    content: {motd:?}\n"
        ),
    )
    .unwrap();
    ctl.cli_ok(&[
        "machine",
        "register",
        "--mac",
        &m,
        "--hostname",
        "vm-reg",
        "--role",
        "worker",
        "--cluster",
        "lab",
        "-f",
        cfg.to_str().unwrap(),
    ])
    .unwrap();
    let mut spec = VmSpec::new("vm-reg", &m, Boot::Network, user_net(&ctl, true));
    spec.uuid = Some("6d757374-6572-4000-8000-000000000001".into());
    let mut vm = Vm::start(&spec, tmp.path()).unwrap();
    let got = wait_machine(&ctl, &mut vm, &m, "ready with role worker and hostname vm-reg", |m| {
        m["state"] == "ready"
            && m["role"] == "worker"
            && m["hostname"] == "vm-reg"
            && m["health"] == "healthy"
    })
    .unwrap();
    let id = got["id"].as_str().unwrap().to_owned();
    assert_eq!(got["cluster"], "lab");
    // The config (hostname + file) was applied on the node, per the agent's own report.
    let rendered = wait_for("config generation 1 applied", BOOT_TIMEOUT, || {
        let out = ctl.cli_ok(&["config", "get", &id, "--rendered"]).ok()?;
        (out.contains("running 1") && out.contains("# file:/etc/motd applied")).then_some(out)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial()));
    assert!(rendered.contains("hostname: vm-reg"), "{rendered}");
    // /metrics shows it.
    let metrics = http_get(ctl.ports.http.port(), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("muster_machine_up{") && l.contains("vm-reg") && l.ends_with(" 1")),
        "{metrics}"
    );
    // Restart the controller on the same ports while the VM runs: the agent reconnects, same id.
    let (g, h) = (ctl.ports.grpc.port(), ctl.ports.http.port());
    drop(ctl);
    let ctl = boot_controller(tmp.path(), &bundle, Some((g, h))).unwrap();
    let again = wait_machine(&ctl, &mut vm, &m, "connected again after the restart", |m| {
        m["connected"] == true && m["state"] == "ready"
    })
    .unwrap();
    assert_eq!(again["id"], id.as_str());
    assert_eq!((again["role"].as_str(), again["hostname"].as_str()), (Some("worker"), Some("vm-reg")));
    assert_eq!(ctl.machines().unwrap().len(), 1, "no second machine appeared");
}

#[test]
fn unregistered_vm_lands_pending_until_approved() {
    let tmp = Keep::new();
    let bundle = pxe_bundle().unwrap();
    let ctl = boot_controller(tmp.path(), &bundle, None).unwrap();
    let m = mac(2, 1);
    let mut vm =
        Vm::start(&VmSpec::new("vm-pending", &m, Boot::Network, user_net(&ctl, true)), tmp.path()).unwrap();
    let got = wait_machine(&ctl, &mut vm, &m, "pending", |m| m["state"] == "pending").unwrap();
    let id = got["id"].as_str().unwrap().to_owned();
    ctl.cli_ok(&["approve", &id]).unwrap();
    wait_machine(&ctl, &mut vm, &m, "ready after approve", |m| m["state"] == "ready").unwrap();
}

#[test]
fn iso_boots_to_ready() {
    let tmp = Keep::new();
    let bundle = pxe_bundle().unwrap();
    let ctl = boot_controller(tmp.path(), &bundle, None).unwrap();
    let token = ctl.cli_ok(&["token", "create", "--description", "iso e2e"]).unwrap().trim().to_owned();
    let iso = tmp.path().join("muster.iso");
    let cmdline = KernelArgs::enrollment(
        &format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}"),
        &ctl.pin().unwrap(),
        &token,
    )
    .after("console=ttyS0 panic=-1");
    let out = Command::new(bin("muster").unwrap())
        .args(["image", "iso", "--quiet", "--agent"])
        .arg(muster_tests::agent_bin().unwrap())
        .arg("--out")
        .arg(&iso)
        .arg("--bundle")
        .arg(tmp.path().join("pxe-for-iso"))
        .args(["--cmdline", &cmdline])
        .output()
        .unwrap();
    assert!(out.status.success(), "muster image iso: {}", String::from_utf8_lossy(&out.stderr));
    let m = mac(3, 1);
    let mut vm =
        Vm::start(&VmSpec::new("vm-iso", &m, Boot::Cdrom(iso), user_net(&ctl, false)), tmp.path()).unwrap();
    wait_machine(&ctl, &mut vm, &m, "ready from the ISO", |m| m["state"] == "ready").unwrap();
}

/// A VM template's path: no kernel arguments for Muster (the kernel and initramfs booted
/// directly, as a disk's boot loader would), the enrollment settings in QEMU's fw_cfg as
/// Proxmox's `args: -fw_cfg ...` passes them. The agent reads them from sysfs and enrolls.
#[test]
fn a_vm_enrolls_with_settings_from_fw_cfg_alone() {
    let tmp = Keep::new();
    let bundle = pxe_bundle().unwrap();
    let ctl = boot_controller(tmp.path(), &bundle, None).unwrap();
    let token = ctl.cli_ok(&["token", "create", "--description", "fw_cfg e2e"]).unwrap().trim().to_owned();
    let m = mac(3, 2);
    let boot = Boot::Kernel {
        kernel: bundle.join(muster_machinery::boot::KERNEL),
        initrd: bundle.join(muster_machinery::boot::INITRD),
        append: "console=ttyS0 panic=-1".into(),
    };
    let mut spec = VmSpec::new("vm-fwcfg", &m, boot, user_net(&ctl, false));
    spec.fw_cfg = vec![
        ("opt/muster/controller".into(), format!("https://{GUEST_FWD_ADDR}:{GUEST_GRPC}")),
        ("opt/muster/token".into(), token),
        ("opt/muster/ca_hash".into(), ctl.pin().unwrap()),
    ];
    let mut vm = Vm::start(&spec, tmp.path()).unwrap();
    wait_machine(&ctl, &mut vm, &m, "ready from fw_cfg settings", |m| m["state"] == "ready").unwrap();
    // The agent says where it found its controller (the console is a terminal: colours go).
    let serial = strip_ansi(&vm.serial());
    assert!(
        serial.lines().any(|l| l.contains("setting found")
            && l.contains("\"controller\"")
            && l.contains("from=fw_cfg")),
        "{serial}"
    );
}

/// A plain HTTP GET on loopback.
fn http_get(port: u16, path: &str) -> String {
    let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}{path}")]).output().unwrap();
    assert!(out.status.success(), "GET {path}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces this test made, deleted when dropped (a failed test leaves nothing).
struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A LAN in namespaces: a bridge (in `lan`), the home router's DHCP server (dnsmasq, addresses
/// only, in `rtr`), the controller with ProxyDHCP and TFTP (in `ctl`), and a VM on a tap in the
/// bridge. The VM gets its address from dnsmasq and its boot information from Muster, and takes
/// its registration because the controller sees its MAC on the LAN.
#[test]
fn proxy_dhcp_beside_a_real_dhcp_server_boots_a_vm_and_tftp_serves_ipxe() {
    let tmp = Keep::new();
    let bundle = pxe_bundle().unwrap();
    let p = format!("mpx{}", std::process::id() % 100_000);
    let (lan, rtr, ctln) = (format!("{p}l"), format!("{p}r"), format!("{p}c"));
    let mut ns = Netns(Vec::new());
    for n in [&lan, &rtr, &ctln] {
        ip(&["netns", "add", n]);
        ns.0.push(n.clone());
        ip(&["-n", n, "link", "set", "lo", "up"]);
    }
    ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &lan, "link", "set", "br0", "up"]);
    for (peer, addr, name) in [(&rtr, "192.168.77.1/24", "r0"), (&ctln, "192.168.77.2/24", "c0")] {
        ip(&[
            "-n",
            &lan,
            "link",
            "add",
            &format!("v{name}"),
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            peer,
        ]);
        ip(&["-n", &lan, "link", "set", &format!("v{name}"), "master", "br0", "up"]);
        ip(&["-n", peer, "addr", "add", addr, "dev", name]);
        ip(&["-n", peer, "link", "set", name, "up"]);
    }
    ip(&["-n", &lan, "tuntap", "add", "tap0", "mode", "tap"]);
    ip(&["-n", &lan, "link", "set", "tap0", "master", "br0", "up"]);

    // The LAN's own DHCP server: addresses only, no boot options, no DNS.
    let leases = tmp.path().join("dnsmasq.leases");
    let mut dnsmasq = muster_tests::Proc::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &rtr,
                "dnsmasq",
                "--no-daemon",
                "--user=root",
                "--port=0",
                "--no-resolv",
                "--no-hosts",
            ])
            .args([
                "--interface=r0",
                "--bind-interfaces",
                "--dhcp-range=192.168.77.100,192.168.77.150,255.255.255.0,1h",
                "--dhcp-option=3,192.168.77.1",
                &format!("--dhcp-leasefile={}", leases.display()),
                "--log-dhcp",
            ]),
        tmp.path().join("dnsmasq.log"),
    )
    .unwrap();

    // The controller, in its namespace, with ProxyDHCP on c0 and TFTP.
    let data = tmp.path().join("controller");
    muster_lab::muster::init_controller(
        &data,
        &["--san", "192.168.77.2", "--endpoint", "https://192.168.77.2:7443"],
    )
    .unwrap();
    let mut ctl = muster_tests::Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &ctln])
            .arg(bin("muster-controller").unwrap())
            .args([
                "serve",
                "--grpc-listen",
                "192.168.77.2:7443",
                "--http-listen",
                "192.168.77.2:80",
                "--data-dir",
            ])
            .arg(&data)
            .args(["--boot-assets", bundle.to_str().unwrap(), "--boot-kernel-args", "console=ttyS0 panic=-1"])
            .args(["--boot-controller-url", "https://192.168.77.2:7443", "--proxy-dhcp", "c0", "--tftp"]),
        tmp.path().join("controller.log"),
    )
    .unwrap();
    let cli = |args: &[&str]| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &ctln])
            .arg(bin("muster").unwrap())
            .arg("--musterconfig")
            .arg(data.join("musterconfig"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "muster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the controller", Duration::from_secs(30), || {
        assert!(ctl.alive(), "controller exited: {}", ctl.log_text());
        data.join("ports.json").exists().then_some(())
    })
    .unwrap();

    // TFTP, with a real client from the router's namespace.
    let got = tmp.path().join("undionly.kpxe");
    let out = Command::new("ip")
        .args(["netns", "exec", &rtr, "busybox", "tftp", "-g", "-r", "undionly.kkpxe", "-l"])
        .arg(&got)
        .arg("192.168.77.2")
        .output()
        .unwrap();
    assert!(out.status.success(), "tftp: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read("/usr/lib/ipxe/undionly.kkpxe").unwrap());

    // A VM registered by its MAC boots on the LAN through Muster and takes its registration:
    // the controller confirms the MAC from its own neighbour table (it trusts no network here).
    let m = mac(4, 1);
    cli(&[
        "machine",
        "register",
        "--mac",
        &m,
        "--hostname",
        "vm-lan",
        "--role",
        "worker",
        "--cluster",
        "lan",
    ]);
    let mut spec = VmSpec::new("vm-proxy", &m, Boot::Network, Net::Tap { ifname: "tap0".into() });
    spec.netns = Some(lan.clone());
    let mut vm = Vm::start(&spec, tmp.path()).unwrap();
    let start = std::time::Instant::now();
    loop {
        vm.check().unwrap();
        assert!(ctl.alive(), "controller exited: {}", ctl.log_text());
        let v: serde_json::Value = serde_json::from_str(&cli(&["machines", "-o", "json"])).unwrap();
        let found =
            v.as_array().unwrap().iter().find(|x| {
                x["macs"].as_array().is_some_and(|a| a.iter().any(|y| y.as_str() == Some(m.as_str())))
            });
        if let Some(x) = found {
            assert_ne!(x["state"], "pending", "the registration was not given: {x}\n{}", ctl.log_text());
            if x["state"] == "ready" && x["hostname"] == "vm-lan" && x["role"] == "worker" {
                break;
            }
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "the VM did not enroll; serial log {}; dnsmasq: {}",
            vm.serial_log.display(),
            dnsmasq.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(ctl.log_text().contains("evidence=\"neighbour table\""), "{}", ctl.log_text());
    // Its address came from the LAN's DHCP server, not from Muster.
    assert!(
        std::fs::read_to_string(&leases).unwrap_or_default().contains(&m),
        "dnsmasq leased it an address"
    );
    vm.kill();
    ctl.kill();
    dnsmasq.kill();
    drop(ns);
}
