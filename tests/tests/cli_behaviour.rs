//! The `muster` binary as an operator meets it (issue #12): a controller that accepts TCP and
//! never answers fails within `--request-timeout` with the endpoint and the deadline named; a
//! port nothing listens on is "connection refused", not a CA problem; `machines --watch -o json`
//! prints one JSON document per line as machines change; a hostname carrying an escape sequence
//! and a newline is shown escaped; a musterconfig of another controller is named as such (its CA
//! or its admin certificate); `config validate` lists every error at once.
//!
//! Everything is on 127.0.0.1 and in temp dirs; the only processes stopped are the `muster`
//! children these tests start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use muster_proto::pb;
use muster_tests::{bin, wait_for, TestController};

/// Generous: only a hang is a failure here, not slowness.
const BOUND: Duration = Duration::from_secs(30);

/// `muster ARGS` with `musterconfig`, waited for at most [`BOUND`] (killed and failed after).
fn muster(musterconfig: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(bin("muster").unwrap())
        .arg("--musterconfig")
        .arg(musterconfig)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Err(e) = wait_for("muster to exit", BOUND, || child.try_wait().ok().flatten()) {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("muster {args:?} hung: {e}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    child.wait_with_output().unwrap()
}

/// A musterconfig with real credentials (from `muster-controller init`'s PKI) whose only
/// endpoint is `endpoint`.
fn musterconfig_for(dir: &Path, endpoint: &str) -> PathBuf {
    let dd = muster_controller::pki::DataDir::new(dir.join("ctl"));
    muster_controller::pki::init(&dd, &[], endpoint).unwrap();
    muster_cli::client::set_endpoint(&dd.musterconfig(), endpoint).unwrap();
    dd.musterconfig()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn request_timeout_names_the_endpoint_and_the_deadline_when_the_controller_never_answers() {
    let tmp = tempfile::tempdir().unwrap();
    // Accepts every connection and keeps it open without a word, like a stopped controller.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("https://{}", silent.local_addr().unwrap());
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in silent.incoming() {
            match conn {
                Ok(c) => open.push(c),
                Err(_) => break,
            }
        }
    });
    let mc = musterconfig_for(tmp.path(), &endpoint);

    let out = muster(&mc, &["machines", "--request-timeout", "1s"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with(&format!("error: cannot reach the controller at {endpoint}: ")), "{err}");
    assert!(err.contains("no answer within 1s (--request-timeout)"), "{err}");
    assert!(!err.contains("CA"), "not a certificate problem: {err}");
    assert!(out.stdout.is_empty());

    // The flag goes before the command too, and bounds the other commands as well.
    let out = muster(&mc, &["--request-timeout", "2s", "token", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no answer within 2s (--request-timeout)"), "{}", stderr(&out));
}

#[test]
fn connection_refused_says_so_and_does_not_blame_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let mc = musterconfig_for(tmp.path(), &endpoint);
    let out = muster(&mc, &["machines"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("error: cannot reach the controller at {endpoint}: connection refused")),
        "{err}"
    );
    assert!(!err.contains("CA") && !err.contains("certificate"), "{err}");
}

/// A musterconfig from another controller says which half is wrong: the other controller's CA
/// does not vouch for this server; this controller refuses the other's admin certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_musterconfig_of_another_controller_is_named_as_such() {
    let a = TestController::start().await.unwrap();
    let b = TestController::start().await.unwrap();
    let write = |name: &str, ca: &str, cert: &str, key: &str| {
        let mut mc = a.mc.clone();
        (mc.ca, mc.cert, mc.key) = (ca.to_owned(), cert.to_owned(), key.to_owned());
        let path = a.dir.path().join(name);
        std::fs::write(&path, mc.to_yaml().unwrap()).unwrap();
        path
    };
    let other_ca = write("other-ca", &b.mc.ca, &b.mc.cert, &b.mc.key);
    let other_admin = write("other-admin", &a.mc.ca, &b.mc.cert, &b.mc.key);
    let (ca_out, admin_out) = tokio::task::spawn_blocking(move || {
        (muster(&other_ca, &["machines"]), muster(&other_admin, &["machines"]))
    })
    .await
    .unwrap();
    let prefix = format!("error: cannot reach the controller at {}: ", a.endpoint);
    let err = stderr(&ca_out);
    assert_eq!(ca_out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{prefix}the server's certificate is not signed by this musterconfig's CA")),
        "{err}"
    );
    let err = stderr(&admin_out);
    assert_eq!(admin_out.status.code(), Some(1), "{err}");
    // With TLS 1.3 the refusal comes after the client's side of the handshake: either the
    // alert saying why arrives, or only the closed connection (which says it may be this).
    assert!(
        err.starts_with(&prefix) && err.contains("refused this musterconfig's admin certificate"),
        "{err}"
    );
    assert!(!err.contains("CA"), "the CA is fine: {err}");
}

/// Reads `child`'s stdout line by line into a channel (the thread ends with the child).
fn lines_of(child: &mut Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next watch line, which must be one JSON document (waits at most [`BOUND`]).
async fn next_event(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
) -> serde_json::Value {
    let line = tokio::time::timeout(BOUND, lines.recv()).await.ok().flatten();
    let line = line.unwrap_or_else(|| panic!("no more watch lines; so far: {seen:?}"));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON document: {line:?}: {e}"));
    seen.push(line);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_prints_one_json_event_per_line() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let inv = pb::Inventory { hostname: "watched".into(), ..Default::default() };
    let m = f.enroll_with(&token, inv).await.unwrap().unwrap();

    let mut child = Command::new(bin("muster").unwrap())
        .arg("--musterconfig")
        .arg(f.data_dir().join("musterconfig"))
        .args(["machines", "--watch", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(&mut child);
    let mut seen = Vec::new();

    let first = next_event(&mut lines, &mut seen).await;
    assert_eq!(first["type"], "ADDED", "{first}");
    assert_eq!(first["object"]["id"], m.id.as_str());
    assert_eq!(first["object"]["hostname"], "watched");
    assert!(first["object"]["role"].is_null(), "{first}");

    f.admin()
        .await
        .unwrap()
        .assign(pb::AssignRequest {
            query: m.id.clone(),
            role: pb::Role::Worker.into(),
            cluster: "homelab".into(),
            force: false,
        })
        .await
        .unwrap();
    // Every line is a JSON event; the assignment shows up as one (the machine's state may
    // change on its own meanwhile, which is an event too).
    loop {
        let e = next_event(&mut lines, &mut seen).await;
        assert_eq!(e["type"], "MODIFIED", "{e}");
        assert_eq!(e["object"]["id"], m.id.as_str());
        if e["object"]["role"] == "worker" {
            assert_eq!(e["object"]["cluster"], "homelab", "{e}");
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// What a node reports reaches the operator's terminal escaped: a hostname with control
/// characters is not a hostname (the controller drops it), and the rest of the inventory (here
/// the kernel string) is printed with its control characters escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reported_strings_with_escape_sequences_and_newlines_are_printed_escaped() {
    let f = TestController::start().await.unwrap();
    let token = f.token(0, 1).await.unwrap();
    let evil = "\u{1b}]0;pwn\u{7}\nx";
    let inv = pb::Inventory { hostname: evil.into(), kernel: evil.into(), ..Default::default() };
    let m = f.enroll_with(&token, inv).await.unwrap().unwrap();
    let mc = f.data_dir().join("musterconfig");
    let shown = r"\u{1b}]0;pwn\u{7}\nx";

    let id = m.id.clone();
    let (table, detail, json) = tokio::task::spawn_blocking(move || {
        (
            muster(&mc, &["machines"]),
            muster(&mc, &["machine", "get", &id]),
            muster(&mc, &["machine", "get", &id, "-o", "json"]),
        )
    })
    .await
    .unwrap();

    let table_out = String::from_utf8(table.stdout.clone()).unwrap();
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(!table_out.contains('\u{1b}') && !table_out.contains('\u{7}'), "{table_out:?}");
    assert_eq!(table_out.lines().count(), 2, "a header and one row:\n{table_out}");

    let detail_out = String::from_utf8(detail.stdout.clone()).unwrap();
    assert!(detail.status.success(), "{}", stderr(&detail));
    assert!(!detail_out.contains('\u{1b}') && !detail_out.contains('\u{7}'), "{detail_out:?}");
    assert!(detail_out.contains("Hostname:      -\n"), "not a hostname, dropped: {detail_out}");
    assert!(detail_out.contains(&format!("Kernel:        {shown}\n")), "{detail_out}");

    // Scripts get the string exactly as the node reported it, escaped by JSON itself.
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["inventory"]["kernel"], evil, "{v}");
    assert!(!String::from_utf8(json.stdout).unwrap().contains('\u{1b}'));
}

#[test]
fn config_validate_lists_unknown_fields_wrong_types_and_the_rest_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("node.yaml");
    std::fs::write(
        &file,
        "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: \"-bad-\"\nfiles:\n  - path: /etc/motd\n    content: x\n    mod: \"0644\"\nsysctls:\n  vm.swappiness: 10\nnetwork:\n  interfaces:\n    - name: eth0\n    - name: eth1\n      mtu: big\n",
    )
    .unwrap();
    // No controller needed: the musterconfig is never read.
    let out = muster(&tmp.path().join("none"), &["config", "validate", "-f", file.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let f = file.display();
    let want = [
        format!("{f}: files[0].mod: unknown field `mod`; did you mean `mode`?"),
        format!(
            "{f}: network.interfaces[1].mtu: invalid type: expected a whole number, found the string \"big\""
        ),
        format!("{f}: hostname: label \"-bad-\" may hold only letters, digits and '-', not at either end"),
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want, "{stdout}");
    assert!(stderr(&out).contains("has 3 errors"), "{}", stderr(&out));
}
