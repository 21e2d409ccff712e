//! Kubernetes Events about what the agent refuses or cannot do (a peer with a malformed annotation,
//! a CIDR conflict …), so operators see it with `kubectl describe node` and not only in logs.
//!
//! The same event is posted at most once per [`REPEAT_AFTER`], so a permanently bad peer does not
//! flood the API on every resync.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

pub const REPEAT_AFTER: Duration = Duration::from_secs(600);
/// Events go to `default`, as kubelet's Node events do (Nodes are cluster-scoped).
const NODE_EVENT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

pub struct EventSink {
    client: kube::Client,
    component: String,
    host: String,
    last_posted: Mutex<HashMap<(String, String, String), Instant>>,
}

impl EventSink {
    pub fn new(client: kube::Client, component: &str, host: &str) -> Self {
        Self {
            client,
            component: component.into(),
            host: host.into(),
            last_posted: Mutex::new(HashMap::new()),
        }
    }

    /// Posts an event about the Node `node`. Failures are logged, never fatal: events are advisory.
    pub async fn node_event(&self, node: &str, kind: EventType, reason: &str, message: &str) {
        let key = (node.to_string(), reason.to_string(), message.to_string());
        {
            let mut seen = self.last_posted.lock().unwrap_or_else(|p| p.into_inner());
            if seen.get(&key).is_some_and(|t| t.elapsed() < REPEAT_AFTER) {
                return;
            }
            seen.insert(key, Instant::now());
        }
        let now = jiff::Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{node}.veilnet.")),
                namespace: Some(NODE_EVENT_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                uid: Some(node.into()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(match kind {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: Some(self.host.clone()),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some("Reconcile".into()),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), NODE_EVENT_NAMESPACE);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(node, reason, error = %e, "could not post event");
        }
    }
}
