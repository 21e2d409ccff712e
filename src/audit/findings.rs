//! The auditor: API objects in, findings out. Pure, so every rule is unit-tested on hand-built
//! objects, including ones with fields missing.
//!
//! What it looks for, and why each matters to a veilnet cluster:
//! - pods that leave the pod network (`hostNetwork`): NetworkPolicy and the spoofing guards never
//!   see their traffic;
//! - pods that can forge packets: `privileged`, or `NET_RAW` / `NET_ADMIN` / `SYS_ADMIN` added,
//!   or `NET_RAW` not dropped (container runtimes grant it by default, and it is what ARP and DNS
//!   spoofing need);
//! - pods that open a node port (`hostPort`);
//! - namespaces with no NetworkPolicy, and pods no policy selects: both accept traffic from
//!   anywhere;
//! - nodes whose pod traffic with some peer crosses the wire in plaintext.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, SecurityContext};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::model::annotations;
use crate::model::encryption::Mode;
use crate::policy::Selector;

/// Namespaces skipped unless asked for: the control plane's own, and veilnet's (its agent needs
/// `hostNetwork` and `NET_ADMIN` to do its job).
pub const SYSTEM_NAMESPACES: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "veilnet-system",
];

/// Capabilities that let a container forge or redirect traffic; `ALL` includes them.
const RISKY_CAPABILITIES: &[&str] = &["NET_RAW", "NET_ADMIN", "SYS_ADMIN"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    HostNetwork,
    Privileged,
    AddedCapability,
    NetRawNotDropped,
    HostPort,
    NamespaceWithoutPolicy,
    PodNotSelected,
    InvalidPolicy,
    PlaintextNode,
    UnpublishedNode,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HostNetwork => "host-network",
            Kind::Privileged => "privileged",
            Kind::AddedCapability => "added-capability",
            Kind::NetRawNotDropped => "net-raw-not-dropped",
            Kind::HostPort => "host-port",
            Kind::NamespaceWithoutPolicy => "namespace-without-policy",
            Kind::PodNotSelected => "pod-not-selected",
            Kind::InvalidPolicy => "invalid-policy",
            Kind::PlaintextNode => "plaintext-node",
            Kind::UnpublishedNode => "unpublished-node",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing found: the object (`Pod ns/name`, `Namespace name`, `Node name`,
/// `NetworkPolicy ns/name`), what it risks, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub object: String,
    pub risk: String,
    pub fix: String,
}

/// The whole audit: the findings (sorted by kind, then object) and what was looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub findings: Vec<Finding>,
    pub pods_audited: usize,
    pub namespaces_audited: usize,
    pub nodes_audited: usize,
    /// Running pods in [`SYSTEM_NAMESPACES`] that were not audited (see `include_system`).
    pub system_pods_skipped: usize,
}

/// What the auditor reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs<'a> {
    pub pods: &'a [Pod],
    pub namespaces: &'a [Namespace],
    pub policies: &'a [NetworkPolicy],
    pub nodes: &'a [Node],
    /// Audit [`SYSTEM_NAMESPACES`] too.
    pub include_system: bool,
}

