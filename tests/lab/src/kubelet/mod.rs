//! The lab kubelet: runs the pods bound to one node, driving CNI plugins exactly as a container
//! runtime (containerd/CRI-O through libcni) does, and keeps the Node, its Lease and the pods'
//! statuses up to date.
//!
//! - `cni`: the CNI exec protocol (config selection, stdin/env, chains, result cache, STATUS/GC).
//! - `sandbox`: pod network namespaces attached with CNI, and their on-disk records.
//! - `containers`: containers as processes in the pod namespace (logs, records, restarts).
//! - `probes`: readiness probes.
//! - `status`: pod status computation (pure).
//! - `pods`: one worker per pod (lifecycle, events, status reports).
//! - `network`: the pod network's readiness, reported by `node` and awaited by `pods`.
//! - `node`: registration, node status, Lease, network readiness.
//!
//! On SIGTERM the kubelet leaves pods and namespaces in place (as a real kubelet leaves
//! containers running); the next kubelet adopts them from the records in `--kubelet-dir`.
//!
//! What it asks of the API server (all JSON; patches are `application/merge-patch+json`):
//! - `GET /api/v1/nodes/{node}`, `POST /api/v1/nodes`, `PATCH /api/v1/nodes/{node}/status`;
//! - `GET|POST|PATCH /apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases[/{node}]`;
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName%3D{node}&limit=500`, then the same with
//!   `watch=true&resourceVersion=…&allowWatchBookmarks=true&timeoutSeconds=290`;
//! - `PATCH /api/v1/namespaces/{ns}/pods/{name}/status`;
//! - `DELETE /api/v1/namespaces/{ns}/pods/{name}` with body
//!   `{"gracePeriodSeconds":0,"preconditions":{"uid":…}}` (404 and 409 are fine);
//! - `POST /api/v1/namespaces/{ns}/events`, `PATCH /api/v1/namespaces/{ns}/events/{name}`.

pub mod cni;
pub mod containers;
pub mod network;
pub mod node;
pub mod pods;
pub mod probes;
pub mod sandbox;
pub mod status;

#[cfg(test)]
mod exec_tests;
#[cfg(test)]
mod run_tests;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use veilnet::duration::parse_duration;

use self::cni::CniRuntime;
use self::network::NetworkState;
use self::node::NodeAgent;
use self::pods::{EventRecord, NodeContext, PodApi, PodApiError, PodWorker, WorkerExit};
use self::sandbox::{PodKey, Sandboxes};

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("failed to create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("the pod watch ended before its first list")]
    WatchEnded,
}

/// `veilnet lab kubelet`: run pods of one node (started by `veilnet lab up`).
#[derive(Clone, Debug, clap::Args)]
pub struct KubeletArgs {
    /// Name of the Node this kubelet runs.
    #[arg(long)]
    pub node_name: String,
    /// The node's InternalIP (its underlay address).
    #[arg(long)]
    pub node_ip: IpAddr,
    /// Kubeconfig of the API server.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Directory of CNI network configs (the lexically first one is used).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Directories searched for CNI plugins, in order (repeatable).
    #[arg(long = "cni-bin-dir", default_values = ["/opt/cni/bin"])]
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Per-pod files (logs, records) and the CNI result cache.
    #[arg(long)]
    pub kubelet_dir: PathBuf,
    /// Prefix of the pod network namespaces (`<prefix><12 hex of the pod uid>`).
    #[arg(long)]
    pub netns_prefix: String,
    /// Pod capacity reported on the Node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Periods and timeouts (boxed: keeps the CLI enum small).
    #[command(flatten)]
    pub timing: Box<KubeletTiming>,
}

/// Periods and timeouts of the kubelet.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeletTiming {
    /// How often the node status is reported (also sent at once on readiness changes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub node_status_period: Duration,
    /// How often the node Lease is renewed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_period: Duration,
    /// Network readiness re-check interval while not ready.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub network_check_fast: Duration,
    /// Network readiness re-check interval once ready.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub network_check_slow: Duration,
    /// How often every pod is re-synced and garbage collected (CNI GC for 1.1.0 configs).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub gc_period: Duration,
    /// Timeout of each CNI plugin call.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub cni_timeout: Duration,
    /// Upper bound of a pod's termination grace period in the lab.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub max_grace_period: Duration,
}

async fn client_from(path: &PathBuf) -> Result<Client, KubeletError> {
    let err = |source| KubeletError::Kubeconfig {
        path: path.clone(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Ok(Client::try_from(config)?)
}

/// [`PodApi`] on a real API server, with the kubelet's event aggregation (a repeated event
/// bumps `count` and `lastTimestamp` of the first one instead of creating a new object).
pub struct KubeApi {
    client: Client,
    node_name: String,
    events: Mutex<HashMap<EventKey, (String, i32)>>,
}

/// (pod uid, reason, message) of an aggregated event.
type EventKey = (String, &'static str, String);

/// Bound of the aggregation memory.
const MAX_TRACKED_EVENTS: usize = 4096;

impl KubeApi {
    pub fn new(client: Client, node_name: String) -> Self {
        Self {
            client,
            node_name,
            events: Mutex::new(HashMap::new()),
        }
    }

    fn new_event(&self, pod: &PodKey, event: &EventRecord, now: Timestamp) -> Event {
        let suffix = format!("{:x}", now.as_nanosecond());
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{suffix}", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(event.reason.into()),
            message: Some(event.message.clone()),
            type_: Some(event.type_.into()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.node_name.clone()),
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.node_name.clone()),
            ..Default::default()
        }
    }
}

fn is_status(e: &kube::Error, codes: &[u16]) -> bool {
    matches!(e, kube::Error::Api(s) if codes.contains(&s.code))
}

impl PodApi for KubeApi {
    async fn patch_status(
        &self,
        pod: &PodKey,
        patch: serde_json::Value,
    ) -> Result<(), PodApiError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    async fn delete_pod(&self, pod: &PodKey) -> Result<(), PodApiError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(pod.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match pods.delete(&pod.name, &params).await {
            Ok(_) => Ok(()),
            // Gone already, or a new pod of the same name (uid precondition failed).
            Err(e) if is_status(&e, &[404, 409]) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn record_event(&self, pod: &PodKey, event: EventRecord) -> Result<(), PodApiError> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let now = Timestamp::now();
        let key = (pod.uid.clone(), event.reason, event.message.clone());
        let existing = self
            .events
            .lock()
            .map_err(|_| PodApiError::Other("event cache poisoned".into()))?
            .get(&key)
            .cloned();
        if let Some((name, count)) = existing {
            let patch = serde_json::json!({"count": count + 1, "lastTimestamp": Time(now)});
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if let Ok(mut map) = self.events.lock() {
                        map.insert(key, (name, count + 1));
                    }
                    return Ok(());
                }
                Err(e) if is_status(&e, &[404]) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let created = events
            .create(&PostParams::default(), &self.new_event(pod, &event, now))
            .await?;
        if let (Some(name), Ok(mut map)) = (created.metadata.name, self.events.lock()) {
            if map.len() >= MAX_TRACKED_EVENTS {
                map.clear();
            }
            map.insert(key, (name, 1));
        }
        Ok(())
    }
}

struct WorkerHandle {
    tx: watch::Sender<Option<Arc<Pod>>>,
    handle: JoinHandle<WorkerExit>,
}

/// Keeps one worker per pod of this node, and cleans up what no pod owns.
pub struct PodManager<A: PodApi> {
    ctx: Arc<NodeContext>,
    api: Arc<A>,
    workers: HashMap<String, WorkerHandle>,
    /// Pods whose worker finished (torn down) while the API still lists them.
    done: HashSet<String>,
}

impl<A: PodApi> PodManager<A> {
    pub fn new(ctx: Arc<NodeContext>, api: Arc<A>) -> Self {
        Self {
            ctx,
            api,
            workers: HashMap::new(),
            done: HashSet::new(),
        }
    }

    fn spawn(&mut self, key: PodKey, pod: Option<Arc<Pod>>) {
        let (tx, rx) = watch::channel(pod);
        let worker = PodWorker::new(self.ctx.clone(), self.api.clone(), key.clone(), rx);
        let handle = tokio::spawn(worker.run());
        self.workers.insert(key.uid, WorkerHandle { tx, handle });
    }

    /// Brings the workers in line with `pods` (the API's pods of this node).
    pub fn reconcile(&mut self, pods: &[Arc<Pod>]) {
        let mut seen = HashSet::new();
        for pod in pods {
            let on_this_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                == Some(self.ctx.node_name.as_str());
            let Some(key) = PodKey::from_pod(pod).filter(|_| on_this_node) else {
                continue;
            };
            seen.insert(key.uid.clone());
            if self.done.contains(&key.uid) {
                continue;
            }
            match self.workers.get(&key.uid) {
                Some(w) => {
                    w.tx.send_if_modified(|current| {
                        let same = current.as_ref().is_some_and(|c| {
                            c.metadata.resource_version == pod.metadata.resource_version
                        });
                        if !same {
                            *current = Some(pod.clone());
                        }
                        !same
                    });
                }
                None => self.spawn(key, Some(pod.clone())),
            }
        }
        for (uid, w) in &self.workers {
            if !seen.contains(uid) {
                w.tx.send_if_modified(|current| current.take().is_some());
            }
        }
        let finished: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.handle.is_finished())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in finished {
            self.workers.remove(&uid);
            if seen.contains(&uid) {
                self.done.insert(uid);
            }
        }
        self.done.retain(|uid| seen.contains(uid));
    }

    /// Tears down what exists on this node but not in the API (a crash leftover): pods recorded on
    /// disk, then namespaces and cached attachments no record owns.
    pub async fn collect_garbage(&mut self, api_uids: &HashSet<String>) {
        for record in self.ctx.sandboxes.discover() {
            let uid = record.pod.uid.clone();
            if !api_uids.contains(&uid) && !self.workers.contains_key(&uid) {
                tracing::info!(pod = %record.pod, "tearing down pod unknown to the API");
                self.spawn(record.pod, None);
            }
        }
        let records = self.ctx.sandboxes.discover();
        let netns: HashSet<String> = records.iter().map(|r| r.netns.clone()).collect();
        let ids: HashSet<String> = records.iter().map(|r| r.sandbox_id.clone()).collect();
        // A pod may be created meanwhile (its record comes before its namespace and its cache
        // entry): each stray is re-checked against the records right before removal.
        let owned_now = |pred: &dyn Fn(&sandbox::SandboxRecord) -> bool| {
            self.ctx.sandboxes.discover().iter().any(pred)
        };
        for cached in self.ctx.sandboxes.stray_attachments(&ids) {
            if owned_now(&|r| r.sandbox_id == cached.container_id) {
                continue;
            }
            tracing::info!(container_id = %cached.container_id, "DEL of an attachment no pod owns");
            if let Err(e) = self.ctx.sandboxes.remove_stray_attachment(&cached).await {
                tracing::warn!(error = %e, "stray attachment cleanup failed");
            }
        }
        for name in self.ctx.sandboxes.stray_netns(&netns) {
            if owned_now(&|r| r.netns == name) {
                continue;
            }
            tracing::info!(netns = %name, "removing a namespace no pod owns");
            if let Err(e) = self.ctx.sandboxes.remove_stray_netns(name).await {
                tracing::warn!(error = %e, "stray netns cleanup failed");
            }
        }
        let config = self.ctx.network.borrow().config.clone();
        if let Some(list) = config.filter(|l| l.supports_gc()) {
            if let Err(e) = self.ctx.sandboxes.gc(&list).await {
                tracing::warn!(error = %e, "CNI GC failed");
            }
        }
    }

    /// Stops the workers without tearing anything down; waits briefly for them.
    pub async fn shutdown(self) {
        let handles: Vec<JoinHandle<WorkerExit>> = self
            .workers
            .into_values()
            .map(|w| {
                drop(w.tx);
                w.handle
            })
            .collect();
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }
}

/// Runs the kubelet until SIGTERM/SIGINT.
pub async fn run(args: KubeletArgs) -> Result<(), KubeletError> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(KubeletError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(KubeletError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    run_until(args, stop).await
}

/// Runs the kubelet until `stop` completes; pods are left running for the next kubelet.
pub async fn run_until(
    args: KubeletArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), KubeletError> {
    let mut stop = std::pin::pin!(stop);
    std::fs::create_dir_all(&args.kubelet_dir).map_err(|source| KubeletError::Dir {
        path: args.kubelet_dir.clone(),
        source,
    })?;
    let client = client_from(&args.kubeconfig).await?;
    let mut cni = CniRuntime::new(
        args.cni_bin_dirs.clone(),
        args.kubelet_dir.join("cni-cache"),
    );
    cni.timeout = args.timing.cni_timeout;
    let sandboxes = Sandboxes::new(
        cni.clone(),
        args.netns_prefix.clone(),
        args.kubelet_dir.clone(),
    );

    let (net_tx, net_rx) = watch::channel(NetworkState {
        ready: false,
        config: None,
        message: "network status not checked yet".into(),
    });
    // A first check before anything else, so that adoption sees the config.
    net_tx.send_replace(node::check_network(&cni, &args.cni_conf_dir).await);
    let monitor = tokio::spawn(node::monitor_network(
        cni.clone(),
        args.cni_conf_dir.clone(),
        net_tx,
        args.timing.network_check_fast,
        args.timing.network_check_slow,
    ));

    let host = node::gather_host_info(args.max_pods, &args.kubelet_dir);
    let agent = NodeAgent {
        client: client.clone(),
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        host,
        network: net_rx.clone(),
        status_period: args.timing.node_status_period,
        lease_period: args.timing.lease_period,
    };
    let node_task = tokio::spawn(agent.run());

    let ctx = Arc::new(NodeContext {
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        sandboxes,
        network: net_rx,
        path: containers::lab_path(),
        max_grace: args.timing.max_grace_period,
    });
    let api = Arc::new(KubeApi::new(client.clone(), args.node_name.clone()));
    let mut manager = PodManager::new(ctx, api);

    let (store, writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let selector = format!("spec.nodeName={}", args.node_name);
    let pods: Api<Pod> = Api::all(client);
    let stream = reflector(
        writer,
        watcher(pods, watcher::Config::default().fields(&selector)),
    )
    .default_backoff();
    let watch_notify = changed.clone();
    let watch_task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "pod watch error");
            }
            watch_notify.notify_one();
        }
    });

    tracing::info!(node = %args.node_name, "waiting for the first pod list");
    // None: interrupted before the first list.
    let first_list = tokio::select! {
        r = store.wait_until_ready() => Some(r.is_ok()),
        _ = &mut stop => None,
    };
    let ready = first_list == Some(true);
    if ready {
        let uids = |store: &reflector::Store<Pod>| -> HashSet<String> {
            store
                .state()
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect()
        };
        manager.reconcile(&store.state());
        manager.collect_garbage(&uids(&store)).await;
        tracing::info!(node = %args.node_name, "kubelet running");
        let mut gc_tick = tokio::time::interval(args.timing.gc_period);
        gc_tick.tick().await;
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = gc_tick.tick() => manager.collect_garbage(&uids(&store)).await,
                _ = &mut stop => break,
            }
            manager.reconcile(&store.state());
        }
    }
    tracing::info!("shutting down; pods are left running for the next kubelet");
    watch_task.abort();
    node_task.abort();
    monitor.abort();
    manager.shutdown().await;
    match first_list {
        Some(false) => Err(KubeletError::WatchEnded),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_like_the_lab_passes_them() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: KubeletArgs,
        }
        let cli = Cli::try_parse_from([
            "kubelet",
            "--node-name",
            "node-1",
            "--node-ip",
            "172.30.0.11",
            "--kubeconfig",
            "/var/lib/veilnet-lab/lab/kubeconfig",
            "--cni-conf-dir",
            "/c",
            "--cni-bin-dir",
            "/b1",
            "--cni-bin-dir",
            "/b2",
            "--kubelet-dir",
            "/k",
            "--netns-prefix",
            "lab.n1.p-",
        ])
        .unwrap();
        assert_eq!(
            cli.args.cni_bin_dirs,
            vec![PathBuf::from("/b1"), PathBuf::from("/b2")]
        );
        assert_eq!(cli.args.max_pods, 110);
        assert_eq!(cli.args.timing.max_grace_period, Duration::from_secs(10));
    }
}
