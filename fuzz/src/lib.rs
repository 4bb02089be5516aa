//! Coverage-guided fuzz targets for every parser that reads what the network (or a node) sends,
//! on stable Rust.
//!
//! Each target is a plain function of the input bytes ([`targets`]); a target fails by
//! panicking (a parser that panics, or an invariant checked with `assert!`). The same functions
//! run in three places:
//!
//! - `scripts/fuzz.sh` builds the `fuzz-*` binaries with rustc's stable SanitizerCoverage flags
//!   and AFL++'s runtime (`--features afl`, own target dir `target/fuzz`) and runs them under
//!   `afl-fuzz` in persistent mode with shared-memory test cases ([`harness`]);
//! - without the `afl` feature the same binaries read one input from stdin (or the files named
//!   on the command line) and run it once: that is how a crash is reproduced;
//! - `tests/replay.rs` runs every committed corpus file (`fuzz/corpus/<target>/`) and every
//!   regression (`fuzz/regressions/<target>/`) through them in the normal `cargo test`.

pub mod harness;
pub mod targets;

/// A fuzz target: its name (the binary is `fuzz-<name>`, the corpus `fuzz/corpus/<name>/`), the
/// function of the input, and what to do once per process before the fork server starts.
#[derive(Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub init: fn(),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("name", &self.name).finish_non_exhaustive()
    }
}

fn no_init() {}

/// Every target, in the order `scripts/fuzz.sh all` runs them.
pub const TARGETS: &[Target] = &[
    Target { name: "boot_query", run: targets::boot_query, init: no_init },
    Target { name: "range", run: targets::range, init: no_init },
    Target { name: "tftp", run: targets::tftp, init: no_init },
    Target { name: "proxydhcp", run: targets::proxydhcp, init: no_init },
    Target { name: "token_pin", run: targets::token_pin, init: no_init },
    Target { name: "csr", run: targets::csr, init: targets::csr_init },
    Target { name: "kernel_args", run: targets::kernel_args, init: no_init },
    Target { name: "inventory", run: targets::inventory, init: no_init },
    Target { name: "config", run: targets::config, init: no_init },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
