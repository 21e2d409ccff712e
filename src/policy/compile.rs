//! NetworkPolicy → per-node enforcement model (pure).
//!
//! The model is what both the nft renderer and `explain` read, so what the kernel enforces and
//! what `explain` reports cannot drift apart. For the compiling node it holds:
//! - one chain per (local pod, direction) in which the pod is isolated, listing the rules of only
//!   the policies that select it, in a stable order;
//! - address sets (rule peers: pod IPs and ipBlocks minus excepts), one per distinct peer list and
//!   shared by every rule with that list; port sets (`protocol . port-range`), shared by content;
//!   destination sets (`ip . protocol . port`, for egress named ports, which resolve against the
//!   destination pod), one per peer list and port names;
//! - the anti-spoofing facts of local pods (bridge port, MAC, IPs);
//! - warnings for input the API server should have rejected; such parts are skipped so that they
//!   never widen what is allowed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::addrset::AddrSet;
use super::model::{ClusterState, MacAddr, ObjectRef, PodInfo, Protocol, NAMESPACE_NAME_LABEL};
use super::selector::Selector;

/// Traffic direction, seen from the pod a policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Knobs of the rendered ruleset that do not change policy semantics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Also log (rate-limited) new connections that a policy allowed.
    pub log_allowed: bool,
    /// NFLOG group of every log statement.
    pub log_group: u16,
    /// Log rate limit per rule, in packets per second.
    pub log_rate_per_second: u32,
    pub log_burst: u32,
    /// Drop frames from bridge ports named `veil*` that have no anti-spoofing entry. Fail-closed for
    /// pods the agent has not described yet; off by default so a missing MAC or veth name in the
    /// agent's input cannot black-hole a pod.
    pub drop_unknown_pod_ports: bool,
    /// Drop TCP packets that conntrack sees as new but that are no SYN (a connection picked up
    /// mid-stream). Strict mode needs it: once a denied connection's entry is deleted, a segment
    /// of the *server* could otherwise start a new entry in the reverse direction, which its
    /// policies allow, and the client's segments would pass as replies.
    pub tcp_new_needs_syn: bool,
    /// This node's pod CIDRs. With them, a packet forwarded to an address in them that is not an
    /// admitted pod's (in `anti_spoof`) is dropped before conntrack can accept it: packets sent to
    /// an address before its pod's chains exist would otherwise wait in the neighbour queue, reach
    /// the pod once it answers ARP, and its reply would make the flow `established`, past its
    /// policy; and an established flow of an earlier pod with the same address would reach the
    /// new one. Empty (the default): no such rule.
    pub local_pod_cidrs: Vec<ipnet::IpNet>,
    /// Trusted DNS: the node's mode and trusted servers (see [`crate::dns`]).
    pub dns: crate::dns::DnsGuard,
    /// Log the new connections to outside the cluster of local pods whose namespace carries
    /// [`NEW_DESTINATION_LABEL`]`=true` (the new-destination alert; off when alerts are).
    pub egress_watch: bool,
}

/// The namespace label that opts its pods in to the new-destination alert.
pub const NEW_DESTINATION_LABEL: &str = "veilnet.io/alert-new-destinations";

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            log_allowed: false,
            log_group: 100,
            log_rate_per_second: 10,
            log_burst: 20,
            drop_unknown_pod_ports: false,
            tcp_new_needs_syn: false,
            local_pod_cidrs: Vec::new(),
            dns: crate::dns::DnsGuard::default(),
            egress_watch: false,
        }
    }
}

/// Input the compiler skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub object: Option<ObjectRef>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{o}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// An inclusive port range of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && self.first <= port && port <= self.last
    }
}

/// Sorted, merged port ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortSet(pub Vec<PortRange>);

impl PortSet {
    fn normalized(mut ranges: Vec<PortRange>) -> PortSet {
        ranges.sort_unstable();
        let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last)
                    if last.protocol == r.protocol
                        && u32::from(r.first) <= u32::from(last.last) + 1 =>
                {
                    last.last = last.last.max(r.last);
                }
                _ => out.push(r),
            }
        }
        PortSet(out)
    }

    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(protocol, port))
    }
}

/// One allowed destination of an egress rule with named ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestTuple {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// What a compiled rule matches. The peer is the source for ingress, the destination for egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// Peer in `peers` (None: any peer) and `protocol . port` in `ports` (None: any).
    PeersPorts {
        peers: Option<usize>,
        ports: Option<usize>,
    },
    /// Egress named ports: `daddr . protocol . port` in the destination set, which already
    /// holds only peers of the rule.
    Destinations(usize),
}

