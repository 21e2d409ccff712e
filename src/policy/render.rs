//! The compiled model → the ruleset's nft objects (pure).
//!
//! [`render`] builds a [`Ruleset`]: both veilnet tables as named counters, sets, maps and chains.
//! Its [`Ruleset::script`] replaces both tables in a single transaction (each table is declared,
//! deleted, and declared again with its full content; `nft -f` commits that atomically, so the
//! kernel never runs a half-built ruleset); [`super::diff`] turns two rulesets into the small
//! transaction between them. Given the previous ruleset, `render` keeps the names of every chain,
//! counter and set whose identity survives (see [`super::ruleset`]). See the module docs of
//! `policy` for the layout of chains, sets and maps.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::addrset::AddrSet;
use super::compile::{AntiSpoofPort, CompiledPolicy, CompiledRule, Direction, PodChain, RuleMatch};
use super::logprefix::{allow_prefix, deny_prefix, spoof_prefix};
use super::ruleset::{Family, Names, NftObject, NftTable, Numbering, ObjectKind, Ruleset};

/// Named counter of default-deny drops, per direction.
pub const DENY_INGRESS_COUNTER: &str = "deny_ingress";
pub const DENY_EGRESS_COUNTER: &str = "deny_egress";
/// Named counter of frames dropped by anti-spoofing (bridge table).
pub const SPOOF_COUNTER: &str = "spoofed";
/// The IEEE 802.1D reserved link-local group addresses, `01:80:c2:00:00:00`–`0f`. Pods have no
/// business sending to them (STP, pause, LACP, 802.1X, LLDP, ...), and the bridge handles most of
/// them locally, where they would teach its FDB: from pod ports they are spoofing.
pub const LINK_LOCAL_GROUPS: &str = "01:80:c2:00:00:00/44";

/// Every packet to a DNS port goes through the `dns` chain first.
const DNS_JUMP: &str = "meta l4proto { tcp, udp } th dport { 53, 853 } jump dns";
/// Every UDP answer from port 53 goes through `dns_reply`.
const DNS_REPLY_JUMP: &str = "udp sport 53 jump dns_reply";

/// What a per-pod DNS counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DnsCount {
    /// Queries to trusted servers.
    Trusted,
    /// Queries to any other server.
    Untrusted,
    /// NXDOMAIN answers received (UDP).
    Nxdomain,
}

impl DnsCount {
    pub const ALL: [DnsCount; 3] = [DnsCount::Trusted, DnsCount::Untrusted, DnsCount::Nxdomain];

    pub fn as_str(self) -> &'static str {
        match self {
            DnsCount::Trusted => "trusted",
            DnsCount::Untrusted => "untrusted",
            DnsCount::Nxdomain => "nxdomain",
        }
    }
}

/// Renders the whole ruleset for `nft -f -` (a full replace, names numbered from 0).
pub fn render_nft(policy: &CompiledPolicy) -> String {
    render(policy, None).script()
}

/// Renders `policy` as nft objects, keeping the names `previous` gave to the same identities.
pub fn render(policy: &CompiledPolicy, previous: Option<&Ruleset>) -> Ruleset {
    let prev = previous.map(|r| &r.names);
    let chain_keys: Vec<(super::model::ObjectRef, Direction)> = policy
        .chains
        .iter()
        .map(|c| (c.pod.clone(), c.direction))
        .collect();
    // By veth *and* pod: a veth name reused by another pod gets another chain (whose comment
    // names the pod) instead of a changed declaration.
    let port_keys: Vec<(String, super::model::ObjectRef)> = policy
        .anti_spoof
        .iter()
        .map(|p| (p.host_veth.clone(), p.pod.clone()))
        .collect();
    let (chains, chain_nums) = Numbering::assign(prev.map(|n| &n.chains), &chain_keys);
    let (policies, policy_nums) = Numbering::assign(prev.map(|n| &n.policies), &policy.policies);
    let (peers, peer_nums) = Numbering::assign(prev.map(|n| &n.peers), &policy.peer_set_keys);
    let (ports, port_nums) = Numbering::assign(prev.map(|n| &n.ports), &policy.port_sets);
    let (dests, dest_nums) = Numbering::assign(prev.map(|n| &n.dests), &policy.dest_set_keys);
    let (bridge_ports, bridge_nums) = Numbering::assign(prev.map(|n| &n.bridge_ports), &port_keys);
    let dns_keys: Vec<super::model::ObjectRef> =
        policy.dns_pods.iter().map(|d| d.pod.clone()).collect();
    let (dns_pods, dns_nums) = Numbering::assign(prev.map(|n| &n.dns_pods), &dns_keys);
    let r = Renderer {
        p: policy,
        chain_nums,
        policy_nums,
        peer_nums,
        port_nums,
        dest_nums,
        bridge_nums,
        dns_nums,
    };
    let mut dns_counters = BTreeMap::new();
    for (i, d) in policy.dns_pods.iter().enumerate() {
        for counts in DnsCount::ALL {
            dns_counters.insert(r.dns_counter(i, counts), (d.pod.clone(), counts));
        }
    }
    let policy_counters: BTreeMap<String, super::model::ObjectRef> = policy
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| (r.counter(i), p.clone()))
        .collect();
    Ruleset {
        comment: format!(
            "# veilnet NetworkPolicy for node {:?}: {} policies, {} pod chains, {} guarded ports",
            policy.node,
            policy.policies.len(),
            policy.chains.len(),
            policy.anti_spoof.len()
        ),
        tables: vec![r.inet(), r.bridge()],
        policy_counters,
        dns_counters,
        names: Names {
            chains,
            policies,
            peers,
            ports,
            dests,
            bridge_ports,
            dns_pods,
        },
    }
}

