//! The README's `console` examples, run as written against a real lab, so a documented command
//! or output that stops being true fails the suite (in the spirit of `trycmd`).
//!
//! Every fenced block tagged `console` runs, in order, in one `bash` session (so `export`s
//! carry over), with this build's binaries first on `PATH`, `HOME` and the working directory in
//! a temp dir (the lab's default `~/.muster/lab` lands there). In a block:
//!
//! - `$ COMMAND` runs COMMAND; following lines starting with `> ` continue it (a here-document);
//! - the lines after it, up to the next `$ `, are its expected output (stdout and stderr as
//!   written), where `[..]` matches any text within a line, a line `...` matches any number of
//!   lines, and runs of spaces count as one (tables align differently with other ids);
//! - a last line `[exit: N]` expects exit status N (else 0);
//! - `<!-- docs-test: retry -->` before a block retries each of its commands for up to 60 s
//!   until the output matches (for what settles by itself, such as a stream closing).
//!
//! Blocks tagged `sh` (set-up and real-node commands) are not run here. Needs root (the lab's
//! namespaces), as in CI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
struct Step {
    line: usize,
    cmd: String,
    expected: Vec<String>,
    exit: i32,
}

#[derive(Debug, Clone, PartialEq)]
struct Block {
    retry: bool,
    steps: Vec<Step>,
}

/// The `console` blocks of a Markdown text.
fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut retry_next = false;
    let mut current: Option<Block> = None;
    for (i, line) in md.lines().enumerate() {
        let n = i + 1;
        match &mut current {
            None => {
                let t = line.trim();
                if t == "<!-- docs-test: retry -->" {
                    retry_next = true;
                } else if t == "```console" {
                    current = Some(Block { retry: std::mem::take(&mut retry_next), steps: Vec::new() });
                } else if !t.is_empty() {
                    retry_next = false;
                }
            }
            Some(b) => {
                if line.trim() == "```" {
                    out.extend(current.take());
                } else if let Some(cmd) = line.strip_prefix("$ ") {
                    b.steps.push(Step { line: n, cmd: cmd.to_owned(), expected: Vec::new(), exit: 0 });
                } else if let (Some(more), Some(s)) = (line.strip_prefix("> "), b.steps.last_mut()) {
                    if s.expected.is_empty() {
                        s.cmd.push('\n');
                        s.cmd.push_str(more);
                    } else {
                        s.expected.push(line.to_owned());
                    }
                } else if let Some(s) = b.steps.last_mut() {
                    match line.strip_prefix("[exit: ").and_then(|r| r.strip_suffix(']')) {
                        Some(code) => s.exit = code.parse().unwrap_or(-1),
                        None => s.expected.push(line.to_owned()),
                    }
                }
            }
        }
    }
    out
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line against a pattern with `[..]` wildcards.
fn line_matches(pattern: &str, actual: &str) -> bool {
    let (p, a) = (norm(pattern), norm(actual));
    let parts: Vec<&str> = p.split("[..]").collect();
    if parts.len() == 1 {
        return p == a;
    }
    let Some(mut rest) = a.strip_prefix(parts[0]) else { return false };
    let last = parts[parts.len() - 1];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Expected lines (with `...` for any lines) against actual lines.
fn lines_match(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.iter().all(|l| l.trim().is_empty()),
        Some((e, rest)) if e.trim() == "..." => (0..=actual.len()).any(|k| lines_match(rest, &actual[k..])),
        Some((e, rest)) => {
            actual.split_first().is_some_and(|(a, more)| line_matches(e, a) && lines_match(rest, more))
        }
    }
}

/// A `bash` that runs one command at a time and says where each one's output ends.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

const END: &str = "__MUSTER_DOCS_END__";

impl Shell {
    fn start(home: &Path, bin: &Path) -> Self {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(home)
            .env("HOME", home)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env_remove("MUSTERCONFIG")
            .env("COLUMNS", "200")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines }
    }

    /// Runs `cmd` (stderr into stdout); its output lines and exit status.
    fn run(&mut self, cmd: &str, timeout: Duration) -> (Vec<String>, i32) {
        writeln!(self.stdin, "{{\n{cmd}\n}} < /dev/null 2>&1; echo \"{END} $?\"").unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => match l.strip_prefix(END) {
                    Some(code) => return (out, code.trim().parse().unwrap_or(-1)),
                    None => out.push(l),
                },
                Err(_) => {
                    panic!("`{cmd}` did not finish within {timeout:?}; output so far:\n{}", out.join("\n"))
                }
            }
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the console blocks of `doc`; stops at the first mismatch.
fn run_doc(doc: &Path) {
    let text = std::fs::read_to_string(doc).unwrap();
    let home = tempfile::tempdir().unwrap();
    let bin = muster_lab::process::bin_dir();
    assert!(bin.join("muster").exists(), "build the binaries first: cargo build --workspace --bins");
    let mut sh = Shell::start(home.path(), &bin);
    // Whatever happens, the lab comes down.
    struct Down<'a>(&'a Path, std::path::PathBuf);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.1.join("muster"))
                .args(["lab", "down", "--dir"])
                .arg(self.0.join(".muster/lab"))
                .output();
        }
    }
    let _down = Down(home.path(), bin.clone());
    for b in blocks(&text) {
        for s in &b.steps {
            let deadline = Instant::now() + if b.retry { Duration::from_secs(60) } else { Duration::ZERO };
            loop {
                let (out, code) = sh.run(&s.cmd, Duration::from_secs(180));
                let ok = code == s.exit && lines_match(&s.expected, &out);
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{}:{}: `{}`\nexit {code} (expected {})\n--- expected\n{}\n--- got\n{}\n",
                        doc.display(),
                        s.line,
                        s.cmd,
                        s.exit,
                        s.expected.join("\n"),
                        out.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

#[test]
fn readme_examples_run_as_written() {
    run_doc(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
}

#[test]
fn the_matcher_means_what_it_says() {
    assert!(line_matches(
        "machine [..] (node-a): generation 1",
        "machine 533a074dfe1d5593 (node-a): generation 1"
    ));
    assert!(!line_matches("machine [..] (node-a): generation 1", "machine 533a (node-b): generation 1"));
    assert!(line_matches("a   b  c", "a b c"), "runs of spaces");
    assert!(!line_matches("abc", "abcd"));
    assert!(line_matches("[..]", "anything"));
    let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert!(lines_match(&l(&["a", "...", "z"]), &l(&["a", "b", "c", "z"])));
    assert!(lines_match(&l(&["a", "...", "z"]), &l(&["a", "z"])));
    assert!(!lines_match(&l(&["a", "z"]), &l(&["a", "b", "z"])));
    assert!(!lines_match(&l(&["a"]), &l(&["a", "extra"])), "unexpected output fails");
    let md = "x\n<!-- docs-test: retry -->\n```console\n$ cat > f <<'EOF'\n> a: 1\n> EOF\n$ echo hi\nhi\n[exit: 0]\n```\n```sh\n$ not run\n```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 1);
    assert!(b[0].retry);
    assert_eq!(b[0].steps[0].cmd, "cat > f <<'EOF'\na: 1\nEOF");
    assert_eq!((b[0].steps[1].expected.clone(), b[0].steps[1].exit), (l(&["hi"]), 0));
}
