//! What may cross the wire: veilnet's `inet veilnet_wire` nftables table on the node's underlay.
//!
//! - Always: unencapsulated pod traffic never leaves or enters through the underlay, whether
//!   pod-to-pod or between pods and other nodes' addresses. It must be inside VXLAN or WireGuard;
//!   a raw one can only be a leak (a route that vanished while the agent restarts, falling back to
//!   the default route) or an injection.
//! - Always: **VXLAN is accepted only where the plan says VXLAN.** A VXLAN datagram must arrive on
//!   the underlay device, addressed to this node's underlay address, from the underlay address of
//!   a peer whose pair with this node is on the VXLAN path (the address the cluster records for
//!   that Node, never a claim), and the encapsulated frame must be IPv4 whose source is one of
//!   *that* peer's pod addresses or its node address. Everything else on the VXLAN port — from
//!   hosts that are not nodes, from peers whose pair is WireGuard or blocked, through the TUN,
//!   from local pods, to any other address of the node — is dropped, counted
//!   (`vxlan_rejected`) and logged (rate-limited NFLOG, prefix `veilnet:vxlan-rejected:<why>`).
//!   The kernel's VXLAN device receives from anyone (`nolearning` stops learning, not
//!   receiving), so this check is the only thing between a UDP socket anywhere and a forged pod
//!   source. It runs in the `input` hook on the encapsulated datagram, before decapsulation: one
//!   concatenated lookup (outer source . inner source) in an interval set, so its cost does not
//!   grow with the number of peers. The inner header is read at fixed offsets from the outer UDP
//!   header (8 bytes UDP + 8 VXLAN + 14 Ethernet: inner ethertype at byte 28, inner IPv4 source
//!   at byte 42); a datagram too short to hold them fails the lookup and is dropped.
//!   One exception: a hostPort connection from another node's address (`ct status dnat`, DNATed
//!   by this node's `ip veilnet_hostport` table from a packet addressed to the node itself) may
//!   reach the local pod raw; from anywhere outside the cluster such traffic is not pod-to-pod
//!   and no rule here concerns it.
//! - Always: the WireGuard port takes no datagram that arrives through a tunnel or from a pod.
//! - Always: TCP MSS is clamped to the route MTU on the WireGuard device.
//! - Always: each pod address holds at most [`WireRules::agent_conns_per_source`] connections to
//!   the agent's TCP ports at once (`ct count`, in a dynamic set per source); more are reset
//!   before they reach the agent and counted in `agent_conn_limited`. With the agent's own
//!   connection caps, one pod cannot take the endpoints from the others.
//! - Strict mode: no VXLAN at all, in or out, so no pod packet crosses the wire in plaintext.
//! - Traffic between a pod and an address outside the cluster (neither a pod nor a peer node)
//!   is not pod-to-pod: none of the rules above match it, in strict mode neither. Unless the node
//!   opts out it is masqueraded to the node's address on the way out (the `postrouting` nat
//!   chain, [`super::masquerade`]).
//!
//! What this does not do: a plaintext VXLAN pair is not authenticated. A host that can forge the
//! peer's underlay source address can still inject traffic claiming that peer's pods; only
//! WireGuard (`on`, `strict`) authenticates every packet.
//!
//! These rules live in the kernel, so they keep holding while the agent restarts. Each load is one
//! nftables transaction (through the shared runner, [`crate::netfilter::nft`]) that declares the table's objects, flushes its rules and set elements and
//! fills them again, so the counters keep counting across loads; only if that fails (an object of
//! an older shape) is the table replaced whole. Rendering is pure and golden-tested.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::masquerade::{self, Masquerade};
use crate::model::encryption::{Path, PeerPath};
use crate::model::overlay::AcceptedPeer;
use crate::model::routing::host_net;
use crate::netfilter::nft::{self, Flags};
use crate::netfilter::NetfilterError;

/// Name of the table (family `inet`).
pub const TABLE: &str = "veilnet_wire";

/// NFLOG group of the flow log (the same as the policy table's).
pub const LOG_GROUP: u16 = 100;

/// Log prefix of rejected VXLAN (`veilnet:vxlan-rejected:<reason>`).
pub const VXLAN_REJECTED_PREFIX: &str = "veilnet:vxlan-rejected";

