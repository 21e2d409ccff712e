//! Pure tests of compile, render and explain (no root needed).

use std::net::IpAddr;

use serde_json::json;

use super::testutil::{e2e_state, ip_of, np, policy};
use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn allowed(state: &ClusterState, from: IpAddr, to: IpAddr, port: u16, proto: Protocol) -> bool {
    explain(from, to, port, proto, state).allowed()
}

fn tcp_ok(state: &ClusterState, from: (&str, &str), to: (&str, &str), port: u16) -> bool {
    allowed(
        state,
        ip_of(from.0, from.1),
        ip_of(to.0, to.1),
        port,
        Protocol::Tcp,
    )
}

#[test]
fn policy_types_default_like_the_api_server() {
    // No policyTypes, only egress rules: Ingress is still implied (deny all ingress), Egress too.
    let s = e2e_state(vec![np(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"ports": [{"port": 80}]}]}),
    )]);
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80), "ingress implied");
    assert!(tcp_ok(&s, ("x", "a"), ("y", "a"), 80));
    assert!(
        !tcp_ok(&s, ("x", "a"), ("y", "a"), 81),
        "egress isolated by its rules"
    );

    // Explicit policyTypes [Egress] with ingress rules: ingress is not isolated.
    let s = e2e_state(vec![np(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [], "egress": [], "policyTypes": ["Egress"]}),
    )]);
    assert!(tcp_ok(&s, ("y", "a"), ("x", "a"), 80));
    assert!(!tcp_ok(&s, ("x", "a"), ("y", "a"), 80));

    // Explicit [Ingress] ignores egress rules that are present.
    let s = e2e_state(vec![np(
        "x",
        "p",
        json!({"podSelector": {}, "egress": [{"ports": [{"port": 1}]}], "policyTypes": ["Ingress"]}),
    )]);
    assert!(tcp_ok(&s, ("x", "a"), ("y", "a"), 80));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80));

    // No egress rules and no types: only ingress.
    let s = e2e_state(vec![np("x", "p", json!({"podSelector": {}}))]);
    assert!(tcp_ok(&s, ("x", "a"), ("y", "a"), 80));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80));
}

#[test]
fn peers_in_one_entry_intersect_and_separate_entries_unite() {
    let both = e2e_state(vec![np(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}, "namespaceSelector": {"matchLabels": {"ns": "y"}}}
        ]}]}),
    )]);
    assert!(tcp_ok(&both, ("y", "b"), ("x", "a"), 80));
    assert!(!tcp_ok(&both, ("y", "c"), ("x", "a"), 80));
    assert!(!tcp_ok(&both, ("x", "b"), ("x", "a"), 80));

    let either = e2e_state(vec![np(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}},
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}}
        ]}]}),
    )]);
    assert!(
        tcp_ok(&either, ("y", "c"), ("x", "a"), 80),
        "any pod of ns y"
    );
    assert!(
        tcp_ok(&either, ("x", "b"), ("x", "a"), 80),
        "pod b of the policy's namespace"
    );
    assert!(
        !tcp_ok(&either, ("z", "b"), ("x", "a"), 80),
        "podSelector alone is namespace-local"
    );
}

#[test]
fn several_policies_are_a_union() {
    let s = e2e_state(vec![
        np(
            "x",
            "from-b",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
        np(
            "x",
            "from-c",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        ),
    ]);
    assert!(tcp_ok(&s, ("x", "b"), ("x", "a"), 80));
    assert!(tcp_ok(&s, ("x", "c"), ("x", "a"), 80));
    let e = explain(ip_of("x", "c"), ip_of("x", "a"), 80, Protocol::Tcp, &s);
    assert_eq!(e.verdict(), "allowed by x/from-c");
    let e = explain(ip_of("y", "c"), ip_of("x", "a"), 80, Protocol::Tcp, &s);
    assert_eq!(
        e.verdict(),
        "denied: default deny ingress (isolated by x/from-b, x/from-c)"
    );
}

#[test]
fn named_port_resolves_per_target_pod() {
    let mut s = e2e_state(vec![np(
        "x",
        "http",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
    )]);
    for p in s.pods.iter_mut() {
        let port = match (p.namespace.as_str(), p.name.as_str()) {
            ("x", "a") => 8080,
            ("x", "b") => 9090,
            _ => continue,
        };
        p.named_ports.push(NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port,
        });
    }
    assert!(tcp_ok(&s, ("y", "a"), ("x", "a"), 8080));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 9090));
    assert!(tcp_ok(&s, ("y", "a"), ("x", "b"), 9090));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "b"), 8080));
    // x/c has no "http": isolated, nothing allowed.
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "c"), 8080));
    // x/a and x/b run on different nodes; on one node with both, they get different port sets.
    for p in s.pods.iter_mut() {
        p.node = "n1".into();
    }
    let c = compile(&s, "n1", &[]);
    let sets: Vec<_> = c.port_sets.iter().map(|p| p.0.clone()).collect();
    assert!(sets.contains(&vec![PortRange {
        protocol: Protocol::Tcp,
        first: 8080,
        last: 8080
    }]));
    assert!(sets.contains(&vec![PortRange {
        protocol: Protocol::Tcp,
        first: 9090,
        last: 9090
    }]));
    // The protocol is part of the name lookup: UDP "http" does not exist.
    assert!(!allowed(
        &s,
        ip_of("y", "a"),
        ip_of("x", "a"),
        8080,
        Protocol::Udp
    ));
}

