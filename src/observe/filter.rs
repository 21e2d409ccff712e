//! `veilnet observe`'s filters and the flow lines they judge (pure).

use std::net::IpAddr;

use serde::Deserialize;

/// Verdicts a flow line can carry (the flow log's, README "Flow log").
pub const VERDICTS: &[&str] = &[
    "allow",
    "deny",
    "spoof",
    "vxlan-rejected",
    "dns-untrusted",
    "dns",
];

/// A filter value longer than this is refused (no Kubernetes name or policy is longer).
const MAX_VALUE: usize = 253;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--{flag}: {value:?} is {len} characters; at most {MAX_VALUE}")]
    TooLong {
        flag: &'static str,
        value: String,
        len: usize,
    },
    #[error("--{flag}: {value:?} is not a Kubernetes name (lowercase a-z, 0-9, '-', '.')")]
    NotAName { flag: &'static str, value: String },
    #[error("--verdict: {0:?} is none of {verdicts}", verdicts = VERDICTS.join(", "))]
    Verdict(String),
    #[error("--policy: {0:?} is neither NAMESPACE/NAME nor \"default deny\", \"anti-spoofing\", \"trusted DNS\", \"vxlan source check\" or \"new-destination watch\"")]
    Policy(String),
    #[error("--since: {0:?} is neither a duration (30s, 5m, 2h) nor an RFC 3339 time")]
    Since(String),
    #[error("--pod: {0:?}: give NAME with --namespace, or NAMESPACE/NAME")]
    Pod(String),
}

/// One end of a flow line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct LineEndpoint {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub node: Option<String>,
    pub mac: Option<String>,
}

impl LineEndpoint {
    /// `ns/pod`, else `node:NAME` for a node's host network, else the address (and port).
    pub fn label(&self) -> String {
        let addr = match (&self.ip, &self.mac) {
            (Some(ip), _) => match self.port {
                Some(p) if ip.is_ipv6() => format!("[{ip}]:{p}"),
                Some(p) => format!("{ip}:{p}"),
                None => ip.to_string(),
            },
            (None, Some(mac)) => mac.clone(),
            (None, None) => "?".into(),
        };
        match (&self.namespace, &self.pod, &self.node) {
            (Some(ns), Some(pod), _) => match self.port {
                Some(p) => format!("{ns}/{pod}:{p}"),
                None => format!("{ns}/{pod}"),
            },
            (_, _, Some(node)) => format!("node:{node} ({addr})"),
            _ => addr,
        }
    }
}

/// What the filters read of a flow line (unknown fields are ignored: newer agents may add some).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct FlowLine {
    pub time: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub verdict: String,
    pub direction: Option<String>,
    #[serde(default)]
    pub policy: String,
    pub pod: Option<String>,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub src: LineEndpoint,
    #[serde(default)]
    pub dst: LineEndpoint,
    pub path: Option<String>,
    /// Absent in lines of agents older than the field: unknown, matched by neither value.
    pub encrypted: Option<bool>,
}

/// The filters of one `veilnet observe` (every one given must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub namespace: Option<String>,
    /// `(namespace, name)`.
    pub pod: Option<(String, String)>,
    pub verdict: Option<String>,
    pub policy: Option<String>,
    pub encrypted: Option<bool>,
    pub node: Option<String>,
}

/// The command line's filter values, before they are checked.
#[derive(Clone, Debug, Default)]
pub struct FilterArgs<'a> {
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
    pub verdict: Option<&'a str>,
    pub policy: Option<&'a str>,
    pub encrypted: Option<bool>,
    pub node: Option<&'a str>,
}

const NAMED_POLICIES: &[&str] = &[
    "default deny",
    "anti-spoofing",
    "trusted DNS",
    "vxlan source check",
    "new-destination watch",
];

fn name(flag: &'static str, value: &str) -> Result<String, FilterError> {
    if value.len() > MAX_VALUE {
        return Err(FilterError::TooLong {
            flag,
            value: value.chars().take(40).collect::<String>() + "…",
            len: value.len(),
        });
    }
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(value.to_string())
    } else {
        Err(FilterError::NotAName {
            flag,
            value: value.to_string(),
        })
    }
}