/// One allow rule in a pod chain: rule `rule_index` of policy `policy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledRule {
    pub policy: usize,
    pub rule_index: usize,
    pub matcher: RuleMatch,
}

/// The chain of one local pod in one direction where it is isolated. Whatever no rule allows is
/// denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodChain {
    pub pod: ObjectRef,
    pub ips: Vec<IpAddr>,
    pub direction: Direction,
    /// Policies that select the pod for this direction (indices into `CompiledPolicy::policies`).
    pub isolated_by: Vec<usize>,
    pub rules: Vec<CompiledRule>,
}

/// Anti-spoofing facts of one local pod.
/// A local pod whose DNS queries the `dns` chain watches (its mode is not `off`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPod {
    pub pod: ObjectRef,
    pub ips: Vec<IpAddr>,
    pub mode: crate::dns::DnsMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiSpoofPort {
    pub pod: ObjectRef,
    pub host_veth: String,
    pub mac: Option<MacAddr>,
    pub ips: Vec<IpAddr>,
}

/// The enforcement model of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub node: String,
    pub node_addrs: Vec<IpAddr>,
    pub options: CompileOptions,
    /// Policies that select at least one local pod; an index here is the policy id of rules and
    /// chains (the renderer gives each policy its named counter, see `Ruleset::policy_counters`).
    pub policies: Vec<ObjectRef>,
    /// One address set per distinct rule peer list (namespace of the policy + the peers as
    /// written), so that a set keeps its identity when labels change what it holds.
    pub peer_sets: Vec<AddrSet>,
    /// Identity of each peer set across compiles (its peer list); the renderer names sets by it,
    /// which is what lets a label change become a few set elements instead of a new ruleset.
    pub peer_set_keys: Vec<String>,
    pub port_sets: Vec<PortSet>,
    pub dest_sets: Vec<Vec<DestTuple>>,
    /// Identity of each destination set across compiles (peer list + named ports).
    pub dest_set_keys: Vec<String>,
    pub chains: Vec<PodChain>,
    pub anti_spoof: Vec<AntiSpoofPort>,
    /// Local pods under the DNS guard (empty while it is inactive: no trusted servers).
    pub dns_pods: Vec<DnsPod>,
    /// Local pods whose new connections to outside the cluster are logged (sorted, unique).
    pub egress_watch: Vec<IpAddr>,
    pub warnings: Vec<Warning>,
    /// Every pod address of the cluster (not host-network pods): a packet *related* to a
    /// connection (an ICMP error) from one of them is accepted only from the connection's own
    /// ends, so a pod cannot forge errors about other pods' connections.
    pub pod_ips: std::collections::BTreeSet<IpAddr>,
}

impl CompiledPolicy {
    /// The chain enforcing `direction` for the local pod owning `ip`, if that pod is isolated.
    pub fn chain_for(&self, direction: Direction, ip: IpAddr) -> Option<&PodChain> {
        self.chains
            .iter()
            .find(|c| c.direction == direction && c.ips.contains(&ip))
    }

    /// True if `rule` matches a connection from/to `peer` with `protocol`/`port` (the peer is
    /// the remote side: source for ingress, destination for egress).
    pub fn rule_matches(
        &self,
        rule: &CompiledRule,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        match &rule.matcher {
            RuleMatch::PeersPorts { peers, ports } => {
                peers.is_none_or(|id| self.peer_sets[id].contains(peer))
                    && ports.is_none_or(|id| self.port_sets[id].contains(protocol, port))
            }
            RuleMatch::Destinations(id) => self.dest_sets[*id].contains(&DestTuple {
                ip: peer,
                protocol,
                port,
            }),
        }
    }
}

/// Compiles with default options. Pure; never panics on odd policies.
pub fn compile(state: &ClusterState, node: &str, node_addrs: &[IpAddr]) -> CompiledPolicy {
    compile_with(state, node, node_addrs, &CompileOptions::default())
}

