//! The upstream Kubernetes NetworkPolicy e2e scenarios (kubernetes `test/e2e/network/netpol/`,
//! `network_policy.go`) as data: namespaces x, y, z, each with pods a, b, c (labels `pod=<name>`,
//! namespace label `ns=<name>`), serving 80 and 81 over TCP, UDP (and SCTP) with named ports
//! `serve-<port>-<proto>`. Each scenario's steps state the policies, label updates and the expected
//! 9×9 reachability, in upstream's vocabulary (`ExpectPeer`, `ExpectAllIngress`, ...).
//!
//! Two consumers check the same data: the pure truth-table test (`truth_tables`, against the
//! product's `explain`, which reads the compiled per-node model) and the lab e2e test
//! (`tests/lab_netpol.rs`, real probes in netns).
//!
//! Upstream now runs each scenario on a reduced topology (e.g. only x/a, y/a); here every scenario
//! covers all nine pods, and the few expectations upstream no longer states for the pods it
//! dropped are added from the policy's meaning (marked "9-pod"). Loopback pairs are ignored, as
//! upstream does. The SCTP scenarios cannot be probed on a kernel without SCTP, but compile and load
//! like any other protocol.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

use veilnet::policy::{ClusterState, Protocol};

/// The model's namespaces and pods (pod `a` of every namespace runs on the first node, `b` on the
/// second, `c` on the third).
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// A policy from its JSON shape, as `kubectl` would send it (fixed data of this module and of
/// the pure tests).
pub fn policy(v: Value) -> NetworkPolicy {
    serde_json::from_value(v).expect("scenario policies are valid NetworkPolicies")
}

impl Default for Reach {
    fn default() -> Self {
        Reach::new()
    }
}

impl Reach {
    pub fn allowed(&self, from: usize, to: usize) -> bool {
        self.0[from][to]
    }
}

/// Pods in the model.
pub const N: usize = 9;

/// `ns/pod` of model index `i` (namespace-major).
pub fn name_of(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

/// Upstream's `Peer`: an empty field matches everything.
#[derive(Clone, Copy, Debug)]
struct Peer {
    ns: Option<&'static str>,
    pod: Option<&'static str>,
}

fn any() -> Peer {
    Peer {
        ns: None,
        pod: None,
    }
}
fn ns(n: &'static str) -> Peer {
    Peer {
        ns: Some(n),
        pod: None,
    }
}
fn pod(n: &'static str, p: &'static str) -> Peer {
    Peer {
        ns: Some(n),
        pod: Some(p),
    }
}

impl Peer {
    fn matches(&self, i: usize) -> bool {
        self.ns.is_none_or(|n| NAMESPACES[i / 3] == n) && self.pod.is_none_or(|p| PODS[i % 3] == p)
    }
}

/// The expected reachability: `0[from][to]`, indices as in [`name_of`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach(pub [[bool; N]; N]);

impl Reach {
    /// Everything reachable.
    pub fn new() -> Reach {
        Reach([[true; N]; N])
    }
    fn peer(mut self, from: Peer, to: Peer, v: bool) -> Reach {
        for f in 0..N {
            for t in 0..N {
                if from.matches(f) && to.matches(t) {
                    self.0[f][t] = v;
                }
            }
        }
        self
    }
    fn all_ingress(self, to: Peer, v: bool) -> Reach {
        self.peer(any(), to, v)
    }
    fn all_egress(self, from: Peer, v: bool) -> Reach {
        self.peer(from, any(), v)
    }
    fn expect(self, from: Peer, to: Peer, v: bool) -> Reach {
        self.peer(from, to, v)
    }
}

/// One step of a scenario: these policies (and no others) exist, these labels were added before
/// it (they stay until the scenario ends), and this is the reachability of `protocol`/`port`.
#[derive(Clone, Debug)]
pub struct Step {
    pub policies: Vec<NetworkPolicy>,
    pub labels: Vec<LabelChange>,
    pub port: u16,
    pub protocol: Protocol,
    pub want: Reach,
}

/// One upstream test (`ginkgo.It`), named as upstream names it.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

/// A label added to a namespace (`pod: None`) or a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelChange {
    pub namespace: &'static str,
    pub pod: Option<&'static str>,
    pub key: &'static str,
    pub value: &'static str,
}

impl LabelChange {
    fn namespace(namespace: &'static str, key: &'static str, value: &'static str) -> Self {
        LabelChange {
            namespace,
            pod: None,
            key,
            value,
        }
    }

