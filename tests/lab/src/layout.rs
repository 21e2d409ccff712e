//! Names, addresses and paths of one lab. Pure: computing a layout touches nothing.
//!
//! Every namespace of a lab is named `<lab>.<role>`; lab names may not contain dots, so the prefix
//! `<lab>.` belongs to exactly one lab and two labs (or parallel tests) never collide.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use veilnet::lab_paths::{
    InvalidLabName, LabPaths, NODE_CNI_CONF_DIR, NODE_RUN_DIR, NODE_STATE_DIR,
};
use veilnet::model::encryption::Mode;

pub use veilnet::lab_paths::{labs_root, validate_name, DEFAULT_LAB_ROOT, LAB_ROOT_ENV};
/// Port of the API stand-in on the control plane's underlay address.
pub const API_PORT: u16 = 6443;
/// Interface name of every node's and the control plane's link onto the underlay.
pub const UNDERLAY_IFNAME: &str = "eth0";
/// TCP and UDP port of the external host's server (it answers with the source address it sees).
pub const EXTERNAL_PORT: u16 = 8080;
/// Name of the bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    InvalidName(#[from] InvalidLabName),
    #[error("a lab needs between 1 and {max} nodes, not {got}")]
    NodeCount { got: usize, max: usize },
    #[error("underlay {cidr} is too small for {nodes} nodes")]
    UnderlayTooSmall { cidr: Ipv4Net, nodes: usize },
}

/// Which CNI plugin chain the lab kubelets use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CniMode {
    /// veilnet's own plugin, driven by the veilnet agent.
    Veilnet,
    /// Debian's containernetworking-plugins (bridge + host-local): proves the kubelet on its own.
    Reference,
}

/// Who sets each Node's pod CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodCidrMode {
    /// Pre-set in `spec.podCIDR(s)`, as kube-controller-manager `--allocate-node-cidrs` would.
    Assigned,
    /// Left empty for the veilnet agent to allocate.
    Agent,
}

/// Which Kubernetes control plane serves the lab's API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ControlPlane {
    /// veilnet's embedded API stand-in: instant, no auth (the demo's).
    #[default]
    StandIn,
    /// The real kube-apiserver, etcd, kube-controller-manager and kube-scheduler, built by
    /// scripts/build-kubernetes.sh, with TLS, client certificates, Node and RBAC authorization.
    Kubernetes,
}

/// What the user asked for; saved as `lab.json` so later commands know the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    pub underlay_mtu: u32,
    pub underlay_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    pub node_cidr_prefix: u8,
    pub cni: CniMode,
    pub pod_cidrs: PodCidrMode,
    /// Default encryption mode of the agents (per node: the `veilnet.io/encryption` label).
    #[serde(default = "default_encryption")]
    pub encryption: Mode,
    /// The agents' `--policy-strict-mode` (`None`: their default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_strict_mode: Option<bool>,
    /// Who serves the API (absent in labs made before the option: the stand-in).
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// An external host on the underlay (`<lab>.ext`, not a node) that reports the source
    /// address it sees (absent in labs made before the option: none).
    #[serde(default)]
    pub external_host: bool,
    /// The agents' `--dns-mode` (`None`: their default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_mode: Option<veilnet::dns::DnsMode>,
    /// The agents' `--trusted-dns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_dns: Vec<ipnet::IpNet>,
    /// The agents' `--flow-log-allowed` (absent in labs made before the option: off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flow_log_allowed: bool,
    /// Every agent's `--config` file (absolute; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_config: Option<std::path::PathBuf>,
}

fn default_encryption() -> Mode {
    Mode::On
}

impl LabSpec {
    pub const MAX_NODES: usize = 64;

    pub fn validate(&self) -> Result<(), LayoutError> {
        validate_name(&self.name)?;
        if self.nodes == 0 || self.nodes > Self::MAX_NODES {
            return Err(LayoutError::NodeCount {
                got: self.nodes,
                max: Self::MAX_NODES,
            });
        }
        // .1 is the control plane, nodes start at .11, the external host is the last address.
        let hosts = self.underlay_cidr.hosts().count();
        if hosts < 10 + self.nodes + usize::from(self.external_host) {
            return Err(LayoutError::UnderlayTooSmall {
                cidr: self.underlay_cidr,
                nodes: self.nodes,
            });
        }
        Ok(())
    }
}

