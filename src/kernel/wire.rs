//! What may cross the wire: veilnet's `inet veilnet_wire` nftables table on the node's underlay.
//!
//! - Always: unencapsulated pod-to-pod packets never leave or enter through the underlay. Pod
//!   traffic between nodes must be inside VXLAN or WireGuard; a raw one can only be a leak (a route
//!   that vanished while the agent restarts, falling back to the default route) or an injection.
//! - Always: TCP MSS is clamped to the route MTU on the WireGuard device.
//! - Strict mode: no VXLAN at all, in or out, so no pod packet crosses the wire in plaintext.
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
}

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
    let mut s = format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         \tcounter raw_pod_traffic {{}}\n\
         \tcounter plaintext_vxlan {{}}\n\
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
    }
}
