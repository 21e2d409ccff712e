//! The lab on the real Kubernetes control plane (`veilnet lab up --control-plane kubernetes`):
//! kube-apiserver with TLS, client certificates, Node and RBAC authorization and NodeRestriction,
//! etcd, kube-controller-manager (node IPAM) and kube-scheduler, built by
//! scripts/build-kubernetes.sh. The lab kubelets talk as `system:node:<name>`, the agents as the
//! manifest's `veilnet` ServiceAccount. Needs root, and skips (saying why) when the binaries are
//! not built.
//!
//! Control plane: kubernetes only, because these tests are about what only the real control
//! plane has: real authentication, authorization, scheduling and node IPAM, and a real API
//! server to stop and a real etcd to compact. Every other lab test file runs on both.

mod common;
mod manifest_docs;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use veilnet::install::{ApiCall, Scope, AGENT_API_CALLS};
use veilnet_lab::control_plane::kubernetes::pinned_version;
use veilnet_lab::rbac::{self, grants_for};

const fn denied(
    group: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    verb: &'static str,
    scope: Scope,
    resource_name: Option<&'static str>,
) -> ApiCall {
    ApiCall {
        group,
        resource,
        subresource,
        verb,
        scope,
        resource_name,
        why: "must be denied",
    }
}

/// Calls the agent must not be able to make.
const DENIED: &[ApiCall] = &[
    denied("", "pods", None, "create", Scope::Cluster, None),
    denied("", "pods", None, "delete", Scope::Cluster, None),
    denied("", "pods", None, "get", Scope::Cluster, None),
    denied("", "pods", Some("exec"), "create", Scope::Cluster, None),
    denied("", "nodes", None, "patch", Scope::Cluster, None),
    denied("", "nodes", None, "update", Scope::Cluster, None),
    denied("", "nodes", None, "create", Scope::Cluster, None),
    denied("", "nodes", None, "delete", Scope::Cluster, None),
    denied("", "nodes", Some("status"), "update", Scope::Cluster, None),
    denied("", "secrets", None, "get", Scope::OwnNamespace, None),
    denied("", "secrets", None, "list", Scope::Cluster, None),
    denied(
        "",
        "configmaps",
        None,
        "get",
        Scope::OwnNamespace,
        Some("kube-root-ca.crt"),
    ),
    denied(
        "",
        "configmaps",
        None,
        "delete",
        Scope::OwnNamespace,
        Some("veilnet-pod-cidrs"),
    ),
    denied(
        "",
        "configmaps",
        None,
        "create",
        Scope::Namespace("kube-system"),
        None,
    ),
    denied("", "events", None, "delete", Scope::OwnNamespace, None),
    denied(
        "",
        "serviceaccounts",
        Some("token"),
        "create",
        Scope::OwnNamespace,
        Some("veilnet"),
    ),
    denied("", "namespaces", None, "delete", Scope::Cluster, None),
    denied(
        "networking.k8s.io",
        "networkpolicies",
        None,
        "patch",
        Scope::Cluster,
        None,
    ),
    denied(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        None,
        "create",
        Scope::Cluster,
        None,
    ),
    denied(
        "coordination.k8s.io",
        "leases",
        None,
        "update",
        Scope::Namespace("kube-node-lease"),
        None,
    ),
];