/// nft's name of a family-specific address match.
fn addr_key(v6: bool, dir_src: bool) -> &'static str {
    match (v6, dir_src) {
        (false, true) => "ip saddr",
        (false, false) => "ip daddr",
        (true, true) => "ip6 saddr",
        (true, false) => "ip6 daddr",
    }
}

fn fam(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("v6", "ipv6_addr")
    } else {
        ("v4", "ipv4_addr")
    }
}

fn set(name: String, ty: &str, interval: bool, elements: Vec<String>) -> NftObject {
    let mut decl = vec![format!("type {ty}")];
    if interval {
        decl.push("flags interval".into());
    }
    NftObject {
        kind: ObjectKind::Set,
        name,
        decl,
        content: elements,
    }
}

fn counter(name: &str, comment: Option<String>) -> NftObject {
    NftObject {
        kind: ObjectKind::Counter,
        name: name.to_string(),
        decl: comment
            .map(|c| format!("comment {c}"))
            .into_iter()
            .collect(),
        content: Vec::new(),
    }
}

fn addr_elements(set: &AddrSet, v6: bool) -> Vec<String> {
    if v6 {
        set.v6_elements().collect()
    } else {
        set.v4_elements().collect()
    }
}

fn node_set(policy: &CompiledPolicy, v6: bool) -> AddrSet {
    let mut s = AddrSet::new();
    for ip in &policy.node_addrs {
        if ip.is_ipv6() == v6 {
            s.push_ip(*ip);
        }
    }
    s.normalize();
    s
}

fn quote_comment(s: &str) -> String {
    // Names are DNS labels; strip anything that could break the quoting anyway.
    let clean: String = s
        .chars()
        .filter(|c| *c != '"' && *c != '\\')
        .take(120)
        .collect();
    format!("\"{clean}\"")
}

fn join(m: &str, rest: &str) -> String {
    if m.is_empty() {
        rest.to_string()
    } else {
        format!("{m} {rest}")
    }
}

/// The model and the numbers of its objects (indexed like the model's vectors).
struct Renderer<'a> {
    p: &'a CompiledPolicy,
    chain_nums: Vec<u32>,
    policy_nums: Vec<u32>,
    peer_nums: Vec<u32>,
    port_nums: Vec<u32>,
    dest_nums: Vec<u32>,
    bridge_nums: Vec<u32>,
    dns_nums: Vec<u32>,
}

