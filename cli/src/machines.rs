//! Machines: list and show them, register them ahead of network boot, give them roles, approve,
//! revoke and delete them, and see their health.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::Subcommand;
use muster_machinery::model::Role;
use muster_proto::pb;
use serde::Serialize;

use crate::output::{escape, render, Output};
use crate::views::{
    health_table, machine_detail, machines_table, registrations_table, HealthView, MachineView,
    RegistrationView,
};
use crate::{parse_cluster, parse_role, read_input, Ctx};

/// What an empty fleet looks like in a table (on stderr, like kubectl's "No resources found").
const NO_MACHINES: &str =
    "no machines yet (create a join token with `muster token create` and start agents with it)";

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Output format: a table for people, json or yaml for scripts.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
    /// Keep watching (every 2 s) until Ctrl-C: the table is redrawn; with -o json|yaml every
    /// change is printed as one event.
    ///
    /// With -o json each event is one compact JSON line (NDJSON), as `kubectl get --watch
    /// --output-watch-events -o json` prints them: {"type":"ADDED|MODIFIED|DELETED",
    /// "object":MACHINE}, MACHINE as in `muster machines -o json`. Every machine is ADDED first;
    /// a heartbeat alone (only last_seen moved) is not a change. With -o yaml the same events
    /// are YAML documents, each after a `---` line.
    #[arg(short, long)]
    watch: bool,
}

/// One change in `machines --watch -o json|yaml`.
#[derive(Debug, Serialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    object: &'a serde_json::Value,
}

/// What `--watch -o json|yaml` has printed so far: each machine as last shown.
#[derive(Default)]
struct Watched {
    shown: BTreeMap<String, serde_json::Value>,
}

impl Watched {
    /// The events that bring the watcher from what it was shown to `now` (in list order,
    /// deletions last), and remembers `now`.
    fn events(&mut self, now: Vec<serde_json::Value>) -> Vec<(&'static str, serde_json::Value)> {
        // Heartbeats move last_seen all the time; they are not a change of the machine.
        let sans_heartbeat = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("last_seen");
            }
            v
        };
        let mut events = Vec::new();
        let mut next = BTreeMap::new();
        for m in now {
            let id = m["id"].as_str().unwrap_or_default().to_owned();
            match self.shown.remove(&id) {
                None => events.push(("ADDED", m.clone())),
                Some(before) if sans_heartbeat(&before) != sans_heartbeat(&m) => {
                    events.push(("MODIFIED", m.clone()))
                }
                Some(_) => {}
            }
            next.insert(id, m);
        }
        for (_, gone) in std::mem::take(&mut self.shown) {
            events.push(("DELETED", gone));
        }
        self.shown = next;
        events
    }
}

/// One watch event as `-o json` (one compact line) or `-o yaml` (a document after `---`).
fn watch_line(kind: &'static str, object: &serde_json::Value, o: Output) -> Result<String> {
    let e = WatchEvent { kind, object };
    Ok(match o {
        Output::Json => serde_json::to_string(&e)? + "\n",
        Output::Yaml => format!("---\n{}", serde_saphyr::to_string(&e)?),
        Output::Table => String::new(),
    })
}