/// `kubectl auth can-i` as the agent's ServiceAccount: the real authorizer's answer.
fn can_i(lab: &Lab, call: &ApiCall, own_ns: &str, user: &str) -> bool {
    let mut resource = if call.group.is_empty() {
        call.resource.to_string()
    } else {
        format!("{}.{}", call.resource, call.group)
    };
    if let Some(name) = call.resource_name {
        resource = format!("{resource}/{name}");
    }
    let mut args = vec![
        "auth".to_string(),
        "can-i".into(),
        call.verb.into(),
        resource,
    ];
    if let Some(sub) = call.subresource {
        args.push(format!("--subresource={sub}"));
    }
    match call.scope {
        Scope::Cluster => args.push("--all-namespaces".into()),
        Scope::OwnNamespace => args.extend(["-n".into(), own_ns.into()]),
        Scope::Namespace(ns) => args.extend(["-n".into(), ns.into()]),
    }
    args.push(format!("--as={user}"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.kubectl(&refs);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match (out.status.code(), answer.as_str()) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!("kubectl {args:?} gave no answer:\n{}", text(&out)),
    }
}

#[test]
fn the_lab_runs_on_the_real_control_plane_with_the_agent_under_real_rbac() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let started = Instant::now();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "k8s", &["--nodes", "3"]);
    eprintln!(
        "lab up (3 nodes, real control plane): {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The real server, its real version, etcd behind it.
    let version = lab.kubectl_json(&["version"]);
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        pinned_version(),
        "{version}"
    );
    let readyz = lab.kubectl_ok(&["get", "--raw", "/readyz?verbose"]);
    assert!(readyz.contains("[+]etcd ok"), "{readyz}");
    let st = lab.status_json();
    assert_eq!(st["controlPlane"], "kubernetes", "{st}");
    assert_eq!(st["serverVersion"], pinned_version(), "{st}");
    // kube-controller-manager's node IPAM gave every node its own /24 of the cluster CIDR, never
    // subnet 0 (the Service range). Which node gets which follows registration order, so the
    // nodes together hold subnets 1..=N, each once.
    let nodes = st["nodes"].as_array().unwrap();
    let mut subnets: Vec<String> = nodes
        .iter()
        .map(|n| {
            assert_eq!(n["ready"], true, "{n}");
            n["podCidr"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    subnets.sort();
    let expected: Vec<String> = (1..=nodes.len())
        .map(|i| format!("10.244.{i}.0/24"))
        .collect();
    assert_eq!(subnets, expected, "{st}");
    let svc = lab.kubectl_json(&["get", "service", "kubernetes"]);
    assert_eq!(svc["spec"]["clusterIP"], "10.244.0.1", "{svc}");
    let rss: u64 = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .iter()
    .map(|r| {
        let kib = lab.daemon_memory(r).rss;
        eprintln!("  {r}: {} MiB", kib / 1024);
        kib
    })
    .sum();
    eprintln!("control plane RSS: {} MiB", rss / 1024);

    // Pods pinned to each node, and one the scheduler places.
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        lab.apply(&pod_manifest(
            "default",
            name,
            &format!("node-{}", i + 1),
            &[],
            SERVE,
        ));
    }
    let mut unscheduled: serde_json::Value =
        serde_json::from_str(&pod_manifest("default", "s", "", &[], SERVE)).unwrap();
    unscheduled["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeName");
    lab.apply(&unscheduled.to_string());
    let mut ips = Vec::new();
    for name in ["a", "b", "c", "s"] {
        ips.push((
            name,
            lab.wait_pod_ip(&format!("default/{name}"), Duration::from_secs(90)),
        ));
    }
    let s = lab.kubectl_json(&["get", "pod", "s"]);
    let node = s["spec"]["nodeName"].as_str().unwrap_or_default();
    assert!(node.starts_with("node-"), "not scheduled: {s}");

    // All pairs, TCP and UDP, across nodes.
    let jobs: Vec<(&str, &str, String, &str)> = ips
        .iter()
        .flat_map(|(from, _)| {
            ips.iter()
                .filter(move |(to, _)| to != from)
                .flat_map(move |(to, ip)| {
                    ["tcp", "udp"].map(|proto| (*from, *to, ip.clone(), proto))
                })
        })
        .collect();
    let results = par_map(&jobs, 4, |(from, to, ip, proto)| {
        let port = if *proto == "tcp" { 80 } else { 81 };
        (
            format!("{from}->{to} {proto}"),
            lab.connect(
                &format!("default/{from}"),
                &format!("{ip}:{port}"),
                proto,
                "3s",
            ),
        )
    });
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, code)| *code != Some(0))
        .map(|(what, _)| what)
        .collect();
    assert!(failed.is_empty(), "unreachable: {failed:?}\n{}", lab.logs());

    // Only ciphertext on the underlay.
    assert_wire(&lab, "default/a", "default/b", "encrypted");
    assert_wire(&lab, "default/c", "default/a", "encrypted");

    // The real RBAC authorizer allows every call the agent makes and denies the rest, and the
    // lab's evaluator agrees with it on each one.
    let (ns, sa) = manifest_docs::agent_identity();
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let grants = grants_for(&manifest_docs::rbac_objects(), &ns, &sa).unwrap();
    let mut wrong = Vec::new();
    for (call, want) in AGENT_API_CALLS
        .iter()
        .map(|c| (c, true))
        .chain(DENIED.iter().map(|c| (c, false)))
    {
        let real = can_i(&lab, call, &ns, &user);
        let ours = rbac::allows(&grants, call, &ns);
        eprintln!(
            "{} {call}: authorizer {real}, evaluator {ours}",
            if real == want { "ok " } else { "BAD" }
        );
        if real != want || ours != real {
            wrong.push(format!(
                "{call}: want {want}, authorizer {real}, evaluator {ours}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // No agent or kubelet was refused anything: the real authorizers judged every call they made
    // (the control plane's own logs are left out: its components race RBAC's bootstrap at start).
    let dir = std::path::Path::new("/var/lib/veilnet-lab")
        .join(&lab.name)
        .join("logs");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !(file.starts_with("agent-") || file.starts_with("kubelet-")) {
            continue;
        }
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("forbidden") || l.contains("Forbidden"))
            .collect();
        assert!(
            refused.is_empty(),
            "{file} was refused calls:\n{}",
            refused.join("\n")
        );
    }
}

/// The dataplane of every node, as the kernel holds it: links, IPv4 addresses, routes, permanent
/// neighbours (IPv6 link-local addresses and their DAD flags come and go on their own). The
/// bridge's MTU is left out: it follows its first pod port (1440) until the agent's periodic pass
/// sets it (1450) about 30 s later, with or without an API server (seen on the stand-in too).
fn dataplane(lab: &Lab, nodes: usize) -> Vec<String> {
    (1..=nodes)
        .map(|n| {
            [
                &["link"][..],
                &["-4", "addr"],
                &["route"],
                &["neigh", "show", "nud", "permanent"],
            ]
            .iter()
            .map(|args| {
                lab.ip(n, args)
                    .lines()
                    .map(|l| match l.find(": veilbr0: ") {
                        Some(_) => l.split(" mtu ").next().unwrap_or(l).to_string(),
                        None => l.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
        })
        .collect()
}

/// `snapshot` once it has settled (the same twice, two seconds apart, within 30 s).
fn settled_snapshot(
    lab: &Lab,
    nodes: usize,
    snapshot: fn(&Lab, usize) -> Vec<String>,
) -> Vec<String> {
    settled(
        "the dataplane",
        Duration::from_secs(2),
        Duration::from_secs(30),
        || snapshot(lab, nodes),
    )
}

/// The dataplane once it has settled: a new pod's link and the bridge take a moment after the
/// pod is Running.
fn settled_dataplane(lab: &Lab, nodes: usize) -> Vec<String> {
    settled_snapshot(lab, nodes, dataplane)
}

/// Pods keep talking: `netns` reaches `target` over TCP every `every` for `span`.
fn keeps_talking(netns: &str, target: &str, span: Duration, every: Duration, during: &str) {
    let since = Instant::now();
    while since.elapsed() < span {
        assert_eq!(
            probe_in(netns, target, "tcp", "3s"),
            Some(0),
            "{target} from {netns} {during} ({:?} in)",
            since.elapsed()
        );
        std::thread::sleep(every);
    }
}

/// A NetworkPolicy isolating `b` for ingress takes effect: `a` no longer reaches it.
fn isolating_b_is_enforced(lab: &Lab, b_ip: &str) {
    lab.apply(
        &serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "isolate-b", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]},
        })
        .to_string(),
    );
    eventually(Duration::from_secs(30), "the policy isolates b", || {
        lab.connect("default/a", &format!("{b_ip}:80"), "tcp", "2s") == Some(1)
    });
}

#[test]
fn kube_apiserver_down_for_60s_changes_nothing_in_the_dataplane_and_the_agents_resync() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "k8sapi", &["--nodes", "2"]);
    let (_, b_ip) = two_pods(&lab);
    let before = settled_dataplane(&lab, 2);
    // Probed from the pod's namespace directly: `lab exec` asks the API where the pod is.
    let a_netns = lab.pod_netns("default/a");

    lab.kill_daemon("kube-apiserver");
    // Pods keep talking, encrypted, while no API server answers.
    keeps_talking(
        &a_netns,
        &format!("{b_ip}:80"),
        Duration::from_secs(60),
        Duration::from_secs(5),
        "during the outage",
    );
    assert_eq!(
        dataplane(&lab, 2),
        before,
        "the outage changed a node's dataplane"
    );

    // `lab up` again starts the API server (and only what is not running); the agents and
    // kubelets reconnect by themselves and pick up what changed meanwhile.
    let agents = (
        lab.daemon_pid("agent-node-1"),
        lab.daemon_pid("agent-node-2"),
    );
    lab.up_again();
    assert_eq!(
        (
            lab.daemon_pid("agent-node-1"),
            lab.daemon_pid("agent-node-2")
        ),
        agents,
        "the agents must ride out the outage, not be restarted"
    );
    assert_wire(&lab, "default/a", "default/b", "encrypted");
    // The kubelets' watches resumed: a new pod starts and is networked.
    let c_ip = new_pod_is_reachable(&lab, "node-2");
    // The agents' watches resumed: a NetworkPolicy made after the outage is enforced.
    isolating_b_is_enforced(&lab, &b_ip);
    assert_eq!(
        lab.connect("default/a", &format!("{c_ip}:80"), "tcp", "3s"),
        Some(0)
    );
}

