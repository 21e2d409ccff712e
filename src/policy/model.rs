//! The input model: what the compiler needs to know about pods, namespaces and policies.
//!
//! Pods and namespaces are reduced to the few fields policy depends on, so the compiler is cheap to
//! feed from a watcher cache and easy to build in tests. Policies stay in their k8s-openapi form:
//! the compiler reads them exactly as the API server stored them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// The label the API server puts on every namespace (immutable, equal to its name). Namespace
/// selectors commonly use it, so the compiler adds it when a caller's namespace lacks it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Everything the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub pods: Vec<PodInfo>,
    pub namespaces: Vec<NamespaceInfo>,
    pub policies: Vec<NetworkPolicy>,
}

/// A pod, as far as policy is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`: only pods on the compiling node are enforced there.
    pub node: String,
    /// Container ports that carry a name, for named-port resolution.
    pub named_ports: Vec<NamedPort>,
    /// Pods in the host network namespace are never selected by policy (upstream semantics) and
    /// are not pod peers either: their IPs are node IPs.
    pub host_network: bool,
    /// Host-side veth of a local pod (bridge port), for anti-spoofing. Filled by the agent.
    pub host_veth: Option<String>,
    /// The pod's MAC address on its eth0, for anti-spoofing. Filled by the agent.
    pub mac: Option<MacAddr>,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A namespace and its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Transport protocols NetworkPolicy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`); the API server accepts only upper case.
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The keyword nft uses (`meta l4proto tcp`, set elements `tcp . 80`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Returned when a MAC address string is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(|| InvalidMac(s.to_string()))?;
            if part.len() != 2 {
                return Err(InvalidMac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| InvalidMac(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(InvalidMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

/// `namespace/name` of a pod or a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PodInfo {
    /// Reduces an API pod to what policy needs. `host_veth` and `mac` are node-local facts the
    /// agent fills in afterwards. Returns `None` for pods without a namespace or name, and for
    /// finished pods (their IPs may already belong to someone else).
    pub fn from_k8s(pod: &Pod) -> Option<PodInfo> {
        let namespace = pod.metadata.namespace.clone()?;
        let name = pod.metadata.name.clone()?;
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        ) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|list| list.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
            {
                ips.push(ip);
            }
        }
        let spec = pod.spec.as_ref();
        let named_ports = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|p| {
                        let name = p.name.clone()?;
                        let protocol = Protocol::from_k8s(p.protocol.as_deref().unwrap_or("TCP"))?;
                        let port = u16::try_from(p.container_port).ok().filter(|p| *p != 0)?;
                        Some(NamedPort {
                            name,
                            protocol,
                            port,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(PodInfo {
            namespace,
            name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            named_ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            host_veth: None,
            mac: None,
        })
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

impl NamespaceInfo {
    pub fn from_k8s(ns: &Namespace) -> Option<NamespaceInfo> {
        Some(NamespaceInfo {
            name: ns.metadata.name.clone()?,
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "0a:58:0A:f4:00:05".parse().unwrap();
        assert_eq!(mac.to_string(), "0a:58:0a:f4:00:05");
        for bad in [
            "",
            "0a:58:0a:f4:00",
            "0a:58:0a:f4:00:05:07",
            "0a:58:0a:f4:00:zz",
            "a:58:0a:f4:00:05",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_from_k8s_keeps_what_policy_needs() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("x".into()),
                name: Some("a".into()),
                labels: Some([("pod".to_string(), "a".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("dns".into()),
                            container_port: 53,
                            protocol: Some("UDP".into()),
                            ..Default::default()
                        },
                        ContainerPort {
                            container_port: 9000,
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP {
                    ip: "10.244.0.5".into(),
                }]),
                phase: Some("Running".into()),
                ..Default::default()
            }),
        };
        let info = PodInfo::from_k8s(&pod).unwrap();
        assert_eq!(info.node, "n1");
        assert_eq!(info.ips, vec!["10.244.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.named_ports.len(), 2);
        assert_eq!(info.named_ports[1].protocol, Protocol::Udp);
        let mut done = pod.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(PodInfo::from_k8s(&done).is_none());
    }
}