/// Everything about one lab that can be derived from its name and spec.
#[derive(Clone, Debug)]
pub struct LabLayout {
    pub spec: LabSpec,
    /// Where the lab's files are, by the convention the product reads them with.
    pub paths: LabPaths,
}

/// One node of a lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLayout {
    /// 1-based.
    pub index: usize,
    /// Kubernetes Node name, e.g. `node-1`.
    pub name: String,
    pub netns: String,
    /// Name of the node's port on the underlay bridge (inside the underlay namespace).
    pub underlay_port: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
}

impl NodeLayout {
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join(NODE_CNI_CONF_DIR)
    }
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }
    /// Persistent state (keys, IPAM); on a real node this is under /var/lib.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(NODE_STATE_DIR)
    }
    /// Runtime files (sockets, the MTU/state file for the CNI plugin); /run on a real node.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(NODE_RUN_DIR)
    }
    /// The kubelet's per-pod files (logs, CNI result cache).
    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    /// Prefix of the pod namespaces this node's kubelet creates.
    pub fn pod_netns_prefix(&self) -> String {
        format!("{}.p-", self.netns)
    }
    /// The namespace of the pod with this UID on this node.
    pub fn pod_netns(&self, pod_uid: &str) -> String {
        pod_netns_name(&self.pod_netns_prefix(), pod_uid)
    }
    /// The kubelet's kubeconfig with the real control plane (its `system:node:<name>` client
    /// certificate); with the stand-in the kubelet uses the lab's kubeconfig.
    pub fn kubelet_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubelet.kubeconfig")
    }
    /// The agent's kubeconfig with the real control plane (a token of the `veilnet`
    /// ServiceAccount); with the stand-in the agent uses the lab's kubeconfig.
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.join("agent.kubeconfig")
    }
}

impl LabLayout {
    pub fn new(spec: LabSpec) -> Result<Self, LayoutError> {
        spec.validate()?;
        let paths = LabPaths::new(&spec.name)?;
        Ok(Self { spec, paths })
    }

    /// The lab's own directory.
    pub fn root(&self) -> &Path {
        self.paths.root()
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// Every namespace of this lab starts with this.
    pub fn netns_prefix(&self) -> String {
        format!("{}.", self.spec.name)
    }
    pub fn control_plane_netns(&self) -> String {
        self.paths.control_plane_netns()
    }
    pub fn underlay_netns(&self) -> String {
        format!("{}.ul", self.spec.name)
    }
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        nth_host(self.spec.underlay_cidr, 1)
    }
    /// The external host's namespace (with `--external-host`).
    pub fn external_netns(&self) -> String {
        format!("{}.ext", self.spec.name)
    }
    /// The external host's underlay address: the underlay's last host address, which no node
    /// uses (nodes count up from .11) and which is outside the cluster CIDR.
    pub fn external_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.spec.underlay_cidr.broadcast()) - 1)
    }
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.control_plane_ip(), API_PORT))
    }
    pub fn api_url(&self) -> String {
        match self.spec.control_plane {
            ControlPlane::StandIn => format!("http://{}", self.api_addr()),
            ControlPlane::Kubernetes => format!("https://{}", self.api_addr()),
        }
    }
    /// The real control plane's files: certificates and keys, kubeconfigs, etcd's data.
    pub fn control_plane_dir(&self) -> PathBuf {
        self.root().join("control-plane")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.paths.kubeconfig()
    }
    pub fn spec_file(&self) -> PathBuf {
        self.root().join("lab.json")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.root().join("logs")
    }

    pub fn node(&self, index: usize) -> NodeLayout {
        let name = format!("node-{index}");
        NodeLayout {
            index,
            netns: format!("{}.n{index}", self.spec.name),
            underlay_port: format!("n{index}"),
            ip: nth_host(self.spec.underlay_cidr, 10 + index as u32),
            dir: self.paths.node_dir(&name),
            name,
        }
    }

    pub fn nodes(&self) -> Vec<NodeLayout> {
        (1..=self.spec.nodes).map(|i| self.node(i)).collect()
    }

    /// The pod CIDR the lab pre-assigns to node `index` in `assigned` mode: the index-th subnet of
    /// the cluster CIDR (subnet 0 is skipped, as operators expect `.1.0/24` for the first node).
    pub fn assigned_pod_cidr(&self, index: usize) -> Option<Ipv4Net> {
        self.spec
            .cluster_cidr
            .subnets(self.spec.node_cidr_prefix)
            .ok()?
            .nth(index)
    }
}