/// [`dataplane`] plus each node's static and permanent forwarding entries (the VXLAN device's
/// per-peer entries and the bridge's own; learned entries age on their own).
fn full_dataplane(lab: &Lab, nodes: usize) -> Vec<String> {
    dataplane(lab, nodes)
        .into_iter()
        .enumerate()
        .map(|(i, mut state)| {
            let fdb =
                ok(Command::new("bridge").args(["-n", &lab.node_netns(i + 1), "fdb", "show"]));
            for line in fdb
                .lines()
                .filter(|l| l.contains("permanent") || l.contains("static"))
            {
                state.push('\n');
                state.push_str(line);
            }
            state
        })
        .collect()
}

/// [`full_dataplane`] once it has settled (the links and routes first, then the FDB).
fn settled_full_dataplane(lab: &Lab, nodes: usize) -> Vec<String> {
    settled_dataplane(lab, nodes);
    settled_snapshot(lab, nodes, full_dataplane)
}

/// The lines an agent logged after byte `from` of its log that satisfy `want`.
fn agent_lines_since(
    lab: &Lab,
    node: &str,
    from: usize,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let log = lab.agent_log(node);
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| want(l))
        .map(str::to_string)
        .collect()
}

/// Two nodes with a serving pod each (`a` on node-1, `b` on node-2) that reach each other.
fn two_pods(lab: &Lab) -> (String, String) {
    for (name, node) in [("a", "node-1"), ("b", "node-2")] {
        lab.apply(&pod_manifest(
            "default",
            name,
            node,
            &[("app", name)],
            SERVE,
        ));
    }
    let a_ip = lab.wait_pod_ip("default/a", Duration::from_secs(90));
    let b_ip = lab.wait_pod_ip("default/b", Duration::from_secs(90));
    assert_eq!(
        lab.connect("default/a", &format!("{b_ip}:80"), "tcp", "3s"),
        Some(0)
    );
    (a_ip, b_ip)
}