#[test]
fn egress_named_port_resolves_against_the_destination() {
    let mut s = e2e_state(vec![np(
        "x",
        "to-http",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"ports": [{"port": "http"}]}], "policyTypes": ["Egress"]}),
    )]);
    for p in s.pods.iter_mut() {
        if p.namespace == "y" {
            let port = if p.name == "a" { 8080 } else { 9090 };
            p.named_ports.push(NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port,
            });
        }
    }
    assert!(tcp_ok(&s, ("x", "a"), ("y", "a"), 8080));
    assert!(!tcp_ok(&s, ("x", "a"), ("y", "a"), 9090));
    assert!(tcp_ok(&s, ("x", "a"), ("y", "b"), 9090));
    assert!(
        !tcp_ok(&s, ("x", "a"), ("z", "a"), 8080),
        "z pods have no http port"
    );
    assert!(
        !allowed(&s, ip_of("x", "a"), ip("192.0.2.1"), 8080, Protocol::Tcp),
        "external: no name"
    );
    let script = render_nft(&compile(&s, "n1", &[]));
    assert!(
        script.contains("type ipv4_addr . inet_proto . inet_service"),
        "{script}"
    );
    assert!(
        script.contains(&format!("{} . tcp . 8080", ip_of("y", "a"))),
        "{script}"
    );
    assert!(
        script.contains("ip daddr . meta l4proto . th dport @dest_0_v4"),
        "{script}"
    );
}

#[test]
fn end_port_ranges() {
    let s = e2e_state(vec![np(
        "x",
        "range",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}, {"port": 8101, "protocol": "UDP"}]}]}),
    )]);
    assert!(tcp_ok(&s, ("y", "a"), ("x", "a"), 8000));
    assert!(tcp_ok(&s, ("y", "a"), ("x", "a"), 8050));
    assert!(tcp_ok(&s, ("y", "a"), ("x", "a"), 8100));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 8101));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 7999));
    assert!(allowed(
        &s,
        ip_of("y", "a"),
        ip_of("x", "a"),
        8101,
        Protocol::Udp
    ));
    let script = render_nft(&compile(&s, "n1", &[]));
    assert!(
        script.contains("elements = { tcp . 8000-8100,\n\t\t\t     udp . 8101 }"),
        "{script}"
    );
}

#[test]
fn ip_block_with_except_applies_to_pod_ips() {
    // y pods live in 10.244.1.0/24; except it from 10.244.0.0/16.
    let s = e2e_state(vec![np(
        "x",
        "cidr",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}]}]}),
    )]);
    assert!(tcp_ok(&s, ("z", "a"), ("x", "a"), 80));
    assert!(tcp_ok(&s, ("x", "b"), ("x", "a"), 80));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80));
    assert!(!allowed(
        &s,
        ip("10.245.0.1"),
        ip_of("x", "a"),
        80,
        Protocol::Tcp
    ));
    let script = render_nft(&compile(&s, "n1", &[]));
    assert!(
        script.contains("elements = { 10.244.0.0/24,\n\t\t\t     10.244.2.0-10.244.255.255 }"),
        "{script}"
    );
}

#[test]
fn sctp_is_its_own_protocol() {
    let s = e2e_state(vec![np(
        "x",
        "sctp",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    )]);
    assert!(allowed(
        &s,
        ip_of("y", "a"),
        ip_of("x", "a"),
        80,
        Protocol::Sctp
    ));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80));
    assert!(!allowed(
        &s,
        ip_of("y", "a"),
        ip_of("x", "a"),
        80,
        Protocol::Udp
    ));
    assert!(render_nft(&compile(&s, "n1", &[])).contains("sctp . 80"));
}

