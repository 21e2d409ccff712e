//! The upstream netpol e2e truth tables ([`super`]) checked against `explain`, which
//! reads the compiled per-node model the renderer emits.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use veilnet::policy::{
    ClusterState, Explainer, NamedPort, NamespaceInfo, PodInfo, Protocol, NAMESPACE_NAME_LABEL,
};

use super::{name_of, policy, upstream, Reach, Step, N, NAMESPACES, PODS};

/// The model's pod IPs: `10.244.<namespace>.<10 + pod>`.
fn ip_of(ns: &str, pod: &str) -> IpAddr {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8;
    let p = PODS.iter().position(|x| *x == pod).unwrap() as u8;
    IpAddr::from([10, 244, n, 10 + p])
}

/// Every pod serves 80 and 81 over TCP, UDP and SCTP, named `serve-<port>-<proto>`.
fn named_ports() -> Vec<NamedPort> {
    let protocols = [
        (Protocol::Tcp, "tcp"),
        (Protocol::Udp, "udp"),
        (Protocol::Sctp, "sctp"),
    ];
    [80u16, 81]
        .into_iter()
        .flat_map(|port| {
            protocols.map(|(protocol, name)| NamedPort {
                name: format!("serve-{port}-{name}"),
                protocol,
                port,
            })
        })
        .collect()
}

/// The e2e model as the compiler sees it: pod a on n1, b on n2, c on n3 (so cases mix same-node
/// and cross-node traffic), namespaces labelled `ns=<name>`.
fn e2e_state(policies: Vec<NetworkPolicy>) -> ClusterState {
    let pod = |ns: &str, pod: &str| PodInfo {
        namespace: ns.into(),
        name: pod.into(),
        labels: [("pod".to_string(), pod.to_string())].into(),
        ips: vec![ip_of(ns, pod)],
        node: format!("n{}", PODS.iter().position(|x| *x == pod).unwrap() + 1),
        named_ports: named_ports(),
        host_network: false,
        host_veth: Some(format!("veil{ns}{pod}")),
        mac: None,
    };
    ClusterState {
        pods: NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| pod(ns, p)))
            .collect(),
        namespaces: NAMESPACES
            .iter()
            .map(|ns| NamespaceInfo {
                name: ns.to_string(),
                labels: [
                    ("ns".to_string(), ns.to_string()),
                    (NAMESPACE_NAME_LABEL.to_string(), ns.to_string()),
                ]
                .into(),
            })
            .collect(),
        policies,
    }
}

/// The step's cluster: the e2e model with the step's policies and every label change up to it.
fn state_of(steps: &[Step], index: usize) -> ClusterState {
    let mut state = e2e_state(steps[index].policies.clone());
    for change in steps[..=index].iter().flat_map(|s| &s.labels) {
        change.apply_to(&mut state);
    }
    state
}

/// The reachability matrix the compiled model gives, as a diff against `want` (empty: equal).
fn diff(state: &ClusterState, step: &Step) -> Vec<String> {
    let mut explainer = Explainer::new(state);
    let mut out = Vec::new();
    for f in 0..N {
        for t in 0..N {
            if f == t {
                continue; // upstream ignores loopback
            }
            let from = ip_of(NAMESPACES[f / 3], PODS[f % 3]);
            let to = ip_of(NAMESPACES[t / 3], PODS[t % 3]);
            let e = explainer.explain(from, to, step.port, step.protocol);
            if e.allowed() != step.want.allowed(f, t) {
                out.push(format!(
                    "{} -> {} {}/{}: want {}, got {} ({})",
                    name_of(f),
                    name_of(t),
                    step.protocol,
                    step.port,
                    step.want.allowed(f, t),
                    e.allowed(),
                    e.verdict()
                ));
            }
        }
    }
    out
}

#[test]
fn upstream_netpol_truth_tables() {
    let all = upstream(&ip_of);
    let mut failures = Vec::new();
    let mut steps = 0;
    for s in &all {
        for i in 0..s.steps.len() {
            steps += 1;
            for d in diff(&state_of(&s.steps, i), &s.steps[i]) {
                failures.push(format!("[{}] step {}: {d}", s.name, i + 1));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 42 TCP scenarios + 3 UDP + 3 SCTP (model only); a scenario dropped by mistake fails here.
    assert_eq!(all.len(), 48);
    assert_eq!(steps, 65);
}

/// The checker itself must be able to fail: a wrong expectation is reported.
#[test]
fn truth_table_checker_detects_a_wrong_expectation() {
    let deny = policy(
        json!({"metadata": {"namespace": "x", "name": "deny-ingress"},
        "spec": {"podSelector": {}, "ingress": [], "policyTypes": ["Ingress"]}}),
    );
    let st = Step {
        policies: vec![deny],
        labels: Vec::new(),
        port: 80,
        protocol: Protocol::Tcp,
        want: Reach::new(), // wrong: x is isolated
    };
    let d = diff(&e2e_state(st.policies.clone()), &st);
    assert_eq!(d.len(), 24, "{d:#?}"); // every non-loopback pair into x: 3 pods × 8 sources
}