/// Why a VXLAN datagram was rejected (the last part of its log prefix).
pub const REJECT_NOT_UNDERLAY: &str = "not-from-the-underlay";
pub const REJECT_NOT_OUR_ADDRESS: &str = "not-to-the-vtep-address";
pub const REJECT_NOT_A_PEER: &str = "not-a-vxlan-peer";
pub const REJECT_INNER_SOURCE: &str = "inner-source-not-the-peers";

/// The named counters of the table, in the order `veilnet status` shows them.
pub const COUNTERS: [&str; 5] = [
    "raw_pod_traffic",
    "plaintext_vxlan",
    "vxlan_rejected",
    "wireguard_rejected",
    "agent_conn_limited",
];

/// Connections one pod address may hold to the agent's ports at once: Prometheus needs one.
pub const AGENT_CONNS_PER_SOURCE: u32 = 8;

/// Byte offsets from the outer UDP header: UDP (8) + VXLAN (8) + Ethernet (14).
const INNER_ETHERTYPE_BITS: u32 = (8 + 8 + 12) * 8;
const INNER_IPV4_SADDR_BITS: u32 = (8 + 8 + 14 + 12) * 8;

/// A peer on the VXLAN path: the outer source it must send from, and the inner sources its
/// frames may carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanPeer {
    pub underlay_ip: IpAddr,
    pub inner_sources: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRules {
    pub underlay_dev: String,
    /// This node's underlay address: the only address VXLAN is accepted on.
    pub underlay_ip: IpAddr,
    pub wg_dev: String,
    pub vxlan_port: u16,
    pub wg_port: u16,
    pub cluster_cidr: IpNet,
    pub strict: bool,
    /// Peers whose pair with this node is on the VXLAN path.
    pub vxlan_peers: Vec<VxlanPeer>,
    /// The node addresses of every accepted peer (as the cluster records them).
    pub peer_nodes: BTreeSet<IpAddr>,
    /// The agent's TCP ports reachable on the node's addresses (health, metrics).
    pub agent_ports: Vec<u16>,
    pub agent_conns_per_source: u32,
    /// Pod egress masquerade (the `postrouting` nat chain); `None`: this node opts out.
    pub masquerade: Option<Masquerade>,
}

impl WireRules {
    /// The peer-dependent part of the rules from the validated peers and their paths (pure):
    /// only a peer on the VXLAN path may send VXLAN, and only with its own pod CIDRs or node
    /// address as the inner source.
    pub fn with_peers(mut self, peers: &[AcceptedPeer], paths: &[PeerPath]) -> Self {
        let by_node = PeerPath::by_node(paths);
        let path_of = |name: &str| by_node.get(name).map(|p| &p.path);
        self.vxlan_peers = peers
            .iter()
            .filter(|p| matches!(path_of(&p.name), Some(Path::Vxlan)))
            .map(|p| VxlanPeer {
                underlay_ip: p.underlay_ip,
                inner_sources: p
                    .pod_cidrs
                    .iter()
                    .copied()
                    .chain(std::iter::once(host_net(p.underlay_ip)))
                    .collect(),
            })
            .collect();
        self.vxlan_peers.sort();
        self.peer_nodes = peers.iter().map(|p| p.underlay_ip).collect();
        self
    }
}

fn family(ip: IpAddr) -> (&'static str, &'static str) {
    match ip {
        IpAddr::V4(_) => ("ip", "ipv4_addr"),
        IpAddr::V6(_) => ("ip6", "ipv6_addr"),
    }
}

/// An IPv4 network as the integer range the raw-payload lookup compares with.
fn v4_range(net: &IpNet) -> Option<String> {
    match net {
        IpNet::V4(v4) => Some(format!(
            "0x{:08x}-0x{:08x}",
            u32::from(v4.network()),
            u32::from(v4.broadcast())
        )),
        IpNet::V6(_) => None,
    }
}

/// The table's objects, without rules or elements (`nft` creates what is missing).
fn declarations(r: &WireRules) -> String {
    let (uf, utype) = family(r.underlay_ip);
    let mut s = format!("table inet {TABLE} {{\n");
    for c in COUNTERS {
        s.push_str(&format!("\tcounter {c} {{}}\n"));
    }
    let ctype = family(r.cluster_cidr.addr()).1;
    s.push_str(&format!(
        "\tset agent_clients {{ type {ctype}; size 65535; flags dynamic; }}\n\
         \tset vxlan_sources {{ typeof {uf} saddr . @th,{INNER_IPV4_SADDR_BITS},32; flags interval; }}\n\
         \tset vxlan_peers {{ type {utype}; }}\n\
         \tset peer_nodes {{ type {utype}; }}\n"
    ));
    for (chain, hook) in [
        ("forward", "forward"),
        ("output", "output"),
        ("input", "input"),
    ] {
        s.push_str(&format!(
            "\tchain {chain} {{ type filter hook {hook} priority -150; policy accept; }}\n"
        ));
    }
    s.push_str(&masquerade::declarations(r.masquerade.as_ref()));
    s.push_str("\tchain vxlan_in {}\n}\n");
    s
}

