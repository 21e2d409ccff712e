//! NFLOG prefixes: how a logged packet names its verdict and who decided it.
//!
//! Formats (at most [`MAX_PREFIX_LEN`] bytes, the kernel's limit; longer ones are cut and end in
//! `~`):
//! - `veilnet:allow:<ingress|egress>:<policy-ns>/<policy>` — a new connection a policy allowed;
//! - `veilnet:deny:<ingress|egress>:<pod-ns>/<pod>` — default deny of an isolated pod (which
//!   policies isolate it is `explain`'s job);
//! - `veilnet:spoof:<pod-ns>/<pod>` — a frame from a pod's bridge port with a forged MAC/IP;
//! - `veilnet:vxlan-rejected:<reason>` — a VXLAN datagram the wire table refused (see
//!   `kernel::wire`): from a host that is not a VXLAN peer, through a tunnel, or with an inner
//!   source that is not the sender's;
//! - `veilnet:dns-untrusted:<drop|monitor>`, `veilnet:dns-query:trusted` — the DNS guard's;
//! - `veilnet:egress-new:watched` — a watched pod's new connection to outside the cluster.

use super::compile::Direction;
use super::model::ObjectRef;

pub const PREFIX_ROOT: &str = "veilnet";
/// A query to an untrusted DNS server, dropped (`dnsMode: enforce`) or let through (`monitor`);
/// the pod is the packet's source.
pub const DNS_DROP_PREFIX: &str = "veilnet:dns-untrusted:drop";
pub const DNS_MONITOR_PREFIX: &str = "veilnet:dns-untrusted:monitor";
/// A sample of the queries to trusted servers (for the query names in the flow log).
pub const DNS_SAMPLE_PREFIX: &str = "veilnet:dns-query:trusted";
/// A new connection from a pod whose namespace opted in to new-destination alerts, to an address
/// that is no pod's and no node's (outside the cluster); the pod is the packet's source.
pub const EGRESS_NEW_PREFIX: &str = "veilnet:egress-new:watched";
/// `NF_LOG_PREFIXLEN` (128) minus the terminating NUL.
pub const MAX_PREFIX_LEN: usize = 127;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogVerdict {
    Allow,
    Deny,
    Spoof,
    VxlanRejected,
    /// A query to an untrusted DNS server; `reason` is `drop` or `monitor`.
    DnsUntrusted,
    /// A sampled query to a trusted DNS server.
    DnsQuery,
    /// A watched pod's new connection to outside the cluster.
    EgressNew,
}

/// A parsed prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPrefix {
    pub verdict: LogVerdict,
    /// None for spoofing drops.
    pub direction: Option<Direction>,
    /// The deciding policy (allow) or the protected pod (deny, spoof); none for VXLAN.
    pub object: Option<ObjectRef>,
    /// Why a VXLAN datagram was rejected.
    pub reason: Option<String>,
    /// The name was cut to fit; `object.name` is a prefix of the real name.
    pub truncated: bool,
}

fn fit(mut s: String) -> String {
    if s.len() <= MAX_PREFIX_LEN {
        return s;
    }
    let mut cut = MAX_PREFIX_LEN - 1;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push('~');
    s
}

pub fn allow_prefix(direction: Direction, policy: &ObjectRef) -> String {
    fit(format!("{PREFIX_ROOT}:allow:{direction}:{policy}"))
}

pub fn deny_prefix(direction: Direction, pod: &ObjectRef) -> String {
    fit(format!("{PREFIX_ROOT}:deny:{direction}:{pod}"))
}

pub fn spoof_prefix(pod: &ObjectRef) -> String {
    fit(format!("{PREFIX_ROOT}:spoof:{pod}"))
}

