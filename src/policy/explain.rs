//! Why a connection is allowed or denied, computed from the same compiled model the renderer
//! turns into nft rules (pure).
//!
//! A connection passes two checks: the source pod's egress chain on the source's node, then the
//! destination pod's ingress chain on the destination's node. Each check reads the compiled model
//! of that node exactly as the kernel would: find the pod's chain by IP (the verdict map), try
//! its rules, fall through to default deny.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use super::compile::{compile, CompiledPolicy, Direction};
use super::model::{ClusterState, ObjectRef, Protocol};

/// One side of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod { pod: ObjectRef, node: String },
    External,
}

/// A policy rule that allowed the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: ObjectRef,
    pub rule_index: usize,
}

/// The outcome of one direction's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// That side is not a pod (external address, node, host-network pod): nothing to enforce.
    NotAPod,
    /// The source is one of the node's own addresses: the kernel accepts it before any policy
    /// (kubelet probes).
    FromNode,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Allowed by these rules (all of them, in evaluation order; the kernel stops at the first).
    Allowed {
        by: Vec<RuleRef>,
        isolated_by: Vec<ObjectRef>,
    },
    Denied {
        isolated_by: Vec<ObjectRef>,
    },
}

impl Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}

fn refs(list: &[ObjectRef]) -> String {
    list.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::NotAPod => f.write_str("not enforced (not a pod)"),
            Decision::FromNode => f.write_str("allowed: traffic from the node itself"),
            Decision::NotIsolated => f.write_str("allowed: not isolated"),
            Decision::Allowed { by, .. } => {
                let first = &by[0];
                write!(f, "allowed by {} (rule {})", first.policy, first.rule_index)?;
                if by.len() > 1 {
                    write!(f, " and {} more", by.len() - 1)?;
                }
                Ok(())
            }
            Decision::Denied { isolated_by } => {
                write!(
                    f,
                    "denied: default deny (isolated by {})",
                    refs(isolated_by)
                )
            }
        }
    }
}

/// The full answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: Protocol,
    pub port: u16,
    pub egress: Decision,
    pub ingress: Decision,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }

    /// One line: "allowed by ns/name", "denied: default deny (isolated by ns/a, ns/b)", ...
    /// Egress is checked first, as in the kernel.
    pub fn verdict(&self) -> String {
        match (&self.egress, &self.ingress) {
            (Decision::Denied { isolated_by }, _) => {
                format!(
                    "denied: default deny egress (isolated by {})",
                    refs(isolated_by)
                )
            }
            (_, Decision::Denied { isolated_by }) => {
                format!(
                    "denied: default deny ingress (isolated by {})",
                    refs(isolated_by)
                )
            }
            (_, Decision::FromNode) => "allowed: traffic from the node itself".to_string(),
            (_, Decision::Allowed { by, .. }) | (Decision::Allowed { by, .. }, _) => {
                format!("allowed by {}", by[0].policy)
            }
            _ => "allowed: no policy isolates either side".to_string(),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |e: &Endpoint, ip: &IpAddr| match e {
            Endpoint::Pod { pod, node } => format!("{pod} ({ip}, node {node})"),
            Endpoint::External => ip.to_string(),
        };
        writeln!(
            f,
            "{} -> {} {}/{}",
            side(&self.from, &self.from_ip),
            side(&self.to, &self.to_ip),
            self.protocol,
            self.port
        )?;
        writeln!(f, "egress:  {}", self.egress)?;
        writeln!(f, "ingress: {}", self.ingress)?;
        write!(f, "verdict: {}", self.verdict())
    }
}

impl CompiledPolicy {
    /// How this node's ruleset treats a new connection in `direction` of the local pod owning
    /// `local_ip` with `peer_ip` (the remote side): the pod's chain from the verdict map, its
    /// rules, default deny. `NotIsolated` when no chain guards that IP on this node. The one
    /// evaluator behind `explain` and the strict mode's conntrack cut.
    pub fn decide(
        &self,
        direction: Direction,
        local_ip: IpAddr,
        peer_ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Decision {
        let Some(chain) = self.chain_for(direction, local_ip) else {
            return Decision::NotIsolated;
        };
        let isolated_by: Vec<ObjectRef> = chain
            .isolated_by
            .iter()
            .map(|i| self.policies[*i].clone())
            .collect();
        let by: Vec<RuleRef> = chain
            .rules
            .iter()
            .filter(|r| self.rule_matches(r, peer_ip, protocol, port))
            .map(|r| RuleRef {
                policy: self.policies[r.policy].clone(),
                rule_index: r.rule_index,
            })
            .collect();
        if by.is_empty() {
            Decision::Denied { isolated_by }
        } else {
            Decision::Allowed { by, isolated_by }
        }
    }
}

/// Explains many connections against one cluster state, compiling each node's model once.
pub struct Explainer<'a> {
    state: &'a ClusterState,
    pod_by_ip: HashMap<IpAddr, usize>,
    node_addrs: Vec<IpAddr>,
    nodes: HashMap<String, CompiledPolicy>,
}

impl<'a> Explainer<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        let mut pod_by_ip = HashMap::new();
        for (i, p) in state.pods.iter().enumerate() {
            if p.host_network {
                continue;
            }
            for ip in &p.ips {
                pod_by_ip.entry(*ip).or_insert(i);
            }
        }
        Explainer {
            state,
            pod_by_ip,
            node_addrs: Vec::new(),
            nodes: HashMap::new(),
        }
    }

    /// Addresses of the nodes (as given to `compile`): traffic from them is accepted before any
    /// policy, so `explain` reports it as such.
    pub fn with_node_addrs(mut self, addrs: &[IpAddr]) -> Self {
        self.node_addrs = addrs.to_vec();
        self
    }

    fn endpoint(&self, ip: IpAddr) -> Endpoint {
        match self.pod_by_ip.get(&ip) {
            Some(&i) => {
                let p = &self.state.pods[i];
                Endpoint::Pod {
                    pod: p.object_ref(),
                    node: p.node.clone(),
                }
            }
            None => Endpoint::External,
        }
    }

    fn decide(
        &mut self,
        direction: Direction,
        local: &Endpoint,
        local_ip: IpAddr,
        peer_ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Decision {
        let Endpoint::Pod { node, .. } = local else {
            return Decision::NotAPod;
        };
        let state = self.state;
        self.nodes
            .entry(node.clone())
            .or_insert_with(|| compile(state, node, &[]))
            .decide(direction, local_ip, peer_ip, protocol, port)
    }

    pub fn explain(
        &mut self,
        from: IpAddr,
        to: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Explanation {
        let from_ep = self.endpoint(from);
        let to_ep = self.endpoint(to);
        let egress = self.decide(Direction::Egress, &from_ep, from, to, protocol, port);
        let ingress = if self.node_addrs.contains(&from) && from_ep == Endpoint::External {
            Decision::FromNode
        } else {
            self.decide(Direction::Ingress, &to_ep, to, from, protocol, port)
        };
        Explanation {
            from_ip: from,
            to_ip: to,
            from: from_ep,
            to: to_ep,
            protocol,
            port,
            egress,
            ingress,
        }
    }
}

/// Explains one connection (compiles the models it needs; use [`Explainer`] for many).
pub fn explain(
    from: IpAddr,
    to: IpAddr,
    port: u16,
    protocol: Protocol,
    state: &ClusterState,
) -> Explanation {
    Explainer::new(state).explain(from, to, port, protocol)
}