/// Audits the cluster. Objects with missing fields are read as the API server would default them
/// (no spec: no containers; no name: shown as `<unnamed>`); nothing here panics on them.
pub fn audit(inputs: Inputs<'_>) -> Report {
    let audited_ns = |ns: &str| inputs.include_system || !SYSTEM_NAMESPACES.contains(&ns);
    let mut report = Report::default();

    // Policies by namespace, their pod selectors compiled once; a selector that cannot be read is
    // a finding (the enforcer skips such a policy, so it protects nothing).
    let mut selectors: BTreeMap<&str, Vec<Selector>> = BTreeMap::new();
    for policy in inputs.policies {
        // The enforcer skips policies without a namespace or name, so they protect nothing.
        let (Some(ns), Some(_)) = (&policy.metadata.namespace, &policy.metadata.name) else {
            continue;
        };
        let ns = ns.as_str();
        if !audited_ns(ns) {
            continue;
        }
        let entry = selectors.entry(ns).or_default();
        let pod_selector = policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref());
        match Selector::compile(pod_selector) {
            Ok(s) => entry.push(s),
            Err(e) => report.findings.push(Finding {
                kind: Kind::InvalidPolicy,
                object: format!("NetworkPolicy {ns}/{}", name(&policy.metadata.name)),
                risk: format!(
                    "its podSelector cannot be read ({e}): it selects and protects no pod"
                ),
                fix: "correct the selector (matchLabels values, matchExpressions operators)".into(),
            }),
        }
    }

    // Namespaces without any policy: one finding each, instead of one per pod in them.
    let mut pods_by_ns: BTreeMap<&str, usize> = BTreeMap::new();
    let running: Vec<&Pod> = inputs.pods.iter().filter(|p| !finished(p)).collect();
    for pod in &running {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        if audited_ns(ns) {
            *pods_by_ns.entry(ns).or_default() += 1;
        } else {
            report.system_pods_skipped += 1;
        }
    }
    let mut namespaces: BTreeSet<&str> = inputs
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .filter(|n| audited_ns(n))
        .collect();
    // A pod's namespace counts even if the namespace object was not readable.
    namespaces.extend(pods_by_ns.keys());
    report.namespaces_audited = namespaces.len();
    for ns in &namespaces {
        if selectors.contains_key(ns) {
            continue;
        }
        let pods = pods_by_ns.get(ns).copied().unwrap_or(0);
        report.findings.push(Finding {
            kind: Kind::NamespaceWithoutPolicy,
            object: format!("Namespace {ns}"),
            risk: format!(
                "no NetworkPolicy: its {pods} pod(s) and every pod created there accept \
                 connections from any pod and host"
            ),
            fix: "add a default-deny NetworkPolicy (podSelector: {}, policyTypes: [Ingress, \
                  Egress]) and allow what each workload needs"
                .into(),
        });
    }

    for pod in running {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        if !audited_ns(ns) {
            continue;
        }
        report.pods_audited += 1;
        audit_pod(pod, selectors.get(ns), &mut report.findings);
    }

    report.nodes_audited = inputs.nodes.len();
    audit_nodes(inputs.nodes, &mut report.findings);
    report.findings.sort();
    report
}

fn name(n: &Option<String>) -> &str {
    n.as_deref().unwrap_or("<unnamed>")
}

/// Succeeded and Failed pods run nothing and hold no address.
fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A container of any of the three lists, reduced to what the checks read.
struct ContainerView<'a> {
    name: &'a str,
    security: Option<&'a SecurityContext>,
    host_ports: Vec<i32>,
}

fn containers(pod: &Pod) -> Vec<ContainerView<'_>> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let regular = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| ContainerView {
            name: &c.name,
            security: c.security_context.as_ref(),
            host_ports: c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.host_port.filter(|&h| h > 0))
                .collect(),
        });
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| ContainerView {
            name: &c.name,
            security: c.security_context.as_ref(),
            host_ports: Vec::new(),
        });
    regular.chain(ephemeral).collect()
}

/// `CAP_net_raw` and `NET_RAW` are the same capability to the runtime.
fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

fn capability_list(security: Option<&SecurityContext>, added: bool) -> Vec<String> {
    security
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| {
            if added {
                c.add.as_ref()
            } else {
                c.drop.as_ref()
            }
        })
        .map(|l| l.iter().map(|c| capability(c)).collect())
        .unwrap_or_default()
}