impl Renderer<'_> {
    fn chain_name(&self, index: usize, chain: &PodChain) -> String {
        let n = self.chain_nums[index];
        match chain.direction {
            Direction::Ingress => format!("ing_{n}"),
            Direction::Egress => format!("egr_{n}"),
        }
    }

    fn counter(&self, policy: usize) -> String {
        format!("pol_{}", self.policy_nums[policy])
    }

    fn peer_set(&self, id: usize, v6: bool) -> String {
        format!("peer_{}_{}", self.peer_nums[id], fam(v6).0)
    }

    fn port_set(&self, id: usize) -> String {
        format!("port_{}", self.port_nums[id])
    }

    fn dest_set(&self, id: usize, v6: bool) -> String {
        format!("dest_{}_{}", self.dest_nums[id], fam(v6).0)
    }

    fn dns_counter(&self, pod: usize, counts: DnsCount) -> String {
        let kind = match counts {
            DnsCount::Trusted => "dnst",
            DnsCount::Untrusted => "dnsu",
            DnsCount::Nxdomain => "dnsx",
        };
        format!("{kind}_{}", self.dns_nums[pod])
    }

    /// `limit … log prefix … group …` with the ruleset's rate.
    fn log(&self, prefix: &str, per_second: u32, burst: u32) -> String {
        format!(
            "limit rate {per_second}/second burst {burst} packets log prefix \"{prefix}\" group {}",
            self.p.options.log_group
        )
    }

    /// The DNS guard's objects (none while it is inactive): per pod a counter of queries to
    /// trusted and to untrusted servers, the trusted servers, which pods are watched and which
    /// enforced, and the `dns` chain that forward and input jump to for every packet to a DNS
    /// port, before conntrack's shortcut (so every query counts, and an enforce drop also cuts a
    /// flow opened before it). A query is a UDP datagram or a TCP SYN.
    fn dns_objects(&self, objects: &mut Vec<NftObject>) -> bool {
        let p = self.p;
        if !p.options.dns.active() {
            return false;
        }
        for (i, d) in p.dns_pods.iter().enumerate() {
            for counts in DnsCount::ALL {
                objects.push(counter(
                    &self.dns_counter(i, counts),
                    Some(quote_comment(&d.pod.to_string())),
                ));
            }
        }
        let mut trusted = AddrSet::new();
        for net in &p.options.dns.trusted {
            trusted.push_net(net);
        }
        trusted.normalize();
        let mut rules = Vec::new();
        let first_packet = [
            "meta l4proto udp",
            "tcp flags & (fin | syn | rst | ack) == syn",
        ];
        for v6 in [false, true] {
            let (f, ty) = fam(v6);
            let ip = if v6 { "ip6" } else { "ip" };
            objects.push(set(
                format!("dns_trusted_{f}"),
                ty,
                true,
                addr_elements(&trusted, v6),
            ));
            let pods = |only_enforce: bool| -> Vec<String> {
                let mut ips: Vec<IpAddr> = p
                    .dns_pods
                    .iter()
                    .filter(|d| !only_enforce || d.mode == crate::dns::DnsMode::Enforce)
                    .flat_map(|d| d.ips.iter().copied())
                    .filter(|a| a.is_ipv6() == v6)
                    .collect();
                ips.sort();
                ips.dedup();
                ips.iter().map(|a| a.to_string()).collect()
            };
            objects.push(set(format!("dns_watched_{f}"), ty, false, pods(false)));
            objects.push(set(format!("dns_enforce_{f}"), ty, false, pods(true)));
            for counts in DnsCount::ALL {
                let mut seen = std::collections::BTreeSet::new();
                let elements = p
                    .dns_pods
                    .iter()
                    .enumerate()
                    .flat_map(|(i, d)| d.ips.iter().map(move |a| (i, *a)))
                    .filter(|(_, a)| a.is_ipv6() == v6 && seen.insert(*a))
                    .map(|(i, a)| format!("{a} : \"{}\"", self.dns_counter(i, counts)))
                    .collect();
                objects.push(NftObject {
                    kind: ObjectKind::Map,
                    name: format!("dns_{}_ctr_{f}", counts.as_str()),
                    decl: vec![format!("type {ty} : counter")],
                    content: elements,
                });
            }
            let sample = self.log(crate::policy::logprefix::DNS_SAMPLE_PREFIX, 2, 5);
            for q in first_packet {
                rules.push(format!(
                    "{ip} daddr @dns_trusted_{f} {q} counter name {ip} saddr map @dns_trusted_ctr_{f}"
                ));
            }
            rules.push(format!(
                "{ip} daddr @dns_trusted_{f} {ip} saddr @dns_watched_{f} meta l4proto udp {sample}"
            ));
            rules.push(format!("{ip} daddr @dns_trusted_{f} return"));
        }
        let (rate, burst) = (p.options.log_rate_per_second, p.options.log_burst);
        for v6 in [false, true] {
            let f = fam(v6).0;
            let ip = if v6 { "ip6" } else { "ip" };
            for q in first_packet {
                rules.push(format!(
                    "{ip} saddr @dns_watched_{f} {q} counter name {ip} saddr map @dns_untrusted_ctr_{f}"
                ));
            }
            let drop_log = self.log(crate::policy::logprefix::DNS_DROP_PREFIX, rate, burst);
            let monitor_log = self.log(crate::policy::logprefix::DNS_MONITOR_PREFIX, rate, burst);
            for q in first_packet {
                rules.push(format!("{ip} saddr @dns_enforce_{f} {q} {drop_log}"));
            }
            rules.push(format!("{ip} saddr @dns_enforce_{f} drop"));
            for q in first_packet {
                rules.push(format!("{ip} saddr @dns_watched_{f} {q} {monitor_log}"));
            }
        }
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "dns".into(),
            decl: Vec::new(),
            content: rules,
        });
        // NXDOMAIN answers to watched pods (QR set, RCODE 3 in the DNS header after UDP's 8
        // bytes), per pod: with the query counters, the NXDOMAIN share of a pod's lookups. An
        // answer from a server on the node itself leaves through output, any other through
        // forward.
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "dns_reply".into(),
            decl: Vec::new(),
            content: [("ip", "v4"), ("ip6", "v6")]
                .iter()
                .map(|(ip, f)| {
                    format!(
                        "@th,80,1 1 @th,92,4 3 counter name {ip} daddr map @dns_nxdomain_ctr_{f}"
                    )
                })
                .collect(),
        });
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "input".into(),
            decl: vec!["type filter hook input priority filter; policy accept;".into()],
            content: vec![DNS_JUMP.to_string()],
        });
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "output".into(),
            decl: vec!["type filter hook output priority filter; policy accept;".into()],
            content: vec![DNS_REPLY_JUMP.to_string()],
        });
        true
    }

    fn inet(&self) -> NftTable {
        let p = self.p;
        let mut objects = Vec::new();
        let dns = self.dns_objects(&mut objects);
        for (id, pol) in p.policies.iter().enumerate() {
            objects.push(counter(
                &self.counter(id),
                Some(quote_comment(&pol.to_string())),
            ));
        }
        for c in [DENY_INGRESS_COUNTER, DENY_EGRESS_COUNTER] {
            objects.push(counter(c, None));
        }

        for v6 in [false, true] {
            let (f, ty) = fam(v6);
            objects.push(set(
                format!("node_{f}"),
                ty,
                true,
                addr_elements(&node_set(p, v6), v6),
            ));
        }
        for (id, peers) in p.peer_sets.iter().enumerate() {
            for (v6, present) in [(false, peers.has_v4()), (true, peers.has_v6())] {
                if present {
                    objects.push(set(
                        self.peer_set(id, v6),
                        fam(v6).1,
                        true,
                        addr_elements(peers, v6),
                    ));
                }
            }
        }
        for (id, ports) in p.port_sets.iter().enumerate() {
            let elements = ports
                .0
                .iter()
                .map(|r| {
                    if r.first == r.last {
                        format!("{} . {}", r.protocol.nft_name(), r.first)
                    } else {
                        format!("{} . {}-{}", r.protocol.nft_name(), r.first, r.last)
                    }
                })
                .collect();
            objects.push(set(
                self.port_set(id),
                "inet_proto . inet_service",
                true,
                elements,
            ));
        }
        for (id, tuples) in p.dest_sets.iter().enumerate() {
            for v6 in [false, true] {
                let elements: Vec<String> = tuples
                    .iter()
                    .filter(|t| t.ip.is_ipv6() == v6)
                    .map(|t| format!("{} . {} . {}", t.ip, t.protocol.nft_name(), t.port))
                    .collect();
                if elements.is_empty() {
                    continue;
                }
                objects.push(set(
                    self.dest_set(id, v6),
                    &format!("{} . inet_proto . inet_service", fam(v6).1),
                    false,
                    elements,
                ));
            }
        }

        // Verdict maps: local pod IP → its chain. One lookup per packet and direction, whatever
        // the number of policies.
        for dir in [Direction::Ingress, Direction::Egress] {
            for v6 in [false, true] {
                let (f, ty) = fam(v6);
                // An IP claimed by two pods (a stale pod) maps to the first chain, as `chain_for`
                // (and so `explain`) picks it; nft refuses duplicate keys.
                let mut entries: Vec<(IpAddr, usize)> = Vec::new();
                for (i, chain) in p.chains.iter().enumerate() {
                    if chain.direction != dir {
                        continue;
                    }
                    for ip in chain.ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                        entries.push((*ip, i));
                    }
                }
                entries.sort();
                entries.dedup_by(|a, b| a.0 == b.0);
                objects.push(NftObject {
                    kind: ObjectKind::Map,
                    name: format!("{}_{f}", dir.as_str()),
                    decl: vec![format!("type {ty} : verdict")],
                    content: entries
                        .iter()
                        .map(|(ip, i)| {
                            format!("{ip} : jump {}", self.chain_name(*i, &p.chains[*i]))
                        })
                        .collect(),
                });
            }
        }

        for (i, chain) in p.chains.iter().enumerate() {
            objects.push(self.pod_chain(i, chain));
        }

        // `x . x` for every pod address: `saddr . saddr` in it means "from a pod", and
        // `saddr . <an end of the connection>` in it means "from that end".
        for v6 in [false, true] {
            let (f, ty) = fam(v6);
            objects.push(set(
                format!("pod_self_{f}"),
                &format!("{ty} . {ty}"),
                false,
                p.pod_ips
                    .iter()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .map(|ip| format!("{ip} . {ip}"))
                    .collect(),
            ));
        }
        objects.push(counter("forged_related", None));
        // Addresses of admitted local pods: in the node's pod CIDRs, only these are forwarded to.
        let mut forward: Vec<String> = Vec::new();
        if dns {
            forward.push(DNS_JUMP.to_string());
            forward.push(DNS_REPLY_JUMP.to_string());
        }
        for v6 in [false, true] {
            let (f, ty) = fam(v6);
            let cidrs: Vec<String> = p
                .options
                .local_pod_cidrs
                .iter()
                .filter(|c| matches!(c, IpNet::V6(_)) == v6)
                .map(|c| c.trunc().to_string())
                .collect();
            if cidrs.is_empty() {
                continue;
            }
            let mut admitted: Vec<IpAddr> = p
                .anti_spoof
                .iter()
                .flat_map(|port| port.ips.iter().copied())
                .filter(|ip| ip.is_ipv6() == v6)
                .collect();
            admitted.sort();
            admitted.dedup();
            objects.push(set(
                format!("local_pods_{f}"),
                ty,
                false,
                admitted.iter().map(|ip| ip.to_string()).collect(),
            ));
            let ip = if v6 { "ip6" } else { "ip" };
            forward.push(format!(
                "{ip} daddr {{ {} }} {ip} daddr != @local_pods_{f} counter name \"{DENY_INGRESS_COUNTER}\" drop",
                cidrs.join(", ")
            ));
        }
        forward.extend(
            [
                "ct state established accept",
                // Related packets (ICMP errors) from a router, a node or outside the cluster, or
                // from an end of the connection they refer to. A pod's forged error about another
                // pod's connection matches none of these.
                "ct state related ip saddr . ip saddr != @pod_self_v4 accept",
                "ct state related ip saddr . ct original ip saddr @pod_self_v4 accept",
                "ct state related ip saddr . ct original ip daddr @pod_self_v4 accept",
                "ct state related ip6 saddr . ip6 saddr != @pod_self_v6 accept",
                "ct state related ip6 saddr . ct original ip6 saddr @pod_self_v6 accept",
                "ct state related ip6 saddr . ct original ip6 daddr @pod_self_v6 accept",
                "ct state related counter name forged_related drop",
                "ct state invalid drop",
            ]
            .map(String::from),
        );
        if p.options.tcp_new_needs_syn {
            // Only new (or untracked) packets get here.
            forward.push("tcp flags & (fin | syn | rst | ack) != syn drop".into());
        }
        // New connections of watched pods to addresses that are no pod's and no node's.
        if !p.egress_watch.is_empty() {
            let log = self.log(
                crate::policy::logprefix::EGRESS_NEW_PREFIX,
                p.options.log_rate_per_second,
                p.options.log_burst,
            );
            for v6 in [false, true] {
                let (f, ty) = fam(v6);
                let ip = if v6 { "ip6" } else { "ip" };
                objects.push(set(
                    format!("egress_watch_{f}"),
                    ty,
                    false,
                    p.egress_watch
                        .iter()
                        .filter(|a| a.is_ipv6() == v6)
                        .map(ToString::to_string)
                        .collect(),
                ));
                forward.push(format!(
                    "{ip} saddr @egress_watch_{f} {ip} daddr . {ip} daddr != @pod_self_{f} {ip} daddr != @node_{f} {log}"
                ));
            }
        }
        forward.extend(
            [
                "ip saddr @node_v4 accept",
                "ip6 saddr @node_v6 accept",
                "ip saddr vmap @egress_v4",
                "ip6 saddr vmap @egress_v6",
                "ip daddr vmap @ingress_v4",
                "ip6 daddr vmap @ingress_v6",
            ]
            .map(String::from),
        );
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "forward".into(),
            decl: vec!["type filter hook forward priority filter; policy accept;".into()],
            content: forward,
        });
        NftTable {
            family: Family::Inet,
            objects,
        }
    }

    /// The match expressions of one rule: one per address family it needs, or one family-less.
    fn rule_matches(&self, rule: &CompiledRule, dir: Direction) -> Vec<String> {
        let p = self.p;
        let peer_is_src = dir == Direction::Ingress;
        match &rule.matcher {
            RuleMatch::PeersPorts { peers, ports } => {
                let port_match =
                    ports.map(|id| format!("meta l4proto . th dport @{}", self.port_set(id)));
                let mut out = Vec::new();
                match peers {
                    None => out.push(port_match.clone().unwrap_or_default()),
                    Some(id) => {
                        let set = &p.peer_sets[*id];
                        for (v6, present) in [(false, set.has_v4()), (true, set.has_v6())] {
                            if !present {
                                continue;
                            }
                            let mut m = format!(
                                "{} @{}",
                                addr_key(v6, peer_is_src),
                                self.peer_set(*id, v6)
                            );
                            if let Some(pm) = &port_match {
                                m.push(' ');
                                m.push_str(pm);
                            }
                            out.push(m);
                        }
                    }
                }
                out
            }
            RuleMatch::Destinations(id) => {
                let tuples = &p.dest_sets[*id];
                let mut out = Vec::new();
                for v6 in [false, true] {
                    if tuples.iter().any(|t| t.ip.is_ipv6() == v6) {
                        out.push(format!(
                            "{} . meta l4proto . th dport @{}",
                            addr_key(v6, false),
                            self.dest_set(*id, v6)
                        ));
                    }
                }
                out
            }
        }
    }

    fn pod_chain(&self, index: usize, chain: &PodChain) -> NftObject {
        let p = self.p;
        let o = &p.options;
        let limit = format!(
            "limit rate {}/second burst {} packets log group {}",
            o.log_rate_per_second, o.log_burst, o.log_group
        );
        // Egress rules `return` so that the destination's ingress chain still runs; `accept`
        // would end the whole forward hook.
        let verdict = match chain.direction {
            Direction::Ingress => "accept",
            Direction::Egress => "return",
        };
        let mut rules = Vec::new();
        for rule in &chain.rules {
            let policy = &p.policies[rule.policy];
            let prefix = allow_prefix(chain.direction, policy);
            for m in self.rule_matches(rule, chain.direction) {
                if o.log_allowed {
                    rules.push(join(&m, &format!("{limit} prefix \"{prefix}\"")));
                }
                rules.push(format!(
                    "{} comment {}",
                    join(
                        &m,
                        &format!("counter name \"{}\" {verdict}", self.counter(rule.policy))
                    ),
                    quote_comment(&format!("{prefix}#{}", rule.rule_index))
                ));
            }
        }
        let pod_prefix = deny_prefix(chain.direction, &chain.pod);
        rules.push(format!("{limit} prefix \"{pod_prefix}\""));
        let isolated: Vec<String> = chain
            .isolated_by
            .iter()
            .map(|i| p.policies[*i].to_string())
            .collect();
        let counter = match chain.direction {
            Direction::Ingress => DENY_INGRESS_COUNTER,
            Direction::Egress => DENY_EGRESS_COUNTER,
        };
        rules.push(format!(
            "counter name \"{counter}\" drop comment {}",
            quote_comment(&format!("default deny, isolated by {}", isolated.join(" ")))
        ));
        NftObject {
            kind: ObjectKind::Chain,
            name: self.chain_name(index, chain),
            decl: vec![format!(
                "comment {}",
                quote_comment(&format!("{} {}", chain.direction, chain.pod))
            )],
            content: rules,
        }
    }

    fn bridge(&self) -> NftTable {
        let p = self.p;
        let o = &p.options;
        let mut objects = vec![counter(SPOOF_COUNTER, None)];
        let mut ports: Vec<(usize, &AntiSpoofPort)> = p.anti_spoof.iter().enumerate().collect();
        ports.sort_by(|a, b| a.1.host_veth.cmp(&b.1.host_veth));
        ports.dedup_by(|a, b| a.1.host_veth == b.1.host_veth);
        let chain = |i: usize| format!("port_{}", self.bridge_nums[i]);
        objects.push(NftObject {
            kind: ObjectKind::Map,
            name: "pod_ports".into(),
            decl: vec!["type ifname : verdict".into()],
            content: ports
                .iter()
                .map(|(i, port)| format!("\"{}\" : goto {}", port.host_veth, chain(*i)))
                .collect(),
        });
        let log = |port: &AntiSpoofPort| {
            format!(
                "limit rate {}/second burst {} packets log group {} prefix \"{}\"",
                o.log_rate_per_second,
                o.log_burst,
                o.log_group,
                spoof_prefix(&port.pod)
            )
        };
        for (i, port) in &ports {
            // Link-local groups first: whatever the source, such a frame from a pod is dropped.
            let mut rules = vec![
                format!("ether daddr {LINK_LOCAL_GROUPS} {}", log(port)),
                format!("ether daddr {LINK_LOCAL_GROUPS} counter name \"{SPOOF_COUNTER}\" drop"),
            ];
            let mac = port
                .mac
                .map(|m| format!("ether saddr {m} "))
                .unwrap_or_default();
            let v4: Vec<String> = port
                .ips
                .iter()
                .filter(|ip| ip.is_ipv4())
                .map(|ip| ip.to_string())
                .collect();
            let mut v6: Vec<String> = port
                .ips
                .iter()
                .filter(|ip| ip.is_ipv6())
                .map(|ip| ip.to_string())
                .collect();
            if !v4.is_empty() {
                let ips = v4.join(", ");
                rules.push(format!("{mac}ether type ip ip saddr {{ {ips} }} return"));
                let arp_mac = port
                    .mac
                    .map(|m| format!("arp saddr ether {m} "))
                    .unwrap_or_default();
                rules.push(format!(
                    "{mac}ether type arp {arp_mac}arp saddr ip {{ {ips} }} return"
                ));
            }
            if !v6.is_empty() {
                // Neighbour discovery uses the link-local address.
                v6.push("fe80::/10".to_string());
                rules.push(format!(
                    "{mac}ether type ip6 ip6 saddr {{ {} }} return",
                    v6.join(", ")
                ));
            }
            rules.push(log(port));
            rules.push(format!("counter name \"{SPOOF_COUNTER}\" drop"));
            objects.push(NftObject {
                kind: ObjectKind::Chain,
                name: chain(*i),
                decl: vec![format!("comment {}", quote_comment(&port.pod.to_string()))],
                content: rules,
            });
        }
        let mut prerouting = vec!["iifname vmap @pod_ports".to_string()];
        if o.drop_unknown_pod_ports {
            prerouting.push(format!(
                "iifname \"veil*\" counter name \"{SPOOF_COUNTER}\" drop"
            ));
        }
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "prerouting".into(),
            decl: vec!["type filter hook prerouting priority filter; policy accept;".into()],
            content: prerouting,
        });
        // Link-local groups the bridge handles locally (01:80:c2:00:00:02–0d, 0f) skip
        // prerouting and meet only the bridge's local-in hook, before it could learn from them.
        let mut input = vec![format!(
            "ether daddr {LINK_LOCAL_GROUPS} iifname vmap @pod_ports"
        )];
        if o.drop_unknown_pod_ports {
            input.push(format!(
                "ether daddr {LINK_LOCAL_GROUPS} iifname \"veil*\" counter name \"{SPOOF_COUNTER}\" drop"
            ));
        }
        objects.push(NftObject {
            kind: ObjectKind::Chain,
            name: "input".into(),
            decl: vec!["type filter hook input priority filter; policy accept;".into()],
            content: input,
        });
        NftTable {
            family: Family::Bridge,
            objects,
        }
    }
}
