//! One pass's view of the cluster: every Node turned into a typed [`PeerRecord`] once, from the
//! reflectors' current state (pure).
//!
//! A peer's pod CIDRs come from its `spec.podCIDR(s)`, else from veilnet's allocation record:
//! never from what the peer claims. Its recorded addresses come from `status.addresses`. Nodes
//! that carry no veilnet annotation at all are not peers yet (their agent has not started, or
//! they run no veilnet): they are left out without a fault.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::underlay::UnderlayDevice;
use crate::cluster::podcidr::{self, AllocationRecord};
use crate::model::annotations;
use crate::model::mac::{derive_vtep_mac, MacAddr};
use crate::model::peer::{NodeFacts, PeerRecord};

/// What the agent decided about itself at start; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct SelfInfo {
    pub underlay: UnderlayDevice,
    pub pod_cidrs: Vec<IpNet>,
    pub vtep_mac: MacAddr,
    /// True when the pod CIDR came from veilnet's allocation record (not `spec.podCIDR`).
    pub allocated: bool,
}

impl SelfInfo {
    pub fn new(
        node: &str,
        underlay: UnderlayDevice,
        pod_cidrs: Vec<IpNet>,
        allocated: bool,
    ) -> Self {
        Self {
            underlay,
            pod_cidrs,
            vtep_mac: derive_vtep_mac(node),
            allocated,
        }
    }
}

/// This node's own Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnNode {
    /// Parsed like every other Node (its label decides this node's mode; its published mode and
    /// key are its row of the path matrix).
    pub record: PeerRecord,
    /// Its veilnet annotations as they are now (what publishing compares against).
    pub annotations: BTreeMap<String, String>,
    /// The value of [`annotations::ROTATE_KEY`]: a key rotation request.
    pub rotate_request: Option<String>,
}

/// The cluster as one pass plans with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// `None` until the reflector has this node's Node.
    pub own: Option<OwnNode>,
    /// Every other Node with veilnet annotations, sorted by name.
    pub peers: Vec<PeerRecord>,
}

impl ClusterSnapshot {
    pub fn take(node_name: &str, nodes: &[Arc<Node>], record: &AllocationRecord) -> Self {
        let mut snapshot = ClusterSnapshot::default();
        let empty = BTreeMap::new();
        for node in nodes {
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            let anns = node.metadata.annotations.as_ref().unwrap_or(&empty);
            let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
            let facts = NodeFacts {
                pod_cidrs: pod_cidrs(node, name, record),
                node_addresses: recorded_addresses(node),
                created: created_seconds(node),
            };
            if name == node_name {
                snapshot.own = Some(OwnNode {
                    record: PeerRecord::parse(name, anns, labels, facts),
                    annotations: anns
                        .iter()
                        .filter(|(k, _)| k.starts_with(annotations::PREFIX))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    rotate_request: anns.get(annotations::ROTATE_KEY).cloned(),
                });
            } else if anns.keys().any(|k| k.starts_with(annotations::PREFIX)) {
                snapshot
                    .peers
                    .push(PeerRecord::parse(name, anns, labels, facts));
            } else {
                tracing::debug!(peer = name, "peer has not published its overlay data yet");
            }
        }
        snapshot.peers.sort_by(|a, b| a.name.cmp(&b.name));
        snapshot
    }
}

/// The Node's pod CIDRs as the cluster assigns them: its spec, else veilnet's allocation record.
fn pod_cidrs(node: &Node, name: &str, record: &AllocationRecord) -> Vec<IpNet> {
    let spec = podcidr::spec_cidrs(node);
    if spec.is_empty() {
        record
            .cidrs
            .get(name)
            .map(|c| IpNet::V4(*c))
            .into_iter()
            .collect()
    } else {
        spec.into_iter().map(IpNet::V4).collect()
    }
}

/// The Node's `metadata.creationTimestamp` in Unix seconds: who was there first.
fn created_seconds(node: &Node) -> Option<i64> {
    node.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

/// The addresses the cluster records for a Node (`status.addresses`: InternalIP and ExternalIP).
pub fn recorded_addresses(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Node object as the API would serve it; the cluster records the address the node
    /// publishes (the kubelet's InternalIP).
    pub(crate) fn node(
        name: &str,
        spec_cidr: Option<&str>,
        anns: &[(&str, &str)],
        labels: &[(&str, &str)],
    ) -> Arc<Node> {
        let annotations: BTreeMap<String, String> = anns
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let addresses: Vec<serde_json::Value> = annotations
            .get(annotations::UNDERLAY_IP)
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
            .into_iter()
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "annotations": annotations, "labels": labels},
                "spec": {"podCIDR": spec_cidr},
                "status": {"addresses": addresses},
            }))
            .unwrap(),
        )
    }

    fn good(ip: &str, mac: &str, claimed: &str) -> Vec<(&'static str, String)> {
        vec![
            (annotations::UNDERLAY_IP, ip.to_string()),
            (annotations::VTEP_MAC, mac.to_string()),
            (annotations::POD_CIDRS, claimed.to_string()),
        ]
    }

    fn node_owned(name: &str, spec: Option<&str>, anns: Vec<(&'static str, String)>) -> Arc<Node> {
        let refs: Vec<(&str, &str)> = anns.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node(name, spec, &refs, &[])
    }

    #[test]
    fn peer_cidrs_come_from_the_cluster_never_from_the_claim() {
        let record = AllocationRecord::from_data(Some(&BTreeMap::from([(
            "n3".to_string(),
            "10.244.3.0/24".to_string(),
        )])));
        let nodes = vec![
            node_owned(
                "n1",
                Some("10.244.1.0/24"),
                good("172.30.0.11", "06:00:00:00:00:01", "10.244.1.0/24"),
            ),
            // Spec wins over the (lying) annotation.
            node_owned(
                "n2",
                Some("10.244.2.0/24"),
                good("172.30.0.12", "06:00:00:00:00:02", "10.244.1.0/24"),
            ),
            // No spec: the allocation record.
            node_owned(
                "n3",
                None,
                good("172.30.0.13", "06:00:00:00:00:03", "10.244.99.0/24"),
            ),
            // Neither: no CIDR at all, whatever it claims.
            node_owned(
                "n4",
                None,
                good("172.30.0.14", "06:00:00:00:00:04", "10.244.4.0/24"),
            ),
            // No veilnet annotations yet: not a peer (its agent has not started).
            node("n5", Some("10.244.5.0/24"), &[], &[]),
        ];
        let snap = ClusterSnapshot::take("n1", &nodes, &record);
        let peers: BTreeMap<&str, &Vec<IpNet>> = snap
            .peers
            .iter()
            .map(|p| (p.name.as_str(), &p.pod_cidrs))
            .collect();
        assert_eq!(peers.len(), 3, "{peers:?}");
        assert_eq!(
            peers["n2"],
            &vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            peers["n3"],
            &vec!["10.244.3.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(peers["n4"].is_empty());
        assert_eq!(
            snap.peers[0].node_addresses,
            vec!["172.30.0.12".parse::<IpAddr>().unwrap()]
        );
        let own = snap.own.unwrap();
        assert_eq!(own.record.name, "n1");
        assert_eq!(own.annotations.len(), 3);
        assert_eq!(own.rotate_request, None);
    }
}
