//! A background service that dies is visible (issue #13, finding 3): a controller in this
//! process (127.0.0.1, temp dir) supervises one more service, which fails at once and waits a
//! long backoff before its restart. Meanwhile `/readyz` answers 503 naming it and its error,
//! `/healthz` stays ok (the process lives), and the metrics show it down with one restart. The
//! supervisor's restarts, backoff, panics and error logs are unit-tested in
//! `controller/src/supervise.rs`; every real service being up is checked in
//! `boot_services_netns.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use muster_controller::supervise::Backoff;
use muster_tests::{http_get, TestController};
use tokio_util::sync::CancellationToken;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = http_get(addr, path, &[]).await.unwrap();
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_name_a_dead_service() {
    let f = TestController::start().await.unwrap();
    let http = f.running.ports.http;
    assert_eq!(get(http, "/readyz").await, (200, "ok\n".to_owned()));
    let (_, metrics) = get(http, "/metrics").await;
    for service in ["grpc", "http", "heartbeat-flush"] {
        assert!(metrics.contains(&format!("muster_service_up{{service=\"{service}\"}} 1")), "{metrics}");
    }

    let stop = CancellationToken::new();
    let backoff = Backoff { initial: Duration::from_secs(3600), ..Backoff::default() };
    let task = f
        .running
        .services
        .spawn("flaky", stop.clone(), backoff, || async { Err("flaky lost its socket".to_owned()) });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while f.running.services.down().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the service never went down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "service flaky: down, restarting (1 restarts; last error: flaky lost its socket)\n");
    assert_eq!(get(http, "/healthz").await, (200, "ok\n".to_owned()));
    let (_, metrics) = get(http, "/metrics").await;
    assert!(metrics.contains("muster_service_up{service=\"flaky\"} 0"), "{metrics}");
    assert!(metrics.contains("muster_service_restarts_total{service=\"flaky\"} 1"), "{metrics}");
    // Stopping does not wait for the hour-long backoff.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    f.still_serving().await.unwrap();
}
