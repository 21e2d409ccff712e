//! The node namespace's network sysctls veilnet depends on.
//!
//! - `sysctl.ip_forward`: `net.ipv4.ip_forward` must be 1 (the node routes between the pod bridge
//!   and the overlay; the agent sets it at start, so 0 means something reset it).
//! - `sysctl.br_netfilter`: `net.bridge.bridge-nf-call-{iptables,ip6tables,arptables}` (present
//!   only with br_netfilter). veilnet's policy needs iptables and ip6tables at 1: bridged
//!   same-node pod↔pod frames reach the inet forward chain only then. arptables is reported but
//!   not needed (ARP spoofing is handled in veilnet's bridge-family table).
//! - `sysctl.rp_filter`: the effective `rp_filter` (max of `all` and the device) on veilnet's
//!   devices. Strict (1) on the VXLAN or WireGuard device drops peers' traffic whenever the
//!   pair's paths differ (one side already on WireGuard while the other still sends over VXLAN,
//!   per-pair modes, node-to-pod traffic whose return route is in veilnet's table): FAIL. On the
//!   bridge, pods' sources route back through the bridge, so strict is fine there.

use super::{Check, Context};
use crate::agent::wireguard::TUN_NAME;
use crate::kernel::sysctl;
use crate::model::overlay::{DEFAULT_BRIDGE_NAME, VXLAN_NAME_PREFIX};

pub const BRIDGE_KEYS: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlFacts {
    /// Where they were read ("the node's namespace NAME" or "this namespace").
    pub namespace: String,
    pub ip_forward: Result<String, String>,
    /// `None` when `/proc/sys/net/bridge` is absent (br_netfilter not loaded).
    pub bridge: Option<Vec<(String, Option<String>)>>,
    pub rp_filter_all: Option<String>,
    /// veilnet's devices present in the namespace, with their own `rp_filter`.
    pub devices: Vec<(String, Option<String>)>,
}

/// Reads everything in the current thread's namespace (`namespace` left empty).
fn read_all() -> SysctlFacts {
    let read = |key: &str| sysctl::read(None, key).ok();
    let ip_forward = sysctl::read(None, sysctl::IPV4_FORWARD).map_err(|e| e.to_string());
    let bridge = std::path::Path::new("/proc/sys/net/bridge")
        .exists()
        .then(|| {
            BRIDGE_KEYS
                .iter()
                .map(|k| (k.to_string(), read(k)))
                .collect()
        });
    let mut devices: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n == DEFAULT_BRIDGE_NAME || n == TUN_NAME || n.starts_with(VXLAN_NAME_PREFIX)
                })
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    let devices = devices
        .into_iter()
        .map(|d| {
            let v = read(&format!("net.ipv4.conf.{d}.rp_filter"));
            (d, v)
        })
        .collect();
    SysctlFacts {
        namespace: String::new(),
        ip_forward,
        bridge,
        rp_filter_all: read("net.ipv4.conf.all.rp_filter"),
        devices,
    }
}

pub fn gather(ctx: &Context) -> SysctlFacts {
    let (namespace, found) = match &ctx.netns {
        Some(ns) => (
            format!("netns {ns}"),
            crate::netns::run_in(ns, read_all).map_err(|e| e.to_string()),
        ),
        None => ("this namespace".to_string(), Ok(read_all())),
    };
    match found {
        Ok(facts) => SysctlFacts { namespace, ..facts },
        Err(e) => SysctlFacts {
            namespace,
            ip_forward: Err(e),
            bridge: None,
            rp_filter_all: None,
            devices: Vec::new(),
        },
    }
}

pub fn check(f: &SysctlFacts) -> Vec<Check> {
    vec![ip_forward(f), br_netfilter(f), rp_filter(f)]
}

fn ip_forward(f: &SysctlFacts) -> Check {
    const NAME: &str = "sysctl.ip_forward";
    let key = sysctl::IPV4_FORWARD;
    match &f.ip_forward {
        Ok(v) if v == "1" => Check::ok(NAME, format!("{key} = 1 ({})", f.namespace)),
        Ok(v) => Check::fail(
            NAME,
            format!(
                "{key} = {v} ({}): the node does not route pod traffic to or from the overlay",
                f.namespace
            ),
            format!("sysctl -w {key}=1 (and find what reset it: the agent sets it when it starts)"),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot read {key} ({}): {e}", f.namespace),
            "run doctor as root on the node",
        ),
    }
}

