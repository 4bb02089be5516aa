//! Supervision of the controller's background services (gRPC, HTTP, the heartbeat flusher,
//! ProxyDHCP, TFTP): each runs as its own task; when it dies — an error, a panic, or an end
//! nobody asked for — its death is logged at error level, it is marked down (`/readyz` answers
//! 503 naming it, `muster_service_up{service}` is 0) and it is started again after a backoff
//! that doubles up to a cap, counted in `muster_service_restarts_total{service}`. Services keep
//! their sockets outside the task that dies, so a restart binds nothing again.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long to wait before restarting a service that died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// After the first death.
    pub initial: Duration,
    /// The most, however often it dies.
    pub max: Duration,
    /// A service that ran at least this long before dying starts again from `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// One service as `/readyz` and the tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: &'static str,
    pub up: bool,
    pub restarts: u64,
    /// Why it last died.
    pub last_error: Option<String>,
}

/// The supervised services of one controller.
#[derive(Clone)]
pub struct Services {
    states: Arc<Mutex<BTreeMap<&'static str, ServiceStatus>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.statuses()).finish()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

impl Services {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Services { states: Arc::default(), metrics }
    }

    /// Every service, by name.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.lock().values().cloned().collect()
    }

    /// The services that are down now.
    pub fn down(&self) -> Vec<ServiceStatus> {
        self.lock().values().filter(|s| !s.up).cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, ServiceStatus>> {
        self.states.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, name: &'static str, f: impl FnOnce(&mut ServiceStatus)) {
        let up = {
            let mut states = self.lock();
            let s = states.entry(name).or_insert(ServiceStatus {
                name,
                up: false,
                restarts: 0,
                last_error: None,
            });
            f(s);
            s.up
        };
        self.metrics.service_state(name, up);
    }

    /// Runs the service `make()` returns until `stop` is cancelled, starting it again (a new
    /// `make()`) whenever it dies. The service must end by itself once `stop` is cancelled; the
    /// returned task ends after it did.
    pub fn spawn<F, Fut>(
        &self,
        name: &'static str,
        stop: CancellationToken,
        backoff: Backoff,
        mut make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let this = self.clone();
        this.update(name, |s| s.up = true);
        tokio::spawn(async move {
            let mut delay = backoff.initial;
            loop {
                this.update(name, |s| s.up = true);
                let started = tokio::time::Instant::now();
                let outcome = tokio::spawn(make()).await;
                if stop.is_cancelled() {
                    if let Ok(Err(e)) = &outcome {
                        tracing::warn!(service = name, error = %e, "service ended with an error while stopping");
                    }
                    this.update(name, |s| s.up = false);
                    return;
                }
                let why = match outcome {
                    Ok(Ok(())) => "ended although nobody stopped it".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic().as_ref())),
                    Err(e) => format!("its task was cancelled: {e}"),
                };
                if started.elapsed() >= backoff.reset_after {
                    delay = backoff.initial;
                }
                this.update(name, |s| {
                    s.up = false;
                    s.restarts += 1;
                    s.last_error = Some(why.clone());
                });
                this.metrics.service_restarted(name);
                tracing::error!(service = name, error = %why, retry_in = ?delay, "service died; restarting it");
                tokio::select! {
                    () = stop.cancelled() => {
                        return;
                    }
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(backoff.max);
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use muster_machinery::metrics::Format;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    fn fast() -> Backoff {
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(40),
            reset_after: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_dead_service_is_logged_shown_down_and_restarted() {
        let log = muster_util::test_log::global();
        let metrics = Arc::new(Metrics::new());
        let services = Services::new(metrics.clone());
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        // Dies twice (a panic, then an error), then runs until stopped; held down in between
        // until the test lets it go on.
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(0u32);
        let task = {
            let (runs, stop2) = (runs.clone(), stop.clone());
            services.spawn("proxy-dhcp", stop.clone(), fast(), move || {
                let (runs, stop, mut gate) = (runs.clone(), stop2.clone(), gate_rx.clone());
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|g| *g > n).await;
                    match n {
                        0 => panic!("decoder assertion failed"),
                        1 => Err("socket closed".to_owned()),
                        _ => {
                            stop.cancelled().await;
                            Ok(())
                        }
                    }
                }
            })
        };
        let up = |s: &Services| s.statuses().first().map(|s| (s.up, s.restarts));
        until("the first run", || runs.load(Ordering::SeqCst) == 1).await;
        assert_eq!(up(&services), Some((true, 0)));
        assert!(services.down().is_empty());
        gate_tx.send(1).unwrap();
        until("the restart", || runs.load(Ordering::SeqCst) == 2).await;
        let s = services.statuses().remove(0);
        assert_eq!((s.name, s.up, s.restarts), ("proxy-dhcp", true, 1));
        assert_eq!(s.last_error.as_deref(), Some("panicked: decoder assertion failed"));
        gate_tx.send(2).unwrap();
        until("the second restart", || runs.load(Ordering::SeqCst) == 3).await;
        assert_eq!(services.statuses()[0].last_error.as_deref(), Some("socket closed"));
        gate_tx.send(3).unwrap();
        let text = metrics.render(&Default::default(), Format::Prometheus).unwrap();
        assert!(text.contains("muster_service_up{service=\"proxy-dhcp\"} 1"), "{text}");
        assert!(text.contains("muster_service_restarts_total{service=\"proxy-dhcp\"} 2"), "{text}");
        let logged = log.text();
        let errors: Vec<_> = logged
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("service died") && l.contains("proxy-dhcp"))
            .collect();
        assert_eq!(errors.len(), 2, "{logged}");
        assert!(
            errors[0].contains("proxy-dhcp") && errors[0].contains("decoder assertion failed"),
            "{logged}"
        );
        stop.cancel();
        task.await.unwrap();
        assert_eq!(up(&services), Some((false, 2)));
    }

    #[tokio::test]
    async fn down_while_waiting_to_restart() {
        let _ = muster_util::test_log::global();
        let metrics = Arc::new(Metrics::new());
        let services = Services::new(metrics.clone());
        let stop = CancellationToken::new();
        let slow = Backoff { initial: Duration::from_secs(3600), ..fast() };
        let task = services.spawn("tftp", stop.clone(), slow, || async { Err("bind lost".to_owned()) });
        until("the death", || !services.down().is_empty()).await;
        let down = services.down();
        assert_eq!(
            (down[0].name, down[0].restarts, down[0].last_error.as_deref()),
            ("tftp", 1, Some("bind lost"))
        );
        let text = metrics.render(&Default::default(), Format::Prometheus).unwrap();
        assert!(text.contains("muster_service_up{service=\"tftp\"} 0"), "{text}");
        // Stopping does not wait for the backoff.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}