#[test]
fn empty_rule_list_denies_and_empty_rule_allows() {
    let deny = e2e_state(vec![np(
        "x",
        "deny",
        json!({"podSelector": {}, "ingress": []}),
    )]);
    assert!(!tcp_ok(&deny, ("y", "a"), ("x", "a"), 80));
    let allow = e2e_state(vec![np(
        "x",
        "allow",
        json!({"podSelector": {}, "ingress": [{}]}),
    )]);
    assert!(tcp_ok(&allow, ("y", "a"), ("x", "a"), 80));
    assert!(
        allowed(&allow, ip("192.0.2.7"), ip_of("x", "a"), 9, Protocol::Udp),
        "any peer, any port"
    );
    let empty_lists = e2e_state(vec![np(
        "x",
        "allow",
        json!({"podSelector": {}, "ingress": [{"from": [], "ports": []}]}),
    )]);
    assert!(
        tcp_ok(&empty_lists, ("y", "a"), ("x", "a"), 80),
        "empty from/ports = all"
    );
}

#[test]
fn only_local_pods_are_enforced_and_host_network_pods_are_never_selected() {
    let mut s = e2e_state(vec![np(
        "x",
        "deny",
        json!({"podSelector": {}, "ingress": []}),
    )]);
    s.pods.push(PodInfo {
        namespace: "x".into(),
        name: "hostnet".into(),
        ips: vec![ip("172.30.0.11")],
        node: "n1".into(),
        host_network: true,
        ..Default::default()
    });
    let c = compile(&s, "n1", &[]);
    // n1 runs x/a, y/a, z/a; only x/a is selected.
    assert_eq!(c.chains.len(), 1);
    assert_eq!(c.chains[0].pod, ObjectRef::new("x", "a"));
    assert_eq!(c.chains[0].direction, Direction::Ingress);
    assert_eq!(c.policies, vec![ObjectRef::new("x", "deny")]);
    let other = compile(&s, "elsewhere", &[]);
    assert!(other.chains.is_empty() && other.policies.is_empty());
}

#[test]
fn odd_input_becomes_warnings_not_panics_and_never_widens() {
    let bad = vec![
        np(
            "x",
            "bad-cidr",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
        ),
        np(
            "x",
            "bad-except",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["nope"]}}]}]}),
        ),
        np(
            "x",
            "bad-op",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Matches", "values": ["a"]}]}}),
        ),
        np(
            "x",
            "bad-peer-op",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists", "values": ["x"]}]}}]}]}),
        ),
        np(
            "x",
            "bad-proto",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
        ),
        np(
            "x",
            "bad-range",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"ports": [{"port": 90, "endPort": 85}, {"port": 0}, {"port": 70000}, {"port": "n", "endPort": 9}, {"endPort": 9}]}]}),
        ),
        np(
            "x",
            "mixed-peer",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}, "podSelector": {}}, {}]}]}),
        ),
        np(
            "x",
            "bad-type",
            json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
        ),
        policy(json!({"metadata": {"name": "no-namespace"}, "spec": {}})),
    ];
    let s = e2e_state(bad);
    let c = compile(&s, "n1", &[]);
    let text: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    let has = |needle: &str| text.iter().any(|w| w.contains(needle));
    assert!(has("x/bad-cidr: invalid ipBlock cidr"), "{text:#?}");
    assert!(has("x/bad-except: invalid ipBlock except"), "{text:#?}");
    assert!(
        has("x/bad-op: invalid podSelector, policy skipped: unknown selector operator"),
        "{text:#?}"
    );
    assert!(has("x/bad-type: unknown policyType"), "{text:#?}");
    assert!(has("policy without namespace or name"), "{text:#?}");
    for n in [1, 2, 3] {
        let c = compile(&s, &format!("n{n}"), &[]);
        assert!(c.warnings.len() >= 5, "n{n}: {:#?}", c.warnings);
    }
    let c3 = compile(&s, "n3", &[]);
    let t3: Vec<String> = c3.warnings.iter().map(|w| w.to_string()).collect();
    for needle in [
        "unknown protocol \"ICMP\"",
        "endPort 85 below port 90",
        "port 0 out of range",
        "port 70000 out of range",
        "endPort with named port",
        "endPort without port",
        "peer mixes ipBlock",
        "empty peer skipped",
    ] {
        assert!(t3.iter().any(|w| w.contains(needle)), "{needle}: {t3:#?}");
    }
    // Skipped parts never allow more: x/a is isolated by the bad CIDR policies and nothing is
    // allowed; x/c keeps only nothing; x/b's bad peer allows nothing.
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "a"), 80));
    assert!(!tcp_ok(&s, ("x", "a"), ("x", "b"), 80));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "c"), 80));
    assert!(!tcp_ok(&s, ("y", "a"), ("x", "c"), 85));
    // And the script still loads syntactically (no dangling set references).
    let script = render_nft(&c3);
    assert!(!script.contains("@peer_") || script.contains("set peer_"));
}

