//! Pod egress masquerade: the `postrouting` nat chain of veilnet's `inet veilnet_wire` table.
//!
//! A packet from one of this node's pods to a destination outside the cluster CIDR and outside
//! `nonMasqueradeCidrs` leaves with the node's address as its source (`masquerade`: the address
//! the route out picks, on the underlay device the node's underlay address), so the reply finds
//! its way back; conntrack undoes it on the reply.
//!
//! Never masqueraded:
//! - pod-to-pod traffic on any path (same node, VXLAN, WireGuard): its destination is inside the
//!   cluster CIDR, so NetworkPolicy on the receiving node sees the real pod address;
//! - anything that leaves through veilnet's own tunnels (VXLAN, WireGuard): pod traffic to other
//!   nodes' addresses keeps the pod's address inside the pair's path;
//! - destinations in `nonMasqueradeCidrs` (routed networks that know the pod CIDRs);
//! - traffic that is not from a local pod (the node's own, forwarded foreign traffic).
//!
//! NetworkPolicy judges the packet before this: the policy table's `forward` chain (hook
//! forward) runs before any `postrouting` hook, so an egress `ipBlock` sees the pod's address.
//!
//! `fully-random`: yes. Every pod of the node shares one source address; without it the kernel
//! keeps the pod's own source port when it is free and searches sequentially from it otherwise,
//! and two pods opening flows at once (DNS over UDP above all) can pick the same tuple and lose
//! the conntrack insertion race: the packet is dropped and the client waits for its retry
//! (Kubernetes' well-known 5 s DNS timeouts; kube-proxy, Flannel and Calico pass `--random-fully`
//! for this reason). The price: the original source port is not kept, which nothing that leaves a
//! Kubernetes cluster through a shared node address may count on anyway. The mapping of one
//! connection stays stable for its lifetime (conntrack).
//!
//! Planning is pure ([`plan`]); rendering too ([`declarations`], [`rules`]); the wire table's
//! loader ([`super::wire::load`]) applies it in the same transaction as the wire rules, so it is
//! as idempotent as they are.

use ipnet::IpNet;

/// The chain's name (family `inet`, in [`super::wire::TABLE`]).
pub const CHAIN: &str = "postrouting";
/// The set of destinations that are never masqueraded (besides the cluster CIDR).
pub const SET: &str = "non_masquerade";
/// Counts the packets that opened a masqueraded connection (the first of each: nat chains see
/// only those).
pub const COUNTER: &str = "masqueraded";

/// What this node masquerades (pure data; `None` in [`super::wire::WireRules`]: opted out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    /// This node's pod CIDRs (IPv4): only their traffic is SNATed.
    pub pod_cidrs: Vec<IpNet>,
    /// Destinations left alone besides the cluster CIDR (`nonMasqueradeCidrs`).
    pub non_masquerade: Vec<IpNet>,
    /// veilnet's tunnel devices (VXLAN, WireGuard): what leaves through them is never SNATed.
    pub tunnel_devs: Vec<String>,
}

/// This node's masquerade from its configuration and pod CIDRs (pure): `None` when the node opts
/// out (`--masquerade=false`) or has no IPv4 pod CIDR yet.
pub fn plan(
    enabled: bool,
    pod_cidrs: &[IpNet],
    non_masquerade: &[IpNet],
    tunnel_devs: &[&str],
) -> Option<Masquerade> {
    if !enabled {
        return None;
    }
    let mut pods: Vec<IpNet> = pod_cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .map(IpNet::trunc)
        .collect();
    pods.sort();
    pods.dedup();
    if pods.is_empty() {
        return None;
    }
    let mut non: Vec<IpNet> = non_masquerade
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .map(IpNet::trunc)
        .collect();
    // Overlapping intervals are refused by an interval set: keep the outermost only.
    non = IpNet::aggregate(&non);
    let mut tunnels: Vec<String> = tunnel_devs.iter().map(|d| d.to_string()).collect();
    tunnels.sort();
    tunnels.dedup();
    Some(Masquerade {
        pod_cidrs: pods,
        non_masquerade: non,
        tunnel_devs: tunnels,
    })
}