fn audit_pod(pod: &Pod, selectors: Option<&Vec<Selector>>, out: &mut Vec<Finding>) {
    let object = format!(
        "Pod {}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        name(&pod.metadata.name)
    );
    let mut found = |kind: Kind, risk: String, fix: &str| {
        out.push(Finding {
            kind,
            object: object.clone(),
            risk,
            fix: fix.to_string(),
        })
    };
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network {
        found(
            Kind::HostNetwork,
            "runs in its node's network namespace: NetworkPolicy does not apply to it, veilnet's \
             spoofing guards do not see its traffic, and it can reach every local pod and the \
             node's own services"
                .into(),
            "remove hostNetwork: true (expose it through a Service instead)",
        );
    }

    let views = containers(pod);
    let joined = |names: Vec<&str>| names.join(", ");
    let privileged: Vec<&str> = views
        .iter()
        .filter(|c| c.security.and_then(|s| s.privileged).unwrap_or(false))
        .map(|c| c.name)
        .collect();
    if !privileged.is_empty() {
        found(
            Kind::Privileged,
            format!(
                "container(s) {} privileged: every capability and the host's devices, so it can \
                 forge any packet and change the node's network",
                joined(privileged.clone())
            ),
            "set securityContext.privileged: false",
        );
    }
    let mut added = Vec::new();
    let mut raw_kept = Vec::new();
    for c in views.iter().filter(|c| !privileged.contains(&c.name)) {
        let add = capability_list(c.security, true);
        let risky: Vec<&str> = RISKY_CAPABILITIES
            .iter()
            .copied()
            .filter(|r| add.iter().any(|a| a == r || a == "ALL"))
            .collect();
        if !risky.is_empty() {
            added.push(format!("{} adds {}", c.name, risky.join(", ")));
        } else {
            let drop = capability_list(c.security, false);
            if !drop.iter().any(|d| d == "NET_RAW" || d == "ALL") {
                raw_kept.push(c.name);
            }
        }
    }
    if !added.is_empty() {
        found(
            Kind::AddedCapability,
            format!(
                "{}: raw sockets and network administration let it spoof ARP, DNS and other pods' \
                 addresses, and sniff or redirect traffic",
                added.join("; ")
            ),
            "remove them from securityContext.capabilities.add",
        );
    }
    if !raw_kept.is_empty() {
        found(
            Kind::NetRawNotDropped,
            format!(
                "container(s) {} keep NET_RAW, which container runtimes grant by default: raw \
                 sockets are what ARP and DNS spoofing need",
                joined(raw_kept)
            ),
            "add securityContext.capabilities.drop: [\"ALL\"] (or at least NET_RAW) to each \
             container",
        );
    }
    let host_ports: Vec<String> = views
        .iter()
        .flat_map(|c| c.host_ports.iter().map(move |p| format!("{}:{p}", c.name)))
        .collect();
    if !host_ports.is_empty() {
        found(
            Kind::HostPort,
            format!(
                "hostPort {} opens the port on its node's address to anything that reaches the \
                 node, outside any Service",
                host_ports.join(", ")
            ),
            "remove hostPort and expose the port through a Service",
        );
    }

    // Policy never selects host-network pods; namespaces without policies were reported whole.
    if let Some(selectors) = selectors.filter(|_| !host_network) {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selectors.iter().any(|s| s.matches(&labels)) {
            found(
                Kind::PodNotSelected,
                "no NetworkPolicy in its namespace selects it: it accepts connections from any \
                 pod and host, and may connect anywhere"
                    .into(),
                "select it from a policy (a namespace-wide default deny selects every pod)",
            );
        }
    }
}

/// The encryption mode a node's agent published (and applies), if it published one we can read.
fn published_mode(node: &Node) -> Option<Mode> {
    node.metadata
        .annotations
        .as_ref()?
        .get(annotations::ENCRYPTION_MODE)?
        .parse()
        .ok()
}

