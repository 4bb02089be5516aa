//! Fuzz target `proxydhcp` (see `muster_fuzz::targets::proxydhcp`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("proxydhcp")
}