/// The chain's and set's declarations (inside `table inet …{ }`).
pub fn declarations(m: Option<&Masquerade>) -> String {
    let mut s = format!("\tcounter {COUNTER} {{}}\n");
    if m.is_some() {
        s.push_str(&format!(
            "\tset {SET} {{ type ipv4_addr; flags interval; }}\n\
             \tchain {CHAIN} {{ type nat hook postrouting priority srcnat; policy accept; }}\n"
        ));
    }
    s
}

/// The chain's rules (inside `table inet …{ }`), and the set's elements after the table.
pub fn rules(m: &Masquerade, cluster_cidr: IpNet) -> (String, String) {
    let list = |items: Vec<String>| {
        if items.len() == 1 {
            items.into_iter().next().unwrap_or_default()
        } else {
            format!("{{ {} }}", items.join(", "))
        }
    };
    let pods = list(m.pod_cidrs.iter().map(IpNet::to_string).collect());
    let mut s = format!(
        "\tchain {CHAIN} {{\n\
         \t\tip saddr != {pods} return\n\
         \t\tip daddr {cluster_cidr} return\n\
         \t\tip daddr @{SET} return\n"
    );
    if !m.tunnel_devs.is_empty() {
        let devs = list(m.tunnel_devs.iter().map(|d| format!("\"{d}\"")).collect());
        s.push_str(&format!("\t\toifname {devs} return\n"));
    }
    s.push_str(&format!(
        "\t\tcounter name {COUNTER} masquerade fully-random\n\t}}\n"
    ));
    let elements = if m.non_masquerade.is_empty() {
        String::new()
    } else {
        format!(
            "add element inet {} {SET} {{ {} }}\n",
            super::wire::TABLE,
            m.non_masquerade
                .iter()
                .map(IpNet::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    (s, elements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_plan_keeps_ipv4_sorts_and_aggregates() {
        let m = plan(
            true,
            &nets(&["10.244.1.0/24", "fd00::/64"]),
            &nets(&["192.168.0.0/16", "192.168.7.1/32", "10.0.0.5/32"]),
            &["veilwg0", "veilvx1"],
        )
        .unwrap();
        assert_eq!(m.pod_cidrs, nets(&["10.244.1.0/24"]));
        assert_eq!(m.non_masquerade, nets(&["10.0.0.5/32", "192.168.0.0/16"]));
        assert_eq!(m.tunnel_devs, vec!["veilvx1", "veilwg0"]);
    }

    #[test]
    fn opted_out_or_without_pod_cidr_there_is_no_chain() {
        assert_eq!(plan(false, &nets(&["10.244.1.0/24"]), &[], &[]), None);
        assert_eq!(plan(true, &[], &[], &[]), None);
        assert_eq!(plan(true, &nets(&["fd00::/64"]), &[], &[]), None);
        let d = declarations(None);
        assert!(!d.contains("nat"), "{d}");
    }

    #[test]
    fn golden_chain() {
        let m = plan(
            true,
            &nets(&["10.244.1.0/24"]),
            &nets(&["172.30.0.254/32"]),
            &["veilvx1", "veilwg0"],
        )
        .unwrap();
        let (chain, elements) = rules(&m, "10.244.0.0/16".parse().unwrap());
        assert_eq!(
            chain,
            "\tchain postrouting {\n\
             \t\tip saddr != 10.244.1.0/24 return\n\
             \t\tip daddr 10.244.0.0/16 return\n\
             \t\tip daddr @non_masquerade return\n\
             \t\toifname { \"veilvx1\", \"veilwg0\" } return\n\
             \t\tcounter name masqueraded masquerade fully-random\n\
             \t}\n"
        );
        assert_eq!(
            elements,
            "add element inet veilnet_wire non_masquerade { 172.30.0.254/32 }\n"
        );
        assert_eq!(
            declarations(Some(&m)),
            "\tcounter masqueraded {}\n\
             \tset non_masquerade { type ipv4_addr; flags interval; }\n\
             \tchain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
        );
        let two = plan(true, &nets(&["10.244.1.0/24", "10.244.9.0/24"]), &[], &[]).unwrap();
        let (chain, elements) = rules(&two, "10.244.0.0/16".parse().unwrap());
        assert!(chain.contains("ip saddr != { 10.244.1.0/24, 10.244.9.0/24 } return"));
        assert!(!chain.contains("oifname"));
        assert_eq!(elements, "");
    }
}
