//! Fuzz target `kernel_args` (see `muster_fuzz::targets::kernel_args`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("kernel_args")
}
