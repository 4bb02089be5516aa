//! Fuzz target `tftp` (see `muster_fuzz::targets::tftp`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("tftp")
}
