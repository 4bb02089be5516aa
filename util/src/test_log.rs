//! A test binary's whole log as text, for tests that check what is (or is not) logged. Only
//! with the `test-log` feature, which crates turn on in their dev-dependencies.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Everything logged through it, kept in memory.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// The text logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

/// Everything this test binary logs at any level, from the first call on: one global
/// subscriber, since a scoped one misses events of callsites that other tests' threads hit
/// first. Tests look for their own markers in it.
///
/// # Panics
/// If another global subscriber was installed first (a test binary has only this one).
pub fn global() -> &'static Captured {
    static LOG: OnceLock<Captured> = OnceLock::new();
    LOG.get_or_init(|| {
        let c = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(c.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        #[allow(clippy::expect_used)]
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber in this test binary");
        c
    })
}
