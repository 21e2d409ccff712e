//! Watching the cluster: reflectors that keep an in-memory copy of what the agent plans from, and a
//! shared `Notify` that wakes the reconcile loop on any change.
//!
//! Plans are always computed from the stores' current state, never from individual events, so a
//! missed or reordered event cannot leave stale state behind.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

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
    spawn_reflector_where(api, config, notify, |_| None, |_| {})
}

/// Like [`spawn_reflector`], but an applied object wakes `notify` only when `relevant` (what the
/// planners read of it) changed since that object last woke it; `None` means "always". The store
/// itself always holds the latest object, after `prune` dropped what no planner reads of it.
/// Deletions and re-lists always wake.
pub fn spawn_reflector_where<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    relevant: fn(&K) -> Option<String>,
    prune: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config)
            .backoff(retry_backoff())
            .modify(prune)
            .reflect(writer);
        futures::pin_mut!(stream);
        // Object name → what the planners last saw of it.
        let mut seen: HashMap<String, String> = HashMap::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(obj)) | Ok(watcher::Event::InitApply(obj)) => {
                    let name = obj.meta().name.clone().unwrap_or_default();
                    match relevant(&obj) {
                        Some(view) if seen.get(&name) == Some(&view) => {}
                        Some(view) => {
                            seen.insert(name, view);
                            notify.notify_one();
                        }
                        None => notify.notify_one(),
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    seen.remove(&obj.meta().name.clone().unwrap_or_default());
                    notify.notify_one();
                }
                // A (re-)list is complete: at start, and after a watch expired (410 Gone) or
                // could not resume, so an operator sees the watch recover, not only fail.
                Ok(watcher::Event::InitDone) => {
                    tracing::info!(kind = %kind, "listed; watching");
                    notify.notify_one();
                }
                Ok(_) => notify.notify_one(),
                // The backoff retries; the store keeps the last good state meanwhile.
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (store, task)
}

/// How long a failed watch waits before it retries: 250 ms doubling to 5 s, plus a random jitter
/// of up to as much again (so 5–10 s at the cap), back to 250 ms after any event. kube-rs's
/// default (client-go's: up to 30 s, kept there for 2 minutes after the last error) left the
/// agent up to a minute behind after an API server restart: the reconnect waits out the grown
/// delay, the watch then expires (410: the new server's cache starts after our resourceVersion),
/// and the re-list waits again, while the CNI refuses pods the agent has not seen yet. The cap
/// keeps a whole cluster's agents (five watches each, jittered) from hammering a recovering
/// server.
pub fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// What the planners read of a Node: its labels and annotations, spec (pod CIDRs), recorded
/// addresses and creation time. Heartbeats (conditions, `lastHeartbeatTime`, images, capacity)
/// change none of it, so another node's heartbeat wakes no reconcile pass.
pub fn node_view(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    let addresses = node.status.as_ref().map(|s| &s.addresses);
    serde_json::to_string(&(
        &node.metadata.labels,
        &node.metadata.annotations,
        &node.metadata.creation_timestamp,
        &node.metadata.deletion_timestamp,
        &node.spec,
        addresses,
    ))
    .ok()
}

/// Drops what no planner reads of a Node before the store keeps it: managed fields, annotations
/// that are not veilnet's, and every status field but the addresses. A real Node is about 10 KB
/// of JSON, most of it images, conditions and managed fields; the agent keeps every Node of the
/// cluster, so at 1,000 nodes that is the difference between a few MiB and tens.
pub fn prune_node(node: &mut k8s_openapi::api::core::v1::Node) {
    node.metadata.managed_fields = None;
    if let Some(anns) = node.metadata.annotations.as_mut() {
        anns.retain(|k, _| k.starts_with(crate::model::annotations::PREFIX));
    }
    if let Some(status) = node.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_watch_retries_within_seconds_and_starts_over_after_an_event() {
        use kube::runtime::utils::Backoff;
        let mut backoff = retry_backoff();
        let delays: Vec<Duration> = (0..40).map(|_| backoff.next().unwrap()).collect();
        // Jitter adds up to the delay itself on top.
        assert!(delays[0] <= Duration::from_millis(500), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(10)),
            "{delays:?}"
        );
        assert!(
            delays[39] >= Duration::from_secs(5),
            "it grows to the cap: {delays:?}"
        );
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(500));
    }

    fn node(extra: serde_json::Value) -> k8s_openapi::api::core::v1::Node {
        let mut base = serde_json::json!({
            "metadata": {"name": "n2", "labels": {"a": "b"}, "annotations": {"veilnet.io/x": "1"}},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.12"}],
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastHeartbeatTime": "2026-12-01T00:00:00Z"}]}
        });
        json_patch::merge(&mut base, &extra);
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn heartbeats_do_not_change_the_node_view_but_planner_inputs_do() {
        let base = node_view(&node(serde_json::json!({}))).unwrap();
        let heartbeat = node(
            serde_json::json!({"status": {"conditions": [{"type": "Ready",
            "status": "True", "lastHeartbeatTime": "2026-12-01T00:00:10Z"}]}}),
        );
        assert_eq!(node_view(&heartbeat).unwrap(), base);
        for change in [
            serde_json::json!({"metadata": {"labels": {"veilnet.io/encryption": "off"}}}),
            serde_json::json!({"metadata": {"annotations": {"veilnet.io/x": "2"}}}),
            serde_json::json!({"spec": {"podCIDR": "10.244.9.0/24"}}),
            serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.99"}]}}),
        ] {
            assert_ne!(node_view(&node(change.clone())).unwrap(), base, "{change}");
        }
    }

    #[test]
    fn pruning_keeps_every_planner_input_and_drops_the_rest() {
        use crate::cluster::podcidr::AllocationRecord;
        let full = node(serde_json::json!({
            "metadata": {
                "annotations": {"veilnet.io/underlay-ip": "172.30.0.12",
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4000)},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
                "creationTimestamp": "2026-12-01T00:00:00Z",
            },
            "status": {"images": [{"names": ["registry.example.com/a:1"], "sizeBytes": 1}],
                "capacity": {"cpu": "16"}, "nodeInfo": {"machineID": "m", "systemUUID": "s",
                "bootID": "b", "kernelVersion": "k", "osImage": "o",
                "containerRuntimeVersion": "c", "kubeletVersion": "v", "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64"}},
        }));
        let mut pruned = full.clone();
        prune_node(&mut pruned);
        // What the planners see is the same.
        assert_eq!(node_view(&pruned), {
            let mut only_ours = full.clone();
            only_ours
                .metadata
                .annotations
                .as_mut()
                .unwrap()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
            node_view(&only_ours)
        });
        let take = |n: &k8s_openapi::api::core::v1::Node| {
            crate::agent::snapshot::ClusterSnapshot::take(
                "n1",
                &[Arc::new(n.clone())],
                &AllocationRecord::default(),
            )
        };
        assert_eq!(take(&pruned), take(&full));
        assert!(!take(&pruned).peers.is_empty());
        // And the bulk is gone.
        assert!(pruned.metadata.managed_fields.is_none());
        let status = pruned.status.as_ref().unwrap();
        assert!(status.images.is_none() && status.conditions.is_none());
        assert!(status.node_info.is_none() && status.capacity.is_none());
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
        assert_eq!(pruned.metadata.labels, full.metadata.labels);
        assert_eq!(pruned.spec, full.spec);
        let size = |n: &k8s_openapi::api::core::v1::Node| serde_json::to_vec(n).unwrap().len();
        assert!(
            size(&pruned) * 5 < size(&full),
            "{} vs {}",
            size(&pruned),
            size(&full)
        );
    }
}