impl Filter {
    /// Checks every value: a clear error for anything no flow line could match.
    pub fn parse(a: FilterArgs<'_>) -> Result<Filter, FilterError> {
        let namespace = a.namespace.map(|n| name("namespace", n)).transpose()?;
        let pod = match a.pod {
            None => None,
            Some(p) => {
                let (ns, pod) = match p.split_once('/') {
                    Some((ns, pod)) => (name("pod", ns)?, name("pod", pod)?),
                    None => match &namespace {
                        Some(ns) => (ns.clone(), name("pod", p)?),
                        None => return Err(FilterError::Pod(p.to_string())),
                    },
                };
                Some((ns, pod))
            }
        };
        let verdict = match a.verdict {
            None => None,
            Some(v) if VERDICTS.contains(&v) => Some(v.to_string()),
            Some(v) => return Err(FilterError::Verdict(v.chars().take(64).collect())),
        };
        let policy = match a.policy {
            None => None,
            Some(p) if NAMED_POLICIES.contains(&p) => Some(p.to_string()),
            Some(p) => match p.split_once('/') {
                Some((ns, n)) if name("policy", ns).is_ok() && name("policy", n).is_ok() => {
                    Some(p.to_string())
                }
                _ => return Err(FilterError::Policy(p.chars().take(64).collect())),
            },
        };
        let node = a.node.map(|n| name("node", n)).transpose()?;
        Ok(Filter {
            namespace,
            pod,
            verdict,
            policy,
            encrypted: a.encrypted,
            node,
        })
    }

    pub fn matches(&self, l: &FlowLine) -> bool {
        let in_ns = |ns: &str| {
            l.src.namespace.as_deref() == Some(ns)
                || l.dst.namespace.as_deref() == Some(ns)
                || l.pod
                    .as_deref()
                    .and_then(|p| p.split_once('/'))
                    .map(|p| p.0)
                    == Some(ns)
        };
        let is_pod = |(ns, name): &(String, String)| {
            let end = |e: &LineEndpoint| {
                e.namespace.as_deref() == Some(ns) && e.pod.as_deref() == Some(name)
            };
            end(&l.src) || end(&l.dst) || l.pod.as_deref() == Some(&format!("{ns}/{name}"))
        };
        self.namespace.as_deref().is_none_or(in_ns)
            && self.pod.as_ref().is_none_or(is_pod)
            && self.verdict.as_deref().is_none_or(|v| l.verdict == v)
            && self.policy.as_deref().is_none_or(|p| l.policy == p)
            && self.encrypted.is_none_or(|e| l.encrypted == Some(e))
            && self.node.as_deref().is_none_or(|n| l.node == n)
    }
}

