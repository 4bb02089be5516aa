//! The Debian packages as an operator gets them: `muster image deb` builds `muster-agent` and
//! `muster-controller`; lintian finds nothing, not even info tags (each override says why);
//! the units pass `systemd-analyze verify` with every directive known; the maintainer scripts
//! are valid shell and do what debhelper's would (enable, start, stop, purge); the controller's
//! unit runs as its own user, sandboxed, with its state in /var/lib/muster.
//!
//! Nothing is installed on this machine: packages are unpacked under a temp dir. Installing
//! them on a node with systemd is the node OS image's test (issue #14).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use muster_tests::bin;

fn tool(name: &str, package: &str) -> PathBuf {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    assert!(found.status.success(), "{name} not found: install it with `apt-get install {package}`");
    PathBuf::from(String::from_utf8(found.stdout).unwrap().trim())
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Unpacks `deb` (files and control area) into `dir`.
fn unpack(deb: &Path, dir: &Path) {
    assert!(run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(dir)).0, "dpkg-deb -R {}", deb.display());
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn packages_build_pass_lintian_and_their_units_verify() {
    let lintian = tool("lintian", "lintian");
    let analyze = tool("systemd-analyze", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("debian");
    let (ok, stdout, stderr) = run(Command::new(bin("muster").unwrap())
        .env("TMPDIR", tmp.path())
        .args(["image", "deb", "--version", "1.2.3", "--agent"])
        .arg(muster_tests::agent_bin().unwrap())
        .arg("--out")
        .arg(&out));
    assert!(ok, "muster image deb: {stderr}");
    let agent = out.join("muster-agent_1.2.3_amd64.deb");
    let controller = out.join("muster-controller_1.2.3_amd64.deb");
    assert!(
        stdout.contains(&agent.display().to_string()) && stdout.contains(&controller.display().to_string())
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only the two packages, no staging dirs: {leftovers:?}");

    // lintian: nothing at all (errors, warnings, info), overrides applied.
    // (Its scratch files go into the test's temp dir, not /tmp.)
    let (ok, report, err) = run(Command::new(&lintian)
        .env("TMPDIR", tmp.path())
        .args(["--tag-display-limit", "0", "--display-info"])
        .arg(&agent)
        .arg(&controller));
    let tags: Vec<&str> = report.lines().filter(|l| l.len() > 2 && l.as_bytes()[1] == b':').collect();
    assert!(ok && tags.is_empty(), "lintian: {tags:#?}\n{err}");

    for (deb, name) in [(&agent, "muster-agent"), (&controller, "muster-controller")] {
        let root = tmp.path().join(name);
        unpack(deb, &root);
        let control = read(&root.join("DEBIAN/control"));
        assert!(control.contains(&format!("Package: {name}\nVersion: 1.2.3\n")), "{control}");
        // Binaries are stripped and run.
        let exe = root.join("usr/bin").join(name);
        let (ok, help, _) = run(Command::new(&exe).arg("--help"));
        assert!(ok && help.contains("Usage:"), "{name} --help");
        let (_, file, _) = run(Command::new("readelf").arg("-S").arg(&exe));
        assert!(!file.contains(".symtab"), "{name} is stripped");
        // The unit, with ExecStart pointed at the unpacked binary (nothing under /usr/bin here):
        // systemd knows every directive and can run the command.
        let unit_text = read(&root.join(format!("lib/systemd/system/{name}.service")));
        let unit = tmp.path().join(format!("{name}.service"));
        let usr_bin = format!("{}/", root.join("usr/bin").display());
        std::fs::write(&unit, unit_text.replace("/usr/bin/", &usr_bin)).unwrap();
        let (ok, vout, verr) = run(Command::new(&analyze).arg("verify").arg(&unit));
        assert!(ok && verr.trim().is_empty(), "systemd-analyze verify {name}: {vout}{verr}");
        assert!(unit_text.contains("Restart=on-failure"), "{name} restarts when it dies");
        assert!(unit_text.contains("WantedBy=multi-user.target"));
        // Maintainer scripts: valid shell; enable and start on install, stop on removal.
        for script in ["postinst", "prerm", "postrm"] {
            let p = root.join("DEBIAN").join(script);
            assert!(run(Command::new("sh").arg("-n").arg(&p)).0, "{name} {script} is not valid sh");
        }
        let postinst = read(&root.join("DEBIAN/postinst"));
        assert!(
            postinst.contains(&format!("deb-systemd-helper update-state '{name}.service'")),
            "{postinst}"
        );
        assert!(
            read(&root.join("DEBIAN/prerm")).contains(&format!("deb-systemd-invoke stop '{name}.service'"))
        );
    }

    // The controller: its own user, its state dir, sandboxed, extra arguments from a conffile.
    let root = tmp.path().join("muster-controller");
    let unit = read(&root.join("lib/systemd/system/muster-controller.service"));
    for line in [
        "User=muster",
        "StateDirectory=muster",
        "ExecStart=/usr/bin/muster-controller serve --data-dir /var/lib/muster $MUSTER_CONTROLLER_ARGS",
        "EnvironmentFile=-/etc/default/muster-controller",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "controller unit lacks {line:?}:\n{unit}");
    }
    assert!(read(&root.join("DEBIAN/conffiles")).contains("/etc/default/muster-controller"));
    let postinst = read(&root.join("DEBIAN/postinst"));
    assert!(postinst.contains("adduser --system --group"));
    // Neither enabled nor started on a fresh install (its names go into /etc/default first),
    // restarted on upgrade.
    assert!(!postinst.contains("_dh_action=start"), "{postinst}");
    assert!(
        postinst.contains("if deb-systemd-helper debian-installed 'muster-controller.service'"),
        "{postinst}"
    );
    assert!(postinst.contains("deb-systemd-invoke try-restart 'muster-controller.service'"), "{postinst}");
    assert!(read(&root.join("etc/default/muster-controller")).contains("--san"));
    assert!(root.join("usr/bin/muster").is_file(), "the CLI comes with the controller");
    // The agent's unit reads no user setting itself: the agent finds agent.env, the kernel
    // command line or fw_cfg on its own.
    let agent_unit = read(&tmp.path().join("muster-agent/lib/systemd/system/muster-agent.service"));
    assert!(agent_unit.lines().any(|l| l == "ExecStart=/usr/bin/muster-agent"), "{agent_unit}");
    // The agent is enabled and started on install (it finds its settings itself); missing
    // settings (exit 2) or a revocation (exit 3) do not restart it in a loop.
    let postinst = read(&tmp.path().join("muster-agent/DEBIAN/postinst"));
    assert!(postinst.contains("deb-systemd-invoke $_dh_action 'muster-agent.service'"), "{postinst}");
    assert!(agent_unit.lines().any(|l| l == "RestartPreventExitStatus=2 3"), "{agent_unit}");
}