#[test]
fn explain_names_policies_rules_and_sides() {
    let s = e2e_state(vec![
        np(
            "x",
            "deny-egress",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
        np(
            "y",
            "web",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}, {"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": 80}]}]}),
        ),
    ]);
    let e = explain(ip_of("x", "b"), ip_of("y", "a"), 80, Protocol::Tcp, &s);
    assert!(e.allowed());
    assert_eq!(e.egress, Decision::NotIsolated);
    assert_eq!(
        e.ingress,
        Decision::Allowed {
            by: vec![RuleRef {
                policy: ObjectRef::new("y", "web"),
                rule_index: 1
            }],
            isolated_by: vec![ObjectRef::new("y", "web")],
        }
    );
    assert_eq!(
        e.to_string(),
        "x/b (10.244.0.11, node n2) -> y/a (10.244.1.10, node n1) TCP/80\n\
         egress:  allowed: not isolated\n\
         ingress: allowed by y/web (rule 1)\n\
         verdict: allowed by y/web"
    );
    let e = explain(ip_of("x", "a"), ip_of("y", "a"), 80, Protocol::Tcp, &s);
    assert!(!e.allowed());
    assert_eq!(
        e.verdict(),
        "denied: default deny egress (isolated by x/deny-egress)"
    );
    let e = explain(ip_of("z", "a"), ip_of("y", "a"), 80, Protocol::Tcp, &s);
    assert_eq!(
        e.verdict(),
        "denied: default deny ingress (isolated by y/web)"
    );
    let e = explain(ip("192.0.2.1"), ip_of("y", "b"), 81, Protocol::Tcp, &s);
    assert_eq!(e.from, Endpoint::External);
    assert_eq!(e.egress, Decision::NotAPod);
    assert_eq!(e.verdict(), "allowed by y/web");
    let e = explain(ip_of("z", "a"), ip_of("z", "b"), 80, Protocol::Tcp, &s);
    assert_eq!(e.verdict(), "allowed: no policy isolates either side");
    // The node's own address passes before any policy; without being told, it is just external.
    let node = ip("10.244.1.1");
    let e = Explainer::new(&s).with_node_addrs(&[node]).explain(
        node,
        ip_of("y", "a"),
        9,
        Protocol::Tcp,
    );
    assert!(e.allowed());
    assert_eq!(e.ingress, Decision::FromNode);
    assert!(!explain(node, ip_of("y", "a"), 9, Protocol::Tcp, &s).allowed());
}

#[test]
fn chains_hold_only_the_policies_that_select_the_pod() {
    let mut policies = Vec::new();
    for i in 0..50 {
        policies.push(np("y", &format!("p{i}"), json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 1000 + i}]}]})));
    }
    policies.push(np(
        "x",
        "only-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
    ));
    let mut s = e2e_state(policies);
    for p in s.pods.iter_mut() {
        p.node = "n1".into();
    }
    let c = compile(&s, "n1", &[]);
    let xa = c.chain_for(Direction::Ingress, ip_of("x", "a")).unwrap();
    assert_eq!(xa.rules.len(), 1);
    assert_eq!(
        c.chain_for(Direction::Ingress, ip_of("y", "b"))
            .unwrap()
            .rules
            .len(),
        50
    );
    assert!(c.chain_for(Direction::Ingress, ip_of("y", "a")).is_none());
    assert!(c.chain_for(Direction::Egress, ip_of("y", "b")).is_none());
}

#[test]
fn identical_peers_share_one_set_and_input_order_does_not_matter() {
    let a = np(
        "x",
        "a",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    );
    let b = np(
        "x",
        "b",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 1}]}]}),
    );
    let s1 = e2e_state(vec![a.clone(), b.clone()]);
    let mut s2 = e2e_state(vec![b, a]);
    s2.pods.reverse();
    let c1 = compile(&s1, "n1", &[]);
    assert_eq!(c1.peer_sets.len(), 1);
    assert_eq!(render_nft(&c1), render_nft(&compile(&s2, "n1", &[])));
}

