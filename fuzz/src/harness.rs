//! The loop around a target.
//!
//! Built with `--features afl` (only `scripts/fuzz.sh` does, with SanitizerCoverage flags and
//! AFL++'s `afl-compiler-rt.o` linked in), a binary is an AFL++ persistent-mode target: it
//! carries AFL++'s persistent and deferred-fork-server markers, runs the target's `init` once,
//! starts the fork server (`__afl_manual_init`), then takes test cases from AFL++'s shared
//! memory (`__afl_fuzz_ptr`/`__afl_fuzz_len`, enabled by exporting `__afl_sharedmem_fuzzing`)
//! in a `__afl_persistent_loop`. This is what the `afl` crate's `fuzz!` does, without its
//! `cargo afl` wrapper or nightly. A panic aborts the process, which AFL++ records as a crash.
//!
//! Without the feature (a normal build) the binary runs the inputs named on its command line, or
//! else the one on stdin, once each: that is how a crash is reproduced and debugged.

use std::process::ExitCode;

use crate::Target;

/// Runs one input; a panic (after the panic hook has printed it) aborts the process.
fn run_one(t: &Target, data: &[u8]) {
    if std::panic::catch_unwind(|| (t.run)(data)).is_err() {
        std::process::abort();
    }
}

/// The `main` of the `fuzz-<name>` binaries.
pub fn main(name: &str) -> ExitCode {
    let Some(t) = crate::target(name) else {
        eprintln!("no fuzz target {name:?}");
        return ExitCode::FAILURE;
    };
    (t.init)();
    #[cfg(feature = "afl")]
    afl::run(t);
    #[cfg(not(feature = "afl"))]
    {
        use std::io::Read;
        let files: Vec<String> = std::env::args().skip(1).collect();
        if files.is_empty() {
            let mut data = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut data) {
                eprintln!("reading stdin: {e}");
                return ExitCode::FAILURE;
            }
            run_one(t, &data);
        }
        for f in &files {
            match std::fs::read(f) {
                Ok(data) => {
                    run_one(t, &data);
                    eprintln!("{name}: {f}: ok");
                }
                Err(e) => {
                    eprintln!("{name}: {f}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(feature = "afl")]
#[allow(unsafe_code)]
mod afl {
    use std::io::Read;

    use crate::Target;

    // Provided by AFL++'s afl-compiler-rt.o, which scripts/fuzz.sh links in.
    extern "C" {
        fn __afl_persistent_loop(max_cnt: u32) -> i32;
        fn __afl_manual_init();
        static __afl_fuzz_len: *const u32;
        static __afl_fuzz_ptr: *const u8;
    }

    /// Read by afl-compiler-rt: non-zero asks afl-fuzz for shared-memory test cases (what
    /// `__AFL_FUZZ_INIT()` defines in C).
    #[no_mangle]
    pub static mut __afl_sharedmem_fuzzing: i32 = 1;

    /// afl-fuzz looks for these strings in the binary to use persistent mode and the deferred
    /// fork server.
    const PERSISTENT_MARKER: &str = "##SIG_AFL_PERSISTENT##\0";
    const DEFERRED_MARKER: &str = "##SIG_AFL_DEFER_FORKSRV##\0";

    /// Iterations before the process is replaced by a fresh fork (bounds leaks and drift).
    const LOOP_COUNT: u32 = 100_000;

    pub(super) fn run(t: &Target) {
        std::hint::black_box(PERSISTENT_MARKER);
        std::hint::black_box(DEFERRED_MARKER);
        // SAFETY: the runtime's functions and variables, used as its C API prescribes: the fork
        // server starts once, then each loop iteration's test case is `__afl_fuzz_len` bytes
        // at `__afl_fuzz_ptr`, valid until the next `__afl_persistent_loop` call.
        unsafe {
            __afl_manual_init();
            if __afl_fuzz_ptr.is_null() {
                // Not under afl-fuzz's shared memory (e.g. run by hand): one input from stdin.
                let mut data = Vec::new();
                if std::io::stdin().read_to_end(&mut data).is_ok() {
                    super::run_one(t, &data);
                }
                return;
            }
            while __afl_persistent_loop(LOOP_COUNT) != 0 {
                let len = *__afl_fuzz_len as usize;
                let data = std::slice::from_raw_parts(__afl_fuzz_ptr, len);
                super::run_one(t, data);
            }
        }
    }
}
