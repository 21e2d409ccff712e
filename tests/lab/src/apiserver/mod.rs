//! The lab's Kubernetes API stand-in: an in-memory API server (plain HTTP, no auth) that behaves
//! like kube-apiserver for what kube-rs clients and kubectl use.
//!
//! - `resources`: the served resources (discovery, scope, subresources); `kinds`: per-kind
//!   decoding, validation and defaulting.
//! - `store`: objects, the resourceVersion counter and the watch history; `crud` and `lifecycle`:
//!   the verbs and the deletion rules on top of it.
//! - `patch`: merge, JSON, strategic merge and server-side apply patches.
//! - `selectors`, `watch`, `tables`, `discovery`, `openapi`: the read side.
//! - `authorization`: the self-reviews of `kubectl auth can-i` (everything is allowed).
//! - `http`: URL grammar, content negotiation and the axum router; `errors`: `metav1.Status`;
//!   `protobuf`: the protobuf bodies of kubectl's typed client (`kubectl create namespace …`).

mod authorization;
mod crud;
mod discovery;
mod errors;
mod http;
mod kinds;
mod lifecycle;
mod meta;
mod openapi;
mod patch;
mod protobuf;
mod resources;
mod selectors;
mod state;
mod store;
mod tables;
mod watch;

#[cfg(test)]
mod kubectl_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use errors::ApiError;
pub use http::router;
pub use state::{ApiState, Config, BUILTIN_NAMESPACES};

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("serving HTTP on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `veilnet lab apiserver`: serve the API stand-in (started by `veilnet lab up`).
#[derive(Clone, Debug, clap::Args)]
pub struct ApiServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Watch events kept for resuming watches; a watch from an older resourceVersion gets
    /// 410 Expired.
    #[arg(long, default_value_t = 10_000)]
    pub history_limit: usize,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 30)]
    pub bookmark_interval_secs: u64,
}

impl ApiServerArgs {
    pub fn config(&self) -> Config {
        Config {
            history_limit: self.history_limit,
            bookmark_interval: Duration::from_secs(self.bookmark_interval_secs.max(1)),
        }
    }
}

/// Serves until the listener fails or `shutdown` completes; open watches are ended first so the
/// graceful HTTP shutdown does not wait on them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiServerError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let app = router(state.clone());
    let graceful = async move {
        shutdown.await;
        state.begin_shutdown();
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await
        .map_err(|source| ApiServerError::Serve { addr, source })
}

/// Binds `args.listen` and serves until SIGTERM or SIGINT.
pub async fn run(args: ApiServerArgs) -> Result<(), ApiServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ApiServerError::Listen {
            addr: args.listen,
            source,
        })?;
    let mut term = signal(SignalKind::terminate()).map_err(|source| ApiServerError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| ApiServerError::Signal {
        signal: "SIGINT",
        source,
    })?;
    tracing::info!(listen = %args.listen, history_limit = args.history_limit, "lab API server serving");
    let state = ApiState::new(args.config());
    serve(listener, state, async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("lab API server shutting down");
    })
    .await
}
