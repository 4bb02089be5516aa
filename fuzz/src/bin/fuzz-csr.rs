//! Fuzz target `csr` (see `muster_fuzz::targets::csr`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("csr")
}