/// Pod `c` on `node`, networked, reached from `a`; its IP.
fn new_pod_is_reachable(lab: &Lab, node: &str) -> String {
    lab.apply(&pod_manifest("default", "c", node, &[], SERVE));
    let c_ip = lab.wait_pod_ip("default/c", Duration::from_secs(90));
    eventually(Duration::from_secs(30), "a reaches the new pod c", || {
        lab.connect("default/a", &format!("{c_ip}:80"), "tcp", "2s") == Some(0)
    });
    c_ip
}

#[test]
fn losing_an_rbac_rule_is_logged_as_forbidden_tears_nothing_down_and_recovers_when_restored() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let started = Instant::now();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "k8srbac", &["--nodes", "2"]);
    let (_, b_ip) = two_pods(&lab);
    let before = settled_full_dataplane(&lab, 2);
    let a_netns = lab.pod_netns("default/a");

    // Take `patch nodes/status` (how the agent publishes its annotations) out of its ClusterRole,
    // as an operator's bad edit would: a JSON patch that tests the rule it removes.
    let role = lab.kubectl_json(&["get", "clusterrole", "veilnet"]);
    let rules = role["rules"].as_array().expect("rules");
    let at = rules
        .iter()
        .position(|r| r["resources"] == serde_json::json!(["nodes/status"]))
        .unwrap_or_else(|| panic!("no nodes/status rule in {role}"));
    let rule = rules[at].clone();
    let node1 = lab.kubectl_json(&["get", "node", "node-1"]);
    let claimed = node1["metadata"]["annotations"]["veilnet.io/pod-cidrs"].clone();
    assert_eq!(claimed, node1["spec"]["podCIDR"], "{node1}");
    let path = format!("/rules/{at}");
    lab.kubectl_ok(&[
        "patch",
        "clusterrole",
        "veilnet",
        "--type=json",
        "-p",
        &serde_json::json!([
            {"op": "test", "path": path, "value": rule},
            {"op": "remove", "path": path},
        ])
        .to_string(),
    ]);
    let (ns, sa) = manifest_docs::agent_identity();
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let patch_status = AGENT_API_CALLS
        .iter()
        .find(|c| c.resource == "nodes" && c.subresource == Some("status"))
        .unwrap();
    eventually(Duration::from_secs(10), "the authorizer denies it", || {
        !can_i(&lab, patch_status, &ns, &user)
    });

    // Make the agent need the call: an operator drops node-1's informational pod-cidrs
    // annotation (routing never reads it), which its agent then republishes.
    let from = lab.agent_log("node-1").len();
    lab.kubectl_ok(&["annotate", "node", "node-1", "veilnet.io/pod-cidrs-"]);
    let forbidden = |l: &str| l.to_lowercase().contains("forbidden") && l.contains("nodes/status");
    eventually(
        Duration::from_secs(20),
        "the agent logs the refusal",
        || !agent_lines_since(&lab, "node-1", from, forbidden).is_empty(),
    );
    eprintln!(
        "refused: {}",
        agent_lines_since(&lab, "node-1", from, forbidden)[0]
    );
    // It keeps retrying (and failing) for a while; nothing it built is torn down meanwhile, and
    // the pods keep talking.
    keeps_talking(
        &a_netns,
        &format!("{b_ip}:80"),
        Duration::from_secs(12),
        Duration::from_secs(2),
        "while the agent is refused",
    );
    assert!(
        agent_lines_since(&lab, "node-1", from, forbidden).len() >= 2,
        "the agent gave up retrying"
    );
    let node1 = lab.kubectl_json(&["get", "node", "node-1"]);
    assert!(
        node1["metadata"]["annotations"]["veilnet.io/pod-cidrs"].is_null(),
        "the agent published without the permission: {node1}"
    );
    assert_eq!(
        full_dataplane(&lab, 2),
        before,
        "losing the rule changed a node's dataplane"
    );
    assert_wire(&lab, "default/a", "default/b", "encrypted");

    // Restore the rule: the agent's next retry publishes, and the refusals stop.
    lab.kubectl_ok(&[
        "patch",
        "clusterrole",
        "veilnet",
        "--type=json",
        "-p",
        &serde_json::json!([{"op": "add", "path": path, "value": rule}]).to_string(),
    ]);
    // Within the agent's longest retry backoff (5 s) and RBAC's propagation, not at the next
    // periodic resync.
    eventually(
        Duration::from_secs(10),
        "the agent republishes its pod-cidrs annotation",
        || {
            let node1 = lab.kubectl_json(&["get", "node", "node-1"]);
            node1["metadata"]["annotations"]["veilnet.io/pod-cidrs"] == claimed
        },
    );
    let recovered = lab.agent_log("node-1").len();
    // Longer than the agent's longest retry backoff (5 s).
    std::thread::sleep(Duration::from_secs(7));
    let again = agent_lines_since(&lab, "node-1", recovered, forbidden);
    assert!(
        again.is_empty(),
        "still refused after the restore: {again:?}"
    );
    assert_eq!(
        full_dataplane(&lab, 2),
        before,
        "the recovery changed a node's dataplane"
    );
    // And a change made after the restore takes effect.
    new_pod_is_reachable(&lab, "node-1");
    eprintln!("rbac fault test: {:.1}s", started.elapsed().as_secs_f64());
}