fn log_then_drop(matches: &str, counter: &str, reason: &str) -> String {
    format!(
        "\t\t{matches}limit rate 10/second burst 20 packets log prefix \"{VXLAN_REJECTED_PREFIX}:{reason}\" group {LOG_GROUP}\n\
         \t\t{matches}counter name {counter} drop\n"
    )
}

/// Rules and elements (after the flush).
fn contents(r: &WireRules) -> String {
    let (ul, wg, c) = (&r.underlay_dev, &r.wg_dev, r.cluster_cidr);
    let cf = family(c.addr()).0;
    let (uf, _) = family(r.underlay_ip);
    let same_family = cf == uf;
    let vx = r.vxlan_port;
    let mut s = format!("table inet {TABLE} {{\n\tchain forward {{\n");
    s.push_str(&format!(
        "\t\toifname \"{wg}\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n\
         \t\toifname \"{ul}\" {cf} saddr {c} {cf} daddr {c} counter name raw_pod_traffic drop\n\
         \t\tiifname \"{ul}\" {cf} saddr {c} {cf} daddr {c} counter name raw_pod_traffic drop\n"
    ));
    if same_family {
        // Pods and other nodes' host networks talk inside the pair's path, never raw. Except a
        // hostPort connection (`ct status dnat`): the peer node addressed *this node*, and this
        // node's own NAT (the CNI plugin's `ip veilnet_hostport` table) sent it on to the pod;
        // that is neither a leak nor an injected pod-addressed packet. The reply leaves through
        // the pod-to-node path of the pair (the pod's source is un-DNATed on the way out).
        s.push_str(&format!(
            "\t\toifname \"{ul}\" {cf} saddr {c} {cf} daddr @peer_nodes counter name raw_pod_traffic drop\n\
             \t\tiifname \"{ul}\" ct status ! dnat {cf} saddr @peer_nodes {cf} daddr {c} counter name raw_pod_traffic drop\n"
        ));
    }
    s.push_str(&format!(
        "\t}}\n\tchain output {{\n\t\toifname \"{ul}\" {cf} daddr {c} counter name raw_pod_traffic drop\n"
    ));
    if r.strict {
        s.push_str(&format!(
            "\t\toifname \"{ul}\" udp dport {vx} counter name plaintext_vxlan drop\n"
        ));
    }
    s.push_str("\t}\n\tchain input {\n");
    if !r.agent_ports.is_empty() {
        let ports: Vec<String> = r.agent_ports.iter().map(u16::to_string).collect();
        s.push_str(&format!(
            "\t\t{cf} saddr {c} tcp dport {{ {} }} ct state new add @agent_clients {{ {cf} saddr ct count over {} }} counter name agent_conn_limited reject with tcp reset\n",
            ports.join(", "),
            r.agent_conns_per_source
        ));
    }
    if r.strict {
        s.push_str(&format!(
            "\t\tiifname \"{ul}\" udp dport {vx} counter name plaintext_vxlan drop\n"
        ));
    }
    s.push_str(&format!(
        "\t\tudp dport {vx} jump vxlan_in\n\
         \t\tudp dport {wgp} iifname != \"{ul}\" counter name wireguard_rejected drop\n\
         \t\tudp dport {wgp} {cf} saddr {c} counter name wireguard_rejected drop\n\
         \t\tiifname \"{ul}\" {cf} saddr {c} counter name raw_pod_traffic drop\n\
         \t}}\n\tchain vxlan_in {{\n",
        wgp = r.wg_port
    ));
    s.push_str(&log_then_drop(
        &format!("iifname != \"{ul}\" "),
        "vxlan_rejected",
        REJECT_NOT_UNDERLAY,
    ));
    s.push_str(&log_then_drop(
        &format!("{uf} daddr != {} ", r.underlay_ip),
        "vxlan_rejected",
        REJECT_NOT_OUR_ADDRESS,
    ));
    s.push_str(&format!(
        "\t\t@th,{INNER_ETHERTYPE_BITS},16 0x0800 {uf} saddr . @th,{INNER_IPV4_SADDR_BITS},32 @vxlan_sources accept\n"
    ));
    s.push_str(&format!(
        "\t\t{uf} saddr != @vxlan_peers limit rate 10/second burst 20 packets log prefix \"{VXLAN_REJECTED_PREFIX}:{REJECT_NOT_A_PEER}\" group {LOG_GROUP}\n\
         \t\t{uf} saddr @vxlan_peers limit rate 10/second burst 20 packets log prefix \"{VXLAN_REJECTED_PREFIX}:{REJECT_INNER_SOURCE}\" group {LOG_GROUP}\n\
         \t\tcounter name vxlan_rejected drop\n\t}}\n"
    ));
    let masquerade_elements = match &r.masquerade {
        Some(m) => {
            let (chain, elements) = masquerade::rules(m, c);
            s.push_str(&chain);
            elements
        }
        None => String::new(),
    };
    s.push_str("}\n");
    for (set, items) in set_elements(r) {
        s.push_str(&element_command("add", set, &items));
    }
    s.push_str(&masquerade_elements);
    s
}

