//! The HTTP endpoint of every long-running process: `GET /metrics` (Prometheus text format) and
//! `GET /health` (readiness), served by axum on `metrics.listen` or `--metrics-port`.
//!
//! `/health` answers 200 `ok` only while the stage is ready: connected to what it reads and
//! writes ([`ready`], after its start and after each reconnect) and making progress ([`beat`],
//! from its main loop, which turns at least every few seconds even when idle). Otherwise 503
//! with the reason: still starting, retrying after a transient error (with the error), or stuck
//! (no turn of its loop for [`STUCK_AFTER_S`] seconds). An orchestrator restarts a stuck process
//! and holds traffic back from one that is not ready.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::clock::now_ms;
use crate::error::{CoreError, Result};
use crate::metrics::metrics;

/// A stage whose loop has not turned for this long is reported stuck.
pub const STUCK_AFTER_S: i64 = 120;

struct Health {
    ready: AtomicBool,
    last_beat_ms: AtomicI64,
    /// Why the stage is not ready (while it is not).
    reason: Mutex<String>,
}

static HEALTH: Health = Health { ready: AtomicBool::new(false), last_beat_ms: AtomicI64::new(0), reason: Mutex::new(String::new()) };

/// The stage is connected to its sources and sinks, and working.
pub fn ready() {
    beat();
    HEALTH.ready.store(true, Ordering::SeqCst);
}

/// The stage is not ready: `reason` says why (`/health` shows it).
pub fn not_ready(reason: impl Into<String>) {
    HEALTH.ready.store(false, Ordering::SeqCst);
    if let Ok(mut r) = HEALTH.reason.lock() {
        *r = reason.into();
    }
}

/// The stage's loop turned: it is not stuck.
pub fn beat() {
    HEALTH.last_beat_ms.store(now_ms(), Ordering::Relaxed);
}

/// `/health`'s answer now: (ready, text).
pub fn health() -> (bool, String) {
    if !HEALTH.ready.load(Ordering::SeqCst) {
        let reason = HEALTH.reason.lock().map(|r| r.clone()).unwrap_or_default();
        return (false, if reason.is_empty() { "starting\n".into() } else { format!("not ready: {reason}\n") });
    }
    let quiet_s = (now_ms() - HEALTH.last_beat_ms.load(Ordering::Relaxed)) / 1000;
    if quiet_s >= STUCK_AFTER_S {
        return (false, format!("stuck: the stage's loop has not turned for {quiet_s} s\n"));
    }
    (true, "ok\n".into())
}

async fn serve_metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics().render())
}

async fn serve_health() -> impl IntoResponse {
    let (ok, text) = health();
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, text)
}

/// Serves `/metrics` and `/health` for `stage` on the config's `metrics.listen`, or on its
/// host with `port` (a stage's `--metrics-port`).
pub async fn serve_stage(metrics_cfg: &crate::config::MetricsConfig, port: Option<u16>, stage: &str) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = metrics_cfg.addr()?;
    serve(port.map(|p| SocketAddr::new(addr.ip(), p)).unwrap_or(addr), stage).await
}

/// Serves `/metrics` and `/health` on `addr` until the task is dropped. Returns the bound
/// address (useful with port 0).
pub async fn serve(addr: SocketAddr, stage: &str) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| CoreError::Metrics { addr: addr.to_string(), source })?;
    let bound = listener.local_addr().map_err(|source| CoreError::Metrics { addr: addr.to_string(), source })?;
    metrics().up.with_label_values(&[stage]).set(1);
    metrics().build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), stage]).set(1);
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/health", get(serve_health))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics or /health\n") });
    tracing::info!(addr = %bound, "serving /metrics and /health");
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the /metrics endpoint stopped");
        }
    });
    Ok((bound, handle))
}