/// The rendered script of a small case, compared with the reviewed golden file. Set
/// `VEILNET_UPDATE_GOLDEN=1` to rewrite it after an intended change (and review the diff).
#[test]
fn golden_small_script() {
    let mut s = e2e_state(vec![
        np(
            "x",
            "allow-y-80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}], "ports": [{"port": 80}, {"port": "serve-81-udp", "protocol": "UDP"}, {"port": 8000, "endPort": 8080, "protocol": "SCTP"}]}]}),
        ),
        np(
            "x",
            "egress-dns",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}, {"to": [{"podSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]}),
        ),
    ]);
    // Keep the golden small: only x's pods and a y/z pod on n1.
    s.pods.retain(|p| p.namespace == "x" || p.name == "a");
    s.pods.push(PodInfo {
        namespace: "y".into(),
        name: "v6".into(),
        labels: [("pod".to_string(), "v6".to_string())].into(),
        ips: vec![ip("fd00::5")],
        node: "n2".into(),
        ..Default::default()
    });
    let c = compile_with(
        &s,
        "n1",
        &[ip("10.244.0.1"), ip("172.30.0.11")],
        &CompileOptions {
            log_allowed: true,
            drop_unknown_pod_ports: true,
            local_pod_cidrs: vec![
                "10.244.0.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            ..Default::default()
        },
    );
    let got = render_nft(&c);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/policy/testdata/small.nft");
    if std::env::var_os("VEILNET_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(got, want, "golden mismatch; got:\n{got}");
}

#[test]
fn strict_mode_drops_tcp_picked_up_mid_stream_after_the_established_accept() {
    let s = e2e_state(vec![]);
    let rule = "tcp flags & (fin | syn | rst | ack) != syn drop";
    assert!(!render_nft(&compile(&s, "n1", &[])).contains(rule));
    let opts = CompileOptions {
        tcp_new_needs_syn: true,
        ..Default::default()
    };
    let script = render_nft(&compile_with(&s, "n1", &[], &opts));
    let at = |needle: &str| {
        script
            .find(needle)
            .unwrap_or_else(|| panic!("{needle}: {script}"))
    };
    assert!(at("ct state invalid drop") < at(rule));
    assert!(at(rule) < at("ip saddr @node_v4 accept"));
}

#[test]
fn only_admitted_pods_addresses_in_the_local_pod_cidr_are_forwarded_to_before_conntrack() {
    let s = e2e_state(vec![]);
    let plain = compile_with(&s, "n1", &[], &CompileOptions::default());
    let admitted: Vec<IpAddr> = plain
        .anti_spoof
        .iter()
        .flat_map(|p| p.ips.clone())
        .filter(|ip| ip.is_ipv4())
        .collect();
    assert!(!admitted.is_empty());
    // Without the node's pod CIDRs: no such rule.
    assert!(!render_nft(&plain).contains("@local_pods_v4"));
    let cidr: ipnet::IpNet = format!("{}/24", admitted[0]).parse().unwrap();
    let opts = CompileOptions {
        local_pod_cidrs: vec![cidr],
        ..Default::default()
    };
    let script = render_nft(&compile_with(&s, "n1", &[], &opts));
    let rule = format!(
        "ip daddr {{ {} }} ip daddr != @local_pods_v4 counter name \"deny_ingress\" drop",
        cidr.trunc()
    );
    let at = |needle: &str| {
        script
            .find(needle)
            .unwrap_or_else(|| panic!("{needle}: {script}"))
    };
    // Before `ct state established accept`: an entry made before the pod was admitted, or by
    // an earlier pod at the same address, must not carry packets to it.
    assert!(at(&rule) < at("ct state established accept"));
    let set_start = at("set local_pods_v4 {");
    let set_block = &script[set_start..];
    let set_block = &set_block[..set_block.find('}').unwrap()];
    for ip in &admitted {
        assert!(
            set_block.contains(&format!(" {ip},")) || set_block.contains(&format!(" {ip} ")),
            "{ip} not admitted in {set_block}"
        );
    }
    // No IPv6 CIDR, no IPv6 rule.
    assert!(!script.contains("@local_pods_v6"));
}

#[test]
fn anti_spoof_rules_pin_mac_and_ips() {
    let s = e2e_state(vec![]);
    let script = render_nft(&compile(&s, "n1", &[]));
    assert!(script.contains("\"veilxa\" : goto port_0"), "{script}");
    assert!(
        script.contains(
            "ether saddr 0a:58:00:00:78:61 ether type ip ip saddr { 10.244.0.10 } return"
        ),
        "{script}"
    );
    assert!(script.contains("ether saddr 0a:58:00:00:78:61 ether type arp arp saddr ether 0a:58:00:00:78:61 arp saddr ip { 10.244.0.10 } return"), "{script}");
    assert!(script.contains("prefix \"veilnet:spoof:x/a\""), "{script}");
    // Link-local groups are dropped first in every port chain, and seen on the local-in path.
    let port_0 = script
        .split("chain port_0 {")
        .nth(1)
        .and_then(|c| c.split('}').next())
        .unwrap();
    let first: Vec<&str> = port_0
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        first[1].starts_with("ether daddr 01:80:c2:00:00:00/44 limit rate")
            && first[1].ends_with("prefix \"veilnet:spoof:x/a\""),
        "{port_0}"
    );
    assert_eq!(
        first[2], "ether daddr 01:80:c2:00:00:00/44 counter name \"spoofed\" drop",
        "{port_0}"
    );
    assert!(
        script.contains("type filter hook input priority filter; policy accept;")
            && script.contains("ether daddr 01:80:c2:00:00:00/44 iifname vmap @pod_ports"),
        "{script}"
    );
    assert!(!script.contains("iifname \"veil*\""), "off by default");
    // A local pod without a host veth is reported.
    let mut s = e2e_state(vec![]);
    s.pods[0].host_veth = None;
    let c = compile(&s, "n1", &[]);
    assert!(c
        .warnings
        .iter()
        .any(|w| w.to_string().contains("x/a: local pod without host veth")));
}

/// Scale: 1,000 policies × 5,000 pods (50 namespaces, 100 nodes), compile for one node and
/// render. Run with `cargo test --release --lib -- --ignored --nocapture scale_`.
#[test]
#[ignore]
fn scale_compile_and_render_1000_policies_5000_pods() {
    let mut state = ClusterState::default();
    for n in 0..50u32 {
        state.namespaces.push(NamespaceInfo {
            name: format!("ns{n}"),
            labels: [("team".to_string(), format!("t{}", n % 10))].into(),
        });
        for p in 0..100u32 {
            let i = n * 100 + p;
            state.pods.push(PodInfo {
                namespace: format!("ns{n}"),
                name: format!("pod{p}"),
                labels: [
                    ("app".to_string(), format!("app{}", p % 20)),
                    ("tier".to_string(), format!("tier{}", p % 3)),
                ]
                .into(),
                ips: vec![IpAddr::from([10, 200, (i / 256) as u8, (i % 256) as u8])],
                node: format!("node{}", i % 100),
                named_ports: vec![NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                host_veth: Some(format!("veil{i}")),
                mac: Some(MacAddr([0x0a, 0x58, 0, 0, (i >> 8) as u8, i as u8])),
                ..Default::default()
            });
        }
        for k in 0..20u32 {
            state.policies.push(np(
                &format!("ns{n}"),
                &format!("p{k}"),
                json!({
                    "podSelector": {"matchLabels": {"app": format!("app{k}")}},
                    "ingress": [
                        {"from": [
                            {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 10)}}, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["tier0", "tier1"]}]}},
                            {"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % 20)}}},
                            {"ipBlock": {"cidr": "172.16.0.0/12", "except": [format!("172.16.{k}.0/24")]}}
                        ], "ports": [{"port": 80}, {"port": "http"}, {"port": 9000, "endPort": 9100}]}
                    ],
                    "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]
                }),
            ));
        }
    }
    assert_eq!(state.policies.len(), 1000);
    assert_eq!(state.pods.len(), 5000);
    let start = std::time::Instant::now();
    let compiled = compile(&state, "node0", &[ip("10.0.0.1")]);
    let compiled_at = start.elapsed();
    let script = render_nft(&compiled);
    let total = start.elapsed();
    println!(
        "compile {compiled_at:?}, compile+render {total:?}: {} policies on node, {} chains, {} peer sets, {} port sets, {} dest sets, {} bytes",
        compiled.policies.len(),
        compiled.chains.len(),
        compiled.peer_sets.len(),
        compiled.port_sets.len(),
        compiled.dest_sets.len(),
        script.len()
    );
    assert!(compiled.warnings.is_empty());
    assert_eq!(compiled.anti_spoof.len(), 50);

    // Worst case: every pod on the compiling node, so every policy is compiled.
    for p in state.pods.iter_mut() {
        p.node = "node0".into();
    }
    let start = std::time::Instant::now();
    let compiled = compile(&state, "node0", &[ip("10.0.0.1")]);
    let compiled_at = start.elapsed();
    let script = render_nft(&compiled);
    let total = start.elapsed();
    println!(
        "all-local: compile {compiled_at:?}, compile+render {total:?}: {} policies, {} chains, {} peer sets, {} bytes",
        compiled.policies.len(),
        compiled.chains.len(),
        compiled.peer_sets.len(),
        script.len()
    );
    assert_eq!(compiled.policies.len(), 1000);
}