/// Compiles the enforcement model of `node`.
pub fn compile_with(
    state: &ClusterState,
    node: &str,
    node_addrs: &[IpAddr],
    options: &CompileOptions,
) -> CompiledPolicy {
    let mut c = Compiler::new(state, node);
    c.out.node = node.to_string();
    c.out.node_addrs = node_addrs.to_vec();
    c.out.node_addrs.sort();
    c.out.node_addrs.dedup();
    c.out.options = options.clone();
    c.compile_policies();
    c.compile_anti_spoof();
    c.compile_dns();
    c.compile_egress_watch();
    c.out.pod_ips = c.pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
    c.out
}

/// Ports of one rule after validation; named ports are resolved later against a pod.
struct ParsedPorts {
    /// The rule has no ports: every port of every protocol.
    any: bool,
    numeric: Vec<PortRange>,
    named: Vec<(String, Protocol)>,
}

#[derive(Clone)]
enum Peers {
    Any,
    Set(AddrSet),
}

struct Compiler<'a> {
    state: &'a ClusterState,
    node: &'a str,
    /// Pods that can be selected or be peers, sorted by namespace/name.
    pods: Vec<&'a PodInfo>,
    pods_by_ns: BTreeMap<&'a str, Vec<usize>>,
    ns_labels: HashMap<&'a str, BTreeMap<String, String>>,
    /// (pod index, direction) → chain index.
    chain_of: HashMap<(usize, Direction), usize>,
    /// Peer list key → peer set id.
    peer_ids: HashMap<String, usize>,
    port_ids: HashMap<PortSet, usize>,
    /// Memo of rule peers: (policy namespace, peers JSON) → peers and their warnings.
    peer_cache: HashMap<String, (Peers, Vec<String>)>,
    /// Memo of egress named-port destinations: (peers key, names) → dest set.
    dest_cache: HashMap<String, Option<usize>>,
    out: CompiledPolicy,
}

impl<'a> Compiler<'a> {
    fn new(state: &'a ClusterState, node: &'a str) -> Self {
        let mut pods: Vec<&PodInfo> = state.pods.iter().filter(|p| !p.host_network).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut pods_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, p) in pods.iter().enumerate() {
            pods_by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
        let mut ns_labels: HashMap<&str, BTreeMap<String, String>> = HashMap::new();
        for ns in &state.namespaces {
            let mut labels = ns.labels.clone();
            labels
                .entry(NAMESPACE_NAME_LABEL.to_string())
                .or_insert_with(|| ns.name.clone());
            ns_labels.insert(ns.name.as_str(), labels);
        }
        // Pods whose namespace object we were not given still get the name label the API server
        // would have set.
        for ns in pods_by_ns.keys() {
            ns_labels
                .entry(ns)
                .or_insert_with(|| [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into());
        }
        Compiler {
            state,
            node,
            pods,
            pods_by_ns,
            ns_labels,
            chain_of: HashMap::new(),
            peer_ids: HashMap::new(),
            port_ids: HashMap::new(),
            peer_cache: HashMap::new(),
            dest_cache: HashMap::new(),
            out: CompiledPolicy::default(),
        }
    }

    fn warn(&mut self, object: Option<&ObjectRef>, message: impl Into<String>) {
        self.out.warnings.push(Warning {
            object: object.cloned(),
            message: message.into(),
        });
    }

    fn compile_policies(&mut self) {
        let state = self.state;
        let mut order: Vec<usize> = (0..state.policies.len()).collect();
        order.sort_by(|a, b| {
            let (a, b) = (&state.policies[*a].metadata, &state.policies[*b].metadata);
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        });
        let default_spec = NetworkPolicySpec::default();
        for i in order {
            let policy = &state.policies[i];
            let (Some(ns), Some(name)) = (&policy.metadata.namespace, &policy.metadata.name) else {
                self.warn(None, "policy without namespace or name skipped");
                continue;
            };
            let pref = ObjectRef::new(ns, name);
            let spec = policy.spec.as_ref().unwrap_or(&default_spec);
            let selector = match Selector::compile(spec.pod_selector.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    self.warn(
                        Some(&pref),
                        format!("invalid podSelector, policy skipped: {e}"),
                    );
                    continue;
                }
            };
            let Some((ingress, egress)) = self.policy_types(spec, &pref) else {
                continue;
            };
            let selected: Vec<usize> = self
                .pods_by_ns
                .get(ns.as_str())
                .map(|idx| {
                    idx.iter()
                        .copied()
                        .filter(|&p| self.pods[p].node == self.node)
                        .filter(|&p| selector.matches(&self.pods[p].labels))
                        .collect()
                })
                .unwrap_or_default();
            if selected.is_empty() {
                continue;
            }
            let id = self.out.policies.len();
            self.out.policies.push(pref.clone());
            if ingress {
                for &p in &selected {
                    self.isolate(p, Direction::Ingress, id);
                }
                for (ri, rule) in spec.ingress.iter().flatten().enumerate() {
                    let (peers, peers_key) = self.compile_peers(ns, rule.from.as_deref(), &pref);
                    let ports = self.parse_ports(rule.ports.as_deref(), &pref);
                    self.add_ingress_rule(id, ri, &selected, (&peers, &peers_key), &ports);
                }
            }
            if egress {
                for &p in &selected {
                    self.isolate(p, Direction::Egress, id);
                }
                for (ri, rule) in spec.egress.iter().flatten().enumerate() {
                    let (peers, peers_key) = self.compile_peers(ns, rule.to.as_deref(), &pref);
                    let ports = self.parse_ports(rule.ports.as_deref(), &pref);
                    self.add_egress_rule(id, ri, &selected, (&peers, &peers_key), &ports);
                }
            }
        }
    }