/// A node that does not encrypt sends its pod traffic in plaintext to every peer that is not
/// strict (a strict peer blocks the pair instead). One finding per such node, naming the peers:
/// the fix is on the node.
fn audit_nodes(nodes: &[Node], out: &mut Vec<Finding>) {
    let modes: Vec<(&str, Option<Mode>)> = nodes
        .iter()
        .map(|n| (name(&n.metadata.name), published_mode(n)))
        .collect();
    for &(node, mode) in &modes {
        match mode {
            None => out.push(Finding {
                kind: Kind::UnpublishedNode,
                object: format!("Node {node}"),
                risk: format!(
                    "no veilnet agent published a readable encryption mode \
                     ({}): whether its pod traffic is encrypted is unknown",
                    annotations::ENCRYPTION_MODE
                ),
                fix: "check the veilnet-agent pod on this node (`kubectl veilnet doctor --node \
                      NAME`)"
                    .into(),
            }),
            Some(Mode::Off) => {
                let plaintext: Vec<&str> = modes
                    .iter()
                    .filter(|(peer, m)| *peer != node && matches!(m, Some(Mode::Off | Mode::On)))
                    .map(|(peer, _)| *peer)
                    .collect();
                if plaintext.is_empty() {
                    continue;
                }
                out.push(Finding {
                    kind: Kind::PlaintextNode,
                    object: format!("Node {node}"),
                    risk: format!(
                        "encryption is off: pod traffic with {} peer(s) ({}) crosses the wire \
                         in plaintext",
                        plaintext.len(),
                        shown_list(&plaintext)
                    ),
                    fix: format!(
                        "kubectl label node {node} {}=on --overwrite (or strict)",
                        annotations::ENCRYPTION_LABEL
                    ),
                });
            }
            Some(Mode::On | Mode::Strict) => {}
        }
    }
}

