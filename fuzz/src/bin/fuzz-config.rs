//! Fuzz target `config` (see `muster_fuzz::targets::config`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("config")
}
