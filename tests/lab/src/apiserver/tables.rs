//! `meta.k8s.io/v1` Tables, which `kubectl get` asks for: the same columns and cell formats the
//! real server's printers produce for these kinds (wide-only columns have priority 1).

use serde_json::{json, Value};

use super::meta;
use super::resources::{Kind, ResourceDef};

/// What each row carries in `object` (`includeObject`); the real default is Metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

struct Column {
    name: &'static str,
    kind: &'static str,
    format: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(
    name: &'static str,
    kind: &'static str,
    priority: u8,
    description: &'static str,
) -> Column {
    Column {
        name,
        kind,
        format: "",
        priority,
        description,
    }
}

const NAME: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace.",
};
/// The name as a wide-only column (events lead with their time instead).
const NAME_P1: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    priority: 1,
    description: "Name must be unique within a namespace.",
};
const AGE: Column = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(kind: Kind) -> Vec<Column> {
    match kind {
        Kind::Pod => vec![
            NAME,
            col("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
            col("Status", "string", 0, "The aggregate status of the containers in this pod."),
            col("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
            AGE,
            col("IP", "string", 1, "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated."),
            col("Node", "string", 1, "NodeName is a request to schedule this pod onto a specific node."),
            col("Nominated Node", "string", 1, "nominatedNodeName is set only when this pod preempts other pods on the node."),
            col("Readiness Gates", "string", 1, "If specified, all readiness gates will be evaluated for pod readiness."),
        ],
        Kind::Node => vec![
            NAME,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            AGE,
            col("Version", "string", 0, "Kubelet Version reported by the node."),
            col("Internal-IP", "string", 1, "List of internal IPs that are assigned to the node."),
            col("External-IP", "string", 1, "List of external IPs that are assigned to the node."),
            col("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy))."),
            col("Kernel-Version", "string", 1, "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64)."),
            col("Container-Runtime", "string", 1, "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2)."),
        ],
        Kind::Namespace => vec![NAME, col("Status", "string", 0, "The status of the namespace"), AGE],
        Kind::NetworkPolicy => vec![
            NAME,
            col("Pod-Selector", "string", 0, "Selects the pods to which this NetworkPolicy object applies."),
            AGE,
        ],
        Kind::ConfigMap => vec![NAME, col("Data", "string", 0, "Data contains the configuration data."), AGE],
        Kind::Lease => vec![NAME, col("Holder", "string", 0, "HolderIdentity contains the identity of the holder of a current lease."), AGE],
        Kind::CoreEvent => vec![
            col("Last Seen", "string", 0, "The time at which the most recent occurrence of this event was recorded."),
            col("Type", "string", 0, "Type of this event (Normal, Warning), new types could be added in the future."),
            col("Reason", "string", 0, "This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
            col("Object", "string", 0, "The object that this event is about."),
            col("Subobject", "string", 1, "The subobject (e.g. a container) that this event is about."),
            col("Source", "string", 1, "The component reporting this event."),
            col("Message", "string", 0, "A human-readable description of the status of this operation."),
            col("First Seen", "string", 1, "The time at which the event was first recorded."),
            col("Count", "string", 1, "The number of times this event has occurred."),
            NAME_P1,
        ],
        Kind::Service => vec![
            NAME,
            col("Type", "string", 0, "type determines how the Service is exposed. Defaults to ClusterIP."),
            col("Cluster-IP", "string", 0, "clusterIP is the IP address of the service and is usually assigned randomly."),
            col("External-IP", "string", 0, "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service."),
            col("Port(s)", "string", 0, "The list of ports that are exposed by this service."),
            AGE,
            col("Selector", "string", 1, "Route service traffic to pods with label keys and values matching this selector."),
        ],
        Kind::Event => vec![NAME, AGE],
        Kind::ServiceAccount => vec![
            NAME,
            col("Secrets", "string", 0, "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use."),
            AGE,
        ],
        Kind::DaemonSet => vec![
            NAME,
            col("Desired", "integer", 0, "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod)."),
            col("Current", "integer", 0, "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod."),
            col("Ready", "integer", 0, "numberReady is the number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition."),
            col("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon pod"),
            col("Available", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)"),
            col("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node."),
            AGE,
            col("Containers", "string", 1, "Names of each container in the template."),
            col("Images", "string", 1, "Images referenced by each container in the template."),
            col("Selector", "string", 1, "A label query over pods that are managed by the daemon set."),
        ],
        Kind::ClusterRole | Kind::Role => vec![
            NAME,
            Column { name: "Created At", kind: "date", format: "", priority: 0, description: "CreationTimestamp is a timestamp representing the server time when this object was created." },
        ],
        Kind::ClusterRoleBinding | Kind::RoleBinding => vec![
            NAME,
            col("Role", "string", 0, "Role references the Role or ClusterRole this binding grants."),
            AGE,
            col("Users", "string", 1, "Users in the binding"),
            col("Groups", "string", 1, "Groups in the binding"),
            col("ServiceAccounts", "string", 1, "ServiceAccounts in the binding"),
        ],
    }
}

/// kubectl's human-readable durations ("45s", "3m20s", "5h", "12d", "2y30d").
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        return match s % 60 {
            0 => format!("{minutes}m"),
            rem => format!("{minutes}m{rem}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            rem => format!("{hours}h{rem}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            rem => format!("{days}d{rem}h"),
        };
    }
    if days < 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if days < 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            rem => format!("{years}y{rem}d"),
        };
    }
    format!("{years}y")
}