#[test]
fn an_ip_claimed_by_two_pods_maps_once_to_the_chain_explain_uses() {
    let mut s = e2e_state(vec![np(
        "x",
        "deny",
        json!({"podSelector": {}, "ingress": []}),
    )]);
    // A stale x/zombie on n1 still claims x/a's IP.
    let mut zombie = s.pods[0].clone();
    zombie.name = "zombie".into();
    s.pods.push(zombie);
    let c = compile(&s, "n1", &[]);
    let script = render_nft(&c);
    let needle = format!("{} : jump", ip_of("x", "a"));
    assert_eq!(script.matches(&needle).count(), 1, "{script}");
    let chosen = c.chain_for(Direction::Ingress, ip_of("x", "a")).unwrap();
    let index = c
        .chains
        .iter()
        .position(|ch| std::ptr::eq(ch, chosen))
        .unwrap();
    assert!(
        script.contains(&format!("{needle} ing_{index}")),
        "{script}"
    );
}

mod dns_guard {
    use super::*;
    use crate::dns::{DnsGuard, DnsMode, NAMESPACE_LABEL};

    fn options(mode: DnsMode, trusted: &[&str]) -> CompileOptions {
        CompileOptions {
            dns: DnsGuard {
                mode,
                trusted: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            },
            ..CompileOptions::default()
        }
    }

