//! Muster's lab mechanisms, shared by `muster lab`, the tests and the benchmarks. Mechanism
//! without policy: nothing here knows about controllers, tokens or configs.
//!
//! - [`netns`]: network namespaces made with `ip netns` (a router with a bridge, one namespace
//!   per node with a veth on it) and a relay from host loopback ports into them, so a lab or a
//!   test never changes this machine's own network.
//! - [`process`]: finding the workspace's binaries, starting children with their logs, stopping
//!   only processes that are provably ours, and a child guard killed on drop.
//! - [`muster`]: Muster's own binaries as processes on loopback (a controller, agents, the CLI),
//!   for the tests and benchmarks; [`http`]: a minimal GET for what scrapers read.
//! - [`qemu`]: the one QEMU command line (TCG, SeaBIOS + iPXE, serial console to a file,
//!   restricted user-mode networking or a tap), and a VM guard.
//! - [`victoriametrics`]: Debian's VictoriaMetrics single-node for `lab up --monitoring`: where
//!   it is, its command line, and how a lab's instance is recognised.
//!
//! Depends only on `muster-machinery` and `muster-util`: it runs Muster's binaries, never links
//! them.

pub mod http;
pub mod muster;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod victoriametrics;

/// What a lab step failed at.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command ran and failed.
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    /// Something on this machine could not be read, written or started.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A program the lab needs is missing.
    #[error("{name} not found: {hint}")]
    Missing { name: String, hint: String },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: std::time::Duration },
    /// A VM did not come up.
    #[error("VM {name}: {detail}")]
    Vm { name: String, detail: String },
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}
