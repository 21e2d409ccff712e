//! What may cross the wire: veilnet's `inet veilnet_wire` nftables table on the node's underlay.
//!
//! - Always: unencapsulated pod-to-pod packets never leave or enter through the underlay. Pod
//!   traffic between nodes must be inside VXLAN or WireGuard; a raw one can only be a leak (a route
//!   that vanished while the agent restarts, falling back to the default route) or an injection.
//! - Always: TCP MSS is clamped to the route MTU on the WireGuard device.
//! - Strict mode: no VXLAN at all, in or out, so no pod packet crosses the wire in plaintext.
//!
//! These rules live in the kernel, so they keep holding while the agent restarts. The table is
//! replaced as one `nft -f` transaction; rendering is pure and golden-tested.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// Name of the table (family `inet`).
pub const TABLE: &str = "veilnet_wire";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the wire rules: {0}")]
    Nft(String),
}

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

/// Loads `script` into the current network namespace in one transaction.
pub fn apply(script: &str) -> Result<(), WireError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(WireError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(WireError::Spawn)?;
    let out = child.wait_with_output().map_err(WireError::Spawn)?;
    if !out.status.success() {
        return Err(WireError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
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