    fn table(r: &Ruleset) -> &NftTable {
        r.tables.iter().find(|t| t.family == Family::Inet).unwrap()
    }

    fn object<'a>(r: &'a Ruleset, name: &str) -> Option<&'a NftObject> {
        table(r).objects.iter().find(|o| o.name == name)
    }

    #[test]
    fn without_trusted_servers_the_guard_renders_nothing() {
        let s = e2e_state(vec![]);
        let model = compile_with(&s, "n1", &[], &options(DnsMode::Monitor, &[]));
        assert!(model.dns_pods.is_empty());
        let r = render(&model, None);
        assert!(object(&r, "dns").is_none());
        assert!(!r.script().contains("jump dns"));
    }

    #[test]
    fn each_local_pod_gets_counters_its_mode_and_the_jump_comes_before_conntrack() {
        let mut s = e2e_state(vec![]);
        // y opts into monitor, z out entirely; x follows the node (enforce).
        for ns in s.namespaces.iter_mut() {
            match ns.name.as_str() {
                "y" => drop(ns.labels.insert(NAMESPACE_LABEL.into(), "monitor".into())),
                "z" => drop(ns.labels.insert(NAMESPACE_LABEL.into(), "off".into())),
                _ => {}
            }
        }
        let model = compile_with(
            &s,
            "n1",
            &[],
            &options(DnsMode::Enforce, &["10.96.0.10/32", "10.244.0.0/28"]),
        );
        let modes: Vec<(String, DnsMode)> = model
            .dns_pods
            .iter()
            .map(|d| (d.pod.to_string(), d.mode))
            .collect();
        assert_eq!(
            modes,
            vec![
                ("x/a".to_string(), DnsMode::Enforce),
                ("y/a".to_string(), DnsMode::Monitor)
            ]
        );
        let r = render(&model, None);
        let enforce = object(&r, "dns_enforce_v4").unwrap();
        assert_eq!(enforce.content, vec![ip_of("x", "a").to_string()]);
        let watched = object(&r, "dns_watched_v4").unwrap();
        assert_eq!(watched.content.len(), 2);
        let ctr = object(&r, "dns_untrusted_ctr_v4").unwrap();
        assert_eq!(
            ctr.content,
            vec![
                format!("{} : \"dnsu_0\"", ip_of("x", "a")),
                format!("{} : \"dnsu_1\"", ip_of("y", "a"))
            ]
        );
        assert_eq!(
            object(&r, "dns_trusted_v4").unwrap().content,
            vec!["10.96.0.10", "10.244.0.0/28"]
        );
        let forward = object(&r, "forward").unwrap();
        assert!(
            forward.content[0].ends_with("jump dns"),
            "{:?}",
            forward.content
        );
        let input = object(&r, "input").unwrap();
        assert!(input.content[0].ends_with("jump dns"));
        let rules = &object(&r, "dns").unwrap().content;
        let drop = rules
            .iter()
            .position(|l| l == "ip saddr @dns_enforce_v4 drop");
        let trusted_return = rules
            .iter()
            .position(|l| l == "ip daddr @dns_trusted_v4 return");
        assert!(trusted_return < drop, "{rules:#?}");
        assert_eq!(
            r.counter_dns("dnsu_1").map(|(p, t)| (p.to_string(), t)),
            Some(("y/a".into(), DnsCount::Untrusted))
        );
    }

    #[test]
    fn a_new_pod_adds_elements_and_counters_without_a_full_replace() {
        let s = e2e_state(vec![]);
        let opts = options(DnsMode::Monitor, &["10.96.0.10/32"]);
        let first = render(&compile_with(&s, "n1", &[], &opts), None);
        let mut more = s.clone();
        let mut pod = more.pods[0].clone();
        pod.name = "new".into();
        pod.ips = vec![ip("10.244.0.99")];
        pod.host_veth = Some("veilnew".into());
        more.pods.push(pod);
        let second = render(&compile_with(&more, "n1", &[], &opts), Some(&first));
        let Plan::Incremental(delta) = diff(&first, &second) else {
            panic!("full replace");
        };
        let script = delta.script();
        assert!(
            script.contains("add counter inet veilnet dnst_"),
            "{script}"
        );
        assert!(
            script.contains("add element inet veilnet dns_watched_v4 { 10.244.0.99 }"),
            "{script}"
        );
        // Counters are declared before the map elements that name them.
        let counter_at = script.find("add counter inet veilnet dnsu_").unwrap();
        let element_at = script
            .find("add element inet veilnet dns_untrusted_ctr_v4")
            .unwrap();
        assert!(counter_at < element_at, "{script}");
    }

    #[test]
    fn a_bad_namespace_label_is_a_warning_and_the_node_mode_applies() {
        let mut s = e2e_state(vec![]);
        s.namespaces[0]
            .labels
            .insert(NAMESPACE_LABEL.into(), "loud".into());
        let model = compile_with(
            &s,
            "n1",
            &[],
            &options(DnsMode::Enforce, &["10.96.0.10/32"]),
        );
        assert!(model
            .warnings
            .iter()
            .any(|w| w.to_string().contains("label veilnet.io/dns-mode")));
        assert_eq!(model.dns_pods[0].mode, DnsMode::Enforce);
    }
}

