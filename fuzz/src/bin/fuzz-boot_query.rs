//! Fuzz target `boot_query` (see `muster_fuzz::targets::boot_query`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("boot_query")
}
