//! Fuzz target `range` (see `muster_fuzz::targets::range`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("range")
}