mod egress_watch {
    use super::*;
    use crate::policy::compile::NEW_DESTINATION_LABEL;

    fn watching() -> CompileOptions {
        CompileOptions {
            egress_watch: true,
            ..CompileOptions::default()
        }
    }

    fn forward(r: &Ruleset) -> Vec<String> {
        r.tables
            .iter()
            .find(|t| t.family == Family::Inet)
            .unwrap()
            .objects
            .iter()
            .find(|o| o.name == "forward")
            .unwrap()
            .content
            .clone()
    }

    #[test]
    fn only_opted_in_namespaces_are_watched_and_the_rule_skips_pods_and_nodes() {
        let mut s = e2e_state(vec![]);
        // Without the label, or with alerts off, nothing is rendered.
        let none = compile_with(&s, "n1", &[], &watching());
        assert!(none.egress_watch.is_empty());
        assert!(!render(&none, None).script().contains("egress_watch"));
        s.namespaces
            .iter_mut()
            .find(|n| n.name == "x")
            .unwrap()
            .labels
            .insert(NEW_DESTINATION_LABEL.into(), "true".into());
        let off = compile_with(&s, "n1", &[], &CompileOptions::default());
        assert!(off.egress_watch.is_empty());

        let model = compile_with(&s, "n1", &[], &watching());
        assert_eq!(model.egress_watch, vec![ip_of("x", "a")]);
        let r = render(&model, None);
        let rules = forward(&r);
        let watch = rules
            .iter()
            .position(|l| l.starts_with("ip saddr @egress_watch_v4"))
            .unwrap_or_else(|| panic!("{rules:#?}"));
        let rule = &rules[watch];
        for part in [
            "ip daddr . ip daddr != @pod_self_v4",
            "ip daddr != @node_v4",
            "log prefix \"veilnet:egress-new:watched\"",
            "limit rate",
        ] {
            assert!(rule.contains(part), "{part} in {rule}");
        }
        // Only new connections reach it: after conntrack's shortcut, before anything accepts.
        let established = rules
            .iter()
            .position(|l| l == "ct state established accept")
            .unwrap();
        let node_accept = rules
            .iter()
            .position(|l| l == "ip saddr @node_v4 accept")
            .unwrap();
        assert!(established < watch && watch < node_accept, "{rules:#?}");
        assert!(r
            .script()
            .contains(&format!("elements = {{ {} }}", ip_of("x", "a"))));
    }

    #[test]
    fn a_bad_label_value_is_a_warning_and_watches_nothing() {
        let mut s = e2e_state(vec![]);
        s.namespaces[0]
            .labels
            .insert(NEW_DESTINATION_LABEL.into(), "yes".into());
        let model = compile_with(&s, "n1", &[], &watching());
        assert!(model.egress_watch.is_empty());
        assert!(model.warnings.iter().any(|w| w
            .to_string()
            .contains("veilnet.io/alert-new-destinations=\"yes\"")));
    }
}
