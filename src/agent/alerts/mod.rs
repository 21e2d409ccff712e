//! Network anomaly alerts, the network half of Falco: the [`detector`] judges what the node's
//! enforcer already sees (flow-log verdicts, DNS counters); each alert it raises becomes
//!
//! - a JSON line in `<runDir>/alerts.jsonl` (`{"time","node","kind","pod","message"}`),
//! - one more in the metric `veilnet_alerts_total{kind}`,
//! - a Warning Event on the pod (reason [`EVENT_REASON`], the evidence in its message), at most
//!   [`AlertConfig::max_events_per_minute`] a minute from a node. Its name is derived from the pod,
//!   the kind and the repeat interval, so the nodes that see one scan (each sees the part aimed at
//!   its pods) post one Event between them: the second create is a conflict, not a second Event.
//!
//! The detector runs on the flow log's reader thread; Events and file writes run on a task of
//! their own, fed through a bounded queue, so a slow API server never stalls the flow log.

pub mod detector;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::sync::mpsc;

pub use detector::{Alert, AlertConfig, AlertKind, Detector, Observation};

/// The reason of every alert Event (`kubectl get events --field-selector reason=…`).
pub const EVENT_REASON: &str = "VeilnetNetworkAnomaly";
/// The alerts file in the run directory.
pub const ALERTS_FILE: &str = "alerts.jsonl";
/// Alerts waiting for their Event and line; beyond it they are only counted.
const QUEUE: usize = 256;
/// The alerts file is rotated (to `<file>.1`) beyond this size.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// One line of `alerts.jsonl`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AlertLine {
    pub time: String,
    pub node: String,
    #[serde(flatten)]
    pub alert: Alert,
}

/// The detector and the queue to the task that reports its alerts.
pub struct Alerts {
    detector: Mutex<Detector>,
    queue: mpsc::Sender<AlertLine>,
    node: String,
}

impl Alerts {
    /// The detector, and the task (on the current runtime) that writes `<run_dir>/alerts.jsonl`
    /// and posts Events with `client`; `on_alert` counts each alert (for the metric).
    pub fn start(
        config: AlertConfig,
        client: kube::Client,
        node: &str,
        run_dir: PathBuf,
        pods: kube::runtime::reflector::Store<Pod>,
    ) -> (Alerts, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let max_per_minute = config.max_events_per_minute;
        let repeat = config.repeat_after_seconds.max(1);
        let task = tokio::spawn(report(
            rx,
            Reporter {
                client,
                node: node.to_string(),
                file: run_dir.join(ALERTS_FILE),
                pods,
                max_per_minute,
                repeat,
            },
        ));
        (
            Alerts {
                detector: Mutex::new(Detector::new(config)),
                queue: tx,
                node: node.to_string(),
            },
            task,
        )
    }

    /// Judges one observation; an alert it raises is queued for its line and Event and returned
    /// (for the caller's count).
    pub fn observe(&self, obs: Observation<'_>) -> Option<Alert> {
        let alert = self
            .detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(Instant::now(), obs)?;
        tracing::warn!(kind = alert.kind.as_str(), pod = %alert.pod, message = %alert.message, "network anomaly");
        let line = AlertLine {
            time: jiff::Timestamp::now().to_string(),
            node: self.node.clone(),
            alert: alert.clone(),
        };
        if self.queue.try_send(line).is_err() {
            tracing::warn!(kind = alert.kind.as_str(), pod = %alert.pod, "alert queue full: no Event or line for this alert");
        }
        Some(alert)
    }
}

struct Reporter {
    client: kube::Client,
    node: String,
    file: PathBuf,
    pods: kube::runtime::reflector::Store<Pod>,
    max_per_minute: u32,
    repeat: u64,
}

async fn report(mut rx: mpsc::Receiver<AlertLine>, r: Reporter) {
    let mut minute = Instant::now();
    let mut posted = 0u32;
    while let Some(line) = rx.recv().await {
        if let Err(e) = append(&r.file, &line) {
            tracing::warn!(path = %r.file.display(), error = %e, "cannot write the alert line");
        }
        if minute.elapsed().as_secs() >= 60 {
            minute = Instant::now();
            posted = 0;
        }
        if posted >= r.max_per_minute {
            tracing::warn!(pod = %line.alert.pod, "alert Event rate limit reached: logged and counted only");
            continue;
        }
        posted += 1;
        post_event(&r, &line).await;
    }
}

fn append(path: &PathBuf, line: &AlertLine) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE_BYTES) {
        let _ = std::fs::rename(path, path.with_extension("jsonl.1"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    f.write_all(&bytes)
}

/// The Event's name: the same on every node for one pod, kind and repeat interval.
pub fn event_name(pod_name: &str, kind: AlertKind, unix_secs: u64, repeat: u64) -> String {
    let bucket = unix_secs / repeat.max(1);
    let base: String = pod_name.chars().take(200).collect();
    format!("{base}.veilnet-{}-{bucket:x}", kind.as_str())
}

async fn post_event(r: &Reporter, line: &AlertLine) {
    let Some((namespace, name)) = line.alert.pod.split_once('/') else {
        return;
    };
    let uid = r
        .pods
        .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
        .and_then(|p| p.metadata.uid.clone());
    let now = jiff::Timestamp::now();
    let secs = u64::try_from(now.as_second()).unwrap_or(0);
    let component = "veilnet-agent";
    let event = Event {
        metadata: ObjectMeta {
            name: Some(event_name(name, line.alert.kind, secs, r.repeat)),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            uid,
            ..Default::default()
        },
        reason: Some(EVENT_REASON.into()),
        message: Some(format!(
            "{} ({}, seen by node {}): {}",
            line.alert.kind.as_str(),
            "veilnet",
            r.node,
            line.alert.message
        )),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(component.into()),
            host: Some(r.node.clone()),
        }),
        reporting_component: Some(component.into()),
        reporting_instance: Some(r.node.clone()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Observe".into()),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(r.client.clone(), namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => {}
        // Another node saw the same anomaly in this interval and posted it.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => {
            tracing::warn!(pod = %line.alert.pod, error = %e, "could not post the alert Event")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_shared_within_an_interval_and_valid() {
        let a = event_name("web-0", AlertKind::Scan, 1_200, 600);
        assert_eq!(a, "web-0.veilnet-scan-2");
        assert_eq!(event_name("web-0", AlertKind::Scan, 1_799, 600), a);
        assert_ne!(event_name("web-0", AlertKind::Scan, 1_800, 600), a);
        assert_ne!(event_name("web-0", AlertKind::DnsTunnel, 1_200, 600), a);
        let long = event_name(&"p".repeat(253), AlertKind::DnsNxdomain, 0, 0);
        assert!(long.len() <= 253, "{}", long.len());
    }
}