/// At most 10 names, then how many more.
fn shown_list(names: &[&str]) -> String {
    const SHOWN: usize = 10;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn ns(name: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    }

    fn deny_all(ns: &str) -> NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "deny", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap()
    }

    fn node(name: &str, mode: Option<&str>) -> Node {
        let annotations = mode
            .map(|m| json!({annotations::ENCRYPTION_MODE: m}))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))
            .unwrap()
    }

    /// A container that drops ALL: clean.
    fn clean(name: &str) -> serde_json::Value {
        json!({"name": name, "image": "i", "securityContext": {"capabilities": {"drop": ["ALL"]}}})
    }

    fn kinds(report: &Report) -> Vec<(Kind, String)> {
        report
            .findings
            .iter()
            .map(|f| (f.kind, f.object.clone()))
            .collect()
    }

    fn run(pods: &[Pod], namespaces: &[Namespace], policies: &[NetworkPolicy]) -> Report {
        audit(Inputs {
            pods,
            namespaces,
            policies,
            nodes: &[],
            include_system: false,
        })
    }

    #[test]
    fn a_clean_namespace_has_no_findings() {
        let pods = [pod(json!({"metadata": {"name": "a", "namespace": "app"},
            "spec": {"containers": [clean("c")], "initContainers": [clean("init")]}}))];
        let report = run(&pods, &[ns("app")], &[deny_all("app")]);
        assert_eq!(kinds(&report), vec![]);
        assert_eq!(report.pods_audited, 1);
        assert_eq!(report.namespaces_audited, 1);
    }

    #[test]
    fn each_risky_pod_setting_is_found_with_its_containers() {
        let pods = [
            pod(json!({"metadata": {"name": "host", "namespace": "app"},
                "spec": {"hostNetwork": true, "containers": [clean("c")]}})),
            pod(json!({"metadata": {"name": "priv", "namespace": "app"},
                "spec": {"containers": [{"name": "p", "image": "i",
                    "securityContext": {"privileged": true}}]}})),
            pod(json!({"metadata": {"name": "raw", "namespace": "app"},
                "spec": {"containers": [{"name": "r", "image": "i", "securityContext":
                    {"capabilities": {"add": ["cap_net_raw", "NET_ADMIN"], "drop": ["ALL"]}}}]}})),
            pod(json!({"metadata": {"name": "kept", "namespace": "app"},
                "spec": {"containers": [clean("ok"), {"name": "default", "image": "i"}]}})),
            pod(json!({"metadata": {"name": "port", "namespace": "app"},
                "spec": {"containers": [{"name": "web", "image": "i",
                    "securityContext": {"capabilities": {"drop": ["NET_RAW"]}},
                    "ports": [{"containerPort": 80, "hostPort": 8080}]}]}})),
        ];
        let report = run(&pods, &[ns("app")], &[deny_all("app")]);
        assert_eq!(
            kinds(&report),
            vec![
                (Kind::HostNetwork, "Pod app/host".into()),
                (Kind::Privileged, "Pod app/priv".into()),
                (Kind::AddedCapability, "Pod app/raw".into()),
                (Kind::NetRawNotDropped, "Pod app/kept".into()),
                (Kind::HostPort, "Pod app/port".into()),
            ]
        );
        let text = |k: Kind| {
            let f = report.findings.iter().find(|f| f.kind == k).unwrap();
            format!("{} / {}", f.risk, f.fix)
        };
        assert!(
            text(Kind::AddedCapability).contains("r adds NET_RAW, NET_ADMIN"),
            "{}",
            text(Kind::AddedCapability)
        );
        assert!(text(Kind::NetRawNotDropped).starts_with("container(s) default keep"));
        assert!(text(Kind::HostPort).contains("web:8080"));
    }

    #[test]
    fn adding_all_counts_as_adding_each_risky_capability() {
        let pods = [pod(json!({"metadata": {"name": "all", "namespace": "app"},
            "spec": {"containers": [{"name": "c", "image": "i",
                "securityContext": {"capabilities": {"add": ["ALL"]}}}]}}))];
        let report = run(&pods, &[ns("app")], &[deny_all("app")]);
        assert_eq!(report.findings.len(), 1, "{:?}", report.findings);
        assert!(report.findings[0]
            .risk
            .contains("adds NET_RAW, NET_ADMIN, SYS_ADMIN"));
    }

    #[test]
    fn policies_decide_namespace_and_pod_findings() {
        let pods = [
            pod(json!({"metadata": {"name": "a", "namespace": "open"},
                "spec": {"containers": [clean("c")]}})),
            pod(
                json!({"metadata": {"name": "web", "namespace": "part", "labels": {"app": "web"}},
                "spec": {"containers": [clean("c")]}}),
            ),
            pod(
                json!({"metadata": {"name": "db", "namespace": "part", "labels": {"app": "db"}},
                "spec": {"containers": [clean("c")]}}),
            ),
            // Host-network pods are never selected: only the host-network finding.
            pod(json!({"metadata": {"name": "h", "namespace": "part"},
                "spec": {"hostNetwork": true, "containers": [clean("c")]}})),
            // Finished pods run nothing.
            pod(json!({"metadata": {"name": "done", "namespace": "part"},
                "spec": {"hostNetwork": true, "containers": [clean("c")]},
                "status": {"phase": "Succeeded"}})),
        ];
        let web_only: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "part"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}}
        }))
        .unwrap();
        let report = run(&pods, &[ns("open"), ns("part"), ns("empty")], &[web_only]);
        assert_eq!(
            kinds(&report),
            vec![
                (Kind::HostNetwork, "Pod part/h".into()),
                (Kind::NamespaceWithoutPolicy, "Namespace empty".into()),
                (Kind::NamespaceWithoutPolicy, "Namespace open".into()),
                (Kind::PodNotSelected, "Pod part/db".into()),
            ]
        );
        assert!(report.findings[1].risk.contains("its 0 pod(s)"));
        assert!(report.findings[2].risk.contains("its 1 pod(s)"));
        assert_eq!(report.pods_audited, 4);
    }

    #[test]
    fn system_namespaces_are_skipped_unless_included() {
        let pods = [pod(
            json!({"metadata": {"name": "agent", "namespace": "veilnet-system"},
            "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "i"}]}}),
        )];
        let namespaces = [ns("veilnet-system")];
        let report = run(&pods, &namespaces, &[]);
        assert_eq!(kinds(&report), vec![]);
        assert_eq!(report.system_pods_skipped, 1);
        let all = audit(Inputs {
            pods: &pods,
            namespaces: &namespaces,
            include_system: true,
            ..Default::default()
        });
        assert_eq!(
            kinds(&all),
            vec![
                (Kind::HostNetwork, "Pod veilnet-system/agent".into()),
                (Kind::NetRawNotDropped, "Pod veilnet-system/agent".into()),
                (
                    Kind::NamespaceWithoutPolicy,
                    "Namespace veilnet-system".into()
                ),
            ]
        );
    }

    #[test]
    fn objects_with_missing_fields_are_read_without_panicking() {
        let pods = [
            pod(json!({})),
            pod(json!({"metadata": {"namespace": "app"}})),
            pod(json!({"metadata": {"name": "x", "namespace": "app"},
                "spec": {"containers": [{"name": "c", "securityContext": {"capabilities": {}}}]}})),
        ];
        let policies: Vec<NetworkPolicy> = vec![
            serde_json::from_value(json!({"metadata": {"namespace": "app"}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "bad", "namespace": "app"},
                "spec": {"podSelector": {"matchExpressions":
                    [{"key": "a", "operator": "Sideways"}]}}}))
            .unwrap(),
        ];
        let nodes = [node("n1", None), serde_json::from_value(json!({})).unwrap()];
        let report = audit(Inputs {
            pods: &pods,
            namespaces: &[serde_json::from_value(json!({})).unwrap()],
            policies: &policies,
            nodes: &nodes,
            include_system: false,
        });
        let found = kinds(&report);
        assert!(found.contains(&(Kind::InvalidPolicy, "NetworkPolicy app/bad".into())));
        assert!(found.contains(&(Kind::NetRawNotDropped, "Pod app/x".into())));
        assert!(found.contains(&(Kind::UnpublishedNode, "Node n1".into())));
        assert!(found.contains(&(Kind::UnpublishedNode, "Node <unnamed>".into())));
    }

    #[test]
    fn an_off_node_is_found_with_its_plaintext_peers_but_not_its_strict_ones() {
        let nodes = [
            node("a", Some("off")),
            node("b", Some("on")),
            node("c", Some("strict")),
            node("d", Some("off")),
        ];
        let report = audit(Inputs {
            nodes: &nodes,
            ..Default::default()
        });
        assert_eq!(
            kinds(&report),
            vec![
                (Kind::PlaintextNode, "Node a".into()),
                (Kind::PlaintextNode, "Node d".into()),
            ]
        );
        assert!(report.findings[0].risk.contains("2 peer(s) (b, d)"));
        assert!(report.findings[0]
            .fix
            .contains("kubectl label node a veilnet.io/encryption=on"));
        let encrypted = [node("a", Some("on")), node("b", Some("strict"))];
        let clean = audit(Inputs {
            nodes: &encrypted,
            ..Default::default()
        });
        assert_eq!(kinds(&clean), vec![]);
        // An off node whose only peers are strict is blocked, not plaintext.
        let blocked = [node("a", Some("off")), node("b", Some("strict"))];
        assert_eq!(
            kinds(&audit(Inputs {
                nodes: &blocked,
                ..Default::default()
            })),
            vec![]
        );
    }

    #[test]
    fn long_peer_lists_are_shortened() {
        let names: Vec<String> = (0..13).map(|i| format!("n{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(
            shown_list(&refs),
            "n0, n1, n2, n3, n4, n5, n6, n7, n8, n9 and 3 more"
        );
    }
}
