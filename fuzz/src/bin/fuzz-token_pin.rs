//! Fuzz target `token_pin` (see `muster_fuzz::targets::token_pin`).
fn main() -> std::process::ExitCode {
    muster_fuzz::harness::main("token_pin")
}