/// etcd's v3 JSON gateway in the control plane's namespace (the lab's etcd listens there only).
fn etcd(lab: &Lab, call: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = ok(Command::new("ip").args([
        "netns",
        "exec",
        &lab.control_plane_netns(),
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-X",
        "POST",
        &format!("http://127.0.0.1:2379/v3/{call}"),
        "-d",
        &body.to_string(),
    ]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcd {call}: {e}: {out}"))
}

#[test]
fn an_expired_watch_410_gone_is_relisted_without_touching_the_dataplane() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let started = Instant::now();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "k8sgone", &["--nodes", "2"]);
    let (_, b_ip) = two_pods(&lab);
    let before = settled_full_dataplane(&lab, 2);
    let from: Vec<usize> = ["node-1", "node-2"]
        .iter()
        .map(|n| lab.agent_log(n).len())
        .collect();

    // Writes the agents' watches do not see move etcd's revision past what they last saw; then,
    // with the API server down, etcd compacts its history up to now. The resourceVersions the
    // agents resume their watches from are gone: the restarted API server answers 410 Gone.
    for i in 0..5 {
        lab.kubectl_ok(&["create", "configmap", &format!("bump-{i}")]);
    }
    lab.kill_daemon("kube-apiserver");
    let revision = etcd(&lab, "kv/range", &serde_json::json!({"key": "AA=="}))["header"]
        ["revision"]
        .as_str()
        .expect("etcd revision")
        .to_string();
    etcd(
        &lab,
        "kv/compaction",
        &serde_json::json!({"revision": revision, "physical": true}),
    );
    let old: i64 = revision.parse::<i64>().unwrap() - 1;
    let compacted = etcd(
        &lab,
        "kv/range",
        &serde_json::json!({"key": "AA==", "revision": old.to_string()}),
    );
    assert!(
        compacted.to_string().contains("compacted"),
        "etcd did not compact revision {old}: {compacted}"
    );
    lab.up_again();

    // Each agent's watches expire, and it lists each expired kind afresh.
    let gone = |l: &str| {
        l.contains("watch failed")
            && l.contains("too old resource version")
            && l.contains("Expired")
    };
    for (node, from) in ["node-1", "node-2"].iter().zip(&from) {
        eventually(
            Duration::from_secs(60),
            "the agent's watch expires (410)",
            || !agent_lines_since(&lab, node, *from, gone).is_empty(),
        );
        let log = lab.agent_log(node);
        let mut at = *from;
        let mut expired = Vec::new();
        for line in log[*from..].lines() {
            at += line.len() + 1;
            if gone(line) {
                let kind = line
                    .split(" kind=")
                    .nth(1)
                    .and_then(|k| k.split(' ').next());
                expired.push((kind.expect("kind").to_string(), at));
            }
        }
        for (kind, after) in &expired {
            let relisted =
                |l: &str| l.contains("listed; watching") && l.contains(&format!("kind={kind}"));
            eventually(Duration::from_secs(30), "the agent re-lists", || {
                !agent_lines_since(&lab, node, *after, relisted).is_empty()
            });
            eprintln!(
                "{node}: {kind} expired, then {}",
                agent_lines_since(&lab, node, *after, relisted)[0]
            );
        }
    }
    // The re-list reconciled against the same cluster: nothing changed, and pods talk.
    assert_eq!(
        settled_full_dataplane(&lab, 2),
        before,
        "the re-list changed a node's dataplane"
    );
    assert_eq!(
        lab.connect("default/a", &format!("{b_ip}:80"), "tcp", "3s"),
        Some(0)
    );
    // Changes after it still apply: a new pod is networked, and a NetworkPolicy is enforced.
    new_pod_is_reachable(&lab, "node-2");
    isolating_b_is_enforced(&lab, &b_ip);
    eprintln!("410 test: {:.1}s", started.elapsed().as_secs_f64());
}

