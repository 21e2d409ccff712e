//! What may cross the wire: veilnet's `inet veilnet_wire` nftables table on the node's underlay.
//!
//! - Always: unencapsulated pod-to-pod packets never leave or enter through the underlay. Pod
//!   traffic between nodes must be inside VXLAN or WireGuard; a raw one can only be a leak (a route
//!   that vanished while the agent restarts, falling back to the default route) or an injection.
//! - Always: TCP MSS is clamped to the route MTU on the WireGuard device.
//! - Strict mode: no VXLAN at all, in or out, so no pod packet crosses the wire in plaintext.
//! - Always: each pod address holds at most [`WireRules::agent_conns_per_source`] connections to
//!   the agent's TCP ports at once (`ct count`, in a dynamic set per source); more are reset
//!   before they reach the agent and counted in `agent_conn_limited` (issue 23.3). With the
//!   agent's own connection caps, one pod cannot take the endpoints from the others.
//!
//! These rules live in the kernel, so they keep holding while the agent restarts. The table is
//! replaced as one nftables transaction (through the shared runner, [`super::nft`]); rendering is
//! pure and golden-tested.

use ipnet::IpNet;

use super::nft::{self, Flags, NftError};

/// Name of the table (family `inet`).
pub const TABLE: &str = "veilnet_wire";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRules {
    pub underlay_dev: String,
    pub wg_dev: String,
    pub vxlan_port: u16,
    pub cluster_cidr: IpNet,
    pub strict: bool,
    /// The agent's TCP ports reachable on the node's addresses (health, metrics).
    pub agent_ports: Vec<u16>,
    pub agent_conns_per_source: u32,
}

/// Connections one pod address may hold to the agent's ports at once: Prometheus needs one.
pub const AGENT_CONNS_PER_SOURCE: u32 = 8;

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// The whole table as an nft script (pure).
pub fn render(r: &WireRules) -> String {
    let (ul, wg, c, f) = (
        &r.underlay_dev,
        &r.wg_dev,
        r.cluster_cidr,
        family(&r.cluster_cidr),
    );
    let addr_type = match r.cluster_cidr {
        IpNet::V4(_) => "ipv4_addr",
        IpNet::V6(_) => "ipv6_addr",
    };
    let mut s = format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         \tcounter raw_pod_traffic {{}}\n\
         \tcounter plaintext_vxlan {{}}\n\
         \tcounter agent_conn_limited {{}}\n\
         \tset agent_clients {{\n\t\ttype {addr_type}\n\t\tsize 65535\n\t\tflags dynamic\n\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -150; policy accept;\n\
         \t\toifname \"{wg}\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n\
         \t\toifname \"{ul}\" {f} saddr {c} {f} daddr {c} counter name raw_pod_traffic drop\n\
         \t\tiifname \"{ul}\" {f} saddr {c} {f} daddr {c} counter name raw_pod_traffic drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority -150; policy accept;\n\
         \t\toifname \"{ul}\" {f} daddr {c} counter name raw_pod_traffic drop\n"
    );
    if r.strict {
        s.push_str(&format!(
            "\t\toifname \"{ul}\" udp dport {p} counter name plaintext_vxlan drop\n",
            p = r.vxlan_port
        ));
    }
    s.push_str("\t}\n\tchain input {\n\t\ttype filter hook input priority -150; policy accept;\n");
    if !r.agent_ports.is_empty() {
        let ports: Vec<String> = r.agent_ports.iter().map(u16::to_string).collect();
        s.push_str(&format!(
            "\t\t{f} saddr {c} tcp dport {{ {} }} ct state new add @agent_clients {{ {f} saddr ct count over {} }} counter name agent_conn_limited reject with tcp reset\n",
            ports.join(", "),
            r.agent_conns_per_source
        ));
    }
    if r.strict {
        s.push_str(&format!(
            "\t\tiifname \"{ul}\" udp dport {p} counter name plaintext_vxlan drop\n",
            p = r.vxlan_port
        ));
    }
    s.push_str("\t}\n}\n");
    s
}

/// Loads `script` into the calling thread's network namespace in one transaction.
pub fn apply(script: &str) -> Result<(), NftError> {
    nft::run_here(script, Flags::default(), "wire rules").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(strict: bool) -> WireRules {
        WireRules {
            underlay_dev: "eth0".into(),
            wg_dev: "veilwg0".into(),
            vxlan_port: 8472,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            strict,
            agent_ports: vec![9891, 9892],
            agent_conns_per_source: 8,
        }
    }

    #[test]
    fn raw_pod_traffic_is_always_dropped_and_vxlan_only_in_strict_mode() {
        let on = render(&rules(false));
        assert!(on.contains("oifname \"eth0\" ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 counter name raw_pod_traffic drop"));
        assert!(on.contains("iifname \"eth0\" ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16"));
        assert!(on.contains("maxseg size set rt mtu"));
        assert!(!on.contains("8472"));
        let strict = render(&rules(true));
        assert_eq!(
            strict
                .matches("udp dport 8472 counter name plaintext_vxlan drop")
                .count(),
            2
        );
        assert!(strict.starts_with("table inet veilnet_wire\ndelete table inet veilnet_wire\n"));
        assert!(on.contains(
            "ip saddr 10.244.0.0/16 tcp dport { 9891, 9892 } ct state new \
             add @agent_clients { ip saddr ct count over 8 } counter name agent_conn_limited reject with tcp reset"
        ));
    }
}
