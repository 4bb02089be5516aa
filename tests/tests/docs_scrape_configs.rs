//! Every scrape config README.md offers (each ```yaml block with `scrape_configs:`) is accepted as
//! written by every scraper the README names for it: Prometheus (`promtool check config`),
//! VictoriaMetrics single-node and vmagent (`-promscrape.config=FILE -promscrape.config.dryRun`,
//! strict parsing, as they parse it at startup). A tool that is missing fails the test with the
//! install hint, never skips it. A control case shows the dry run really refuses what
//! VictoriaMetrics cannot start with (`refresh_interval` in `http_sd_configs`, which Prometheus
//! accepts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "apt-get install prometheus victoria-metrics (tests/run.sh installs both)";

/// The scrapers the README names for its scrape configs, and how each checks a config file
/// without starting.
const CHECKERS: &[(&str, &[&str])] = &[
    ("promtool", &["check", "config", "{}"]),
    (
        "victoria-metrics",
        &[
            "-promscrape.config={}",
            "-promscrape.config.dryRun",
            "-promscrape.config.strictParse=true",
            "-loggerLevel=ERROR",
        ],
    ),
    (
        "vmagent",
        &[
            "-promscrape.config={}",
            "-promscrape.config.dryRun",
            "-promscrape.config.strictParse=true",
            "-loggerLevel=ERROR",
        ],
    ),
];

fn readme() -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path, text)
}

/// The ```yaml (or ```yml) fenced blocks of `md` that contain `scrape_configs:`, with the line
/// number (1-based) of their opening fence. Fences of other languages are skipped whole.
fn scrape_config_blocks(md: &str) -> Vec<(usize, String)> {
    let mut blocks = vec![];
    // (line of the opening fence, whether it is yaml, body so far)
    let mut open: Option<(usize, bool, String)> = None;
    for (i, line) in md.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match open.take() {
            None if fence => {
                let lang = line.trim_start().trim_start_matches('`').trim();
                open = Some((i + 1, matches!(lang, "yaml" | "yml"), String::new()));
            }
            None => {}
            // The closing fence.
            Some((start, yaml, body)) if fence => {
                blocks.extend((yaml && body.contains("scrape_configs:")).then_some((start, body)));
            }
            Some((start, yaml, mut body)) => {
                body.push_str(line);
                body.push('\n');
                open = Some((start, yaml, body));
            }
        }
    }
    assert!(open.is_none(), "README.md: a ``` block is never closed");
    blocks
}

/// Runs `tool` on `file` (in `cwd`, so nothing it might write lands elsewhere); its output when
/// it refuses the file. Panics with the install hint when the tool is not installed.
fn check(tool: &str, args: &[&str], file: &Path, cwd: &Path) -> Result<(), String> {
    let args: Vec<String> = args.iter().map(|a| a.replace("{}", &file.display().to_string())).collect();
    let out = match Command::new(tool).args(&args).current_dir(cwd).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run `{tool}` ({e}): install it with `{INSTALL_HINT}`"),
    };
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{tool} {}` refused it ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn every_readme_scrape_config_passes_promtool_victoriametrics_and_vmagent() {
    let (path, md) = readme();
    let blocks = scrape_config_blocks(&md);
    assert!(
        blocks.iter().any(|(_, b)| b.contains("/sd/prometheus")),
        "{} offers no ```yaml scrape config using /sd/prometheus: the docs changed shape, update this test",
        path.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut refused = vec![];
    for (line, body) in &blocks {
        let file = tmp.path().join(format!("readme-line-{line}.yml"));
        std::fs::write(&file, body).unwrap();
        for (tool, args) in CHECKERS {
            if let Err(e) = check(tool, args, &file, tmp.path()) {
                refused.push(format!("README.md:{line}: {e}\n--- the config ---\n{body}"));
            }
        }
    }
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}

/// The dry runs above would pass vacuously if they accepted anything: the config the README
/// used to offer (VictoriaMetrics 1.79 refuses to start with it) must be refused by both.
#[test]
fn victoriametrics_dry_runs_refuse_refresh_interval_in_http_sd_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("old.yml");
    std::fs::write(
        &file,
        "scrape_configs:\n  - job_name: muster-agents\n    http_sd_configs:\n      - url: http://controller.example:7480/sd/prometheus\n        refresh_interval: 30s\n",
    )
    .unwrap();
    check("promtool", CHECKERS[0].1, &file, tmp.path()).unwrap();
    for (tool, args) in &CHECKERS[1..] {
        let e = check(tool, args, &file, tmp.path()).err();
        let e = e.unwrap_or_else(|| panic!("{tool} accepted refresh_interval in http_sd_configs"));
        assert!(e.contains("refresh_interval"), "{e}");
    }
}

#[test]
fn only_yaml_blocks_with_scrape_configs_are_taken() {
    let md = "text\n```yaml\nscrape_configs:\n  - job_name: a\n```\n```console\n$ scrape_configs:\n```\n\
              ```yaml\nkind: MachineConfig\n```\n  ```yml\nscrape_configs: []\n  ```\n";
    let blocks = scrape_config_blocks(md);
    assert_eq!(
        blocks,
        [(2, "scrape_configs:\n  - job_name: a\n".to_owned()), (12, "scrape_configs: []\n".to_owned())]
    );
}