/// Parses a prefix as NFLOG delivers it (trailing NULs and spaces are ignored). `None` for
/// prefixes veilnet did not write.
pub fn parse_prefix(raw: &str) -> Option<LogPrefix> {
    let s = raw.trim_end_matches(['\0', ' ']);
    let rest = s.strip_prefix(PREFIX_ROOT)?.strip_prefix(':')?;
    let (verdict, rest) = rest.split_once(':')?;
    let dns = match (verdict, rest) {
        ("dns-untrusted", "drop" | "monitor") => Some(LogVerdict::DnsUntrusted),
        ("dns-query", "trusted") => Some(LogVerdict::DnsQuery),
        ("egress-new", "watched") => Some(LogVerdict::EgressNew),
        _ => None,
    };
    if let Some(verdict) = dns {
        return Some(LogPrefix {
            verdict,
            direction: Some(Direction::Egress),
            object: None,
            reason: Some(rest.to_string()),
            truncated: false,
        });
    }
    if verdict == "vxlan-rejected" {
        let ok = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'-');
        return ok.then(|| LogPrefix {
            verdict: LogVerdict::VxlanRejected,
            direction: None,
            object: None,
            reason: Some(rest.to_string()),
            truncated: false,
        });
    }
    let verdict = match verdict {
        "allow" => LogVerdict::Allow,
        "deny" => LogVerdict::Deny,
        "spoof" => LogVerdict::Spoof,
        _ => return None,
    };
    let (direction, object) = if verdict == LogVerdict::Spoof {
        (None, rest)
    } else {
        let (d, obj) = rest.split_once(':')?;
        let d = match d {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            _ => return None,
        };
        (Some(d), obj)
    };
    let (object, truncated) = match object.strip_suffix('~') {
        Some(o) if s.len() == MAX_PREFIX_LEN => (o, true),
        _ => (object, false),
    };
    let (ns, name) = object.split_once('/')?;
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    Some(LogPrefix {
        verdict,
        direction,
        object: Some(ObjectRef::new(ns, name)),
        reason: None,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = ObjectRef::new("x", "allow-80");
        let a = allow_prefix(Direction::Ingress, &p);
        assert_eq!(a, "veilnet:allow:ingress:x/allow-80");
        let parsed = parse_prefix(&a).unwrap();
        assert_eq!(parsed.verdict, LogVerdict::Allow);
        assert_eq!(parsed.direction, Some(Direction::Ingress));
        assert_eq!(parsed.object, Some(p));
        assert!(!parsed.truncated);

        let pod = ObjectRef::new("y", "web-0");
        let d = deny_prefix(Direction::Egress, &pod);
        let parsed = parse_prefix(&format!("{d}\0")).unwrap();
        assert_eq!(
            (parsed.verdict, parsed.direction, parsed.object),
            (LogVerdict::Deny, Some(Direction::Egress), Some(pod.clone()))
        );
        let s = parse_prefix(&spoof_prefix(&pod)).unwrap();
        assert_eq!((s.verdict, s.direction), (LogVerdict::Spoof, None));
    }

    #[test]
    fn long_names_are_cut_and_flagged() {
        let long = ObjectRef::new("ns", "p".repeat(200));
        let a = allow_prefix(Direction::Egress, &long);
        assert_eq!(a.len(), MAX_PREFIX_LEN);
        let parsed = parse_prefix(&a).unwrap();
        assert!(parsed.truncated);
        assert!(long.name.starts_with(&parsed.object.unwrap().name));
    }

    #[test]
    fn vxlan_rejections_carry_their_reason() {
        let v = parse_prefix("veilnet:vxlan-rejected:not-a-vxlan-peer\0").unwrap();
        assert_eq!(v.verdict, LogVerdict::VxlanRejected);
        assert_eq!(v.reason.as_deref(), Some("not-a-vxlan-peer"));
        assert_eq!(v.object, None);
        assert_eq!(parse_prefix("veilnet:vxlan-rejected:"), None);
        assert_eq!(parse_prefix("veilnet:vxlan-rejected:Bad Reason"), None);
    }

    #[test]
    fn dns_prefixes_carry_what_happened() {
        let d = parse_prefix(&format!("{DNS_DROP_PREFIX}\0")).unwrap();
        assert_eq!(
            (d.verdict, d.reason.as_deref()),
            (LogVerdict::DnsUntrusted, Some("drop"))
        );
        let m = parse_prefix(DNS_MONITOR_PREFIX).unwrap();
        assert_eq!(m.reason.as_deref(), Some("monitor"));
        let q = parse_prefix(DNS_SAMPLE_PREFIX).unwrap();
        assert_eq!(q.verdict, LogVerdict::DnsQuery);
        assert_eq!(parse_prefix("veilnet:dns-untrusted:maybe"), None);
    }

    #[test]
    fn foreign_and_malformed_prefixes_are_none() {
        for bad in [
            "",
            "calico-packet",
            "veilnet",
            "veilnet:allow",
            "veilnet:allow:sideways:x/p",
            "veilnet:maybe:ingress:x/p",
            "veilnet:deny:ingress:nopod",
            "veilnet:deny:ingress:/p",
            "veilnetx:deny:ingress:x/p",
        ] {
            assert_eq!(parse_prefix(bad), None, "{bad}");
        }
    }
}