fn br_netfilter(f: &SysctlFacts) -> Check {
    const NAME: &str = "sysctl.br_netfilter";
    let Some(values) = &f.bridge else {
        return Check::warn(
            NAME,
            format!("no net.bridge.* sysctls ({}): br_netfilter is not loaded, so bridged same-node pod↔pod traffic bypasses NetworkPolicy", f.namespace),
            "modprobe br_netfilter (the agent then sets bridge-nf-call-iptables/ip6tables=1)",
        );
    };
    let shown = values
        .iter()
        .map(|(k, v)| {
            format!(
                "{} = {}",
                k.trim_start_matches("net.bridge."),
                v.as_deref().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let off: Vec<&str> = values
        .iter()
        .filter(|(k, v)| !k.ends_with("arptables") && v.as_deref() != Some("1"))
        .map(|(k, _)| k.as_str())
        .collect();
    if off.is_empty() {
        Check::ok(
            NAME,
            format!("{shown} ({}): bridged pod↔pod traffic meets the policy's forward chain (arptables unused by veilnet)", f.namespace),
        )
    } else {
        Check::warn(
            NAME,
            format!("{shown} ({}): bridged same-node pod↔pod traffic skips the inet forward hook, so NetworkPolicy between pods of this node is not enforced", f.namespace),
            format!(
                "sysctl -w {} (the agent sets them when it enforces policy: restart it)",
                off.iter()
                    .map(|k| format!("{k}=1"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
    }
}

fn rp_filter(f: &SysctlFacts) -> Check {
    const NAME: &str = "sysctl.rp_filter";
    let num = |v: &Option<String>| v.as_deref().and_then(|v| v.parse::<u8>().ok()).unwrap_or(0);
    let all = num(&f.rp_filter_all);
    if f.devices.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "all.rp_filter = {all}; none of veilnet's devices exists yet ({})",
                f.namespace
            ),
        );
    }
    let mut shown = Vec::new();
    let mut strict = Vec::new();
    for (dev, v) in &f.devices {
        let own = num(v);
        let effective = all.max(own);
        shown.push(format!("{dev} {effective}"));
        if effective == 1 && dev != DEFAULT_BRIDGE_NAME {
            strict.push((dev.as_str(), own));
        }
    }
    let evidence = format!(
        "effective rp_filter (max of all = {all} and the device): {} ({})",
        shown.join(", "),
        f.namespace
    );
    if strict.is_empty() {
        return Check::ok(NAME, evidence);
    }
    let mut keys = Vec::new();
    if all == 1 {
        keys.push("net.ipv4.conf.all.rp_filter=2".to_string());
    }
    for (dev, own) in &strict {
        if *own == 1 {
            keys.push(format!("net.ipv4.conf.{dev}.rp_filter=2"));
        }
    }
    Check::fail(
        NAME,
        format!(
            "{evidence}: strict on {}, which drops peers' packets whenever the pair's paths differ (VXLAN one way, WireGuard the other)",
            strict.iter().map(|(d, _)| *d).collect::<Vec<_>>().join(", ")
        ),
        format!("sysctl -w {} (loose)", keys.join(" ")),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn healthy() -> SysctlFacts {
        SysctlFacts {
            namespace: "netns lab.n1".into(),
            ip_forward: Ok("1".into()),
            bridge: Some(
                BRIDGE_KEYS
                    .iter()
                    .map(|k| (k.to_string(), Some("1".into())))
                    .collect(),
            ),
            rp_filter_all: Some("0".into()),
            devices: vec![
                ("veilbr0".into(), Some("0".into())),
                ("veilvx1".into(), Some("0".into())),
                ("veilwg0".into(), Some("2".into())),
            ],
        }
    }

    #[test]
    fn a_healthy_node_is_ok() {
        let c = check(&healthy());
        let names: Vec<_> = c.iter().map(|c| (c.name.as_str(), c.verdict)).collect();
        assert_eq!(
            names,
            [
                ("sysctl.ip_forward", Verdict::Ok),
                ("sysctl.br_netfilter", Verdict::Ok),
                ("sysctl.rp_filter", Verdict::Ok)
            ]
        );
        assert!(
            c[2].evidence.contains("veilbr0 0, veilvx1 0, veilwg0 2"),
            "{}",
            c[2].evidence
        );
    }

    #[test]
    fn forwarding_off_fails() {
        let f = SysctlFacts {
            ip_forward: Ok("0".into()),
            ..healthy()
        };
        let c = ip_forward(&f);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("net.ipv4.ip_forward = 0"));
        assert!(c
            .fix
            .unwrap()
            .starts_with("sysctl -w net.ipv4.ip_forward=1"));
    }

    #[test]
    fn bridge_netfilter_off_or_absent_warns() {
        let mut f = healthy();
        f.bridge.as_mut().unwrap()[1].1 = Some("0".into());
        let c = br_netfilter(&f);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.evidence.contains("bridge-nf-call-ip6tables = 0"),
            "{}",
            c.evidence
        );
        assert_eq!(
            c.fix.as_deref().unwrap().split(" (").next(),
            Some("sysctl -w net.bridge.bridge-nf-call-ip6tables=1")
        );
        // arptables off is fine.
        let mut f = healthy();
        f.bridge.as_mut().unwrap()[2].1 = Some("0".into());
        assert_eq!(br_netfilter(&f).verdict, Verdict::Ok);
        let f = SysctlFacts {
            bridge: None,
            ..healthy()
        };
        let c = br_netfilter(&f);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.fix.unwrap().contains("modprobe br_netfilter"));
    }

    #[test]
    fn strict_rp_filter_on_the_overlay_fails_and_names_the_device() {
        let mut f = healthy();
        f.devices[1].1 = Some("1".into());
        let c = rp_filter(&f);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("strict on veilvx1,"), "{}", c.evidence);
        assert_eq!(
            c.fix.as_deref(),
            Some("sysctl -w net.ipv4.conf.veilvx1.rp_filter=2 (loose)")
        );
        // all = 1 makes every device strict unless it is loose itself (max).
        let f = SysctlFacts {
            rp_filter_all: Some("1".into()),
            ..healthy()
        };
        let c = rp_filter(&f);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("strict on veilvx1,"), "{}", c.evidence);
        assert!(
            !c.evidence.contains("strict on veilvx1, veilwg0"),
            "{}",
            c.evidence
        );
        assert_eq!(
            c.fix.as_deref(),
            Some("sysctl -w net.ipv4.conf.all.rp_filter=2 (loose)")
        );
        // Strict on the bridge alone is fine.
        let mut f = healthy();
        f.devices[0].1 = Some("1".into());
        assert_eq!(rp_filter(&f).verdict, Verdict::Ok);
    }
}