/// `--since`: a duration back from `now`, or an RFC 3339 time.
pub fn parse_since(value: &str, now: jiff::Timestamp) -> Result<jiff::Timestamp, FilterError> {
    if let Ok(t) = value.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let d = crate::duration::parse_duration(value)
        .map_err(|_| FilterError::Since(value.chars().take(64).collect()))?;
    let span = jiff::SignedDuration::try_from(d)
        .map_err(|_| FilterError::Since(value.chars().take(64).collect()))?;
    now.checked_sub(span)
        .map_err(|_| FilterError::Since(value.chars().take(64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> FlowLine {
        serde_json::from_str(json).unwrap()
    }

    const CROSS: &str = r#"{"time":"2026-01-01T00:00:00Z","node":"node-1","verdict":"allow",
        "direction":"ingress","nodes":{"src":"node-2","dst":"node-1"},"path":"wireguard",
        "encrypted":true,"policy":"x/allow-web","pod":"x/web","protocol":"TCP",
        "src":{"ip":"10.244.2.5","port":40000,"namespace":"y","pod":"client","node":"node-2"},
        "dst":{"ip":"10.244.1.7","port":80,"namespace":"x","pod":"web","node":"node-1"}}"#;

    fn filter(a: FilterArgs<'_>) -> Filter {
        Filter::parse(a).unwrap()
    }

    #[test]
    fn every_given_filter_must_match() {
        let l = line(CROSS);
        assert!(Filter::default().matches(&l));
        for yes in [
            FilterArgs {
                namespace: Some("y"),
                ..Default::default()
            },
            FilterArgs {
                pod: Some("x/web"),
                ..Default::default()
            },
            FilterArgs {
                namespace: Some("y"),
                pod: Some("client"),
                ..Default::default()
            },
            FilterArgs {
                verdict: Some("allow"),
                policy: Some("x/allow-web"),
                ..Default::default()
            },
            FilterArgs {
                encrypted: Some(true),
                node: Some("node-1"),
                ..Default::default()
            },
        ] {
            assert!(filter(yes.clone()).matches(&l), "{yes:?}");
        }
        for no in [
            FilterArgs {
                namespace: Some("z"),
                ..Default::default()
            },
            FilterArgs {
                pod: Some("x/client"),
                ..Default::default()
            },
            FilterArgs {
                verdict: Some("deny"),
                ..Default::default()
            },
            FilterArgs {
                policy: Some("default deny"),
                ..Default::default()
            },
            FilterArgs {
                encrypted: Some(false),
                ..Default::default()
            },
            FilterArgs {
                verdict: Some("allow"),
                node: Some("node-2"),
                ..Default::default()
            },
        ] {
            assert!(!filter(no.clone()).matches(&l), "{no:?}");
        }
        // A line from an agent without the field is neither encrypted nor not.
        let old = line(r#"{"time":"2026-01-01T00:00:00Z","verdict":"deny"}"#);
        for e in [true, false] {
            assert!(!filter(FilterArgs {
                encrypted: Some(e),
                ..Default::default()
            })
            .matches(&old));
        }
    }

    #[test]
    fn odd_and_huge_values_are_refused_with_the_flag_named() {
        let huge = "a".repeat(10_000);
        let e = Filter::parse(FilterArgs {
            namespace: Some(&huge),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.to_string().starts_with("--namespace:") && e.to_string().contains("10000"),
            "{e}"
        );
        assert!(e.to_string().len() < 200, "{e}");
        for (args, flag) in [
            (
                FilterArgs {
                    namespace: Some("Bad_NS"),
                    ..Default::default()
                },
                "--namespace",
            ),
            (
                FilterArgs {
                    pod: Some("web"),
                    ..Default::default()
                },
                "--pod",
            ),
            (
                FilterArgs {
                    pod: Some("a/b/c"),
                    ..Default::default()
                },
                "--pod",
            ),
            (
                FilterArgs {
                    verdict: Some("maybe"),
                    ..Default::default()
                },
                "--verdict",
            ),
            (
                FilterArgs {
                    policy: Some("no-slash"),
                    ..Default::default()
                },
                "--policy",
            ),
            (
                FilterArgs {
                    node: Some(""),
                    ..Default::default()
                },
                "--node",
            ),
        ] {
            let e = Filter::parse(args).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{flag}: {e}");
        }
        assert!(Filter::parse(FilterArgs {
            policy: Some("default deny"),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now: jiff::Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        assert_eq!(
            parse_since("5m", now).unwrap().to_string(),
            "2026-01-01T00:55:00Z"
        );
        assert_eq!(
            parse_since("2026-01-01T00:00:00Z", now)
                .unwrap()
                .to_string(),
            "2026-01-01T00:00:00Z"
        );
        for bad in ["yesterday", "-5m", "", "99999999999999999999h"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_read_as_pods_nodes_or_addresses() {
        let l = line(CROSS);
        assert_eq!(l.src.label(), "y/client:40000");
        let host = LineEndpoint {
            ip: Some("172.30.0.12".parse().unwrap()),
            node: Some("node-2".into()),
            ..Default::default()
        };
        assert_eq!(host.label(), "node:node-2 (172.30.0.12)");
        let out = LineEndpoint {
            ip: Some("2001:db8::1".parse().unwrap()),
            port: Some(53),
            ..Default::default()
        };
        assert_eq!(out.label(), "[2001:db8::1]:53");
    }
}
