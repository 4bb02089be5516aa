//! Fuzz target `inventory` (see `muster_fuzz::targets::inventory`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("inventory")
}
