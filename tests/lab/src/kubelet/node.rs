//! The Node side of the kubelet: registration, `nodes/status` (addresses, nodeInfo, capacity,
//! conditions with heartbeats), the node Lease, and the runtime's network readiness.
//!
//! Ready follows the network as a real kubelet + containerd do: a loadable CNI config and, for
//! `cniVersion` >= 1.1.0, a successful STATUS of its plugins.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::cni::{self, CniRuntime};
use super::network::{self, NetworkState};

pub const KUBELET_VERSION: &str = "v1.33.0-veilnet-lab";
pub const RUNTIME_VERSION: &str = "veilnet-lab://0.1";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// Field manager of our writes.
pub const FIELD_MANAGER: &str = "veilnet-lab-kubelet";
/// Condition types this kubelet owns; others (e.g. NetworkUnavailable) are preserved.
const OWNED_CONDITIONS: &[&str] = &["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"];

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {node}: {source}")]
    Api { node: String, source: kube::Error },
}

/// Facts about the machine, gathered once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    pub kernel_version: String,
    pub os_image: String,
    pub architecture: String,
    pub boot_id: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub cpus: usize,
    pub memory_ki: u64,
    pub ephemeral_storage_bytes: Option<u64>,
    pub max_pods: u32,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `PRETTY_NAME` from os-release.
fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

fn mem_total_ki() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kubernetes' name of the architecture.
fn go_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
    .to_string()
}

pub fn gather_host_info(max_pods: u32, storage_dir: &Path) -> HostInfo {
    let uname = nix::sys::utsname::uname().ok();
    let ephemeral = nix::sys::statvfs::statvfs(storage_dir)
        .ok()
        .map(|s| s.blocks().saturating_mul(s.fragment_size()));
    HostInfo {
        kernel_version: uname
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        os_image: os_image(),
        architecture: go_arch(),
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        machine_id: read_trimmed("/etc/machine-id"),
        system_uuid: read_trimmed("/sys/class/dmi/id/product_uuid"),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_ki: mem_total_ki(),
        ephemeral_storage_bytes: ephemeral,
        max_pods,
    }
}

fn node_condition(
    type_: &str,
    ok_status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
    previous: Option<&NodeStatus>,
) -> NodeCondition {
    let status = if ok_status { "True" } else { "False" };
    let prev = previous
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_));
    let transition = match prev {
        Some(p) if p.status == status && p.last_transition_time.is_some() => {
            p.last_transition_time.clone()
        }
        _ => Some(Time(now)),
    };
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: transition,
    }
}

/// The status this kubelet reports (pure). `previous` keeps transition times and foreign
/// conditions.
pub fn node_status(
    host: &HostInfo,
    node_name: &str,
    node_ip: IpAddr,
    network: &NetworkState,
    previous: Option<&NodeStatus>,
    now: Timestamp,
) -> NodeStatus {
    let (ready_reason, ready_message) = if network.ready {
        (
            "KubeletReady",
            "kubelet is posting ready status".to_string(),
        )
    } else {
        (
            "KubeletNotReady",
            network::not_ready_message(&network.message),
        )
    };
    let mut conditions = vec![
        node_condition(
            "MemoryPressure",
            false,
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            now,
            previous,
        ),
        node_condition(
            "DiskPressure",
            false,
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
            now,
            previous,
        ),
        node_condition(
            "PIDPressure",
            false,
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
            now,
            previous,
        ),
        node_condition(
            "Ready",
            network.ready,
            ready_reason,
            &ready_message,
            now,
            previous,
        ),
    ];
    if let Some(prev) = previous.and_then(|p| p.conditions.as_ref()) {
        conditions.extend(
            prev.iter()
                .filter(|c| !OWNED_CONDITIONS.contains(&c.type_.as_str()))
                .cloned(),
        );
    }
    let mut capacity = BTreeMap::new();
    capacity.insert("cpu".to_string(), Quantity(host.cpus.to_string()));
    capacity.insert(
        "memory".to_string(),
        Quantity(format!("{}Ki", host.memory_ki)),
    );
    capacity.insert("pods".to_string(), Quantity(host.max_pods.to_string()));
    if let Some(bytes) = host.ephemeral_storage_bytes {
        capacity.insert("ephemeral-storage".to_string(), Quantity(bytes.to_string()));
    }
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node_name.to_string(),
            },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(conditions),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: 10250 }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: host.architecture.clone(),
            boot_id: host.boot_id.clone(),
            container_runtime_version: RUNTIME_VERSION.into(),
            kernel_version: host.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: host.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: host.os_image.clone(),
            system_uuid: host.system_uuid.clone(),
            swap: None,
        }),
        ..Default::default()
    }
}

