//! The agent's HTTP endpoint (`--health-addr`, default `0.0.0.0:9891`): `/healthz` (the reconcile
//! loop is alive), `/readyz` (the dataplane and the CNI configuration are in place), `/metrics`
//! (Prometheus text format) and `/status` (the same JSON as `veilnet status --json`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("binding the health endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Shared between the reconcile loop (writer) and the endpoint (reader).
pub struct Health {
    pub metrics: Metrics,
    ready: AtomicBool,
    /// Unix seconds of the last completed loop iteration.
    heartbeat: AtomicU64,
    /// How long the loop may be silent before `/healthz` fails.
    stall_after: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Health {
    pub fn new(resync: Duration) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
            heartbeat: AtomicU64::new(now_secs()),
            // The loop wakes at least every 2 s (status refresh); a resync is longer.
            stall_after: (resync * 3).max(Duration::from_secs(30)),
        })
    }
    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Ordering::Relaxed);
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    fn alive(&self) -> bool {
        now_secs().saturating_sub(self.heartbeat.load(Ordering::Relaxed))
            <= self.stall_after.as_secs()
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(health)
}

async fn healthz(State(h): State<Arc<Health>>) -> Response {
    if h.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "reconcile loop stalled\n").into_response()
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> Response {
    if h.ready.load(Ordering::Relaxed) && h.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "dataplane or CNI configuration not in place yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
        .into_response()
}

async fn status(State(h): State<Arc<Health>>) -> Response {
    let st = h
        .metrics
        .sources
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match st {
        Some(st) => axum::Json(st).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no reconcile pass yet\n").into_response(),
    }
}

/// Serves until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
) -> Result<tokio::task::JoinHandle<()>, HealthError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(health)).await {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    async fn get_status(h: Arc<Health>, path: &str) -> (StatusCode, String) {
        let resp = router(h)
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let code = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_only_once_the_dataplane_is_in_place() {
        let h = Health::new(Duration::from_secs(30));
        assert_eq!(get_status(h.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get_status(h.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_ready(true);
        assert_eq!(get_status(h.clone(), "/readyz").await.0, StatusCode::OK);
        // A stalled loop fails both.
        h.heartbeat.store(now_secs() - 3600, Ordering::Relaxed);
        assert_eq!(
            get_status(h.clone(), "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            get_status(h.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (code, body) = get_status(h, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("veilnet_reconcile_errors_total"), "{body}");
    }
}