    fn pod(
        namespace: &'static str,
        pod: &'static str,
        key: &'static str,
        value: &'static str,
    ) -> Self {
        LabelChange {
            namespace,
            pod: Some(pod),
            key,
            value,
        }
    }

    /// Applies the change to a cluster state of the x/y/z × a/b/c model.
    pub fn apply_to(&self, state: &mut ClusterState) {
        match self.pod {
            None => {
                for ns in state
                    .namespaces
                    .iter_mut()
                    .filter(|n| n.name == self.namespace)
                {
                    ns.labels.insert(self.key.into(), self.value.into());
                }
            }
            Some(pod) => {
                for p in state
                    .pods
                    .iter_mut()
                    .filter(|p| p.namespace == self.namespace && p.name == pod)
                {
                    p.labels.insert(self.key.into(), self.value.into());
                }
            }
        }
    }
}

/// A policy `namespace/name` with `spec`.
pub fn np(namespace: &str, name: &str, spec: Value) -> NetworkPolicy {
    policy(json!({"metadata": {"namespace": namespace, "name": name}, "spec": spec}))
}

/// Upstream's `GenNetworkPolicyWithNameAndPodSelector(name, sel, SetSpecIngressRules(rules...))`:
/// policyTypes gets `Ingress` explicitly.
fn ingress(namespace: &str, name: &str, selector: Value, rules: Value) -> NetworkPolicy {
    np(
        namespace,
        name,
        json!({"podSelector": selector, "ingress": rules, "policyTypes": ["Ingress"]}),
    )
}

fn egress(namespace: &str, name: &str, selector: Value, rules: Value) -> NetworkPolicy {
    np(
        namespace,
        name,
        json!({"podSelector": selector, "egress": rules, "policyTypes": ["Egress"]}),
    )
}

fn pod_a() -> Value {
    json!({"matchLabels": {"pod": "a"}})
}

fn ns_is(n: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": n}})
}

fn not_in_ns(n: &str) -> Value {
    json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [n]}]})
}

fn step(policies: Vec<NetworkPolicy>, port: u16, protocol: Protocol, want: Reach) -> Step {
    Step {
        policies,
        labels: Vec::new(),
        port,
        protocol,
        want,
    }
}

fn tcp(policies: Vec<NetworkPolicy>, port: u16, want: Reach) -> Step {
    step(policies, port, Protocol::Tcp, want)
}

fn with_labels(mut s: Step, change: LabelChange) -> Step {
    s.labels.push(change);
    s
}