/// The sets of the table (`flush table` empties chains, not sets).
const SETS: [&str; 3] = ["vxlan_sources", "vxlan_peers", "peer_nodes"];

/// The elements of the peer-dependent sets, as `nft` writes them (pure).
fn set_elements(r: &WireRules) -> [(&'static str, Vec<String>); 3] {
    let sources: Vec<String> = r
        .vxlan_peers
        .iter()
        .flat_map(|p| {
            p.inner_sources
                .iter()
                .filter_map(v4_range)
                .map(move |range| format!("{} . {range}", p.underlay_ip))
        })
        .collect();
    let peers: Vec<String> = r
        .vxlan_peers
        .iter()
        .map(|p| p.underlay_ip.to_string())
        .collect();
    let nodes: Vec<String> = r.peer_nodes.iter().map(IpAddr::to_string).collect();
    [(SETS[0], sources), (SETS[1], peers), (SETS[2], nodes)]
}

/// When only peers changed since `old` was loaded (a node joined, left or changed its path),
/// the element additions and deletions that turn `old`'s sets into `new`'s, as one transaction
/// (pure); `None` when anything else changed and the table must be rendered whole. A node
/// joining a 1,000-node cluster then costs one small transaction, not a flush and reload of
/// every rule and the 1,000-element sets (and their counters' and the sets' lookups stay put).
pub fn render_element_changes(old: &WireRules, new: &WireRules) -> Option<String> {
    let peerless = |r: &WireRules| WireRules {
        vxlan_peers: Vec::new(),
        peer_nodes: BTreeSet::new(),
        ..r.clone()
    };
    if peerless(old) != peerless(new) {
        return None;
    }
    let mut script = String::new();
    for ((set, before), (_, after)) in set_elements(old).into_iter().zip(set_elements(new)) {
        let before: BTreeSet<String> = before.into_iter().collect();
        let after: BTreeSet<String> = after.into_iter().collect();
        let gone: Vec<&str> = before.difference(&after).map(String::as_str).collect();
        let added: Vec<&str> = after.difference(&before).map(String::as_str).collect();
        script.push_str(&element_command("delete", set, &gone));
        script.push_str(&element_command("add", set, &added));
    }
    Some(script)
}

/// `add`/`delete element` of `items` in one of the table's sets; nothing for no items.
fn element_command(verb: &str, set: &str, items: &[impl AsRef<str>]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let items: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    format!(
        "{verb} element inet {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

/// The table as one transaction that keeps its counters (pure).
pub fn render(r: &WireRules) -> String {
    let masquerade_set = r.masquerade.as_ref().map(|_| masquerade::SET);
    let flush_sets: String = SETS
        .iter()
        .copied()
        .chain(masquerade_set)
        .map(|set| format!("flush set inet {TABLE} {set}\n"))
        .collect();
    format!(
        "{}flush table inet {TABLE}\n{flush_sets}{}",
        declarations(r),
        contents(r)
    )
}

/// The table replaced whole (pure): for when [`render`]'s declarations clash with what the
/// kernel holds (a table of an older shape). Counters restart from zero.
pub fn render_replace(r: &WireRules) -> String {
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}{}",
        declarations(r),
        contents(r)
    )
}

/// Loads the rules: only the set elements that changed since `previous` (what this process
/// loaded last) when nothing else did, else the whole table in place, else by replacing the
/// table. Returns whether it had to replace.
pub fn load(previous: Option<&WireRules>, r: &WireRules) -> Result<bool, NetfilterError> {
    if let Some(script) = previous.and_then(|old| render_element_changes(old, r)) {
        if script.is_empty() {
            return Ok(false);
        }
        match apply(&script) {
            Ok(()) => return Ok(false),
            // The kernel's sets are not what we loaded (someone edited the table): load it whole.
            Err(e) => {
                tracing::debug!(error = %e, "the wire table's sets differ from what was loaded; loading it whole")
            }
        }
    }
    match apply(&render(r)) {
        Ok(()) => Ok(false),
        Err(NetfilterError::NftRefused { message, .. }) => {
            tracing::warn!(error = %message, "the wire table could not be updated in place; replacing it (its counters restart)");
            apply(&render_replace(r)).map(|()| true)
        }
        Err(e) => Err(e),
    }
}

/// Loads `script` into the calling thread's network namespace in one transaction.
pub fn apply(script: &str) -> Result<(), NetfilterError> {
    nft::run_here(script, Flags::default(), "wire rules").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::encryption::{BlockReason, Mode};
    use crate::model::MacAddr;

    fn rules(strict: bool) -> WireRules {
        WireRules {
            underlay_dev: "eth0".into(),
            underlay_ip: "172.30.0.11".parse().unwrap(),
            wg_dev: "veilwg0".into(),
            vxlan_port: 8472,
            wg_port: 51820,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            strict,
            vxlan_peers: Vec::new(),
            peer_nodes: BTreeSet::new(),
            agent_ports: vec![9891, 9892],
            agent_conns_per_source: 8,
            masquerade: None,
        }
    }

    #[test]
    fn a_peer_change_is_rendered_as_element_changes_only() {
        let mut old = rules(false);
        old.peer_nodes = ["172.30.0.12", "172.30.0.13"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut new = old.clone();
        new.peer_nodes.remove(&"172.30.0.12".parse().unwrap());
        new.peer_nodes.insert("172.30.0.14".parse().unwrap());
        new.vxlan_peers.push(VxlanPeer {
            underlay_ip: "172.30.0.14".parse().unwrap(),
            inner_sources: vec!["10.244.4.0/24".parse().unwrap()],
        });
        let script = render_element_changes(&old, &new).unwrap();
        assert_eq!(
            script,
            "add element inet veilnet_wire vxlan_sources { 172.30.0.14 . 0x0af40400-0x0af404ff }\n\
             add element inet veilnet_wire vxlan_peers { 172.30.0.14 }\n\
             delete element inet veilnet_wire peer_nodes { 172.30.0.12 }\n\
             add element inet veilnet_wire peer_nodes { 172.30.0.14 }\n"
        );
        // Nothing changed: nothing to write. Anything but the peers changed: a whole load.
        assert_eq!(render_element_changes(&new, &new).as_deref(), Some(""));
        let mut strict = new.clone();
        strict.strict = true;
        assert!(render_element_changes(&new, &strict).is_none());
        let mut ports = new.clone();
        ports.agent_ports = vec![9892];
        assert!(render_element_changes(&new, &ports).is_none());
    }

    fn peer(name: &str, ip: &str, cidr: &str) -> AcceptedPeer {
        AcceptedPeer {
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            vtep_mac: MacAddr([6, 0, 0, 0, 0, 1]),
            pod_cidrs: vec![cidr.parse().unwrap()],
            vxlan_unusable: None,
        }
    }

    fn path(node: &str, path: Path) -> PeerPath {
        PeerPath {
            node: node.into(),
            mode: Some(Mode::Off),
            path,
            refused_downgrade: false,
        }
    }

    #[test]
    fn raw_pod_traffic_is_always_dropped_and_vxlan_only_in_strict_mode() {
        let on = render(&rules(false));
        assert!(on.contains("oifname \"eth0\" ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 counter name raw_pod_traffic drop"));
        assert!(on.contains("iifname \"eth0\" ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16"));
        assert!(on.contains("oifname \"eth0\" ip saddr 10.244.0.0/16 ip daddr @peer_nodes"));
        assert!(on.contains(
            "iifname \"eth0\" ct status ! dnat ip saddr @peer_nodes ip daddr 10.244.0.0/16"
        ));
        assert!(on.contains("maxseg size set rt mtu"));
        assert!(!on.contains("plaintext_vxlan drop"));
        assert!(on.contains(
            "ip saddr 10.244.0.0/16 tcp dport { 9891, 9892 } ct state new \
             add @agent_clients { ip saddr ct count over 8 } counter name agent_conn_limited reject with tcp reset"
        ));
        let strict = render(&rules(true));
        assert_eq!(
            strict
                .matches("udp dport 8472 counter name plaintext_vxlan drop")
                .count(),
            2
        );
    }

    #[test]
    fn only_vxlan_peers_may_send_vxlan_and_only_with_their_own_sources() {
        let peers = [
            peer("b", "172.30.0.12", "10.244.2.0/24"),
            peer("c", "172.30.0.13", "10.244.3.0/24"),
            peer("d", "172.30.0.14", "10.244.4.0/24"),
        ];
        let wg = Path::Wireguard {
            public_key: [1; 32],
            endpoint: "172.30.0.12:51820".parse().unwrap(),
        };
        let paths = [
            path("b", wg),
            path("c", Path::Vxlan),
            path("d", Path::Blocked(BlockReason::PeerIsStrict)),
        ];
        let r = rules(false).with_peers(&peers, &paths);
        assert_eq!(
            r.vxlan_peers,
            vec![VxlanPeer {
                underlay_ip: "172.30.0.13".parse().unwrap(),
                inner_sources: vec![
                    "10.244.3.0/24".parse().unwrap(),
                    "172.30.0.13/32".parse().unwrap()
                ],
            }]
        );
        let s = render(&r);
        // node-c's pod CIDR and node address, as integer ranges after its outer source.
        assert!(s.contains("add element inet veilnet_wire vxlan_sources { 172.30.0.13 . 0x0af40300-0x0af403ff, 172.30.0.13 . 0xac1e000d-0xac1e000d }"), "{s}");
        assert!(s.contains("add element inet veilnet_wire vxlan_peers { 172.30.0.13 }"));
        assert!(s.contains(
            "add element inet veilnet_wire peer_nodes { 172.30.0.12, 172.30.0.13, 172.30.0.14 }"
        ));
        // The accept needs IPv4 inside and the (outer, inner) pair in the set; the rest drops.
        assert!(s.contains("@th,224,16 0x0800 ip saddr . @th,336,32 @vxlan_sources accept"));
        assert!(s.contains("iifname != \"eth0\" counter name vxlan_rejected drop"));
        assert!(s.contains("ip daddr != 172.30.0.11 counter name vxlan_rejected drop"));
        assert!(
            s.contains("udp dport 51820 iifname != \"eth0\" counter name wireguard_rejected drop")
        );
        assert!(s.ends_with("}\n}\nadd element inet veilnet_wire vxlan_sources { 172.30.0.13 . 0x0af40300-0x0af403ff, 172.30.0.13 . 0xac1e000d-0xac1e000d }\nadd element inet veilnet_wire vxlan_peers { 172.30.0.13 }\nadd element inet veilnet_wire peer_nodes { 172.30.0.12, 172.30.0.13, 172.30.0.14 }\n"));
    }

    #[test]
    fn with_no_vxlan_peer_every_vxlan_datagram_is_rejected_and_no_empty_set_is_written() {
        let s = render(&rules(false));
        assert!(!s.contains("add element"), "{s}");
        assert!(s.contains("udp dport 8472 jump vxlan_in"));
        assert!(s.contains("counter name vxlan_rejected drop\n\t}"));
    }

    #[test]
    fn the_update_keeps_counters_and_the_replacement_starts_over() {
        let r = rules(false);
        let update = render(&r);
        assert!(update.starts_with("table inet veilnet_wire {\n\tcounter raw_pod_traffic {}"));
        assert!(update.contains("}\nflush table inet veilnet_wire\nflush set inet veilnet_wire vxlan_sources\nflush set inet veilnet_wire vxlan_peers\nflush set inet veilnet_wire peer_nodes\ntable inet veilnet_wire {"));
        let replace = render_replace(&r);
        assert!(replace.starts_with("table inet veilnet_wire\ndelete table inet veilnet_wire\n"));
        assert!(!replace.contains("flush table"));
    }
}
