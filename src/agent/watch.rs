//! Watching the cluster: reflectors that keep an in-memory copy of what the agent plans from, and a
//! shared `Notify` that wakes the reconcile loop on any change.
//!
//! Plans are always computed from the stores' current state, never from individual events, so a
//! missed or reordered event cannot leave stale state behind.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Starts a reflector for `api` filtered by `config`. Every applied or deleted object, and every
/// re-list, wakes `notify`.
pub fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                // The backoff retries; the store keeps the last good state meanwhile.
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (store, task)
}