/// Statuses equal but for heartbeat times: nothing worth an early update.
pub fn same_node_status(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
            c.last_transition_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

/// The Node object a kubelet registers.
pub fn new_node(name: &str, host: &HostInfo) -> Node {
    let labels = [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", host.architecture.as_str()),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", host.architecture.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The node's Lease, owned by the Node (so it goes with it).
pub fn new_lease(node_name: &str, node_uid: Option<&str>, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node_name.to_string()),
            namespace: Some(LEASE_NAMESPACE.to_string()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node_name.to_string(),
                    uid: uid.to_string(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node_name.to_string()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Evaluates the runtime's network readiness once.
pub async fn check_network(cni: &CniRuntime, conf_dir: &Path) -> NetworkState {
    let list = match cni::load_default_config(conf_dir) {
        Ok(l) => l,
        Err(e) => {
            return NetworkState {
                ready: false,
                config: None,
                message: format!("cni plugin not initialized: {e}"),
            }
        }
    };
    if let Err(e) = cni.status(&list).await {
        return NetworkState {
            ready: false,
            config: Some(Arc::new(list)),
            message: e.to_string(),
        };
    }
    NetworkState {
        ready: true,
        config: Some(Arc::new(list)),
        message: String::new(),
    }
}

/// Re-checks network readiness: every `fast` until ready (so a lab comes up quickly), then every
/// `slow`. Publishes changes only.
pub async fn monitor_network(
    cni: CniRuntime,
    conf_dir: PathBuf,
    tx: watch::Sender<NetworkState>,
    fast: Duration,
    slow: Duration,
) {
    loop {
        let state = check_network(&cni, &conf_dir).await;
        let ready = state.ready;
        tx.send_if_modified(|current| {
            let changed = current.ready != state.ready
                || current.message != state.message
                || current.config.as_deref() != state.config.as_deref();
            if changed {
                if state.ready {
                    tracing::info!(config = ?state.config.as_ref().map(|c| &c.origin), "network ready");
                } else {
                    tracing::warn!(reason = %state.message, "network not ready");
                }
                *current = state;
            }
            changed
        });
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(if ready { slow } else { fast }).await;
    }
}

/// Registers the node and keeps its status and Lease fresh.
pub struct NodeAgent {
    pub client: Client,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub host: HostInfo,
    pub network: watch::Receiver<NetworkState>,
    pub status_period: Duration,
    pub lease_period: Duration,
}

impl NodeAgent {
    fn err(&self) -> impl Fn(kube::Error) -> NodeError + '_ {
        move |source| NodeError::Api {
            node: self.node_name.clone(),
            source,
        }
    }

    /// Gets the Node, creating it when absent (the lab usually creates it first).
    pub async fn register(&self) -> Result<Node, NodeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        if let Some(node) = nodes.get_opt(&self.node_name).await.map_err(self.err())? {
            return Ok(node);
        }
        tracing::info!(node = %self.node_name, "registering node");
        match nodes
            .create(
                &PostParams::default(),
                &new_node(&self.node_name, &self.host),
            )
            .await
        {
            Ok(n) => Ok(n),
            // Created meanwhile by someone else.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                nodes.get(&self.node_name).await.map_err(self.err())
            }
            Err(e) => Err(self.err()(e)),
        }
    }

    async fn update_status(&self, last: &mut Option<NodeStatus>) -> Result<(), NodeError> {
        let node = self.register().await?;
        let network = self.network.borrow().clone();
        let status = node_status(
            &self.host,
            &self.node_name,
            self.node_ip,
            &network,
            node.status.as_ref(),
            Timestamp::now(),
        );
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({ "status": status });
        nodes
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(self.err())?;
        *last = Some(status);
        Ok(())
    }

    async fn renew_lease(&self, node_uid: Option<&str>) -> Result<(), NodeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let lease = new_lease(&self.node_name, node_uid, Timestamp::now());
        if leases
            .get_opt(&self.node_name)
            .await
            .map_err(self.err())?
            .is_none()
        {
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(self.err()(e)),
            }
        }
        let patch = serde_json::json!({ "spec": lease.spec });
        leases
            .patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Runs until the task is dropped. Status goes out every `status_period` or as soon as
    /// readiness changes; the Lease every `lease_period`.
    pub async fn run(self) {
        let mut last: Option<NodeStatus> = None;
        let mut node_uid: Option<String> = None;
        let mut status_tick = tokio::time::interval(self.status_period);
        let mut lease_tick = tokio::time::interval(self.lease_period);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut network = self.network.clone();
        loop {
            tokio::select! {
                _ = status_tick.tick() => {}
                changed = network.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let ready = network.borrow_and_update().ready;
                    let was_ready = last
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                        .is_some_and(|c| c.status == "True");
                    if ready == was_ready {
                        continue;
                    }
                }
                _ = lease_tick.tick() => {
                    if node_uid.is_none() {
                        node_uid = self.register().await.ok().and_then(|n| n.metadata.uid);
                    }
                    if let Err(e) = self.renew_lease(node_uid.as_deref()).await {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                    continue;
                }
            }
            if let Err(e) = self.update_status(&mut last).await {
                tracing::warn!(error = %e, "node status update failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            architecture: "amd64".into(),
            boot_id: "b".into(),
            machine_id: "m".into(),
            system_uuid: String::new(),
            cpus: 2,
            memory_ki: 4_000_000,
            ephemeral_storage_bytes: None,
            max_pods: 110,
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn ready_of(s: &NodeStatus) -> NodeCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .clone()
    }

    #[test]
    fn not_ready_until_the_network_is() {
        let ip: IpAddr = "172.30.0.11".parse().unwrap();
        let down = NetworkState {
            ready: false,
            config: None,
            message: "cni plugin not initialized".into(),
        };
        let s = node_status(&host(), "node-1", ip, &down, None, ts(0));
        let r = ready_of(&s);
        assert_eq!(r.status, "False");
        assert_eq!(r.reason.as_deref(), Some("KubeletNotReady"));
        assert!(r.message.unwrap().starts_with(
            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:"
        ));
        let addrs = s.addresses.as_ref().unwrap();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[0].address, "172.30.0.11");
        let info = s.node_info.as_ref().unwrap();
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert_eq!(info.container_runtime_version, RUNTIME_VERSION);
        assert_eq!(s.capacity.as_ref().unwrap()["pods"].0, "110");
        assert_eq!(s.capacity.as_ref().unwrap()["memory"].0, "4000000Ki");

        let up = NetworkState {
            ready: true,
            config: None,
            message: String::new(),
        };
        // A foreign condition survives, Ready flips with a new transition time.
        let mut prev = s.clone();
        prev.conditions.as_mut().unwrap().push(NodeCondition {
            type_: "NetworkUnavailable".into(),
            status: "False".into(),
            ..Default::default()
        });
        let s2 = node_status(&host(), "node-1", ip, &up, Some(&prev), ts(10));
        let r2 = ready_of(&s2);
        assert_eq!(r2.status, "True");
        assert_eq!(r2.reason.as_deref(), Some("KubeletReady"));
        assert_eq!(r2.last_transition_time, Some(Time(ts(10))));
        assert!(s2
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .any(|c| c.type_ == "NetworkUnavailable"));
        let mem = s2
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "MemoryPressure")
            .unwrap()
            .clone();
        assert_eq!(mem.last_transition_time, Some(Time(ts(0))));
        assert_eq!(mem.last_heartbeat_time, Some(Time(ts(10))));
        assert!(!same_node_status(&s, &s2));
    }

    #[test]
    fn lease_is_held_by_the_node() {
        let l = new_lease("node-1", Some("uid-1"), ts(0));
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(l.metadata.namespace.as_deref(), Some(LEASE_NAMESPACE));
        assert_eq!(l.metadata.owner_references.unwrap()[0].kind, "Node");
    }

    #[test]
    fn registered_node_has_standard_labels() {
        let n = new_node("node-1", &host());
        let labels = n.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "node-1");
        assert_eq!(labels["kubernetes.io/arch"], "amd64");
    }
}