fn age_of(timestamp: Option<&str>, now: jiff::Timestamp) -> String {
    match timestamp.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        Some(t) => human_duration(now.as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn age(obj: &Value, now: jiff::Timestamp) -> String {
    age_of(meta::str_at(obj, &["metadata", "creationTimestamp"]), now)
}

fn or_none(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "<none>".into(),
    }
}

fn list(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn pod_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let spec = obj.get("spec");
    let status = obj.get("status");
    let total = list(spec.and_then(|s| s.get("containers"))).len();
    let statuses = list(status.and_then(|s| s.get("containerStatuses")));
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready") == Some(&json!(true)))
        .count();
    let mut restarts = 0;
    let mut last_restart: Option<jiff::Timestamp> = None;
    let mut reason = meta::str_at(obj, &["status", "phase"])
        .unwrap_or("")
        .to_string();
    if let Some(r) = meta::str_at(obj, &["status", "reason"]).filter(|r| !r.is_empty()) {
        reason = r.to_string();
    }
    let mut has_running = false;
    for c in statuses.iter().rev() {
        restarts += c.get("restartCount").and_then(Value::as_i64).unwrap_or(0);
        if let Some(t) =
            meta::str_at(c, &["lastState", "terminated", "finishedAt"]).and_then(|t| t.parse().ok())
        {
            last_restart = Some(last_restart.map_or(t, |l: jiff::Timestamp| l.max(t)));
        }
        let state = c.get("state");
        if let Some(w) = meta::str_at(c, &["state", "waiting", "reason"]).filter(|r| !r.is_empty())
        {
            reason = w.to_string();
        } else if let Some(term) = state.and_then(|s| s.get("terminated")) {
            reason = match meta::str_at(term, &["reason"]).filter(|r| !r.is_empty()) {
                Some(r) => r.to_string(),
                None => match term
                    .get("signal")
                    .and_then(Value::as_i64)
                    .filter(|s| *s != 0)
                {
                    Some(sig) => format!("Signal:{sig}"),
                    None => format!(
                        "ExitCode:{}",
                        term.get("exitCode").and_then(Value::as_i64).unwrap_or(0)
                    ),
                },
            };
        } else if state.and_then(|s| s.get("running")).is_some()
            && c.get("ready") == Some(&json!(true))
        {
            has_running = true;
        }
    }
    if reason == "Completed" && has_running {
        reason = "Running".into();
    }
    if meta::is_deleting(obj) {
        reason = if meta::str_at(obj, &["status", "reason"]) == Some("NodeLost") {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let restarts = match last_restart {
        Some(t) if restarts > 0 => format!(
            "{restarts} ({} ago)",
            human_duration(now.as_second() - t.as_second())
        ),
        _ => restarts.to_string(),
    };
    let gates = list(spec.and_then(|s| s.get("readinessGates")));
    let gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = list(status.and_then(|s| s.get("conditions")));
        let passing = gates
            .iter()
            .filter(|g| {
                conditions.iter().any(|c| {
                    c.get("type") == g.get("conditionType")
                        && c.get("status") == Some(&json!("True"))
                })
            })
            .count();
        format!("{passing}/{}", gates.len())
    };
    vec![
        json!(meta::name(obj)),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        json!(age(obj, now)),
        json!(or_none(meta::str_at(obj, &["status", "podIP"]))),
        json!(or_none(meta::str_at(obj, &["spec", "nodeName"]))),
        json!(or_none(meta::str_at(obj, &["status", "nominatedNodeName"]))),
        json!(gates),
    ]
}

/// core/v1 Event rows as the real printer makes them: `Object` is `kind/name` in lower case.
fn event_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let last = meta::str_at(obj, &["lastTimestamp"])
        .or_else(|| meta::str_at(obj, &["eventTime"]))
        .or_else(|| meta::str_at(obj, &["metadata", "creationTimestamp"]));
    let first = meta::str_at(obj, &["firstTimestamp"])
        .or_else(|| meta::str_at(obj, &["eventTime"]))
        .or_else(|| meta::str_at(obj, &["metadata", "creationTimestamp"]));
    let kind = meta::str_at(obj, &["involvedObject", "kind"])
        .unwrap_or("")
        .to_lowercase();
    let name = meta::str_at(obj, &["involvedObject", "name"]).unwrap_or("");
    let source = [
        meta::str_at(obj, &["source", "component"]),
        meta::str_at(obj, &["source", "host"]),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    let count = obj.get("count").and_then(Value::as_i64).unwrap_or(1);
    vec![
        json!(age_of(last, now)),
        json!(meta::str_at(obj, &["type"]).unwrap_or("")),
        json!(meta::str_at(obj, &["reason"]).unwrap_or("")),
        json!(format!("{kind}/{name}")),
        json!(meta::str_at(obj, &["involvedObject", "fieldPath"]).unwrap_or("")),
        json!(source),
        json!(meta::str_at(obj, &["message"]).unwrap_or("")),
        json!(age_of(first, now)),
        json!(count),
        json!(meta::name(obj)),
    ]
}

fn node_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let conditions = list(meta::value_at(obj, &["status", "conditions"]));
    let mut status = match conditions
        .iter()
        .find(|c| c.get("type") == Some(&json!("Ready")))
    {
        Some(c) if c.get("status") == Some(&json!("True")) => "Ready".to_string(),
        Some(c) if c.get("status") == Some(&json!("False")) => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if meta::value_at(obj, &["spec", "unschedulable"]) == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = meta::labels(obj)
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| {
                    if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                        Some(role.to_string())
                    } else if k == "kubernetes.io/role" {
                        v.as_str().map(str::to_string)
                    } else {
                        None
                    }
                })
                .filter(|r| !r.is_empty())
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    roles.dedup();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };
    let addresses = list(meta::value_at(obj, &["status", "addresses"]));
    let address = |t: &str| {
        or_none(
            addresses
                .iter()
                .find(|a| a.get("type") == Some(&json!(t)))
                .and_then(|a| a.get("address"))
                .and_then(Value::as_str),
        )
    };
    let info = |k: &str| match meta::str_at(obj, &["status", "nodeInfo", k]) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "<unknown>".to_string(),
    };
    vec![
        json!(meta::name(obj)),
        json!(status),
        json!(roles),
        json!(age(obj, now)),
        json!(meta::str_at(obj, &["status", "nodeInfo", "kubeletVersion"]).unwrap_or("")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(info("osImage")),
        json!(info("kernelVersion")),
        json!(info("containerRuntimeVersion")),
    ]
}