#[derive(Subcommand, Debug)]
pub enum MachineCmd {
    /// Show a machine with its full inventory.
    Get {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Pre-register a machine that will network-boot: its first enrollment (even with a public
    /// boot token) is accepted and takes this hostname, role, cluster and config. The
    /// registration is used up then; a second machine with the same MAC lands pending, flagged.
    Register {
        /// The MAC address it boots from (52:54:00:12:34:56).
        #[arg(long)]
        mac: String,
        /// Its SMBIOS UUID too, if known: both must match.
        #[arg(long)]
        uuid: Option<String>,
        /// The hostname it gets.
        #[arg(long)]
        hostname: Option<String>,
        /// Its role (needs --cluster).
        #[arg(long, value_parser = parse_role, requires = "cluster")]
        role: Option<Role>,
        /// Its cluster (needs --role).
        #[arg(long, value_parser = parse_cluster, requires = "role")]
        cluster: Option<String>,
        /// Its own config layer, a MachineConfig YAML file (- for standard input).
        #[arg(short, long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Boot it from its local disk: its boot script says `exit` instead of booting Muster.
        #[arg(long)]
        boot_local: bool,
        /// Replace an existing registration of the MAC.
        #[arg(long)]
        force: bool,
    },
    /// List registrations, used and unused.
    Registrations {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a registration by MAC.
    Unregister {
        /// The registered MAC address.
        mac: String,
    },
    /// Install a node OS image to one of the machine's disks; the machine then boots from it.
    ///
    /// The machine must be approved and running the network-booted live image. Its agent
    /// downloads the image from the controller (SHA-256 checked, resumed after a broken
    /// connection), writes it, reads it back and compares, writes the partition table last and
    /// the machine's identity into it, reports `installed` and reboots. From then on its boot
    /// script says `exit`, so the firmware boots the disk, and it comes back as the same
    /// machine. Nothing half-written is ever booted. Follow it with `muster machine get`.
    ///
    /// Disk selectors: a device path (/dev/sda, /dev/disk/by-id/...), `only-non-removable`,
    /// or conditions joined by commas that must all hold: serial=S, model=M (M* for a prefix),
    /// name=sda, size>=100G, size<=2T. A selector matching no disk or several is refused, as is
    /// a disk smaller than the image.
    Install {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// The target disk (see above).
        #[arg(long, value_name = "SELECTOR")]
        disk: String,
        /// The image, as `muster-controller image add` named it (`muster machine images`).
        #[arg(long, value_name = "NAME")]
        image: String,
    },
    /// Undo an install: the machine's agent erases what it installed on its install disk (and
    /// no other disk), forgets its identity and reboots into network boot, where it shows up
    /// again as a new machine (pending, or as its MAC's registration says).
    Reset {
        /// Machine id, unique id prefix, hostname or MAC.
        id: String,
        /// Erase the disk's signatures and partition tables (else only the machine's identity
        /// on it goes, and the next install overwrites the rest).
        #[arg(long)]
        wipe: bool,
    },
    /// List the node OS images the controller serves for install to disk.
    Images {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// The verbs that act on one machine.
#[derive(Debug, Clone)]
pub enum Verb {
    Assign { id: String, role: Role, cluster: String, force: bool },
    Approve { id: String },
    Revoke { id: String },
    Delete { id: String },
}

pub async fn list(ctx: &Ctx, args: ListArgs) -> Result<()> {
    let mut a = ctx.admin().await?;
    let mut watched = Watched::default();
    loop {
        let ms = muster_cli::list::all_machines(&mut a.client).await.map_err(|s| a.explain(s))?;
        match args.output {
            Output::Table => {
                if args.watch {
                    out!(
                        "\x1b[2J\x1b[H{} machines at {}\n\n",
                        ms.len(),
                        humantime::format_rfc3339_seconds(SystemTime::now())
                    );
                }
                if ms.is_empty() && !args.watch {
                    eprintln!("{NO_MACHINES}");
                } else {
                    out!("{}", machines_table(&ms, SystemTime::now()));
                }
            }
            o if args.watch => {
                let now = ms
                    .iter()
                    .map(|m| serde_json::to_value(MachineView::new(m, false)))
                    .collect::<Result<Vec<_>, _>>()?;
                for (kind, object) in watched.events(now) {
                    out!("{}", watch_line(kind, &object, o)?);
                }
            }
            o => {
                let v: Vec<MachineView> = ms.iter().map(|m| MachineView::new(m, false)).collect();
                out!("{}", render(&v, o)?);
            }
        }
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

impl MachineCmd {
    pub async fn run(self, ctx: &Ctx) -> Result<()> {
        let mut a = ctx.admin().await?;
        match self {
            MachineCmd::Get { id, output } => {
                let m = a
                    .client
                    .get_machine(pb::MachineRef { query: id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                match output {
                    Output::Table => out!("{}", machine_detail(&m, SystemTime::now())),
                    o => out!("{}", render(&MachineView::new(&m, true), o)?),
                }
            }
            MachineCmd::Register { mac, uuid, hostname, role, cluster, file, boot_local, force } => {
                let yaml = match &file {
                    Some(f) => read_input(f)?,
                    None => String::new(),
                };
                let registration = pb::Registration {
                    mac,
                    uuid: uuid.unwrap_or_default(),
                    hostname: hostname.unwrap_or_default(),
                    role: role.map_or(pb::Role::Unspecified, pb::Role::from).into(),
                    cluster: cluster.unwrap_or_default(),
                    yaml,
                    boot_local,
                    ..Default::default()
                };
                let r = a
                    .client
                    .register_machine(pb::RegisterMachineRequest { registration: Some(registration), force })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!(
                    "registered {}{}: its first enrollment is accepted{}",
                    r.mac,
                    if r.hostname.is_empty() {
                        String::new()
                    } else {
                        format!(" as {}", escape(&r.hostname))
                    },
                    if r.boot_local { " (boots from its local disk)" } else { "" }
                );
            }
            MachineCmd::Registrations { output } => {
                let regs = a
                    .client
                    .list_registrations(pb::ListRegistrationsRequest {})
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner()
                    .registrations;
                let view: Vec<RegistrationView<'_>> = regs.iter().map(RegistrationView::new).collect();
                match output {
                    Output::Table if view.is_empty() => {
                        eprintln!("no registrations (add one with `muster machine register --mac M`)")
                    }
                    Output::Table => out!("{}", registrations_table(&view)),
                    o => out!("{}", render(&view, o)?),
                }
            }
            MachineCmd::Install { id, disk, image } => {
                let m = a
                    .client
                    .install(pb::InstallRequest { query: id, image, disk })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!(
                    "machine {} ({}): installing {} to {}{}",
                    m.id,
                    escape(&m.hostname),
                    escape(&m.install_image),
                    escape(&m.install_disk),
                    if m.connected { "" } else { " when its agent connects" }
                );
            }
            MachineCmd::Reset { id, wipe } => {
                let m = a
                    .client
                    .reset(pb::ResetRequest { query: id, wipe })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!(
                    "machine {} ({}): {} {}; it reboots into network boot and shows up as a new machine",
                    m.id,
                    escape(&m.hostname),
                    if wipe { "wiping" } else { "forgetting the install on" },
                    escape(&m.install_disk)
                );
            }
            MachineCmd::Images { output } => {
                let images = a
                    .client
                    .list_images(pb::ListImagesRequest {})
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner()
                    .images;
                #[derive(serde::Serialize)]
                struct ImageView<'a> {
                    name: &'a str,
                    size: u64,
                    sha256: &'a str,
                    raw_size: u64,
                    raw_sha256: &'a str,
                    added_unix_ms: i64,
                }
                let view: Vec<ImageView<'_>> = images
                    .iter()
                    .map(|i| ImageView {
                        name: &i.name,
                        size: i.size,
                        sha256: &i.sha256,
                        raw_size: i.raw_size,
                        raw_sha256: &i.raw_sha256,
                        added_unix_ms: i.added_unix_ms,
                    })
                    .collect();
                match output {
                    Output::Table if view.is_empty() => {
                        eprintln!("no images (on the controller's host: `muster-controller image add FILE --name NAME`)")
                    }
                    Output::Table => {
                        out!("{:<20} {:>14} {:>14}  SHA256\n", "NAME", "DOWNLOAD", "WRITES");
                        for i in &view {
                            out!("{:<20} {:>14} {:>14}  {}\n", escape(i.name), i.size, i.raw_size, i.sha256);
                        }
                    }
                    o => out!("{}", render(&view, o)?),
                }
            }
            MachineCmd::Unregister { mac } => {
                let r = a
                    .client
                    .delete_registration(pb::MachineRef { query: mac })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("registration {} removed", r.id);
            }
        }
        Ok(())
    }
}

impl Verb {
    pub async fn run(self, ctx: &Ctx) -> Result<()> {
        let mut a = ctx.admin().await?;
        match self {
            Verb::Assign { id, role, cluster, force } => {
                let req = pb::AssignRequest { query: id, role: pb::Role::from(role).into(), cluster, force };
                let m = a.client.assign(req).await.map_err(|s| a.explain(s))?.into_inner();
                outln!(
                    "machine {} ({}) assigned role {role} in cluster {}",
                    m.id,
                    escape(&m.hostname),
                    escape(&m.cluster)
                );
            }
            Verb::Approve { id } => {
                let m = a
                    .client
                    .approve(pb::MachineRef { query: id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("machine {} ({}) approved", m.id, escape(&m.hostname));
            }
            Verb::Revoke { id } => {
                let m = a
                    .client
                    .revoke(pb::MachineRef { query: id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!(
                    "machine {} ({}) revoked; it must enroll again with a new token",
                    m.id,
                    escape(&m.hostname)
                );
            }
            Verb::Delete { id } => {
                let r = a
                    .client
                    .delete(pb::MachineRef { query: id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("machine {} deleted", r.id);
            }
        }
        Ok(())
    }
}

/// `muster health [ID]`.
pub async fn health(ctx: &Ctx, id: Option<String>, output: Output) -> Result<()> {
    let mut a = ctx.admin().await?;
    let ms = match id {
        Some(id) => vec![a
            .client
            .get_machine(pb::MachineRef { query: id })
            .await
            .map_err(|s| a.explain(s))?
            .into_inner()],
        None => muster_cli::list::all_machines(&mut a.client).await.map_err(|s| a.explain(s))?,
    };
    match output {
        Output::Table if ms.is_empty() => eprintln!("{NO_MACHINES}"),
        Output::Table => out!("{}", health_table(&ms)),
        o => out!("{}", render(&ms.iter().map(HealthView::new).collect::<Vec<_>>(), o)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn watch_events_are_changes_only() {
        let mut w = Watched::default();
        let a = json!({"id": "a", "role": null, "last_seen": "2026-01-01T00:00:00Z"});
        let b = json!({"id": "b", "role": null, "last_seen": null});
        let kinds = |ev: Vec<(&'static str, serde_json::Value)>| {
            ev.into_iter().map(|(k, v)| format!("{k} {}", v["id"].as_str().unwrap())).collect::<Vec<_>>()
        };
        assert_eq!(kinds(w.events(vec![a.clone(), b.clone()])), ["ADDED a", "ADDED b"]);
        assert!(w.events(vec![a.clone(), b.clone()]).is_empty(), "nothing changed");
        let beat = json!({"id": "a", "role": null, "last_seen": "2026-01-01T00:00:05Z"});
        assert!(w.events(vec![beat, b.clone()]).is_empty(), "a heartbeat alone is not a change");
        let assigned = json!({"id": "a", "role": "worker", "last_seen": "2026-01-01T00:00:07Z"});
        let ev = w.events(vec![assigned.clone()]);
        assert_eq!(kinds(ev.clone()), ["MODIFIED a", "DELETED b"]);
        assert_eq!(ev[0].1, assigned, "the machine as it is now");
        assert_eq!(ev[1].1, b, "a deleted machine as it was last shown");
    }

    #[test]
    fn watch_json_is_one_compact_line_per_event_and_yaml_documents_are_separated() {
        let m = json!({"id": "a", "hostname": "x\ny", "labels": {"k": "v"}});
        let line = watch_line("ADDED", &m, Output::Json).unwrap();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, json!({"type": "ADDED", "object": m}));
        let two = watch_line("ADDED", &m, Output::Yaml).unwrap()
            + &watch_line("DELETED", &m, Output::Yaml).unwrap();
        assert!(two.starts_with("---\n"), "{two}");
        let docs: Vec<&str> = two.split("---\n").filter(|d| !d.is_empty()).collect();
        assert_eq!(docs.len(), 2, "{two}");
        for (doc, kind) in docs.iter().zip(["ADDED", "DELETED"]) {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            assert_eq!(v, json!({"type": kind, "object": m}), "{doc}");
        }
    }
}
