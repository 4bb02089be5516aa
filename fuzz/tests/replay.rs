//! Every committed fuzz input runs in the normal suite, without instrumentation: the seed corpus
//! (`fuzz/corpus/<target>/`) and every crash the fuzzer found (`fuzz/regressions/<target>/`,
//! minimised). A regression file that panics again fails its target's test, naming the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        rd.map(|e| e.unwrap().path()).filter(|p| p.is_file() && !is_readme(p)).collect();
    out.sort();
    out
}

fn is_readme(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "README.md")
}

fn replay(name: &str) {
    let target = muster_fuzz::target(name).expect("a target of that name");
    let corpus = files(&root().join("corpus").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ has no seeds");
    let regressions = files(&root().join("regressions").join(name));
    let mut failed = Vec::new();
    for f in corpus.iter().chain(&regressions) {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| (target.run)(&data)).is_err() {
            failed.push(f.strip_prefix(root()).unwrap_or(f).display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs panic (reproduce with `cargo run -p muster-fuzz --bin fuzz-{name} -- FILE`): {failed:#?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { replay(stringify!($name)); } )*

        #[test]
        fn every_target_is_replayed_and_every_input_dir_has_a_target() {
            let tested = [$(stringify!($name)),*];
            let all: Vec<&str> = muster_fuzz::TARGETS.iter().map(|t| t.name).collect();
            assert_eq!(tested.as_slice(), all.as_slice());
            for kind in ["corpus", "regressions"] {
                for d in std::fs::read_dir(root().join(kind)).unwrap() {
                    let d = d.unwrap().path();
                    if d.is_dir() {
                        let n = d.file_name().unwrap().to_str().unwrap();
                        assert!(muster_fuzz::target(n).is_some(), "fuzz/{kind}/{n}/ names no target");
                    }
                }
            }
        }
    };
}

replay_tests!(boot_query, range, tftp, proxydhcp, token_pin, csr, kernel_args, inventory, config);
