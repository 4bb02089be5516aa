//! `muster-bench-node`: the agent's own `/metrics` next to Debian's `prometheus-node-exporter`,
//! on the same machine in one run: idle RSS after 30 s, CPU time per scrape, bytes per scrape.
//! The agent runs as it does on a node: enrolled, its stream to a real controller open.
//!
//! ```sh
//! cargo build --release -p muster-bench -p muster-cli && cargo build --profile agent -p muster-agent
//! MUSTER_AGENT_BIN=target/agent/muster-agent target/release/muster-bench-node
//! ```

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use muster_bench::sys;
use muster_lab::http::http_get;
use muster_lab::muster::{start_agent, ControllerProc};
use muster_lab::process::{wait_for, Proc};

/// Compare the agent's /metrics with prometheus-node-exporter.
#[derive(Parser, Debug)]
#[command(name = "muster-bench-node", version, about)]
struct Args {
    /// Idle time before measuring RSS.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Scrapes per exporter.
    #[arg(long, default_value_t = 500)]
    scrapes: u32,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

struct Measured {
    rss_kib: u64,
    cpu_per_scrape_ms: f64,
    bytes_per_scrape: f64,
    series: usize,
}

async fn measure(name: &str, pid: u32, addr: std::net::SocketAddr, scrapes: u32) -> Result<Measured> {
    let pid = pid.to_string();
    let (rss, _) = sys::rss(&pid);
    // One warm-up scrape, then the measured ones.
    let first = http_get(addr, "/metrics", &[]).await.with_context(|| format!("scraping {name}"))?;
    let series = first.text().lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let cpu0 = sys::cpu_seconds(&pid);
    let mut bytes = 0usize;
    for _ in 0..scrapes {
        bytes += http_get(addr, "/metrics", &[]).await?.body.len();
    }
    let cpu = sys::cpu_seconds(&pid) - cpu0;
    Ok(Measured {
        rss_kib: rss / 1024,
        cpu_per_scrape_ms: cpu * 1e3 / f64::from(scrapes),
        bytes_per_scrape: bytes as f64 / f64::from(scrapes),
        series,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    muster_agent::init_crypto();
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let ctl = ControllerProc::start(&tmp.path().join("ctl"), "127.0.0.1:0", "127.0.0.1:0", &[])?;
    let token = ctl.cli_ok(&["token", "create"])?.trim().to_owned();
    let agent_port = free_port();
    let agent_listen = format!("127.0.0.1:{agent_port}");
    let agent = start_agent(&ctl, &token, &tmp.path().join("node"), &["--metrics-listen", &agent_listen])?;
    wait_for("the agent to be ready", Duration::from_secs(60), || {
        ctl.machines().ok()?.iter().any(|m| m["state"] == "ready" && m["connected"] == true).then_some(())
    })?;
    let ne_port = free_port();
    let mut ne_cmd = Command::new("prometheus-node-exporter");
    ne_cmd.arg(format!("--web.listen-address=127.0.0.1:{ne_port}"));
    let ne = Proc::spawn(&mut ne_cmd, tmp.path().join("node-exporter.log"))
        .context("prometheus-node-exporter (apt-get install prometheus-node-exporter)")?;
    eprintln!("both running; idling {} before measuring...", humantime::format_duration(args.idle));
    tokio::time::sleep(args.idle).await;
    let a = measure("muster-agent", agent.pid(), agent_listen.parse()?, args.scrapes).await?;
    let n = measure("node-exporter", ne.pid(), format!("127.0.0.1:{ne_port}").parse()?, args.scrapes).await?;
    println!("{:<28} {:>14} {:>16}", "", "muster-agent", "node-exporter");
    println!(
        "{:<28} {:>11} KiB {:>13} KiB",
        format!("idle RSS after {}", humantime::format_duration(args.idle)),
        a.rss_kib,
        n.rss_kib
    );
    println!("{:<28} {:>11.3} ms {:>13.3} ms", "CPU per scrape", a.cpu_per_scrape_ms, n.cpu_per_scrape_ms);
    println!("{:<28} {:>12.0} B {:>14.0} B", "bytes per scrape", a.bytes_per_scrape, n.bytes_per_scrape);
    println!("{:<28} {:>14} {:>16}", "series per scrape", a.series, n.series);
    println!(
        "({} scrapes each; the agent's RSS includes its open mTLS stream to the controller)",
        args.scrapes
    );
    drop(agent);
    drop(ne);
    Ok(())
}
