//! `GET /doctor` on the agent's metrics listener: this node's report as JSON, for
//! `veilnet doctor --all-nodes` and `kubectl veilnet doctor`.
//!
//! The checks read files and sockets and probe peers (blocking, seconds), so they run on the
//! blocking pool, one run at a time, and a report stays fresh for [`FRESH_FOR`]: however often
//! anyone asks (a pod can reach this port too), the node runs the checks at most that often.
//! A run that outlives [`ANSWER_WITHIN`] keeps going and fills the cache for the next request;
//! this one gets 503 (the listener closes every connection after 15 s anyway).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;

use super::{run_checks, Context, Report};

/// How long a report is served again instead of running the checks.
pub const FRESH_FOR: Duration = Duration::from_secs(10);
/// How long a request waits for a run.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(12);

struct Doctor {
    ctx: Context,
    /// The last report and when it was made; the lock also makes runs one at a time.
    last: Mutex<Option<(Instant, Report)>>,
}

/// The `/doctor` route, to merge into the metrics router.
pub fn router(ctx: Context) -> Router {
    Router::new()
        .route("/doctor", get(doctor))
        .with_state(Arc::new(Doctor {
            ctx,
            last: Mutex::new(None),
        }))
}

async fn doctor(State(d): State<Arc<Doctor>>) -> Response {
    let run = {
        let d = d.clone();
        // Spawned, so that a run whose request gave up still finishes and fills the cache.
        tokio::spawn(async move {
            let mut last = d.last.lock().await;
            if let Some((at, report)) = last.as_ref() {
                if at.elapsed() < FRESH_FOR {
                    return Some(report.clone());
                }
            }
            let ctx = d.ctx.clone();
            let report = tokio::task::spawn_blocking(move || run_checks(&ctx))
                .await
                .ok()?;
            *last = Some((Instant::now(), report.clone()));
            Some(report)
        })
    };
    match tokio::time::timeout(ANSWER_WITHIN, run).await {
        Ok(Ok(Some(report))) => axum::Json(report).into_response(),
        Ok(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the checks panicked\n").into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the checks are still running after {} s; ask again shortly\n",
                ANSWER_WITHIN.as_secs()
            ),
        )
            .into_response(),
    }
}