    /// (ingress, egress) as the API server defaults them: an explicit list wins; otherwise
    /// Ingress always and Egress iff there are egress rules.
    fn policy_types(&mut self, spec: &NetworkPolicySpec, pref: &ObjectRef) -> Option<(bool, bool)> {
        match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => {
                let mut ingress = false;
                let mut egress = false;
                for t in types {
                    match t.as_str() {
                        "Ingress" => ingress = true,
                        "Egress" => egress = true,
                        other => {
                            self.warn(Some(pref), format!("unknown policyType {other:?} ignored"))
                        }
                    }
                }
                if !ingress && !egress {
                    self.warn(Some(pref), "no valid policyTypes, policy skipped");
                    return None;
                }
                Some((ingress, egress))
            }
            _ => Some((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
        }
    }

    fn isolate(&mut self, pod: usize, direction: Direction, policy: usize) {
        let chain = self.chain(pod, direction);
        let isolated_by = &mut self.out.chains[chain].isolated_by;
        if !isolated_by.contains(&policy) {
            isolated_by.push(policy);
        }
    }

    fn chain(&mut self, pod: usize, direction: Direction) -> usize {
        if let Some(&c) = self.chain_of.get(&(pod, direction)) {
            return c;
        }
        let p = self.pods[pod];
        let idx = self.out.chains.len();
        self.out.chains.push(PodChain {
            pod: p.object_ref(),
            ips: p.ips.clone(),
            direction,
            isolated_by: Vec::new(),
            rules: Vec::new(),
        });
        self.chain_of.insert((pod, direction), idx);
        idx
    }

    /// [`Self::compute_peers`], memoised: policies across a cluster repeat the same peers, and
    /// a selector over every namespace costs a pass over every pod. Returns the peers and the
    /// memo key (reused for egress named-port destinations).
    fn compile_peers(
        &mut self,
        policy_ns: &str,
        peers: Option<&[NetworkPolicyPeer]>,
        pref: &ObjectRef,
    ) -> (Peers, String) {
        let key = format!(
            "{policy_ns}\0{}",
            serde_json::to_string(&peers).unwrap_or_default()
        );
        if let Some((cached, messages)) = self.peer_cache.get(&key) {
            let (cached, messages) = (cached.clone(), messages.clone());
            for m in messages {
                self.warn(Some(pref), m);
            }
            return (cached, key);
        }
        let mut messages = Vec::new();
        let computed = self.compute_peers(policy_ns, peers, &mut messages);
        for m in &messages {
            self.warn(Some(pref), m.clone());
        }
        self.peer_cache
            .insert(key.clone(), (computed.clone(), messages));
        (computed, key)
    }

    /// The union of a rule's peers; an absent or empty list means every peer. Problems go to
    /// `warnings`.
    fn compute_peers(
        &self,
        policy_ns: &str,
        peers: Option<&[NetworkPolicyPeer]>,
        warnings: &mut Vec<String>,
    ) -> Peers {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Peers::Any;
        };
        let mut set = AddrSet::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                    warnings.push("peer mixes ipBlock with selectors, peer skipped".into());
                    continue;
                }
                match ip_block_set(&block.cidr, block.except.as_deref().unwrap_or_default()) {
                    Ok(s) => set.extend(&s),
                    Err(e) => warnings.push(format!("{e}, peer skipped")),
                }
                continue;
            }
            if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
                warnings.push("empty peer skipped".into());
                continue;
            }
            let pod_sel = match Selector::compile(peer.pod_selector.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    warnings.push(format!("invalid peer podSelector, peer skipped: {e}"));
                    continue;
                }
            };
            let namespaces: Vec<&str> = match &peer.namespace_selector {
                None => vec![policy_ns],
                Some(ns_sel) => match Selector::compile(Some(ns_sel)) {
                    Ok(s) => self
                        .pods_by_ns
                        .keys()
                        .copied()
                        .filter(|ns| self.ns_labels.get(ns).is_some_and(|l| s.matches(l)))
                        .collect(),
                    Err(e) => {
                        warnings.push(format!("invalid peer namespaceSelector, peer skipped: {e}"));
                        continue;
                    }
                },
            };
            for ns in namespaces {
                for &p in self.pods_by_ns.get(ns).into_iter().flatten() {
                    let pod = self.pods[p];
                    if pod_sel.matches(&pod.labels) {
                        for ip in &pod.ips {
                            set.push_ip(*ip);
                        }
                    }
                }
            }
        }
        set.normalize();
        Peers::Set(set)
    }

    fn parse_ports(
        &mut self,
        ports: Option<&[NetworkPolicyPort]>,
        pref: &ObjectRef,
    ) -> ParsedPorts {
        let mut parsed = ParsedPorts {
            any: false,
            numeric: Vec::new(),
            named: Vec::new(),
        };
        let Some(ports) = ports.filter(|p| !p.is_empty()) else {
            parsed.any = true;
            return parsed;
        };
        for p in ports {
            match parse_port(p) {
                Ok(ParsedPort::Range(r)) => parsed.numeric.push(r),
                Ok(ParsedPort::Named(name, proto)) => parsed.named.push((name, proto)),
                Err(e) => self.warn(Some(pref), format!("{e}, port skipped")),
            }
        }
        parsed
    }

    fn add_ingress_rule(
        &mut self,
        policy: usize,
        rule_index: usize,
        selected: &[usize],
        (peers, peers_key): (&Peers, &str),
        ports: &ParsedPorts,
    ) {
        let peers = match peers {
            Peers::Any => None,
            Peers::Set(s) if s.is_empty() => return,
            Peers::Set(s) => Some(self.intern_peers(s, peers_key)),
        };
        let shared_ports = if ports.any {
            Some(None)
        } else if ports.named.is_empty() {
            if ports.numeric.is_empty() {
                return;
            }
            Some(Some(
                self.intern_ports(PortSet::normalized(ports.numeric.clone())),
            ))
        } else {
            None
        };
        for &p in selected {
            // Named ports of an ingress rule resolve against the pod being protected.
            let port_id = match shared_ports {
                Some(id) => id,
                None => {
                    let mut ranges = ports.numeric.clone();
                    ranges.extend(resolve_named(self.pods[p], &ports.named));
                    if ranges.is_empty() {
                        continue;
                    }
                    Some(self.intern_ports(PortSet::normalized(ranges)))
                }
            };
            let chain = self.chain(p, Direction::Ingress);
            self.out.chains[chain].rules.push(CompiledRule {
                policy,
                rule_index,
                matcher: RuleMatch::PeersPorts {
                    peers,
                    ports: port_id,
                },
            });
        }
    }

    fn add_egress_rule(
        &mut self,
        policy: usize,
        rule_index: usize,
        selected: &[usize],
        (peers, peers_key): (&Peers, &str),
        ports: &ParsedPorts,
    ) {
        if let Peers::Set(s) = peers {
            if s.is_empty() {
                return;
            }
        }
        let mut matchers = Vec::new();
        let peer_id = match peers {
            Peers::Any => None,
            Peers::Set(s) => Some(self.intern_peers(s, peers_key)),
        };
        if ports.any {
            matchers.push(RuleMatch::PeersPorts {
                peers: peer_id,
                ports: None,
            });
        } else if !ports.numeric.is_empty() {
            let id = self.intern_ports(PortSet::normalized(ports.numeric.clone()));
            matchers.push(RuleMatch::PeersPorts {
                peers: peer_id,
                ports: Some(id),
            });
        }
        if !ports.named.is_empty() {
            let key = format!("{peers_key}\0{:?}", ports.named);
            let dests = match self.dest_cache.get(&key) {
                Some(d) => *d,
                None => {
                    let d = self.egress_destinations(peers, &ports.named, &key);
                    self.dest_cache.insert(key, d);
                    d
                }
            };
            if let Some(id) = dests {
                matchers.push(RuleMatch::Destinations(id));
            }
        }
        for &p in selected {
            let chain = self.chain(p, Direction::Egress);
            for m in &matchers {
                self.out.chains[chain].rules.push(CompiledRule {
                    policy,
                    rule_index,
                    matcher: m.clone(),
                });
            }
        }
    }

    /// The destination set of egress named ports: they resolve against each destination pod
    /// among the peers (an ipBlock peer counts for the pods whose IPs it covers). None if no
    /// pod resolves them.
    fn egress_destinations(
        &mut self,
        peers: &Peers,
        named: &[(String, Protocol)],
        key: &str,
    ) -> Option<usize> {
        {
            let mut tuples = Vec::new();
            for pod in &self.pods {
                let resolved = resolve_named(pod, named);
                if resolved.is_empty() {
                    continue;
                }
                for ip in &pod.ips {
                    let in_peers = match peers {
                        Peers::Any => true,
                        Peers::Set(s) => s.contains(*ip),
                    };
                    if in_peers {
                        tuples.extend(resolved.iter().map(|r| DestTuple {
                            ip: *ip,
                            protocol: r.protocol,
                            port: r.first,
                        }));
                    }
                }
            }
            if tuples.is_empty() {
                return None;
            }
            tuples.sort_unstable();
            tuples.dedup();
            Some(self.push_dests(tuples, key))
        }
    }

    /// The set of the peer list `key` (one set per distinct peer list, not per content: a set
    /// must keep its name when a label change alters what it holds).
    fn intern_peers(&mut self, set: &AddrSet, key: &str) -> usize {
        if let Some(&id) = self.peer_ids.get(key) {
            return id;
        }
        let id = self.out.peer_sets.len();
        self.out.peer_sets.push(set.clone());
        self.out.peer_set_keys.push(key.to_string());
        self.peer_ids.insert(key.to_string(), id);
        id
    }

    fn intern_ports(&mut self, set: PortSet) -> usize {
        if let Some(&id) = self.port_ids.get(&set) {
            return id;
        }
        let id = self.out.port_sets.len();
        self.out.port_sets.push(set.clone());
        self.port_ids.insert(set, id);
        id
    }

    /// A new destination set; `egress_destinations` is memoised by `key`, so each key comes once.
    fn push_dests(&mut self, set: Vec<DestTuple>, key: &str) -> usize {
        let id = self.out.dest_sets.len();
        self.out.dest_sets.push(set);
        self.out.dest_set_keys.push(key.to_string());
        id
    }

    /// The DNS mode of each local pod with an address (its namespace's label, else the node's).
    fn compile_dns(&mut self) {
        let guard = &self.out.options.dns;
        if !guard.active() {
            return;
        }
        let guard = guard.clone();
        let mut bad_labels = Vec::new();
        for pod in self.local_pods() {
            let labels = self.ns_labels.get(pod.namespace.as_str());
            let (mode, bad) = guard.mode_for(&pod.namespace, labels.unwrap_or(&BTreeMap::new()));
            if let Some(e) = bad {
                bad_labels.push((pod.namespace.clone(), e));
            }
            if mode != crate::dns::DnsMode::Off {
                self.out.dns_pods.push(DnsPod {
                    pod: pod.object_ref(),
                    ips: pod.ips.clone(),
                    mode,
                });
            }
        }
        bad_labels.dedup();
        for (ns, e) in bad_labels {
            self.warn(
                None,
                format!(
                    "namespace {ns}: label {}: {e}; the node's DNS mode applies",
                    crate::dns::NAMESPACE_LABEL
                ),
            );
        }
    }

    /// The addresses of local pods in namespaces labelled [`NEW_DESTINATION_LABEL`]`=true`.
    fn compile_egress_watch(&mut self) {
        if !self.out.options.egress_watch {
            return;
        }
        let mut bad = std::collections::BTreeSet::new();
        let mut ips = Vec::new();
        for pod in self.local_pods() {
            let label = self
                .ns_labels
                .get(pod.namespace.as_str())
                .and_then(|l| l.get(NEW_DESTINATION_LABEL));
            match label.map(String::as_str) {
                Some("true") => ips.extend(pod.ips.iter().copied()),
                None | Some("false") => {}
                Some(other) => {
                    bad.insert((pod.namespace.clone(), other.to_string()));
                }
            }
        }
        ips.sort();
        ips.dedup();
        self.out.egress_watch = ips;
        for (ns, value) in bad {
            self.warn(
                None,
                format!(
                    "namespace {ns}: label {NEW_DESTINATION_LABEL}={value:?} is neither \"true\" \
                     nor \"false\"; its pods are not watched"
                ),
            );
        }
    }

    /// This node's pods that have an address (the ones the kernel side can act on).
    fn local_pods(&self) -> Vec<&'a PodInfo> {
        self.pods
            .iter()
            .copied()
            .filter(|p| p.node == self.node && !p.ips.is_empty())
            .collect()
    }

    fn compile_anti_spoof(&mut self) {
        for pod in self.local_pods() {
            match &pod.host_veth {
                Some(veth) if !veth.is_empty() && is_safe_ifname(veth) => {
                    self.out.anti_spoof.push(AntiSpoofPort {
                        pod: pod.object_ref(),
                        host_veth: veth.clone(),
                        mac: pod.mac,
                        ips: pod.ips.clone(),
                    })
                }
                Some(veth) => self.warn(
                    Some(&pod.object_ref()),
                    format!(
                        "host veth name {veth:?} is not a valid interface name; no anti-spoofing"
                    ),
                ),
                None => self.warn(
                    Some(&pod.object_ref()),
                    "local pod without host veth; no anti-spoofing",
                ),
            }
        }
    }
}