/// `metav1.FormatLabelSelector`: requirements sorted by key, `<none>` when empty.
pub fn format_label_selector(sel: Option<&Value>) -> String {
    let mut reqs: Vec<(String, String)> = Vec::new();
    if let Some(labels) = sel
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
    {
        for (k, v) in labels {
            reqs.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or(""))));
        }
    }
    for e in list(sel.and_then(|s| s.get("matchExpressions"))) {
        let key = e
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut values: Vec<&str> = list(e.get("values"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        values.sort();
        let text = match e.get("operator").and_then(Value::as_str).unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other}"),
        };
        reqs.push((key, text));
    }
    reqs.sort();
    if reqs.is_empty() {
        "<none>".into()
    } else {
        reqs.into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn cells(kind: Kind, obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    match kind {
        Kind::Pod => pod_cells(obj, now),
        Kind::Node => node_cells(obj, now),
        Kind::Namespace => vec![
            json!(meta::name(obj)),
            json!(meta::str_at(obj, &["status", "phase"]).unwrap_or("")),
            json!(age(obj, now)),
        ],
        Kind::NetworkPolicy => vec![
            json!(meta::name(obj)),
            json!(format_label_selector(meta::value_at(
                obj,
                &["spec", "podSelector"]
            ))),
            json!(age(obj, now)),
        ],
        Kind::ConfigMap => {
            let n = ["data", "binaryData"]
                .iter()
                .filter_map(|k| obj.get(*k).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            vec![json!(meta::name(obj)), json!(n), json!(age(obj, now))]
        }
        Kind::Lease => vec![
            json!(meta::name(obj)),
            json!(meta::str_at(obj, &["spec", "holderIdentity"]).unwrap_or("")),
            json!(age(obj, now)),
        ],
        Kind::CoreEvent => event_cells(obj, now),
        Kind::Service => service_cells(obj, now),
        Kind::Event => {
            vec![json!(meta::name(obj)), json!(age(obj, now))]
        }
        Kind::ServiceAccount => vec![
            json!(meta::name(obj)),
            json!(list(obj.get("secrets")).len()),
            json!(age(obj, now)),
        ],
        Kind::DaemonSet => daemonset_cells(obj, now),
        Kind::ClusterRole | Kind::Role => vec![
            json!(meta::name(obj)),
            json!(meta::str_at(obj, &["metadata", "creationTimestamp"]).unwrap_or("")),
        ],
        Kind::ClusterRoleBinding | Kind::RoleBinding => binding_cells(obj, now),
    }
}

/// kubectl's printService: `<none>` where a field is empty, `<pending>` for a LoadBalancer
/// without ingress, ports as `80/TCP` or `80:30080/TCP`.
fn service_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let spec = obj.get("spec");
    let text = |f: &str| {
        spec.and_then(|s| s.get(f))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        list(v)
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let kind = text("type");
    let cluster_ip = strings(spec.and_then(|s| s.get("clusterIPs")))
        .into_iter()
        .next()
        .or_else(|| Some(text("clusterIP").to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "<none>".into());
    let external_ips = strings(spec.and_then(|s| s.get("externalIPs")));
    let external = match kind {
        "ExternalName" => text("externalName").to_string(),
        "LoadBalancer" => {
            let mut ips: Vec<String> =
                list(meta::value_at(obj, &["status", "loadBalancer", "ingress"]))
                    .iter()
                    .filter_map(|i| {
                        i.get("ip")
                            .or_else(|| i.get("hostname"))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .collect();
            ips.extend(external_ips);
            if ips.is_empty() {
                "<pending>".into()
            } else {
                ips.join(",")
            }
        }
        _ if external_ips.is_empty() => "<none>".into(),
        _ => external_ips.join(","),
    };
    let ports: Vec<String> = list(spec.and_then(|s| s.get("ports")))
        .iter()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p
                .get("nodePort")
                .and_then(Value::as_i64)
                .filter(|n| *n != 0)
            {
                Some(node) => format!("{port}:{node}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    let mut selector: Vec<String> = spec
        .and_then(|s| s.get("selector"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    selector.sort();
    vec![
        json!(meta::name(obj)),
        json!(kind),
        json!(cluster_ip),
        json!(external),
        json!(if ports.is_empty() {
            "<none>".to_string()
        } else {
            ports.join(",")
        }),
        json!(age(obj, now)),
        json!(if selector.is_empty() {
            "<none>".to_string()
        } else {
            selector.join(",")
        }),
    ]
}

fn daemonset_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let count = |field: &str| {
        meta::value_at(obj, &["status", field])
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let pod_spec = meta::value_at(obj, &["spec", "template", "spec"]);
    let node_selector = pod_spec
        .and_then(|s| s.get("nodeSelector"))
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let mut pairs: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            pairs.sort();
            pairs.join(",")
        })
        .unwrap_or_else(|| "<none>".into());
    let containers = list(pod_spec.and_then(|s| s.get("containers")));
    let field = |f: &str| {
        containers
            .iter()
            .map(|c| c.get(f).and_then(Value::as_str).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        json!(meta::name(obj)),
        json!(count("desiredNumberScheduled")),
        json!(count("currentNumberScheduled")),
        json!(count("numberReady")),
        json!(count("updatedNumberScheduled")),
        json!(count("numberAvailable")),
        json!(node_selector),
        json!(age(obj, now)),
        json!(field("name")),
        json!(field("image")),
        json!(format_label_selector(meta::value_at(
            obj,
            &["spec", "selector"]
        ))),
    ]
}

fn binding_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let role = format!(
        "{}/{}",
        meta::str_at(obj, &["roleRef", "kind"]).unwrap_or(""),
        meta::str_at(obj, &["roleRef", "name"]).unwrap_or("")
    );
    let subjects = |kind: &str| {
        list(obj.get("subjects"))
            .iter()
            .filter(|s| s.get("kind").and_then(Value::as_str) == Some(kind))
            .map(|s| {
                let name = s.get("name").and_then(Value::as_str).unwrap_or("");
                match s.get("namespace").and_then(Value::as_str) {
                    Some(ns) if kind == "ServiceAccount" => format!("{ns}/{name}"),
                    _ => name.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        json!(meta::name(obj)),
        json!(role),
        json!(age(obj, now)),
        json!(subjects("User")),
        json!(subjects("Group")),
        json!(subjects("ServiceAccount")),
    ]
}

/// `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A Table of `objects` (a list, or the single object of a get or watch event).
pub fn to_table<'a>(
    d: &ResourceDef,
    objects: impl IntoIterator<Item = &'a Value>,
    include: IncludeObject,
    list_meta: Value,
) -> Value {
    let now = jiff::Timestamp::now();
    let defs: Vec<Value> = columns(d.kind_id)
        .iter()
        .map(|c| json!({ "name": c.name, "type": c.kind, "format": c.format, "description": c.description, "priority": c.priority }))
        .collect();
    let rows: Vec<Value> = objects
        .into_iter()
        .map(|o| {
            let mut row = json!({ "cells": cells(d.kind_id, o, now) });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o),
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{def, id_of};

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(40 * 86400), "40d");
        assert_eq!(human_duration(-5), "<invalid>");
    }

    #[test]
    fn pod_rows() {
        let pod = json!({ "metadata": { "name": "web", "creationTimestamp": meta::now_rfc3339() },
            "spec": { "nodeName": "n1", "containers": [{ "name": "a" }, { "name": "b" }] },
            "status": { "phase": "Running", "podIP": "10.1.0.5", "containerStatuses": [
                { "name": "a", "ready": true, "restartCount": 1, "state": { "running": {} } },
                { "name": "b", "ready": false, "restartCount": 0, "state": { "waiting": { "reason": "CrashLoopBackOff" } } } ] } });
        let t = to_table(
            def(id_of(Kind::Pod)),
            [&pod],
            IncludeObject::Metadata,
            json!({}),
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "1");
        assert_eq!(cells[5], "10.1.0.5");
        assert_eq!(cells[6], "n1");
        assert_eq!(cells[7], "<none>");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }

    #[test]
    fn terminating_pods_say_so() {
        let pod = json!({ "metadata": { "name": "p", "deletionTimestamp": "2024-01-01T00:00:00Z" },
            "spec": { "containers": [{ "name": "a" }] }, "status": { "phase": "Running" } });
        assert_eq!(pod_cells(&pod, jiff::Timestamp::now())[2], "Terminating");
    }

    /// As `kubectl get svc -o wide` prints them on the real server (columns and cells).
    #[test]
    fn service_rows() {
        let svc = json!({ "metadata": { "name": "web" },
            "spec": { "type": "NodePort", "clusterIPs": ["10.96.0.10"], "selector": { "b": "2", "a": "1" },
                "ports": [{ "port": 80, "protocol": "TCP", "nodePort": 30080 }, { "port": 53, "protocol": "UDP" }] } });
        let t = to_table(
            def(id_of(Kind::Service)),
            [&svc],
            IncludeObject::None,
            json!({}),
        );
        let names: Vec<_> = list(Some(&t["columnDefinitions"]))
            .iter()
            .map(|c| c["name"].clone())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector"
            ]
        );
        let c = &t["rows"][0]["cells"];
        assert_eq!(c[1], "NodePort");
        assert_eq!(c[2], "10.96.0.10");
        assert_eq!(c[3], "<none>");
        assert_eq!(c[4], "80:30080/TCP,53/UDP");
        assert_eq!(c[6], "a=1,b=2");
        let lb = json!({ "metadata": { "name": "lb" }, "spec": { "type": "LoadBalancer" } });
        let c = service_cells(&lb, jiff::Timestamp::now());
        assert_eq!(
            (&c[2], &c[3], &c[4], &c[6]),
            (
                &json!("<none>"),
                &json!("<pending>"),
                &json!("<none>"),
                &json!("<none>")
            )
        );
    }

    #[test]
    fn node_rows() {
        let node = json!({ "metadata": { "name": "n1", "labels": { "node-role.kubernetes.io/control-plane": "" } },
            "spec": { "unschedulable": true },
            "status": { "conditions": [{ "type": "Ready", "status": "True" }],
                "addresses": [{ "type": "InternalIP", "address": "192.168.0.2" }],
                "nodeInfo": { "kubeletVersion": "v1.33.0", "osImage": "Debian", "kernelVersion": "6.1", "containerRuntimeVersion": "veil://1" } } });
        let c = node_cells(&node, jiff::Timestamp::now());
        assert_eq!(c[1], "Ready,SchedulingDisabled");
        assert_eq!(c[2], "control-plane");
        assert_eq!(c[4], "v1.33.0");
        assert_eq!(c[5], "192.168.0.2");
        assert_eq!(c[6], "<none>");
    }

    #[test]
    fn daemonset_and_rbac_rows() {
        let ds = json!({ "metadata": { "name": "veilnet" },
            "spec": { "selector": { "matchLabels": { "app": "v" } },
                "template": { "spec": { "nodeSelector": { "kubernetes.io/os": "linux" },
                    "containers": [{ "name": "agent", "image": "veilnet:1" }, { "name": "b", "image": "x" }] } } },
            "status": { "desiredNumberScheduled": 3, "numberReady": 2 } });
        let t = to_table(
            def(id_of(Kind::DaemonSet)),
            [&ds],
            IncludeObject::None,
            json!({}),
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "veilnet",
                3,
                0,
                2,
                0,
                0,
                "kubernetes.io/os=linux",
                "<unknown>",
                "agent,b",
                "veilnet:1,x",
                "app=v"
            ])
        );
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 11);
        let rb = json!({ "metadata": { "name": "b" },
            "roleRef": { "kind": "ClusterRole", "name": "veilnet" },
            "subjects": [{ "kind": "ServiceAccount", "name": "veilnet", "namespace": "veilnet-system" },
                         { "kind": "User", "name": "alice" }] });
        let c = binding_cells(&rb, jiff::Timestamp::now());
        assert_eq!(c[1], "ClusterRole/veilnet");
        assert_eq!(c[3], "alice");
        assert_eq!(c[5], "veilnet-system/veilnet");
        let role =
            json!({ "metadata": { "name": "r", "creationTimestamp": "2024-01-01T00:00:00Z" } });
        assert_eq!(
            cells(Kind::Role, &role, jiff::Timestamp::now())[1],
            "2024-01-01T00:00:00Z"
        );
    }

    #[test]
    fn label_selector_format() {
        assert_eq!(format_label_selector(Some(&json!({}))), "<none>");
        let sel = json!({ "matchLabels": { "b": "2", "a": "1" }, "matchExpressions": [{ "key": "c", "operator": "In", "values": ["y", "x"] }] });
        assert_eq!(format_label_selector(Some(&sel)), "a=1,b=2,c in (x,y)");
    }
}