/// A pod's namespace name: the node's prefix and the first 12 hex digits of the pod UID. Shared by
/// the kubelet (which creates it) and `lab exec` (which enters it).
pub fn pod_netns_name(prefix: &str, pod_uid: &str) -> String {
    let hex: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{prefix}{hex}")
}

fn nth_host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, nodes: usize) -> LabSpec {
        LabSpec {
            name: name.into(),
            nodes,
            underlay_mtu: 1500,
            underlay_cidr: "172.30.0.0/24".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_cidr_prefix: 24,
            cni: CniMode::Reference,
            pod_cidrs: PodCidrMode::Assigned,
            encryption: Mode::On,
            policy_strict_mode: None,
            control_plane: ControlPlane::StandIn,
            external_host: false,
            dns_mode: None,
            flow_log_allowed: false,
            agent_config: None,
            trusted_dns: Vec::new(),
        }
    }

    #[test]
    fn names_addresses_and_cidrs() {
        let lab = LabLayout::new(spec("veilnet", 3)).unwrap();
        assert_eq!(lab.control_plane_netns(), "veilnet.cp");
        assert_eq!(lab.api_url(), "http://172.30.0.1:6443");
        let n2 = lab.node(2);
        assert_eq!(n2.name, "node-2");
        assert_eq!(n2.netns, "veilnet.n2");
        assert_eq!(n2.ip, "172.30.0.12".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            lab.assigned_pod_cidr(2).unwrap().to_string(),
            "10.244.2.0/24"
        );
        assert!(n2.pod_netns_prefix().starts_with(&lab.netns_prefix()));
        // `veilnet doctor --lab` and `status --lab` find the node by the shared convention.
        let paths = LabPaths::new("veilnet").unwrap();
        assert_eq!(
            paths.node_netns(&n2.name).as_deref(),
            Some(n2.netns.as_str())
        );
        assert_eq!(paths.node_state_dir(&n2.name), n2.state_dir());
        assert_eq!(paths.node_cni_conf_dir(&n2.name), n2.cni_conf_dir());
    }

    #[test]
    fn the_external_host_is_the_last_underlay_address() {
        let mut s = spec("lab", 3);
        s.external_host = true;
        let lab = LabLayout::new(s).unwrap();
        assert_eq!(lab.external_netns(), "lab.ext");
        assert_eq!(
            lab.external_ip(),
            "172.30.0.254".parse::<Ipv4Addr>().unwrap()
        );
        assert!(lab.nodes().iter().all(|n| n.ip != lab.external_ip()));
        assert!(!lab.spec.cluster_cidr.contains(&lab.external_ip()));
    }

    #[test]
    fn specs_of_older_labs_still_load() {
        let old = r#"{"name":"old","nodes":2,"underlay_mtu":1500,"underlay_cidr":"172.30.0.0/24",
            "cluster_cidr":"10.244.0.0/16","node_cidr_prefix":24,"cni":"veilnet","pod_cidrs":"assigned"}"#;
        let s: LabSpec = serde_json::from_str(old).unwrap();
        assert!(!s.external_host);
        assert_eq!(s.control_plane, ControlPlane::StandIn);
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(LabLayout::new(spec("Bad.Name", 3)).is_err());
        assert!(LabLayout::new(spec("lab", 0)).is_err());
        let mut small = spec("lab", 10);
        small.underlay_cidr = "172.30.0.0/28".parse().unwrap();
        assert!(LabLayout::new(small).is_err());
    }
}