/// The upstream scenarios; `ip_of(namespace, pod)` gives the pods' IPs (ipBlock scenarios).
pub fn upstream(ip_of: &dyn Fn(&str, &str) -> IpAddr) -> Vec<Scenario> {
    use Protocol::{Sctp, Udp};
    let deny_ingress_x = || ingress("x", "deny-ingress", json!({}), json!([]));
    let from_ns_y_port = |port: Value, proto: &str| {
        ingress(
            "x",
            "allow-port",
            pod_a(),
            json!([{"from": [{"namespaceSelector": ns_is("y")}], "ports": [{"port": port, "protocol": proto}]}]),
        )
    };
    let y_ports_reach = || {
        Reach::new()
            .peer(ns("x"), pod("x", "a"), false)
            .peer(ns("z"), pod("x", "a"), false)
    };
    let only_y_a = || {
        ingress(
            "x",
            "allow-ns-y-pod-a",
            pod_a(),
            json!([{"from": [{"namespaceSelector": ns_is("y"), "podSelector": pod_a()}]}]),
        )
    };
    let only_y_a_reach = || {
        Reach::new()
            .all_ingress(pod("x", "a"), false)
            .expect(pod("y", "a"), pod("x", "a"), true)
    };
    let deny_all_x = || {
        np(
            "x",
            "deny-all",
            json!({"podSelector": {}, "ingress": [], "egress": [], "policyTypes": ["Ingress", "Egress"]}),
        )
    };
    let large_cidr = {
        let ip = match ip_of("x", "b") {
            std::net::IpAddr::V4(v4) => u32::from(v4) & 0xf000_0000,
            // An IPv6 pod network: the same shape, a /4 around the pod.
            IpAddr::V6(_) => 0x1000_0000,
        };
        format!("{}/4", std::net::Ipv4Addr::from(ip))
    };
    let xb32 = format!("{}/32", ip_of("x", "b"));
    let except_policy = egress(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        pod_a(),
        json!([{"to": [{"ipBlock": {"cidr": large_cidr, "except": [xb32]}}]}]),
    );

    vec![
        Scenario {
            name: "should support a 'default-deny-ingress' policy",
            steps: vec![tcp(vec![deny_ingress_x()], 80, Reach::new().peer(any(), ns("x"), false))],
        },
        Scenario {
            name: "should support a 'default-deny-all' policy",
            steps: vec![tcp(
                vec![deny_all_x()],
                80,
                Reach::new().peer(any(), ns("x"), false).peer(ns("x"), any(), false),
            )],
        },
        Scenario {
            name: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            steps: vec![tcp(
                vec![ingress("x", "x-a-allows-x-b", pod_a(), json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]))],
                80,
                Reach::new().all_ingress(pod("x", "a"), false).expect(pod("x", "b"), pod("x", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce policy to allow ingress traffic for a target",
            steps: vec![tcp(
                vec![
                    ingress("x", "deny-all", json!({}), json!([])),
                    ingress("x", "allow-all-to-a", pod_a(), json!([{"from": [{"podSelector": {}, "namespaceSelector": {}}]}])),
                ],
                80,
                Reach::new()
                    .all_ingress(pod("x", "a"), true)
                    .all_ingress(pod("x", "b"), false)
                    .all_ingress(pod("x", "c"), false), // 9-pod
            )],
        },
        Scenario {
            name: "should enforce policy to allow ingress traffic from pods in all namespaces",
            steps: vec![tcp(
                vec![ingress("x", "allow-from-another-ns", pod_a(), json!([{"from": [{"namespaceSelector": {"matchLabels": {}}}]}]))],
                80,
                Reach::new(),
            )],
        },
        Scenario {
            name: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            steps: vec![tcp(
                vec![ingress("x", "allow-client-a-via-ns-selector", pod_a(), json!([{"from": [{"namespaceSelector": ns_is("y")}]}]))],
                80,
                y_ports_reach(),
            )],
        },
        Scenario {
            name: "should enforce policy based on PodSelector with MatchExpressions",
            steps: vec![tcp(
                vec![ingress("x", "x-a-allows-x-b", pod_a(), json!([{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]))],
                80,
                Reach::new().all_ingress(pod("x", "a"), false).expect(pod("x", "b"), pod("x", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce policy based on NamespaceSelector with MatchExpressions",
            steps: vec![tcp(
                vec![ingress("x", "allow-ns-y-match-selector", pod_a(), json!([{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}}]}]))],
                80,
                y_ports_reach(),
            )],
        },
        Scenario {
            name: "should enforce policy based on PodSelector or NamespaceSelector",
            steps: vec![tcp(
                vec![ingress("x", "allow-ns-y-match-selector", pod_a(), json!([{"from": [{"namespaceSelector": not_in_ns("x")}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]))],
                80,
                Reach::new()
                    .expect(pod("x", "a"), pod("x", "a"), false)
                    .expect(pod("x", "c"), pod("x", "a"), false),
            )],
        },
        Scenario {
            name: "should enforce policy based on PodSelector and NamespaceSelector",
            steps: vec![tcp(
                vec![ingress("x", "allow-ns-y-podselector-and-nsselector", pod_a(), json!([{"from": [{"namespaceSelector": not_in_ns("x"), "podSelector": {"matchLabels": {"pod": "b"}}}]}]))],
                80,
                Reach::new()
                    .all_ingress(pod("x", "a"), false)
                    .expect(pod("y", "b"), pod("x", "a"), true)
                    .expect(pod("z", "b"), pod("x", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            steps: vec![tcp(
                vec![ingress("x", "allow-ns-y-z-pod-b-c", pod_a(), json!([{"from": [{"namespaceSelector": not_in_ns("x"), "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]))],
                80,
                Reach::new()
                    .peer(ns("x"), pod("x", "a"), false)
                    .expect(pod("y", "a"), pod("x", "a"), false)
                    .expect(pod("z", "a"), pod("x", "a"), false), // 9-pod
            )],
        },
        Scenario {
            name: "should enforce policy based on any PodSelectors",
            steps: vec![tcp(
                vec![ingress("x", "allow-ns-x-pod-b-c", pod_a(), json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}, {"podSelector": {"matchLabels": {"pod": "c"}}}]}]))],
                80,
                Reach::new()
                    .all_ingress(pod("x", "a"), false)
                    .expect(pod("x", "b"), pod("x", "a"), true)
                    .expect(pod("x", "c"), pod("x", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            steps: vec![tcp(vec![only_y_a()], 80, only_y_a_reach())],
        },
        Scenario {
            name: "should enforce policy based on Ports",
            steps: vec![tcp(
                vec![from_ns_y_port(json!(81), "TCP")],
                81,
                y_ports_reach().peer(ns("y"), pod("x", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce multiple, stacked policies with overlapping podSelectors",
            steps: vec![
                tcp(vec![from_ns_y_port(json!(81), "TCP")], 81, y_ports_reach()),
                tcp(vec![from_ns_y_port(json!(81), "TCP")], 80, Reach::new().all_ingress(pod("x", "a"), false)),
                tcp(
                    vec![
                        from_ns_y_port(json!(81), "TCP"),
                        ingress("x", "allow-client-a-via-ns-selector-80", pod_a(), json!([{"from": [{"namespaceSelector": ns_is("y")}], "ports": [{"port": 80, "protocol": "TCP"}]}])),
                    ],
                    80,
                    y_ports_reach(),
                ),
            ],
        },
        Scenario {
            name: "should support allow-all policy",
            steps: vec![
                tcp(vec![ingress("x", "allow-all", json!({}), json!([{}]))], 80, Reach::new()),
                tcp(vec![ingress("x", "allow-all", json!({}), json!([{}]))], 81, Reach::new()),
            ],
        },
        Scenario {
            name: "should allow ingress access on one named port",
            steps: {
                let p = || ingress("x", "allow-all", json!({}), json!([{"ports": [{"port": "serve-81-tcp"}]}]));
                vec![
                    tcp(vec![p()], 81, Reach::new()),
                    tcp(vec![p()], 80, Reach::new().peer(any(), ns("x"), false)),
                ]
            },
        },
        Scenario {
            name: "should allow ingress access from namespace on one named port",
            steps: vec![
                tcp(vec![from_ns_y_port(json!("serve-80-tcp"), "TCP")], 80, y_ports_reach()),
                tcp(vec![from_ns_y_port(json!("serve-80-tcp"), "TCP")], 81, Reach::new().all_ingress(pod("x", "a"), false)),
            ],
        },
        Scenario {
            name: "should allow egress access on one named port",
            steps: {
                let p = || egress("x", "allow-egress", json!({}), json!([{"ports": [{"port": "serve-80-tcp"}]}]));
                vec![
                    tcp(vec![p()], 80, Reach::new()),
                    tcp(vec![p()], 81, Reach::new().peer(ns("x"), any(), false)),
                ]
            },
        },
        Scenario {
            name: "should enforce updated policy",
            steps: vec![
                tcp(vec![ingress("x", "allow-all-mutate-to-deny-all", json!({}), json!([{}]))], 81, Reach::new()),
                tcp(vec![ingress("x", "allow-all-mutate-to-deny-all", json!({}), json!([]))], 81, Reach::new().peer(any(), ns("x"), false)),
            ],
        },
        Scenario {
            name: "should allow ingress access from updated namespace",
            steps: {
                let p = || ingress("x", "allow-client-a-via-ns-selector", pod_a(), json!([{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]));
                vec![
                    tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false)),
                    with_labels(
                        tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false).peer(ns("y"), any(), true)),
                        LabelChange::namespace("y", "ns2", "updated"),
                    ),
                ]
            },
        },
        Scenario {
            name: "should allow ingress access from updated pod",
            steps: {
                let p = || ingress("x", "allow-client-a-via-pod-selector", pod_a(), json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}]));
                vec![
                    tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false)),
                    with_labels(
                        tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false).expect(pod("x", "b"), pod("x", "a"), true)),
                        LabelChange::pod("x", "b", "pod2", "updated"),
                    ),
                ]
            },
        },
        Scenario {
            name: "should deny ingress from pods on other namespaces",
            steps: vec![tcp(
                vec![ingress("x", "deny-empty-policy", json!({}), json!([{"from": [{"podSelector": {"matchLabels": {}}}]}]))],
                80,
                Reach::new().peer(ns("y"), ns("x"), false).peer(ns("z"), ns("x"), false),
            )],
        },
        Scenario {
            name: "should deny ingress access to updated pod",
            steps: {
                let p = || ingress("x", "deny-ingress-via-label-selector", json!({"matchLabels": {"target": "isolated"}}), json!([]));
                vec![
                    tcp(vec![p()], 80, Reach::new()),
                    with_labels(
                        tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false)),
                        LabelChange::pod("x", "a", "target", "isolated"),
                    ),
                ]
            },
        },
        Scenario {
            name: "should deny egress from pods based on PodSelector",
            steps: vec![tcp(
                vec![egress("x", "deny-egress-pod-a", pod_a(), json!([]))],
                80,
                Reach::new().all_egress(pod("x", "a"), false),
            )],
        },
        Scenario {
            name: "should deny egress from all pods in a namespace",
            steps: vec![tcp(
                vec![egress("x", "deny-egress-ns-x", json!({}), json!([]))],
                80,
                Reach::new().peer(ns("x"), any(), false),
            )],
        },
        Scenario {
            name: "should work with Ingress, Egress specified together",
            steps: {
                let p = || {
                    np(
                        "x",
                        "allow-client-a-via-pod-selector",
                        json!({
                            "podSelector": pod_a(),
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                            "egress": [{"ports": [{"port": 80}]}],
                            "policyTypes": ["Egress", "Ingress"],
                        }),
                    )
                };
                vec![
                    tcp(vec![p()], 80, Reach::new().all_ingress(pod("x", "a"), false).expect(pod("x", "b"), pod("x", "a"), true)),
                    tcp(
                        vec![p()],
                        81,
                        Reach::new()
                            .all_ingress(pod("x", "a"), false)
                            .all_egress(pod("x", "a"), false)
                            .expect(pod("x", "b"), pod("x", "a"), true),
                    ),
                ]
            },
        },
        Scenario {
            name: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            steps: {
                let from_xa = json!([{"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod_a()}]}]);
                vec![tcp(
                    vec![
                        egress("x", "allow-to-ns-y-pod-a", pod_a(), json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_a()}]}])),
                        ingress("y", "allow-from-xa-on-ya-match-selector", pod_a(), from_xa.clone()),
                        ingress("y", "allow-from-xa-on-yb-match-selector", json!({"matchLabels": {"pod": "b"}}), from_xa),
                    ],
                    80,
                    Reach::new()
                        .peer(pod("x", "a"), any(), false)
                        .peer(any(), pod("y", "a"), false)
                        .peer(pod("x", "a"), pod("y", "a"), true)
                        .peer(any(), pod("y", "b"), false),
                )]
            },
        },
        Scenario {
            name: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            steps: vec![tcp(
                vec![egress("x", "allow-to-ns-y-pod-a", pod_a(), json!([{"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod_a()}]}]))],
                80,
                Reach::new().all_egress(pod("x", "a"), false).expect(pod("x", "a"), pod("y", "a"), true),
            )],
        },
        Scenario {
            name: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            steps: {
                let p = || ingress("x", "allow-ingress-by-proto", pod_a(), json!([{"ports": [{"protocol": "TCP"}]}]));
                vec![
                    tcp(vec![p()], 80, Reach::new()),
                    step(vec![p()], 80, Udp, Reach::new().peer(any(), pod("x", "a"), false)),
                ]
            },
        },
        Scenario {
            name: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
            steps: {
                let only80 = || ingress("x", "allow-ingress-port-80", json!({}), json!([{"ports": [{"port": 80}]}]));
                vec![
                    tcp(vec![only80()], 81, Reach::new().peer(any(), ns("x"), false)),
                    tcp(vec![only80(), ingress("x", "allow-ingress", json!({}), json!([{}]))], 81, Reach::new()),
                ]
            },
        },
        Scenario {
            name: "should enforce multiple egress policies with egress allow-all policy taking precedence",
            steps: {
                let only80 = || egress("x", "allow-egress-port-80", json!({}), json!([{"ports": [{"port": 80}]}]));
                vec![
                    tcp(vec![only80()], 81, Reach::new().peer(ns("x"), any(), false)),
                    tcp(vec![only80(), egress("x", "allow-egress", json!({}), json!([{}]))], 81, Reach::new()),
                ]
            },
        },
        Scenario {
            name: "should stop enforcing policies after they are deleted",
            steps: vec![
                tcp(vec![deny_all_x()], 80, Reach::new().peer(ns("x"), any(), false).peer(any(), ns("x"), false)),
                tcp(vec![], 80, Reach::new()),
            ],
        },
        Scenario {
            name: "should allow egress access to server in CIDR block",
            steps: vec![tcp(
                vec![egress("x", "allow-client-a-via-cidr-egress-rule", pod_a(), json!([{"to": [{"ipBlock": {"cidr": format!("{}/32", ip_of("y", "b"))}}]}]))],
                80,
                Reach::new().all_egress(pod("x", "a"), false).expect(pod("x", "a"), pod("y", "b"), true),
            )],
        },
        Scenario {
            name: "should enforce except clause while egress access to server in CIDR block",
            steps: vec![tcp(vec![except_policy.clone()], 80, Reach::new().expect(pod("x", "a"), pod("x", "b"), false))],
        },
        Scenario {
            name: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            steps: vec![
                tcp(vec![except_policy], 80, Reach::new().expect(pod("x", "a"), pod("x", "b"), false)),
                // UpdatePolicy with the same name replaces the except policy.
                tcp(
                    vec![egress("x", "allow-client-a-via-cidr-egress-rule", pod_a(), json!([{"to": [{"ipBlock": {"cidr": format!("{}/32", ip_of("x", "b"))}}]}]))],
                    80,
                    Reach::new().all_egress(pod("x", "a"), false).expect(pod("x", "a"), pod("x", "b"), true),
                ),
            ],
        },
        Scenario {
            name: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
            steps: {
                let allow_egress = || egress("x", "allow-egress-for-target", pod_a(), json!([{}]));
                vec![
                    tcp(vec![allow_egress()], 80, Reach::new()),
                    tcp(
                        vec![allow_egress(), ingress("x", "deny-ingress-via-label-selector", pod_a(), json!([]))],
                        80,
                        Reach::new().all_ingress(pod("x", "a"), false),
                    ),
                ]
            },
        },
        Scenario {
            name: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
            steps: vec![tcp(
                vec![
                    deny_ingress_x(),
                    ingress("x", "allow-only-sctp-ingress-on-port-81", pod_a(), json!([{"ports": [{"port": 81, "protocol": "SCTP"}]}])),
                ],
                81,
                Reach::new().peer(any(), ns("x"), false),
            )],
        },
        Scenario {
            name: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
            steps: vec![tcp(
                vec![ingress("x", "allow-only-sctp-ingress-on-port-80", pod_a(), json!([{"ports": [{"port": 80, "protocol": "SCTP"}]}]))],
                81,
                Reach::new().all_ingress(pod("x", "a"), false),
            )],
        },
        Scenario {
            name: "should not allow access by TCP when a policy specifies only UDP",
            steps: vec![tcp(
                vec![ingress("x", "allow-only-udp-ingress-on-port-81", pod_a(), json!([{"ports": [{"port": 81, "protocol": "UDP"}]}]))],
                81,
                Reach::new().all_ingress(pod("x", "a"), false),
            )],
        },
        Scenario {
            name: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            steps: vec![tcp(
                vec![ingress("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", pod_a(), json!([{"from": [{"namespaceSelector": ns_is("y")}]}]))],
                80,
                y_ports_reach(),
            )],
        },
        Scenario {
            name: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
            steps: vec![tcp(
                vec![egress("x", "allow-ns-y-match-selector-for-immutable-ns-label", pod_a(), json!([{"to": [{"namespaceSelector": not_in_ns("y")}]}]))],
                80,
                Reach::new().peer(pod("x", "a"), ns("y"), false),
            )],
        },
        Scenario {
            name: "UDP: should support a 'default-deny-ingress' policy",
            steps: vec![step(vec![ingress("x", "deny-all", json!({}), json!([]))], 80, Udp, Reach::new().peer(any(), ns("x"), false))],
        },
        Scenario {
            name: "UDP: should enforce policy based on Ports",
            steps: vec![step(vec![from_ns_y_port(json!(81), "UDP")], 81, Udp, y_ports_reach())],
        },
        Scenario {
            name: "UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            steps: vec![step(vec![only_y_a()], 80, Udp, only_y_a_reach())],
        },
        Scenario {
            name: "SCTP (model only): should support a 'default-deny-ingress' policy",
            steps: vec![step(vec![ingress("x", "deny-all", json!({}), json!([]))], 80, Sctp, Reach::new().peer(any(), ns("x"), false))],
        },
        Scenario {
            name: "SCTP (model only): should enforce policy based on Ports",
            steps: vec![step(vec![from_ns_y_port(json!(81), "SCTP")], 81, Sctp, y_ports_reach())],
        },
        Scenario {
            name: "SCTP (model only): should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            steps: vec![step(vec![only_y_a()], 80, Sctp, only_y_a_reach())],
        },
    ]
}

#[cfg(test)]
mod truth_tables;
