//! Debian packages of Muster's daemons, built with `dpkg-deb` from a staged tree (no debhelper
//! or cargo-deb needed): `muster-agent` (the agent, its systemd unit, restarted on failure,
//! logging to journald) and `muster-controller` (the controller and the `muster` CLI, a unit
//! that runs as the `muster` system user with systemd's sandboxing, state in `/var/lib/muster`).
//!
//! The maintainer scripts are the ones debhelper's `dh_installsystemd` (bookworm) and `adduser`
//! would write. The agent is enabled and started on install and restarted on upgrade. The
//! controller is neither enabled nor started on install (`--no-enable --no-start`): the names
//! agents reach it by (`--san`) go into `/etc/default/muster-controller` before its first start
//! makes its CA, then `systemctl enable --now muster-controller`; it is restarted on upgrade
//! when it runs. Both are stopped on removal and forgotten on purge (the controller's data dir is
//! kept: it holds the fleet's CA and state).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{gzip, io, run, Error};

/// One package: its name, the binaries it installs into `/usr/bin`, and its text files.
struct Package {
    name: &'static str,
    description: &'static str,
    depends: &'static str,
    /// (file name under /usr/bin, source binary)
    bins: Vec<(&'static str, PathBuf)>,
    /// (path, mode, contents) of the other files, conffiles among them.
    files: Vec<(&'static str, u32, String)>,
    conffiles: Vec<&'static str>,
    postinst: String,
    prerm: String,
    postrm: String,
}

/// The systemd unit of the agent.
pub const AGENT_UNIT: &str = "\
[Unit]
Description=Muster node agent (enrollment, machine config, health)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
# Settings: /etc/muster/agent.env, the kernel command line or QEMU's fw_cfg (see --help).
ExecStart=/usr/bin/muster-agent
Restart=on-failure
RestartSec=5s
# 2: its settings are missing or wrong (fix them, then restart it); 3: the machine was revoked.
RestartPreventExitStatus=2 3
Environment=RUST_LOG=info

[Install]
WantedBy=multi-user.target
";

/// The systemd unit of the controller.
pub const CONTROLLER_UNIT: &str = "\
[Unit]
Description=Muster controller (fleet state, certificates, agent API, network boot, /metrics)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=muster
Group=muster
EnvironmentFile=-/etc/default/muster-controller
ExecStart=/usr/bin/muster-controller serve --data-dir /var/lib/muster $MUSTER_CONTROLLER_ARGS
Restart=on-failure
RestartSec=5s
Environment=RUST_LOG=info
StateDirectory=muster
StateDirectoryMode=0700
UMask=0077
# DHCP (67, 4011) and TFTP (69) for network boot, bound to one interface.
AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
";

const CONTROLLER_DEFAULTS: &str = "\
# Extra arguments of `muster-controller serve` (see `muster-controller serve --help`), split at
# spaces (no quoting). The package neither enables nor starts the controller: set the names
# agents reach it by (--san, used when the data dir is initialised on the first start), then
# `systemctl enable --now muster-controller`. E.g.
#   MUSTER_CONTROLLER_ARGS=\"--san controller.lan --boot-assets /var/lib/muster/boot\"
MUSTER_CONTROLLER_ARGS=\"\"
";

/// What `dh_installsystemd` writes into postinst for `unit`: enable, then start (restart on
/// upgrade); with `enable_and_start` false (`--no-enable --no-start`), only keep an operator's
/// enablement across upgrades and restart a running unit on upgrade.
fn postinst_systemd(unit: &str, enable_and_start: bool) -> String {
    if enable_and_start {
        format!(
            r#"if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	# The following line should be removed in trixie or trixie+1
	deb-systemd-helper unmask '{unit}' >/dev/null || true
	if deb-systemd-helper --quiet was-enabled '{unit}'; then
		deb-systemd-helper enable '{unit}' >/dev/null || true
	else
		deb-systemd-helper update-state '{unit}' >/dev/null || true
	fi
fi
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_dh_action=restart
		else
			_dh_action=start
		fi
		deb-systemd-invoke $_dh_action '{unit}' >/dev/null || true
	fi
fi
"#
        )
    } else {
        format!(
            r#"if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if deb-systemd-helper debian-installed '{unit}'; then
		# The following line should be removed in trixie or trixie+1
		deb-systemd-helper unmask '{unit}' >/dev/null || true
		if deb-systemd-helper --quiet was-enabled '{unit}'; then
			# Create new symlinks, if any.
			deb-systemd-helper enable '{unit}' >/dev/null || true
		fi
	fi
	# Update the statefile to add new symlinks (if any), which need to be
	# cleaned up on purge. Also remove old symlinks.
	deb-systemd-helper update-state '{unit}' >/dev/null || true
fi
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			deb-systemd-invoke try-restart '{unit}' >/dev/null || true
		fi
	fi
fi
"#
        )
    }
}

fn prerm_systemd(unit: &str) -> String {
    format!(
        r#"#!/bin/sh
set -e
if [ -z "${{DPKG_ROOT:-}}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	deb-systemd-invoke stop '{unit}' >/dev/null || true
fi
"#
    )
}

fn postrm_systemd(unit: &str) -> String {
    format!(
        r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge '{unit}' >/dev/null || true
	fi
fi
"#
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: muster\n\n\
     Files: *\n\
     Copyright: 2026 The Muster developers\n\
     License: Apache-2.0\n \
     On Debian systems, the full text of the Apache License, Version 2.0 can be found in\n \
     /usr/share/common-licenses/Apache-2.0.\n"
        .to_owned()
}

fn changelog(name: &str, version: &str) -> String {
    format!(
        "{name} ({version}) unstable; urgency=medium\n\n  * Built from the Muster workspace.\n\n \
         -- Muster developers <muster@example.org>  Thu, 01 Jan 2026 00:00:00 +0000\n"
    )
}

/// Where the packages' binaries come from.
#[derive(Debug, Clone)]
pub struct DebOptions {
    pub out: PathBuf,
    pub agent: PathBuf,
    pub controller: PathBuf,
    pub cli: PathBuf,
    /// Package version (the workspace's by default).
    pub version: String,
    /// Build muster-agent only (`muster image os` needs nothing else).
    pub agent_only: bool,
}

/// A built package.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

fn packages(o: &DebOptions) -> Vec<Package> {
    let agent_unit = "muster-agent.service";
    let ctl_unit = "muster-controller.service";
    vec![
        Package {
            name: "muster-agent",
            description: "Muster node agent\n Runs on every node of a Muster fleet: enrolls with the controller\n \
                          over mutual TLS, applies the machine config it is given, reports\n inventory and health, and \
                          serves /metrics. Settings come from\n /etc/muster/agent.env, the kernel command line or \
                          QEMU's fw_cfg.",
            depends: "libc6 (>= 2.34)",
            bins: vec![("muster-agent", o.agent.clone())],
            files: vec![
                ("lib/systemd/system/muster-agent.service", 0o644, AGENT_UNIT.to_owned()),
            ],
            conffiles: vec![],
            postinst: format!("#!/bin/sh\nset -e\n{}", postinst_systemd(agent_unit, true)),
            prerm: prerm_systemd(agent_unit),
            postrm: postrm_systemd(agent_unit),
        },
        Package {
            name: "muster-controller",
            description: "Muster controller and CLI\n Holds a Muster fleet's state (machines, roles, configs, \
                          certificates),\n serves the agents' API, network boot and /metrics; `muster` is the\n \
                          operator's command line.",
            depends: "libc6 (>= 2.34), adduser",
            bins: vec![("muster-controller", o.controller.clone()), ("muster", o.cli.clone())],
            files: vec![
                ("lib/systemd/system/muster-controller.service", 0o644, CONTROLLER_UNIT.to_owned()),
                ("etc/default/muster-controller", 0o644, CONTROLLER_DEFAULTS.to_owned()),
            ],
            conffiles: vec!["/etc/default/muster-controller"],
            postinst: format!(
                "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n\
                 \tadduser --system --group --quiet --home /var/lib/muster --no-create-home muster\nfi\n{}",
                postinst_systemd(ctl_unit, false)
            ),
            prerm: prerm_systemd(ctl_unit),
            postrm: postrm_systemd(ctl_unit),
        },
    ]
}

fn write(path: &Path, mode: u32, contents: &[u8]) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    std::fs::write(path, contents).map_err(io(format!("writing {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", path.display())))
}

/// `md5sum`'s lines for every file under `root` (paths relative to it), as dpkg keeps them.
fn md5sums(root: &Path) -> Result<String, Error> {
    let script = "find . -type f ! -path './DEBIAN/*' -printf '%P\\0' | LC_ALL=C sort -z | xargs -0r md5sum";
    let out = run(Command::new("sh").arg("-c").arg(script).current_dir(root))?;
    String::from_utf8(out).map_err(|_| Error::Input("md5sum printed something that is not text".into()))
}

/// Builds both packages into `o.out`; returns them.
pub fn build_debs(o: &DebOptions) -> Result<Vec<Built>, Error> {
    for (what, p) in [("agent", &o.agent), ("controller", &o.controller), ("muster CLI", &o.cli)] {
        if o.agent_only && what != "agent" {
            continue;
        }
        if !p.is_file() {
            return Err(Error::Input(format!(
                "the {what} binary {} does not exist (build it first)",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(&o.out).map_err(io(format!("creating {}", o.out.display())))?;
    // The binaries are this machine's.
    let arch =
        String::from_utf8_lossy(&run(Command::new("dpkg").arg("--print-architecture"))?).trim().to_owned();
    let mut built = Vec::new();
    for pkg in packages(o) {
        if o.agent_only && pkg.name != "muster-agent" {
            continue;
        }
        let stage = tempfile::Builder::new()
            .prefix(&format!("{}-", pkg.name))
            .tempdir_in(&o.out)
            .map_err(io("creating a staging dir"))?;
        let root = stage.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the staging dir's mode"))?;
        let mut installed: u64 = 0;
        for (name, src) in &pkg.bins {
            let dst = root.join("usr/bin").join(name);
            let data = std::fs::read(src).map_err(io(format!("reading {}", src.display())))?;
            write(&dst, 0o755, &data)?;
            // Debug builds carry symbols; a package does not.
            run(Command::new("strip").args(["--strip-unneeded", "--remove-section=.comment"]).arg(&dst))?;
            installed += std::fs::metadata(&dst).map_err(io("sizing a binary"))?.len();
        }
        for (path, mode, text) in &pkg.files {
            write(&root.join(path), *mode, text.as_bytes())?;
            installed += text.len() as u64;
        }
        let doc = root.join("usr/share/doc").join(pkg.name);
        write(&doc.join("copyright"), 0o644, copyright().as_bytes())?;
        // A native package (no Debian revision): changelog.gz.
        write(
            &doc.join("changelog.gz"),
            0o644,
            &gzip(changelog(pkg.name, &o.version).as_bytes(), 9, "the changelog")?,
        )?;
        let unit = format!("lib/systemd/system/{}.service", pkg.name);
        let mut overrides = String::new();
        for (name, _) in &pkg.bins {
            overrides.push_str(&format!(
                "# `{name} --help` is its manual.\n{p}: no-manual-page [usr/bin/{name}]\n\
                 # Rust does not use the C library's fortified string functions.\n\
                 {p}: hardening-no-fortify-functions [usr/bin/{name}]\n\
                 # Words lintian finds in compiled data (symbols, tables) are not text.\n\
                 {p}: spelling-error-in-binary * [usr/bin/{name}]\n",
                p = pkg.name
            ));
        }
        overrides.push_str(&format!(
            "# A systemd service only: the nodes Muster makes run systemd.\n\
             {p}: package-supports-alternative-init-but-no-init.d-script [{unit}]\n\
             # Its manual is `--help` (no man page or URL to point at).\n\
             {p}: systemd-service-file-missing-documentation-key [{unit}]\n",
            p = pkg.name
        ));
        write(&root.join("usr/share/lintian/overrides").join(pkg.name), 0o644, overrides.as_bytes())?;
        let control = format!(
            "Package: {}\nVersion: {}\nArchitecture: {arch}\nMaintainer: Muster developers <muster@example.org>\n\
             Installed-Size: {}\nDepends: {}\nSection: admin\nPriority: optional\nHomepage: https://example.org/muster\n\
             Description: {}\n",
            pkg.name,
            o.version,
            installed.div_ceil(1024),
            pkg.depends,
            pkg.description
        );
        let debian = root.join("DEBIAN");
        write(&debian.join("md5sums"), 0o644, md5sums(root)?.as_bytes())?;
        write(&debian.join("control"), 0o644, control.as_bytes())?;
        write(&debian.join("postinst"), 0o755, pkg.postinst.as_bytes())?;
        write(&debian.join("prerm"), 0o755, pkg.prerm.as_bytes())?;
        write(&debian.join("postrm"), 0o755, pkg.postrm.as_bytes())?;
        if !pkg.conffiles.is_empty() {
            let text: String = pkg.conffiles.iter().map(|c| format!("{c}\n")).collect();
            write(&debian.join("conffiles"), 0o644, text.as_bytes())?;
        }
        let path = o.out.join(format!("{}_{}_{arch}.deb", pkg.name, o.version));
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(root)
            .arg(&path)
            .env("SOURCE_DATE_EPOCH", "946684800"))?;
        let size = std::fs::metadata(&path).map_err(io(format!("reading {}", path.display())))?.len();
        built.push(Built { name: pkg.name.to_owned(), path, size });
    }
    Ok(built)
}
