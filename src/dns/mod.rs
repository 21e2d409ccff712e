//! Trusted DNS: which servers pods may query, and what happens to queries to any other.
//!
//! - `off`: nothing is checked or counted;
//! - `monitor` (the default): queries to untrusted servers are counted and logged
//!   (`veilnet:dns-untrusted`), and go through;
//! - `enforce`: they are dropped (UDP and TCP 53, DNS over TLS and QUIC on 853), whatever the
//!   NetworkPolicies say.
//!
//! The trusted servers are the agent's `trustedDns` (addresses or CIDRs: the cluster DNS Service
//! and its endpoints). A namespace's label [`NAMESPACE_LABEL`] sets the mode for its pods;
//! `kube-system`, where the cluster DNS forwards to upstream resolvers, is `off` unless labelled.
//! The kernel half is in `policy::render` (the `dns` chain); [`message`] reads the queries the
//! flow log samples.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

pub mod message;

/// A namespace's own mode (`off`, `monitor`, `enforce`), over the node's.
pub const NAMESPACE_LABEL: &str = "veilnet.io/dns-mode";

/// Namespaces that are `off` unless labelled: the cluster DNS lives there and must reach
/// upstream resolvers.
pub const OFF_BY_DEFAULT_NAMESPACES: &[&str] = &["kube-system"];

/// The ports DNS travels on: 53 (UDP and TCP), 853 (DNS over TLS, and over QUIC).
pub const DNS_PORTS: &[u16] = &[53, 853];

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    Off,
    #[default]
    Monitor,
    Enforce,
}

impl DnsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsMode::Off => "off",
            DnsMode::Monitor => "monitor",
            DnsMode::Enforce => "enforce",
        }
    }
}

impl fmt::Display for DnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid DNS mode {0:?}: use off, monitor or enforce")]
pub struct InvalidDnsMode(pub String);

impl FromStr for DnsMode {
    type Err = InvalidDnsMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(DnsMode::Off),
            "monitor" => Ok(DnsMode::Monitor),
            "enforce" => Ok(DnsMode::Enforce),
            other => Err(InvalidDnsMode(crate::model::annotations::shown(other))),
        }
    }
}

/// A trusted server: an address (a /32 or /128) or a CIDR.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a CIDR"))
}

/// The node's DNS settings, as the compiler reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsGuard {
    pub mode: DnsMode,
    pub trusted: Vec<IpNet>,
}

impl DnsGuard {
    /// The mode for pods of a namespace with `labels`: the label's, else `off` for
    /// [`OFF_BY_DEFAULT_NAMESPACES`], else the node's. A label that is not a mode is ignored
    /// (and reported by the caller): the node's mode applies.
    pub fn mode_for(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> (DnsMode, Option<InvalidDnsMode>) {
        let fallback = if OFF_BY_DEFAULT_NAMESPACES.contains(&namespace) {
            DnsMode::Off
        } else {
            self.mode
        };
        match labels.get(NAMESPACE_LABEL).map(|v| v.parse::<DnsMode>()) {
            Some(Ok(mode)) => (mode, None),
            Some(Err(e)) => (fallback, Some(e)),
            None => (fallback, None),
        }
    }

    /// Without trusted servers there is nothing to tell queries apart by: the guard is inactive
    /// (`enforce` without them is refused by the agent's config check).
    pub fn active(&self) -> bool {
        !self.trusted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_namespace_label_overrides_the_node_and_kube_system_is_off_by_default() {
        let guard = DnsGuard {
            mode: DnsMode::Enforce,
            trusted: vec!["10.96.0.10/32".parse().unwrap()],
        };
        let none = BTreeMap::new();
        let label = |v: &str| BTreeMap::from([(NAMESPACE_LABEL.to_string(), v.to_string())]);
        assert_eq!(guard.mode_for("app", &none), (DnsMode::Enforce, None));
        assert_eq!(guard.mode_for("kube-system", &none), (DnsMode::Off, None));
        assert_eq!(
            guard.mode_for("kube-system", &label("enforce")),
            (DnsMode::Enforce, None)
        );
        assert_eq!(
            guard.mode_for("app", &label("monitor")),
            (DnsMode::Monitor, None)
        );
        let (mode, err) = guard.mode_for("app", &label("sometimes"));
        assert_eq!(mode, DnsMode::Enforce);
        assert_eq!(
            err.unwrap().to_string(),
            "invalid DNS mode \"sometimes\": use off, monitor or enforce"
        );
        assert!(guard.active());
        assert!(!DnsGuard::default().active());
    }
}
