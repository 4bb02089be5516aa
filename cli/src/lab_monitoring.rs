//! `muster lab up --monitoring`: a VictoriaMetrics single-node (Debian's `victoria-metrics`) that
//! scrapes the lab with the README's scrape config, verbatim (only the controller's address
//! swapped in and a short scrape interval put in front): the controller's `/metrics`, and every
//! agent found through the controller's `/sd/prometheus`.
//!
//! Its UI is `/vmui/` where the build has one; Debian's build has none, and then the lab points
//! at its index page (targets, service discovery, the query API).
//!
//! Where it runs: with namespaces, in the lab's router namespace (the agents' metrics endpoints
//! are on the lab bridge, reachable only from inside), its UI relayed to 127.0.0.1 like the
//! controller's ports; without, on 127.0.0.1. Its scrape config, data and log live in
//! `LAB_DIR/monitoring`, so `lab down` removes them with the lab dir (`--keep` keeps them).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muster_lab::process::{describe_exit, spawn, tail};
use muster_lab::victoriametrics;

use crate::lab::MonitoringFile;

/// The README's scrape config (section Monitoring), verbatim: a test checks the README still has
/// exactly this text; the test suite runs that through promtool and VictoriaMetrics' dry runs.
pub(crate) const README_SCRAPE_CONFIG: &str = "\
scrape_configs:
  - job_name: muster-controller
    static_configs:
      - targets: [\"controller.example:7480\"]
  - job_name: muster-agents
    http_sd_configs:
      - url: http://controller.example:7480/sd/prometheus
";
/// The controller's address in [`README_SCRAPE_CONFIG`].
const README_CONTROLLER: &str = "controller.example:7480";
/// How often the lab is scraped, and `/sd/prometheus` re-read.
const INTERVAL: Duration = Duration::from_secs(5);
/// How long VictoriaMetrics may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The scrape config for a controller whose HTTP listener VictoriaMetrics reaches at
/// `controller_http`.
pub(crate) fn scrape_config(controller_http: &str) -> String {
    format!(
        "global:\n  scrape_interval: {}s\n{}",
        INTERVAL.as_secs(),
        README_SCRAPE_CONFIG.replace(README_CONTROLLER, controller_http)
    )
}

/// Where the lab's VictoriaMetrics runs.
pub(crate) struct Placement {
    /// The network namespace it runs in (`ip netns exec NS`), or `None` for this machine's.
    pub netns: Option<String>,
    /// Its listen address there; `None`: a free port on 127.0.0.1.
    pub listen: Option<String>,
    /// Its address as this machine reaches it (the relay's); `None`: the listen address.
    pub host: Option<String>,
    /// The controller's HTTP address as VictoriaMetrics reaches it.
    pub controller_http: String,
}

/// Starts VictoriaMetrics for the lab in `dir` and waits until it answers `/health` on its
/// host address; returns the process and what `lab.json` records of it.
pub(crate) async fn start(dir: &Path, bin: &Path, place: &Placement) -> Result<(Child, MonitoringFile)> {
    let mdir = dir.join("monitoring");
    std::fs::create_dir_all(&mdir).with_context(|| format!("creating {}", mdir.display()))?;
    let config = mdir.join(victoriametrics::CONFIG_FILE);
    muster_util::write_atomic(&config, scrape_config(&place.controller_http).as_bytes(), 0o644)
        .with_context(|| format!("writing {}", config.display()))?;
    let log = mdir.join("victoria-metrics.log");
    // A free port on loopback may be taken between choosing and binding it: choose again then.
    let tries = if place.listen.is_some() { 1 } else { 3 };
    let mut last = None;
    for _ in 0..tries {
        let listen = match &place.listen {
            Some(l) => l.clone(),
            None => free_loopback_port().context("choosing a port for VictoriaMetrics")?,
        };
        let host = place.host.clone().unwrap_or_else(|| listen.clone());
        let mut args = victoriametrics::args(&listen, &mdir, INTERVAL);
        let (program, args) = match &place.netns {
            Some(ns) => {
                let mut a =
                    vec!["netns".to_owned(), "exec".to_owned(), ns.clone(), bin.display().to_string()];
                a.append(&mut args);
                (Path::new("ip").to_path_buf(), a)
            }
            None => (bin.to_path_buf(), args),
        };
        let mut child = spawn(&program, &args, &log)?;
        match wait_healthy(&host, &mut child, &log).await {
            Ok(()) => {
                let m = MonitoringFile {
                    pid: child.id(),
                    ui: ui_url(&host).await,
                    http: host,
                    dir: mdir.clone(),
                };
                return Ok((child, m));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let taken = tail(&log).contains("address already in use");
                last = Some(e);
                if !taken {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("VictoriaMetrics did not start")))
}

/// The UI: `/vmui/` where the build has it; Debian's (1.79 "+ds") leaves it out, and its index
/// page (`/`) is what there is: links to the targets, service discovery and the query API.
async fn ui_url(host: &str) -> String {
    let has_vmui = match host.parse::<SocketAddr>() {
        Ok(addr) => matches!(
            tokio::time::timeout(Duration::from_secs(5), muster_lab::http::http_get(addr, "/vmui/", &[])).await,
            Ok(Ok(r)) if r.status == 200
        ),
        Err(_) => false,
    };
    if has_vmui {
        format!("http://{host}/vmui/")
    } else {
        format!("http://{host}/")
    }
}

fn free_loopback_port() -> std::io::Result<String> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

/// Waits until `GET /health` on `host` answers 200, failing at once if the process exits.
async fn wait_healthy(host: &str, child: &mut Child, log: &Path) -> Result<()> {
    let addr: SocketAddr = host.parse().with_context(|| format!("VictoriaMetrics' address {host:?}"))?;
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("VictoriaMetrics {} on start:\n{}", describe_exit(status), tail(log));
        }
        let probe =
            tokio::time::timeout(Duration::from_secs(2), muster_lab::http::http_get(addr, "/health", &[]));
        if let Ok(Ok(r)) = probe.await {
            if r.status == 200 {
                return Ok(());
            }
        }
        if start.elapsed() > START_TIMEOUT {
            bail!(
                "VictoriaMetrics did not answer http://{host}/health within {START_TIMEOUT:?}:\n{}",
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's one ```yaml block with `scrape_configs:` and `/sd/prometheus`.
    fn readme_scrape_config() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let md = std::fs::read_to_string(&path).unwrap();
        let blocks: Vec<&str> = md
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split_once("```").map(|(body, _)| body))
            .filter(|b| b.contains("scrape_configs:") && b.contains("/sd/prometheus"))
            .collect();
        assert_eq!(blocks.len(), 1, "{}: expected one scrape config with /sd/prometheus", path.display());
        blocks[0].to_owned()
    }

    #[test]
    fn the_lab_scrapes_with_the_readmes_config_verbatim() {
        assert_eq!(README_SCRAPE_CONFIG, readme_scrape_config(), "keep the lab's copy the README's text");
        let c = scrape_config("10.77.0.1:7480");
        assert!(c.starts_with("global:\n  scrape_interval: 5s\nscrape_configs:\n"), "{c}");
        assert!(c.contains("url: http://10.77.0.1:7480/sd/prometheus"), "{c}");
        assert!(c.contains("targets: [\"10.77.0.1:7480\"]"), "{c}");
        assert!(!c.contains("controller.example"), "{c}");
    }
}