/// Interface names are at most 15 bytes; quoting is safe for these characters only.
fn is_safe_ifname(name: &str) -> bool {
    name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

enum ParsedPort {
    Range(PortRange),
    Named(String, Protocol),
}

fn parse_port(p: &NetworkPolicyPort) -> Result<ParsedPort, String> {
    let proto_name = p.protocol.as_deref().unwrap_or("TCP");
    let protocol =
        Protocol::from_k8s(proto_name).ok_or_else(|| format!("unknown protocol {proto_name:?}"))?;
    let port_num = |v: i32| u16::try_from(v).ok().filter(|v| *v != 0);
    match &p.port {
        None => {
            if p.end_port.is_some() {
                return Err("endPort without port".into());
            }
            Ok(ParsedPort::Range(PortRange {
                protocol,
                first: 0,
                last: u16::MAX,
            }))
        }
        Some(IntOrString::Int(v)) => {
            let first = port_num(*v).ok_or_else(|| format!("port {v} out of range"))?;
            let last = match p.end_port {
                None => first,
                Some(e) => {
                    let last = port_num(e).ok_or_else(|| format!("endPort {e} out of range"))?;
                    if last < first {
                        return Err(format!("endPort {last} below port {first}"));
                    }
                    last
                }
            };
            Ok(ParsedPort::Range(PortRange {
                protocol,
                first,
                last,
            }))
        }
        Some(IntOrString::String(s)) => {
            if p.end_port.is_some() {
                return Err(format!("endPort with named port {s:?}"));
            }
            // The API accepts numeric strings nowhere here; a name is a name.
            if s.is_empty() {
                return Err("empty port name".into());
            }
            Ok(ParsedPort::Named(s.clone(), protocol))
        }
    }
}

/// The ports `named` resolve to on `pod` (name and protocol must both match).
fn resolve_named(pod: &PodInfo, named: &[(String, Protocol)]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for (name, protocol) in named {
        for np in &pod.named_ports {
            if &np.name == name && np.protocol == *protocol {
                out.push(PortRange {
                    protocol: *protocol,
                    first: np.port,
                    last: np.port,
                });
            }
        }
    }
    out
}

/// `cidr − except`, or why the block is invalid.
pub(crate) fn ip_block_set(cidr: &str, except: &[String]) -> Result<AddrSet, String> {
    let net: IpNet = cidr
        .trim()
        .parse()
        .map_err(|_| format!("invalid ipBlock cidr {cidr:?}"))?;
    let mut set = AddrSet::new();
    set.push_net(&net);
    set.normalize();
    let mut cut = AddrSet::new();
    for e in except {
        let enet: IpNet = e
            .trim()
            .parse()
            .map_err(|_| format!("invalid ipBlock except {e:?}"))?;
        cut.push_net(&enet);
    }
    cut.normalize();
    Ok(set.subtract(&cut))
}