/// The port the slow API proxy listens on, beside the API server on the control plane's address.
const SLOW_API_PORT: u16 = 16443;
const SLOW_API_TABLE: &str = "veilnet_test_slow_api";

/// A slow API server, as one node sees it: every byte its clients send to the API server's
/// address is held `delay` before it is passed on (responses and watch events are not held), so
/// every request, and every new connection's TLS handshake round, takes that much longer. A TCP
/// proxy in the control plane's namespace does the holding; a DNAT rule in the node's namespace
/// sends new connections to it, and the node's open connections to the API server are reset so
/// that its clients (agent and kubelet) reconnect through it. Dropping it removes the rules and
/// closes the proxied connections: the clients reconnect directly.
struct SlowApi {
    node_netns: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

fn ipv4_of(netns: &str) -> String {
    let out = ok(Command::new("ip").args(["-n", netns, "-4", "-j", "addr", "show", "eth0"]));
    let addrs: serde_json::Value = serde_json::from_str(&out).unwrap();
    addrs[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap_or_else(|| panic!("no IPv4 address on eth0 in {netns}: {out}"))
        .to_string()
}

impl SlowApi {
    fn start(lab: &Lab, node: usize, delay: Duration) -> SlowApi {
        let cp_netns = lab.control_plane_netns();
        let api_ip: std::net::Ipv4Addr = ipv4_of(&cp_netns).parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let acceptor = {
            let (stop, accepted, conns) = (stop.clone(), accepted.clone(), conns.clone());
            std::thread::spawn(move || {
                // Every socket this thread opens, the upstream connections included, is the
                // control plane's: the node's rules never see the proxy's own traffic.
                veilnet::netns::enter_current_thread(&cp_netns).expect("enter the control plane");
                let listener = std::net::TcpListener::bind((api_ip, SLOW_API_PORT));
                let listener = match listener {
                    Ok(l) => {
                        bound_tx.send(Ok(())).unwrap();
                        l
                    }
                    Err(e) => return bound_tx.send(Err(e)).unwrap(),
                };
                listener.set_nonblocking(true).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    client.set_nonblocking(false).unwrap();
                    let Ok(upstream) = std::net::TcpStream::connect((api_ip, 6443)) else {
                        continue; // the client sees its connection closed, as with a dead LB
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut held = conns.lock().unwrap();
                    held.push(client.try_clone().unwrap());
                    held.push(upstream.try_clone().unwrap());
                    drop(held);
                    proxy_delayed(client, upstream, delay);
                }
            })
        };
        bound_rx
            .recv()
            .unwrap()
            .expect("the slow API proxy's listener");

        let node_netns = lab.node_netns(node);
        let ruleset = format!(
            "table ip {SLOW_API_TABLE} {{\n\
             \x20chain out_nat {{ type nat hook output priority -100; policy accept;\n\
             \x20 ip daddr {api_ip} tcp dport 6443 dnat to {api_ip}:{SLOW_API_PORT}\n }}\n\
             \x20chain out {{ type filter hook output priority 0; policy accept;\n\
             \x20 ip daddr {api_ip} tcp dport 6443 counter reject with tcp reset\n }}\n}}\n"
        );
        veilnet::netfilter::nft::run(
            Some(&node_netns),
            &ruleset,
            veilnet::netfilter::Flags::default(),
            "slow API rules",
        )
        .unwrap_or_else(|e| panic!("{e}:\n{ruleset}"));
        SlowApi {
            node_netns,
            stop,
            accepted,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// Connections the proxy has carried to the API server so far.
    fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Copies `client` → `upstream` with every chunk held `delay` (order kept, chunks pipelined),
/// and `upstream` → `client` as it comes, each direction on its own threads.
fn proxy_delayed(client: std::net::TcpStream, upstream: std::net::TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let mut from_client = client.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = std::io::Read::read(&mut from_client, &mut buf) {
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    let mut to_upstream = upstream.try_clone().unwrap();
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if std::io::Write::write_all(&mut to_upstream, &chunk).is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown(std::net::Shutdown::Write);
    });
    let (mut from_upstream, mut to_client) = (upstream, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_upstream, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for SlowApi {
    fn drop(&mut self) {
        let _ = veilnet::netfilter::nft::run(
            Some(&self.node_netns),
            &format!("delete table ip {SLOW_API_TABLE}"),
            veilnet::netfilter::Flags::default(),
            "remove the slow API rules",
        );
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_slow_api_2s_a_call_tears_nothing_down_and_changes_still_converge() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "k8sslow", &["--nodes", "2"]);
    let (_, b_ip) = two_pods(&lab);
    let before = settled_dataplane(&lab, 2);
    let a_netns = lab.pod_netns("default/a");
    let agent = lab.daemon_pid("agent-node-2");
    let log_from = lab.agent_log("node-2").len();

    // node-2's agent and kubelet lose their connections and come back through the slow proxy.
    let slow = SlowApi::start(&lab, 2, Duration::from_secs(2));
    eventually(
        Duration::from_secs(60),
        "node-2's clients reconnect through the slow API",
        || slow.connections() >= 2,
    );
    keeps_talking(
        &a_netns,
        &format!("{b_ip}:80"),
        Duration::from_secs(20),
        Duration::from_secs(4),
        "while node-2's API calls take 2 s",
    );
    assert_eq!(
        dataplane(&lab, 2),
        before,
        "a slow API changed a node's dataplane"
    );

    // Changes still reach node-2: a NetworkPolicy for its pod (its agent's watch), a new pod on
    // it (its kubelet's, then the CNI ADD through its agent).
    let started = Instant::now();
    isolating_b_is_enforced(&lab, &b_ip);
    let policy_took = started.elapsed();
    let started = Instant::now();
    new_pod_is_reachable(&lab, "node-2");
    let pod_took = started.elapsed();
    assert_eq!(
        lab.daemon_pid("agent-node-2"),
        agent,
        "the agent must ride out a slow API, not be restarted"
    );
    let through_proxy = slow.connections();

    // Back to a fast API: the agent reconnects directly and keeps up.
    drop(slow);
    lab.kubectl_ok(&["delete", "networkpolicy", "isolate-b"]);
    let started = Instant::now();
    eventually(Duration::from_secs(30), "a reaches b again", || {
        lab.connect("default/a", &format!("{b_ip}:80"), "tcp", "2s") == Some(0)
    });
    let unpolicy_took = started.elapsed();
    // kube-client logs each request a cut connection broke (at the reset that sent node-2
    // through the proxy, and at the proxy's end): a handful, not one per slow call. Anything
    // else at ERROR is the agent's own, and a slow API is no reason for one.
    let cut = |l: &str| l.contains("kube_client::client::builder") && l.contains("SendRequest");
    let errors = agent_lines_since(&lab, "node-2", log_from, |l| {
        l.contains("panicked") || l.contains("ERROR")
    });
    let (cuts, own): (Vec<_>, Vec<_>) = errors.into_iter().partition(|l| cut(l));
    assert!(
        own.is_empty(),
        "node-2's agent under a slow API:\n{}",
        own.join("\n")
    );
    assert!(cuts.len() <= 6, "requests broken:\n{}", cuts.join("\n"));
    eprintln!(
        "slow API (every request from node-2 held 2 s, {through_proxy} connections): a policy \
         for node-2's pod enforced after {:.1} s, a new pod on node-2 reachable after {:.1} s; \
         with the API fast again, the policy's removal took {:.1} s",
        policy_took.as_secs_f64(),
        pod_took.as_secs_f64(),
        unpolicy_took.as_secs_f64()
    );
}
