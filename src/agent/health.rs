//! The agent's HTTP endpoints (issue 23.3: nothing a pod sends to them may stop the agent).
//!
//! - **Health** (`--health-addr`, default `127.0.0.1:9891`): `/healthz` and `/livez` (the
//!   reconcile loop is alive), `/readyz` (the dataplane and the CNI configuration are in place),
//!   `/status` (the same JSON as `veilnet status --json`). Only the kubelet of the node needs
//!   them, and with `hostNetwork` its probes reach the node's loopback (`host: 127.0.0.1`), so no
//!   pod can reach them at all.
//! - **Metrics** (`--metrics-addr`, default `0.0.0.0:9892`): `/metrics` (Prometheus text format),
//!   reachable by Prometheus on the node's address.
//!
//! Both are served by [`serve`]: at most [`Limits::max_connections`] connections at once (one
//! over the cap is closed at once and counted, see `crate::listen`), headers within
//! [`Limits::header_timeout`], one request per connection (no keep-alive, so no idle connection
//! outlives its answer) and every connection closed after [`Limits::lifetime`] whatever it does.

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
use crate::listen::ConnLimit;

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

/// `/healthz`, `/livez`, `/readyz` and `/status`: the health listener's routes.
pub fn health_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(health)
}

/// `/metrics`: the metrics listener's route.
pub fn metrics_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
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

/// Bounds of one HTTP listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Time for a client to send its request headers, from the moment it connects.
    pub header_timeout: Duration,
    /// Longest any connection lives (headers, handler and writing the answer included).
    pub lifetime: Duration,
}

impl Limits {
    /// The health listener: the kubelet's probes (one every few seconds) and an operator.
    pub const HEALTH: Limits = Limits {
        max_connections: 32,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(10),
    };
    /// The metrics listener: Prometheus (one scrape at a time per server).
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(15),
    };
    /// The flows listener: `veilnet observe` through the API server's proxy, one request per
    /// node at a time (a full answer is tens of MiB: a longer lifetime).
    pub const FLOWS: Limits = Limits {
        max_connections: 16,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(60),
    };
}

/// Binds `addr` and serves `router` under `limits` (see the module documentation) until the
/// task is dropped. Connections over the cap are closed at once and counted on `cap`.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    cap: Arc<ConnLimit>,
) -> Result<tokio::task::JoinHandle<()>, HealthError> {
    serve_gated(addr, router, limits, cap, None).await
}

/// Decides from a connection's source address whether it may be served at all.
pub type SourceGate = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

/// [`serve`], closing at once (and counting on `cap`) every connection `gate` refuses.
pub async fn serve_gated(
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    cap: Arc<ConnLimit>,
    gate: Option<SourceGate>,
) -> Result<tokio::task::JoinHandle<()>, HealthError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    Ok(tokio::spawn(accept_loop(
        listener, router, limits, cap, gate,
    )))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    cap: Arc<ConnLimit>,
    gate: Option<SourceGate>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let mut failures: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, peer)) => {
                if gate.as_ref().is_some_and(|admits| !admits(peer.ip())) {
                    // Closed before a byte is read: nothing is served to a refused source.
                    drop(stream);
                    cap.refuse(peer.ip());
                    continue;
                }
                stream
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(listener = cap.name(), error = %e, failures, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = cap.try_admit() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Dropping the connection future closes the socket.
            let _ = tokio::time::timeout(limits.lifetime, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    async fn get_status(h: Arc<Health>, path: &str) -> (StatusCode, String) {
        let router = if path == "/metrics" {
            metrics_router(h)
        } else {
            health_router(h)
        };
        let resp = router
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
        let (code, body) = get_status(h.clone(), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("veilnet_reconcile_errors_total"), "{body}");
        // Each listener serves only its own routes.
        assert_eq!(
            get_status(h.clone(), "/status").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let resp = metrics_router(h)
            .oneshot(
                axum::http::Request::get("/readyz")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    /// Reads until EOF or `within`; true if the server closed the connection in time.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn connections_are_capped_and_slow_clients_cut_off() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits {
            max_connections: 3,
            header_timeout: Duration::from_millis(300),
            lifetime: Duration::from_secs(2),
        };
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let cap = ConnLimit::new("test", limits.max_connections);
        let h = Health::new(Duration::from_secs(30));
        let task = serve(addr, health_router(h), limits, cap.clone())
            .await
            .unwrap();
        // Three idle clients fill the cap; a fourth is closed at once and counted.
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            idle.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(cap.open(), 3);
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_millis(200)).await);
        assert_eq!(cap.rejected(), 1);
        // The idle ones are cut off at the header timeout and free their permits.
        for s in &mut idle {
            assert!(closed_within(s, Duration::from_secs(1)).await);
        }
        // So is one that never sends a byte.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(1)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(cap.open(), 0);
        // A well-behaved client gets its answer, and the connection is not kept alive.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncReadExt;
            s.read_to_end(&mut answer).await
        })
        .await
        .expect("the server closes after one answer")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        task.abort();
    }
}
