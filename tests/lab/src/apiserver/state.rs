//! Shared server state: the store behind one mutex (no lock is held across an await), the
//! bookmark cadence, and the shutdown signal that ends open watch streams.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use super::crud::{self, WriteOptions};
use super::resources::{id_of, Kind};
use super::store::Store;

/// Namespaces every cluster starts with.
pub const BUILTIN_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Clone, Debug)]
pub struct Config {
    /// Watch events retained for resuming watches; older resourceVersions get 410 Expired.
    pub history_limit: usize,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(30),
        }
    }
}

pub struct ApiState {
    store: Mutex<Store>,
    config: Config,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl ApiState {
    /// A fresh cluster with the built-in namespaces.
    pub fn new(config: Config) -> Arc<Self> {
        let mut store = Store::new(config.history_limit);
        let ns = id_of(Kind::Namespace);
        for name in BUILTIN_NAMESPACES {
            let body =
                json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
            // Cannot fail: fixed, valid names in an empty store.
            let _ = crud::create(&mut store, ns, None, body, &WriteOptions::default());
        }
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Arc::new(ApiState {
            store: Mutex::new(store),
            config,
            shutdown,
        })
    }

    /// The store; a panic while holding it cannot leave it half-written in a way later requests
    /// care about, so poisoning is ignored.
    pub fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bookmark_interval(&self) -> Duration {
        self.config.bookmark_interval
    }

    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Ends every open watch (so graceful HTTP shutdown does not wait on them).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}
