//! The lab on the real Kubernetes control plane (`veilnet lab up --control-plane kubernetes`):
//! kube-apiserver with TLS, client certificates, Node and RBAC authorization and NodeRestriction,
//! etcd, kube-controller-manager (node IPAM) and kube-scheduler, built by
//! scripts/build-kubernetes.sh. The lab kubelets talk as `system:node:<name>`, the agents as the
//! manifest's `veilnet` ServiceAccount. Needs root, and skips (saying why) when the binaries are
//! not built.

mod common;
mod manifest_docs;

use std::time::{Duration, Instant};

use common::*;
use veilnet::install::{ApiCall, Scope, AGENT_API_CALLS};
use veilnet_lab::control_plane::kubernetes::pinned_version;
use veilnet_lab::rbac::{self, grants_for};

/// The agent's namespace and ServiceAccount, as the manifest's DaemonSet runs it.
fn agent_identity() -> (String, String) {
    let ds = manifest_docs::daemonset();
    let ns = ds.metadata.namespace.clone().unwrap();
    let sa = ds
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    (ns, sa)
}

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
    denied("", "events", None, "create", Scope::OwnNamespace, None),
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

/// Resident memory (KiB) of a lab daemon, from its pid file.
fn rss_kib(lab: &Lab, role: &str) -> u64 {
    let pid = lab
        .daemon_pid(role)
        .unwrap_or_else(|| panic!("{role} is not running"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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
    // kube-controller-manager's node IPAM gave every node a pod CIDR from the cluster CIDR.
    for n in st["nodes"].as_array().unwrap() {
        let cidr = n["podCidr"].as_str().unwrap_or_else(|| panic!("{n}"));
        assert!(cidr.starts_with("10.244."), "{n}");
        assert_eq!(n["ready"], true, "{n}");
    }
    let rss: u64 = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .iter()
    .map(|r| {
        let kib = rss_kib(&lab, r);
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
    let (ns, sa) = agent_identity();
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
