//! Which nodes a flow ran between and whether that pair's path was encrypted: what the flow log
//! adds to each line (`nodes`, `path`, `encrypted`), from the node agent's latest plan.
//!
//! The reconcile loop hands its status over after every pass ([`PairPaths::of`]); the flow log
//! reader reads the latest copy. Until the first pass the table is empty, and lines say
//! `encrypted: false` with no `path`: nothing is claimed that the plan has not said.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::agent::status::NodeStatus;

/// The path name of a pair whose two ends are on the same node.
pub const LOCAL: &str = "local";
const WIREGUARD: &str = "wireguard";

/// This node's view of every pair it is part of (pure data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairPaths {
    /// This node's name.
    pub me: String,
    /// Peer → the path this node sends to it by (`wireguard`, `vxlan`, `blocked`).
    pub peers: HashMap<String, String>,
    /// Node addresses (underlay) → node, this node's included: host-network endpoints.
    pub node_by_ip: HashMap<IpAddr, String>,
    /// Every node's pod CIDRs, this node's included: who is a pod, for the flows endpoint's
    /// source check, even for pods the index has not seen yet.
    pub pod_cidrs: Vec<IpNet>,
}

/// What a flow line says about the pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairVerdict {
    /// `local`, or the peer's path; `None` when a side is outside the cluster (or unknown).
    pub path: Option<String>,
    /// The packet crossed between two nodes over WireGuard.
    pub encrypted: bool,
}

impl PairPaths {
    /// The pairs of this node as its status describes them (pure).
    pub fn of(status: &NodeStatus) -> Self {
        let mut node_by_ip = HashMap::new();
        let mut pod_cidrs: Vec<IpNet> = status
            .pod_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        if let Ok(ip) = status.underlay_ip.parse() {
            node_by_ip.insert(ip, status.node.clone());
        }
        let mut peers = HashMap::new();
        for p in &status.peers {
            peers.insert(p.node.clone(), p.path.clone());
            pod_cidrs.extend(p.pod_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()));
            if let Some(ip) = p.underlay_ip.as_deref().and_then(|ip| ip.parse().ok()) {
                node_by_ip.insert(ip, p.node.clone());
            }
        }
        PairPaths {
            me: status.node.clone(),
            peers,
            node_by_ip,
            pod_cidrs,
        }
    }

    /// The node whose host network holds `ip`.
    pub fn node_of(&self, ip: &IpAddr) -> Option<&str> {
        self.node_by_ip.get(ip).map(String::as_str)
    }

    /// `ip` lies in some node's pod CIDR.
    pub fn is_pod_address(&self, ip: &IpAddr) -> bool {
        self.pod_cidrs.iter().any(|c| c.contains(ip))
    }

    /// The pair `src_node` → `dst_node` as this node sees it. Only pairs with this node on one
    /// end have a path here: the other end's is the peer's entry.
    pub fn judge(&self, src_node: Option<&str>, dst_node: Option<&str>) -> PairVerdict {
        let unknown = PairVerdict {
            path: None,
            encrypted: false,
        };
        let (Some(src), Some(dst)) = (src_node, dst_node) else {
            return unknown;
        };
        if src == dst {
            return PairVerdict {
                path: Some(LOCAL.to_string()),
                encrypted: false,
            };
        }
        let other = if src == self.me {
            dst
        } else if dst == self.me {
            src
        } else {
            return unknown;
        };
        match self.peers.get(other) {
            Some(path) => PairVerdict {
                encrypted: path == WIREGUARD,
                path: Some(path.clone()),
            },
            None => unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> PairPaths {
        PairPaths {
            me: "node-1".into(),
            peers: [
                ("node-2".to_string(), "wireguard".to_string()),
                ("node-3".to_string(), "vxlan".to_string()),
            ]
            .into(),
            node_by_ip: [("172.30.0.11".parse().unwrap(), "node-1".to_string())].into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn a_pair_through_this_node_takes_the_peers_path_and_only_wireguard_is_encrypted() {
        let p = paths();
        let v = p.judge(Some("node-2"), Some("node-1"));
        assert_eq!(v.path.as_deref(), Some("wireguard"));
        assert!(v.encrypted);
        let v = p.judge(Some("node-1"), Some("node-3"));
        assert_eq!(v.path.as_deref(), Some("vxlan"));
        assert!(!v.encrypted);
    }

    #[test]
    fn same_node_is_local_and_unknown_or_foreign_pairs_claim_nothing() {
        let p = paths();
        assert_eq!(
            p.judge(Some("node-1"), Some("node-1")).path.as_deref(),
            Some(LOCAL)
        );
        for (s, d) in [
            (None, Some("node-1")),
            (Some("node-2"), Some("node-3")),
            (Some("node-1"), Some("node-9")),
        ] {
            let v = p.judge(s, d);
            assert_eq!(v.path, None, "{s:?} → {d:?}");
            assert!(!v.encrypted);
        }
        assert!(!PairPaths::default().judge(Some("a"), Some("b")).encrypted);
    }

    #[test]
    fn pod_addresses_are_those_in_any_nodes_pod_cidr() {
        let p = paths();
        assert!(p.is_pod_address(&"10.244.1.9".parse().unwrap()));
        assert!(!p.is_pod_address(&"172.30.0.11".parse().unwrap()));
        assert_eq!(p.node_of(&"172.30.0.11".parse().unwrap()), Some("node-1"));
    }
}
