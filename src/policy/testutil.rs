//! Fixtures for the pure tests: the upstream netpol e2e model (namespaces x, y, z, each with pods
//! a, b, c labelled `pod=<name>`, serving 80 and 81 over TCP, UDP and SCTP with named ports
//! `serve-<port>-<proto>`), spread over three nodes. The upstream scenarios on this model, and
//! their truth tables, live in the lab crate (`tests/lab/src/scenarios.rs`).

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::model::{ClusterState, NamedPort, NamespaceInfo, PodInfo, Protocol};

use serde_json::{json, Value};

/// The model's namespaces and pods.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// A policy from its JSON shape, as `kubectl` would send it.
pub fn policy(v: Value) -> NetworkPolicy {
    serde_json::from_value(v).expect("fixture policies are valid NetworkPolicies")
}

/// A policy named `namespace/name` with this spec.
pub fn np(namespace: &str, name: &str, spec: Value) -> NetworkPolicy {
    policy(json!({"metadata": {"namespace": namespace, "name": name}, "spec": spec}))
}

pub fn ip_of(ns: &str, pod: &str) -> IpAddr {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8;
    let p = PODS.iter().position(|x| *x == pod).unwrap() as u8;
    IpAddr::from([10, 244, n, 10 + p])
}

/// Pod a runs on n1, b on n2, c on n3: each node has one pod of every namespace, so cases mix
/// same-node and cross-node traffic.
pub fn node_of(pod: &str) -> String {
    format!("n{}", PODS.iter().position(|x| *x == pod).unwrap() + 1)
}

pub fn e2e_named_ports() -> Vec<NamedPort> {
    let mut out = Vec::new();
    for port in [80u16, 81] {
        for (proto, name) in [
            (Protocol::Tcp, "tcp"),
            (Protocol::Udp, "udp"),
            (Protocol::Sctp, "sctp"),
        ] {
            out.push(NamedPort {
                name: format!("serve-{port}-{name}"),
                protocol: proto,
                port,
            });
        }
    }
    out
}

pub fn e2e_pod(ns: &str, pod: &str) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: pod.into(),
        labels: [("pod".to_string(), pod.to_string())].into(),
        ips: vec![ip_of(ns, pod)],
        node: node_of(pod),
        named_ports: e2e_named_ports(),
        host_network: false,
        host_veth: Some(format!("veil{ns}{pod}")),
        mac: Some(super::model::MacAddr([
            0x0a,
            0x58,
            0,
            0,
            ns.as_bytes()[0],
            pod.as_bytes()[0],
        ])),
    }
}

pub fn e2e_state(policies: Vec<NetworkPolicy>) -> ClusterState {
    ClusterState {
        pods: NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| e2e_pod(ns, p)))
            .collect(),
        namespaces: NAMESPACES
            .iter()
            .map(|ns| NamespaceInfo {
                name: ns.to_string(),
                labels: [
                    ("ns".to_string(), ns.to_string()),
                    (
                        super::model::NAMESPACE_NAME_LABEL.to_string(),
                        ns.to_string(),
                    ),
                ]
                .into(),
            })
            .collect(),
        policies,
    }
}
