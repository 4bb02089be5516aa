//! `muster lab status`: every process the lab recorded in `lab.json` (alive and still ours, by
//! its PID), every namespace it made (present under /run/netns) and its endpoints as this
//! machine reaches them (answering now or not), with what is down named. Exits 1 unless the
//! whole lab is up.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use muster_lab::process::is_ours;

use crate::lab::{read_lab, LabFile, Provisioner};
use crate::output::{render, Output};
use crate::views::{
    lab_status_text, LabEndpointView, LabNamespaceView, LabProcessView, LabState, LabStatusView,
};
use crate::Exit;

/// How long an endpoint may take to answer.
const PROBE: Duration = Duration::from_secs(2);

pub(crate) async fn show(dir: &Path, output: Output) -> Result<()> {
    let v = match read_lab(dir) {
        Some(lab) => status(dir, &lab).await,
        None => LabStatusView {
            dir: dir.display().to_string(),
            state: LabState::None,
            provisioner: None,
            isolation: None,
            processes: Vec::new(),
            namespaces: Vec::new(),
            endpoints: Vec::new(),
            musterconfig: None,
            down: Vec::new(),
        },
    };
    match output {
        Output::Table => out!("{}", lab_status_text(&v)),
        o => out!("{}", render(&v, o)?),
    }
    if v.state == LabState::Running {
        Ok(())
    } else {
        Err(Exit(1).into())
    }
}

async fn status(dir: &Path, lab: &LabFile) -> LabStatusView {
    let proc =
        |name: String, kind: &'static str, pid: u32| LabProcessView { name, kind, pid, alive: is_ours(pid) };
    let mut processes = Vec::new();
    processes.extend(lab.supervisor_pid.map(|p| proc("supervisor".into(), "supervisor", p)));
    processes.push(proc("controller".into(), "controller", lab.controller_pid));
    processes.extend(lab.relay_pid.map(|p| proc("relay".into(), "relay", p)));
    let node_kind = match lab.provisioner {
        Provisioner::Process => "agent",
        Provisioner::Qemu => "vm",
    };
    for (name, pid) in lab.node_names().into_iter().zip(&lab.agent_pids) {
        processes.push(proc(name, node_kind, *pid));
    }
    processes.extend(lab.monitoring.as_ref().map(|m| proc("monitoring".into(), "monitoring", m.pid)));
    let namespaces: Vec<LabNamespaceView> = lab
        .netns
        .iter()
        .map(|n| LabNamespaceView { name: n.clone(), exists: Path::new("/run/netns").join(n).exists() })
        .collect();
    let mut endpoints = vec![
        LabEndpointView {
            name: "controller-grpc",
            url: format!("https://{}", lab.grpc),
            reachable: connects(&lab.grpc).await,
        },
        LabEndpointView {
            name: "controller-http",
            url: format!("http://{}", lab.http),
            reachable: answers(&lab.http, "/healthz").await,
        },
    ];
    if let Some(m) = &lab.monitoring {
        endpoints.push(LabEndpointView {
            name: "monitoring-ui",
            url: m.ui.clone(),
            reachable: answers(&m.http, "/health").await,
        });
    }
    let down: Vec<String> = processes
        .iter()
        .filter(|p| !p.alive)
        .map(|p| p.name.clone())
        .chain(namespaces.iter().filter(|n| !n.exists).map(|n| n.name.clone()))
        .collect();
    let state = if down.is_empty() {
        LabState::Running
    } else if processes.iter().any(|p| p.alive) {
        LabState::Degraded
    } else {
        LabState::Stopped
    };
    let isolation = match lab.provisioner {
        Provisioner::Qemu => "qemu",
        Provisioner::Process if lab.netns.is_empty() => "none",
        Provisioner::Process => "netns",
    };
    LabStatusView {
        dir: dir.display().to_string(),
        state,
        provisioner: Some(format!("{:?}", lab.provisioner).to_lowercase()),
        isolation: Some(isolation.to_owned()),
        processes,
        namespaces,
        endpoints,
        musterconfig: Some(lab.musterconfig.display().to_string()),
        down,
    }
}

/// Whether a TCP connection to `addr` opens now.
async fn connects(addr: &str) -> bool {
    let Ok(addr) = addr.parse::<SocketAddr>() else { return false };
    matches!(tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// Whether `GET path` on `addr` answers 200 now.
async fn answers(addr: &str, path: &str) -> bool {
    let Ok(addr) = addr.parse::<SocketAddr>() else { return false };
    matches!(
        tokio::time::timeout(PROBE, muster_lab::http::http_get(addr, path, &[])).await,
        Ok(Ok(r)) if r.status == 200
    )
}
