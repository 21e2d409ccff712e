//! Kind-specific behaviour: decoding through the k8s-openapi types (which both validates the
//! shape and prunes unknown fields, as the real server does), required-field validation (422),
//! defaulting, and the update rules of pods.

use k8s_openapi::api;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::errors::{ApiError, Cause};
use super::meta;
use super::resources::{Kind, ResourceDef};

/// The `fieldValidation` query parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<Self, ApiError> {
        match s {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other}; must be one of Ignore, Warn, Strict"
            ))),
        }
    }
}

/// A decoded object plus the warnings to send back in `Warning` headers.
#[derive(Debug)]
pub struct Decoded {
    pub object: Value,
    pub warnings: Vec<String>,
}

fn roundtrip<T: DeserializeOwned + Serialize>(raw: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Paths present (non-null) in `input` but dropped by the typed round trip: unknown fields.
fn unknown_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown_fields(v, ov, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                unknown_fields(iv, ov, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Decodes `raw` (which already carries the right apiVersion/kind) as the resource's type.
pub fn decode(def: &ResourceDef, raw: &Value, mode: FieldValidation) -> Result<Decoded, ApiError> {
    let out = match def.kind_id {
        Kind::Namespace => roundtrip::<api::core::v1::Namespace>(raw),
        Kind::Node => roundtrip::<api::core::v1::Node>(raw),
        Kind::Pod => roundtrip::<api::core::v1::Pod>(raw),
        Kind::ConfigMap => roundtrip::<api::core::v1::ConfigMap>(raw),
        Kind::CoreEvent => roundtrip::<api::core::v1::Event>(raw),
        Kind::Service => roundtrip::<api::core::v1::Service>(raw),
        Kind::Lease => roundtrip::<api::coordination::v1::Lease>(raw),
        Kind::NetworkPolicy => roundtrip::<api::networking::v1::NetworkPolicy>(raw),
        Kind::Event => roundtrip::<api::events::v1::Event>(raw),
        Kind::ServiceAccount => roundtrip::<api::core::v1::ServiceAccount>(raw),
        Kind::DaemonSet => roundtrip::<api::apps::v1::DaemonSet>(raw),
        Kind::ClusterRole => roundtrip::<api::rbac::v1::ClusterRole>(raw),
        Kind::ClusterRoleBinding => roundtrip::<api::rbac::v1::ClusterRoleBinding>(raw),
        Kind::Role => roundtrip::<api::rbac::v1::Role>(raw),
        Kind::RoleBinding => roundtrip::<api::rbac::v1::RoleBinding>(raw),
    };
    let object = out.map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            def.kind, def.version, def.kind
        ))
    })?;
    let mut unknown = Vec::new();
    if mode != FieldValidation::Ignore {
        unknown_fields(raw, &object, "", &mut unknown);
    }
    let warnings: Vec<String> = unknown
        .iter()
        .map(|p| format!("unknown field \"{p}\""))
        .collect();
    if mode == FieldValidation::Strict && !warnings.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            def.kind,
            def.version,
            def.kind,
            warnings.join(", ")
        )));
    }
    Ok(Decoded { object, warnings })
}

// ---------------------------------------------------------------------------------------------
// Validation (422 Invalid). Runs on the raw JSON before typed decoding, so that a missing
// required field is reported as the real server does ("Required value") rather than as a decode
// error; every accessor therefore tolerates wrong types.

fn arr(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn validate_labels_and_annotations(obj: &Value, causes: &mut Vec<Cause>) {
    if let Some(labels) = meta::labels(obj) {
        for (k, v) in labels {
            if let Some(e) = meta::qualified_name_error(k) {
                causes.push(Cause::invalid("metadata.labels", &json!(k), e));
            }
            match v.as_str() {
                Some(s) => {
                    if let Some(e) = meta::label_value_error(s) {
                        causes.push(Cause::invalid("metadata.labels", v, e));
                    }
                }
                None => causes.push(Cause::invalid("metadata.labels", v, "must be a string")),
            }
        }
    }
    if let Some(ann) = meta::value_at(obj, &["metadata", "annotations"]).and_then(Value::as_object)
    {
        for k in ann.keys() {
            if let Some(e) = meta::qualified_name_error(k) {
                causes.push(Cause::invalid("metadata.annotations", &json!(k), e));
            }
        }
    }
}

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

fn validate_port_number(field: String, v: &Value, causes: &mut Vec<Cause>) {
    match v.as_i64() {
        Some(n) if (1..=65535).contains(&n) => {}
        Some(_) => causes.push(Cause::invalid(
            field,
            v,
            "must be between 1 and 65535, inclusive",
        )),
        None => {}
    }
}

fn validate_containers(
    list: &[Value],
    field: &str,
    seen: &mut Vec<String>,
    causes: &mut Vec<Cause>,
) {
    for (i, c) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match c.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required(format!("{f}.name"))),
            Some(n) => {
                if let Some(e) = meta::dns1123_label_error(n) {
                    causes.push(Cause::invalid(format!("{f}.name"), &json!(n), e));
                }
                if seen.iter().any(|s| s == n) {
                    causes.push(Cause::duplicate(format!("{f}.name"), &json!(n)));
                }
                seen.push(n.to_string());
            }
        }
        match c.get("image").and_then(Value::as_str) {
            Some(s) if !s.trim().is_empty() => {}
            _ => causes.push(Cause::required(format!("{f}.image"))),
        }
        for (j, p) in arr(c.get("ports")).iter().enumerate() {
            let pf = format!("{f}.ports[{j}]");
            match p.get("containerPort") {
                None => causes.push(Cause::required(format!("{pf}.containerPort"))),
                Some(v) => validate_port_number(format!("{pf}.containerPort"), v, causes),
            }
            if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
                if !PROTOCOLS.contains(&proto) {
                    causes.push(Cause::unsupported(
                        format!("{pf}.protocol"),
                        &json!(proto),
                        PROTOCOLS,
                    ));
                }
            }
        }
    }
}

fn validate_pod(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    let containers = arr(spec.and_then(|s| s.get("containers")));
    if containers.is_empty() {
        causes.push(Cause::required("spec.containers"));
    }
    let mut seen = Vec::new();
    validate_containers(containers, "spec.containers", &mut seen, causes);
    let init = arr(spec.and_then(|s| s.get("initContainers")));
    validate_containers(init, "spec.initContainers", &mut seen, causes);
    if let Some(rp) = spec
        .and_then(|s| s.get("restartPolicy"))
        .and_then(Value::as_str)
    {
        const POLICIES: &[&str] = &["Always", "OnFailure", "Never"];
        if !POLICIES.contains(&rp) {
            causes.push(Cause::unsupported(
                "spec.restartPolicy",
                &json!(rp),
                POLICIES,
            ));
        }
    }
    if let Some(node) = spec.and_then(|s| s.get("nodeName")).and_then(Value::as_str) {
        if !node.is_empty() {
            if let Some(e) = meta::dns1123_subdomain_error(node) {
                causes.push(Cause::invalid("spec.nodeName", &json!(node), e));
            }
        }
    }
}

fn validate_network_policy(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    const TYPES: &[&str] = &["Ingress", "Egress"];
    for (i, t) in arr(spec.and_then(|s| s.get("policyTypes")))
        .iter()
        .enumerate()
    {
        if !t.as_str().is_some_and(|t| TYPES.contains(&t)) {
            causes.push(Cause::unsupported(
                format!("spec.policyTypes[{i}]"),
                t,
                TYPES,
            ));
        }
    }
    for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in arr(spec.and_then(|s| s.get(dir))).iter().enumerate() {
            let rf = format!("spec.{dir}[{i}]");
            for (j, p) in arr(rule.get("ports")).iter().enumerate() {
                let pf = format!("{rf}.ports[{j}]");
                if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
                    if !PROTOCOLS.contains(&proto) {
                        causes.push(Cause::unsupported(
                            format!("{pf}.protocol"),
                            &json!(proto),
                            PROTOCOLS,
                        ));
                    }
                }
                if let Some(port) = p.get("port").filter(|v| v.is_number()) {
                    validate_port_number(format!("{pf}.port"), port, causes);
                }
                if let Some(end) = p.get("endPort") {
                    validate_port_number(format!("{pf}.endPort"), end, causes);
                    if !p.get("port").is_some_and(Value::is_number) {
                        causes.push(Cause::required(format!("{pf}.port")));
                    } else if end.as_i64() < p.get("port").and_then(Value::as_i64) {
                        causes.push(Cause::invalid(
                            format!("{pf}.endPort"),
                            end,
                            "must be greater than or equal to `port`",
                        ));
                    }
                }
            }
            for (j, peer) in arr(rule.get(peers_key)).iter().enumerate() {
                let Some(block) = peer.get("ipBlock") else {
                    continue;
                };
                let bf = format!("{rf}.{peers_key}[{j}].ipBlock");
                let cidr = block.get("cidr").and_then(Value::as_str).unwrap_or("");
                if cidr.is_empty() {
                    causes.push(Cause::required(format!("{bf}.cidr")));
                } else if cidr.parse::<ipnet::IpNet>().is_err() {
                    causes.push(Cause::invalid(
                        format!("{bf}.cidr"),
                        &json!(cidr),
                        "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                    ));
                }
                for (k, ex) in arr(block.get("except")).iter().enumerate() {
                    let valid = ex
                        .as_str()
                        .is_some_and(|e| e.parse::<ipnet::IpNet>().is_ok());
                    if !valid {
                        causes.push(Cause::invalid(
                            format!("{bf}.except[{k}]"),
                            ex,
                            "must be a valid CIDR value",
                        ));
                    }
                }
            }
        }
    }
}

fn validate_config_map(obj: &Value, causes: &mut Vec<Cause>) {
    let mut keys = Vec::new();
    for field in ["data", "binaryData"] {
        if let Some(m) = obj.get(field).and_then(Value::as_object) {
            for k in m.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    causes.push(Cause::invalid(
                        field,
                        &json!(k),
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                    ));
                }
                if keys.contains(k) {
                    causes.push(Cause::invalid(
                        field,
                        &json!(k),
                        "duplicate of key present in data",
                    ));
                }
                keys.push(k.clone());
            }
        }
    }
}

fn labels_match(selector: &Map<String, Value>, labels: Option<&Map<String, Value>>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn validate_daemonset(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    let template = spec.and_then(|s| s.get("template"));
    let pod = template.and_then(|t| t.get("spec"));
    match spec.and_then(|s| s.get("selector")) {
        None | Some(Value::Null) => causes.push(Cause::required("spec.selector")),
        Some(sel) => {
            let match_labels = sel.get("matchLabels").and_then(Value::as_object);
            let has_expressions = !arr(sel.get("matchExpressions")).is_empty();
            if match_labels.is_none_or(Map::is_empty) && !has_expressions {
                causes.push(Cause::invalid(
                    "spec.selector",
                    sel,
                    "empty selector is invalid for daemonset",
                ));
            }
            // matchExpressions are not evaluated here; matchLabels must select the template.
            let template_labels = template
                .and_then(|t| t.get("metadata"))
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object);
            if let Some(ml) = match_labels {
                if !labels_match(ml, template_labels) {
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        &json!(template_labels),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        }
    }
    let containers = arr(pod.and_then(|s| s.get("containers")));
    if containers.is_empty() {
        causes.push(Cause::required("spec.template.spec.containers"));
    }
    let mut seen = Vec::new();
    validate_containers(
        containers,
        "spec.template.spec.containers",
        &mut seen,
        causes,
    );
    let init = arr(pod.and_then(|s| s.get("initContainers")));
    validate_containers(init, "spec.template.spec.initContainers", &mut seen, causes);
    if let Some(rp) = pod
        .and_then(|s| s.get("restartPolicy"))
        .and_then(Value::as_str)
    {
        if rp != "Always" {
            causes.push(Cause::unsupported(
                "spec.template.spec.restartPolicy",
                &json!(rp),
                &["Always"],
            ));
        }
    }
}

fn validate_rules(obj: &Value, namespaced: bool, causes: &mut Vec<Cause>) {
    for (i, rule) in arr(obj.get("rules")).iter().enumerate() {
        let f = format!("rules[{i}]");
        if arr(rule.get("verbs")).is_empty() {
            causes.push(Cause::required(format!("{f}.verbs")));
        }
        let urls = arr(rule.get("nonResourceURLs"));
        if namespaced && !urls.is_empty() {
            causes.push(Cause::invalid(
                format!("{f}.nonResourceURLs"),
                &json!(urls),
                "namespaced rules cannot apply to non-resource URLs",
            ));
        }
        let resources = arr(rule.get("resources"));
        if urls.is_empty() && resources.is_empty() {
            causes.push(Cause::required(format!("{f}.resources")));
        }
        if !resources.is_empty() && rule.get("apiGroups").is_none_or(Value::is_null) {
            causes.push(Cause::required(format!("{f}.apiGroups")));
        }
    }
}

fn validate_binding(obj: &Value, namespaced: bool, causes: &mut Vec<Cause>) {
    let role_ref = obj.get("roleRef");
    let field = |k: &str| role_ref.and_then(|r| r.get(k)).and_then(Value::as_str);
    if field("apiGroup") != Some("rbac.authorization.k8s.io") {
        causes.push(Cause::unsupported(
            "roleRef.apiGroup",
            &json!(field("apiGroup").unwrap_or("")),
            &["rbac.authorization.k8s.io"],
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    match field("kind") {
        Some(k) if kinds.contains(&k) => {}
        other => causes.push(Cause::unsupported(
            "roleRef.kind",
            &json!(other.unwrap_or("")),
            kinds,
        )),
    }
    if field("name").is_none_or(str::is_empty) {
        causes.push(Cause::required("roleRef.name"));
    }
    const SUBJECT_KINDS: &[&str] = &["ServiceAccount", "User", "Group"];
    for (i, subject) in arr(obj.get("subjects")).iter().enumerate() {
        let f = format!("subjects[{i}]");
        let kind = subject.get("kind").and_then(Value::as_str).unwrap_or("");
        if !SUBJECT_KINDS.contains(&kind) {
            causes.push(Cause::unsupported(
                format!("{f}.kind"),
                &json!(kind),
                SUBJECT_KINDS,
            ));
        }
        if subject
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            causes.push(Cause::required(format!("{f}.name")));
        }
        // A RoleBinding's ServiceAccount defaults to the binding's namespace; a cluster binding
        // must say which.
        let ns_missing = subject
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if kind == "ServiceAccount" && !namespaced && ns_missing {
            causes.push(Cause::required(format!("{f}.namespace")));
        }
    }
}

/// 422 checks of one object (create and update alike).
pub fn validate(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    validate_labels_and_annotations(obj, &mut causes);
    match def.kind_id {
        Kind::Pod => validate_pod(obj, &mut causes),
        Kind::NetworkPolicy => validate_network_policy(obj, &mut causes),
        Kind::ConfigMap => validate_config_map(obj, &mut causes),
        Kind::DaemonSet => validate_daemonset(obj, &mut causes),
        Kind::ClusterRole => validate_rules(obj, false, &mut causes),
        Kind::Role => validate_rules(obj, true, &mut causes),
        Kind::ClusterRoleBinding => validate_binding(obj, false, &mut causes),
        Kind::RoleBinding => validate_binding(obj, true, &mut causes),
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            def.group,
            def.kind,
            meta::name(obj),
            causes,
        ))
    }
}

/// Checks a name against the grammar of its kind (namespaces are labels; the rest subdomains).
pub fn validate_name(def: &ResourceDef, name: &str) -> Result<(), ApiError> {
    let error = if def.kind_id == Kind::Namespace {
        meta::dns1123_label_error(name)
    } else {
        meta::dns1123_subdomain_error(name)
    };
    match error {
        Some(e) => Err(ApiError::invalid(
            def.group,
            def.kind,
            name,
            vec![Cause::invalid("metadata.name", &json!(name), e)],
        )),
        None => Ok(()),
    }
}

/// Update rules beyond per-object validation: pods may only change a few spec fields (images,
/// activeDeadlineSeconds, tolerations, terminationGracePeriodSeconds), and never their node.
pub fn validate_update(def: &ResourceDef, old: &Value, new: &Value) -> Result<(), ApiError> {
    // A binding's roleRef and a DaemonSet's selector never change, as in the real server.
    let immutable = match def.kind_id {
        Kind::ClusterRoleBinding | Kind::RoleBinding => Some(("roleRef", "cannot change roleRef")),
        Kind::DaemonSet => Some(("spec.selector", "field is immutable")),
        _ => None,
    };
    if let Some((field, message)) = immutable {
        let path: Vec<&str> = field.split('.').collect();
        let (before, after) = (meta::value_at(old, &path), meta::value_at(new, &path));
        if before != after {
            return Err(ApiError::invalid(
                def.group,
                def.kind,
                meta::name(new),
                vec![Cause::invalid(
                    field,
                    after.unwrap_or(&Value::Null),
                    message,
                )],
            ));
        }
        return Ok(());
    }
    if def.kind_id != Kind::Pod {
        return Ok(());
    }
    let strip = |spec: Option<&Value>| -> Value {
        let mut s = spec.cloned().unwrap_or(Value::Null);
        if let Some(m) = s.as_object_mut() {
            for f in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
                "schedulingGates",
            ] {
                m.remove(f);
            }
            for list in ["containers", "initContainers"] {
                if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
                    for c in cs {
                        if let Some(c) = c.as_object_mut() {
                            c.remove("image");
                        }
                    }
                }
            }
        }
        s
    };
    if strip(old.get("spec")) != strip(new.get("spec")) {
        return Err(ApiError::invalid(
            def.group,
            def.kind,
            meta::name(new),
            vec![Cause::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            )],
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Defaulting, as the real server's defaulting functions do for the fields clients look at.

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    let absent = map.get(key).is_none_or(Value::is_null);
    if absent {
        map.insert(key.to_string(), value);
    }
}

fn default_protocols(ports: Option<&mut Value>) {
    if let Some(ports) = ports.and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
}

/// `latest` (or no tag, and no digest) means Always; a pinned tag means IfNotPresent.
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_probe(probe: Option<&mut Value>) {
    if let Some(p) = probe.and_then(Value::as_object_mut) {
        set_default(p, "timeoutSeconds", json!(1));
        set_default(p, "periodSeconds", json!(10));
        set_default(p, "successThreshold", json!(1));
        set_default(p, "failureThreshold", json!(3));
        if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
            set_default(h, "scheme", json!("HTTP"));
        }
    }
}

fn default_containers(list: Option<&mut Value>) {
    let Some(list) = list.and_then(Value::as_array_mut) else {
        return;
    };
    for c in list.iter_mut().filter_map(Value::as_object_mut) {
        set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
        set_default(c, "terminationMessagePolicy", json!("File"));
        let policy = default_pull_policy(c.get("image").and_then(Value::as_str).unwrap_or(""));
        set_default(c, "imagePullPolicy", json!(policy));
        set_default(c, "resources", json!({}));
        default_protocols(c.get_mut("ports"));
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            default_probe(c.get_mut(probe));
        }
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let has_resources = ["containers", "initContainers"].iter().any(|l| {
        arr(spec.get(*l)).iter().any(|c| {
            let r = c.get("resources");
            ["requests", "limits"].iter().any(|k| {
                r.and_then(|r| r.get(*k))
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty())
            })
        })
    });
    if has_resources {
        "Burstable"
    } else {
        "BestEffort"
    }
}

/// Field defaults applied on every write (create and update), like decode-time defaulting.
pub fn apply_defaults(def: &ResourceDef, obj: &mut Value) {
    match def.kind_id {
        Kind::Pod => default_pod_spec(meta::object_field_mut(obj, "spec"), true),
        Kind::DaemonSet => {
            let spec = meta::object_field_mut(obj, "spec");
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "updateStrategy", json!({}));
            if let Some(strategy) = spec
                .get_mut("updateStrategy")
                .and_then(Value::as_object_mut)
            {
                set_default(strategy, "type", json!("RollingUpdate"));
                if strategy.get("type") == Some(&json!("RollingUpdate")) {
                    set_default(strategy, "rollingUpdate", json!({}));
                    if let Some(r) = strategy
                        .get_mut("rollingUpdate")
                        .and_then(Value::as_object_mut)
                    {
                        set_default(r, "maxUnavailable", json!(1));
                        set_default(r, "maxSurge", json!(0));
                    }
                }
            }
            let template = spec.entry("template").or_insert_with(|| json!({}));
            // Template pods get no priority: admission resolves it when the real pod is made.
            default_pod_spec(meta::object_field_mut(template, "spec"), false);
        }
        Kind::Namespace => {
            let name = meta::name(obj).to_string();
            let labels = meta::metadata_mut(obj)
                .entry("labels")
                .or_insert_with(|| json!({}));
            if !labels.is_object() {
                *labels = json!({});
            }
            // The real server forces this label; it cannot be removed or changed.
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        Kind::NetworkPolicy => {
            let spec = meta::object_field_mut(obj, "spec");
            set_default(spec, "podSelector", json!({}));
            let types_absent = spec
                .get("policyTypes")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
            if types_absent {
                let has_egress = spec
                    .get("egress")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty());
                let mut types = vec![json!("Ingress")];
                if has_egress {
                    types.push(json!("Egress"));
                }
                spec.insert("policyTypes".into(), Value::Array(types));
            }
            for dir in ["ingress", "egress"] {
                if let Some(rules) = spec.get_mut(dir).and_then(Value::as_array_mut) {
                    for r in rules {
                        default_protocols(r.get_mut("ports"));
                    }
                }
            }
        }
        Kind::Service => {
            let spec = meta::object_field_mut(obj, "spec");
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    set_default(p, "protocol", json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        set_default(p, "targetPort", port);
                    }
                }
            }
        }
        Kind::Node
        | Kind::ConfigMap
        | Kind::CoreEvent
        | Kind::Lease
        | Kind::Event
        | Kind::ServiceAccount
        | Kind::ClusterRole
        | Kind::ClusterRoleBinding
        | Kind::Role
        | Kind::RoleBinding => {}
    }
}

/// The pod spec defaults (of a Pod, or of a workload's pod template).
fn default_pod_spec(spec: &mut Map<String, Value>, is_pod: bool) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    if is_pod {
        set_default(spec, "priority", json!(0));
        set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    }
    default_containers(spec.get_mut("containers"));
    default_containers(spec.get_mut("initContainers"));
}

/// The taints a pod tolerates for 5 minutes unless it says otherwise (the real server's
/// DefaultTolerationSeconds admission plugin).
const DEFAULT_TOLERATED_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// What the real server's admission plugins add to a new pod that the lab can honour:
/// `ServiceAccount` names the namespace's `default` account (without the token volume it would
/// also mount: the lab kubelet refuses volumes), `DefaultTolerationSeconds` adds the two
/// NoExecute tolerations of 300 s.
fn admit_pod(spec: &mut Map<String, Value>) {
    let account = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    spec.insert("serviceAccountName".into(), json!(account));
    spec.insert("serviceAccount".into(), json!(account));
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for taint in DEFAULT_TOLERATED_TAINTS {
        let tolerated = list.iter().any(|t| {
            let key = t.get("key").and_then(Value::as_str).unwrap_or("");
            let exists = t.get("operator").and_then(Value::as_str) == Some("Exists");
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            (key == taint || key.is_empty() && exists) && matches!(effect, "" | "NoExecute")
        });
        if !tolerated {
            list.push(
                json!({ "key": taint, "operator": "Exists", "effect": "NoExecute",
                              "tolerationSeconds": 300 }),
            );
        }
    }
}

/// What create does to `status` (the real strategies' PrepareForCreate): pods and services start
/// from a fresh status, namespaces start Active with the `kubernetes` finalizer; nodes keep the
/// status the kubelet registers them with.
pub fn prepare_for_create(def: &ResourceDef, obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    match def.kind_id {
        Kind::Pod => {
            let qos = map.get("spec").map(qos_class).unwrap_or("BestEffort");
            map.insert(
                "status".into(),
                json!({ "phase": "Pending", "qosClass": qos }),
            );
            admit_pod(meta::object_field_mut(obj, "spec"));
        }
        Kind::Service => {
            map.insert("status".into(), json!({ "loadBalancer": {} }));
            let spec = meta::object_field_mut(obj, "spec");
            // The real server's IP family defaults (a single-stack IPv4 cluster, as the lab's).
            if spec.get("type").and_then(Value::as_str) != Some("ExternalName") {
                set_default(spec, "ipFamilies", json!(["IPv4"]));
                set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
            }
        }
        Kind::DaemonSet => {
            // Nothing runs it yet: the controller (absent in the lab) would fill these in.
            map.insert(
                "status".into(),
                json!({ "currentNumberScheduled": 0, "numberMisscheduled": 0,
                        "desiredNumberScheduled": 0, "numberReady": 0 }),
            );
        }
        Kind::Namespace => {
            map.insert("status".into(), json!({ "phase": "Active" }));
            let spec = meta::object_field_mut(obj, "spec");
            spec.insert("finalizers".into(), json!(["kubernetes"]));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{def, id_of};

    fn pod(spec: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" }, "spec": spec })
    }

    #[test]
    fn decode_prunes_and_reports_unknown_fields() {
        let d = def(id_of(Kind::Pod));
        let raw =
            pod(json!({ "containers": [{ "name": "c", "image": "i", "bogus": 1 }], "nope": true }));
        let out = decode(d, &raw, FieldValidation::Warn).unwrap();
        assert_eq!(
            out.warnings,
            vec![
                "unknown field \"spec.containers[0].bogus\"",
                "unknown field \"spec.nope\""
            ]
        );
        assert!(out.object["spec"].get("nope").is_none());
        let e = decode(d, &raw, FieldValidation::Strict).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.message
                .contains("strict decoding error: unknown field \"spec.containers[0].bogus\""),
            "{}",
            e.message
        );
        assert!(decode(d, &raw, FieldValidation::Ignore)
            .unwrap()
            .warnings
            .is_empty());
    }

    #[test]
    fn decode_rejects_wrong_types() {
        let d = def(id_of(Kind::Pod));
        let raw = pod(
            json!({ "containers": [{ "name": "c", "image": "i", "ports": [{ "containerPort": "eighty" }] }] }),
        );
        let e = decode(d, &raw, FieldValidation::Warn).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.message
                .starts_with("Pod in version \"v1\" cannot be handled as a Pod"),
            "{}",
            e.message
        );
    }

    #[test]
    fn pods_need_named_containers_with_images() {
        let d = def(id_of(Kind::Pod));
        let e = validate(d, &pod(json!({}))).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "Pod \"p\" is invalid: spec.containers: Required value"
        );
        let e = validate(
            d,
            &pod(json!({ "containers": [{ "name": "c" }, { "name": "c", "image": "x" }] })),
        )
        .unwrap_err();
        let causes = e.details.unwrap()["causes"].clone();
        assert_eq!(causes[0]["field"], "spec.containers[0].image");
        assert_eq!(causes[1]["reason"], "FieldValueDuplicate");
        assert!(validate(
            d,
            &pod(json!({ "containers": [{ "name": "c", "image": "x" }] }))
        )
        .is_ok());
    }

    #[test]
    fn bad_labels_are_invalid() {
        let d = def(id_of(Kind::ConfigMap));
        let cm = json!({ "metadata": { "name": "c", "labels": { "a": "-bad" } } });
        assert_eq!(validate(d, &cm).unwrap_err().code, 422);
    }

    #[test]
    fn pod_defaults() {
        let d = def(id_of(Kind::Pod));
        let mut p = pod(json!({ "containers": [
            { "name": "a", "image": "busybox", "ports": [{ "containerPort": 80 }] },
            { "name": "b", "image": "reg:5000/x/busybox:1.36" }
        ] }));
        apply_defaults(d, &mut p);
        prepare_for_create(d, &mut p);
        let s = &p["spec"];
        assert_eq!(s["restartPolicy"], "Always");
        assert_eq!(s["terminationGracePeriodSeconds"], 30);
        // Admission (create only), as on the real server: the default ServiceAccount, the two
        // NoExecute tolerations of 300 s.
        assert_eq!(s["serviceAccountName"], "default");
        assert_eq!(s["serviceAccount"], "default");
        assert_eq!(
            s["tolerations"],
            json!([
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ])
        );
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        assert_eq!(s["schedulerName"], "default-scheduler");
        assert_eq!(s["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(s["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            s["containers"][0]["terminationMessagePath"],
            "/dev/termination-log"
        );
        assert_eq!(s["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "BestEffort");
    }

    #[test]
    fn network_policy_types_default_like_the_real_server() {
        let d = def(id_of(Kind::NetworkPolicy));
        let mut only_ingress =
            json!({ "metadata": { "name": "n" }, "spec": { "podSelector": {} } });
        apply_defaults(d, &mut only_ingress);
        assert_eq!(only_ingress["spec"]["policyTypes"], json!(["Ingress"]));
        let mut with_egress = json!({ "metadata": { "name": "n" }, "spec": {
            "egress": [{ "ports": [{ "port": 53, "protocol": "UDP" }, { "port": 80 }] }] } });
        apply_defaults(d, &mut with_egress);
        assert_eq!(
            with_egress["spec"]["policyTypes"],
            json!(["Ingress", "Egress"])
        );
        assert_eq!(
            with_egress["spec"]["egress"][0]["ports"][0]["protocol"],
            "UDP"
        );
        assert_eq!(
            with_egress["spec"]["egress"][0]["ports"][1]["protocol"],
            "TCP"
        );
        let mut explicit =
            json!({ "metadata": { "name": "n" }, "spec": { "policyTypes": ["Egress"] } });
        apply_defaults(d, &mut explicit);
        assert_eq!(explicit["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn network_policy_validation() {
        let d = def(id_of(Kind::NetworkPolicy));
        let np = json!({ "metadata": { "name": "n" }, "spec": {
            "policyTypes": ["Sideways"],
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.0.0.0/33" } }], "ports": [{ "port": 70000 }] }] } });
        let e = validate(d, &np).unwrap_err();
        let causes = e.details.unwrap()["causes"].as_array().unwrap().len();
        assert_eq!(causes, 3, "{}", e.message);
    }

    #[test]
    fn namespace_label_is_forced() {
        let d = def(id_of(Kind::Namespace));
        let mut ns = json!({ "metadata": { "name": "team", "labels": { "kubernetes.io/metadata.name": "other" } } });
        apply_defaults(d, &mut ns);
        prepare_for_create(d, &mut ns);
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "team"
        );
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
    }

    fn daemonset(selector: Value, labels: Value) -> Value {
        json!({ "metadata": { "name": "ds" }, "spec": {
            "selector": selector,
            "template": { "metadata": { "labels": labels },
                "spec": { "containers": [{ "name": "c", "image": "veilnet:1" }] } } } })
    }

    #[test]
    fn daemonset_selector_must_select_its_template() {
        let d = def(id_of(Kind::DaemonSet));
        let ok = daemonset(
            json!({ "matchLabels": { "a": "1" } }),
            json!({ "a": "1", "b": "2" }),
        );
        assert!(validate(d, &ok).is_ok());
        let e = validate(
            d,
            &daemonset(json!({ "matchLabels": { "a": "2" } }), json!({ "a": "1" })),
        )
        .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message
                .contains("`selector` does not match template `labels`"),
            "{}",
            e.message
        );
        let e = validate(d, &daemonset(json!(null), json!({}))).unwrap_err();
        assert!(
            e.message.contains("spec.selector: Required value"),
            "{}",
            e.message
        );
        let moved = daemonset(
            json!({ "matchLabels": { "b": "2" } }),
            json!({ "a": "1", "b": "2" }),
        );
        let e = validate_update(d, &ok, &moved).unwrap_err();
        assert!(e.message.contains("field is immutable"), "{}", e.message);
    }

    #[test]
    fn daemonset_defaults_and_status() {
        let d = def(id_of(Kind::DaemonSet));
        let mut ds = daemonset(json!({ "matchLabels": { "a": "1" } }), json!({ "a": "1" }));
        apply_defaults(d, &mut ds);
        prepare_for_create(d, &mut ds);
        assert_eq!(
            ds["spec"]["updateStrategy"],
            json!({ "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1, "maxSurge": 0 } })
        );
        assert_eq!(ds["spec"]["revisionHistoryLimit"], 10);
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert!(pod.get("priority").is_none());
        assert_eq!(ds["status"]["desiredNumberScheduled"], 0);
        // An explicit OnDelete strategy gets no rollingUpdate.
        let mut ondelete = daemonset(json!({ "matchLabels": { "a": "1" } }), json!({ "a": "1" }));
        ondelete["spec"]["updateStrategy"] = json!({ "type": "OnDelete" });
        apply_defaults(d, &mut ondelete);
        assert_eq!(
            ondelete["spec"]["updateStrategy"],
            json!({ "type": "OnDelete" })
        );
    }

    #[test]
    fn rbac_validation_and_immutable_role_ref() {
        let cr = def(id_of(Kind::ClusterRole));
        let rules = json!({ "metadata": { "name": "r" }, "rules": [
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["get"] },
            { "nonResourceURLs": ["/metrics"], "verbs": ["get"] }] });
        assert!(validate(cr, &rules).is_ok());
        let role = def(id_of(Kind::Role));
        let e = validate(role, &rules).unwrap_err();
        assert!(
            e.message
                .contains("namespaced rules cannot apply to non-resource URLs"),
            "{}",
            e.message
        );
        let no_verbs = json!({ "metadata": { "name": "r" }, "rules": [{ "apiGroups": [""], "resources": ["nodes"] }] });
        assert!(validate(cr, &no_verbs)
            .unwrap_err()
            .message
            .contains("rules[0].verbs: Required value"));

        let crb = def(id_of(Kind::ClusterRoleBinding));
        let binding = |role: &str, sa_ns: Value| {
            json!({ "metadata": { "name": "b" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": [{ "kind": "ServiceAccount", "name": "sa", "namespace": sa_ns }] })
        };
        assert!(validate(crb, &binding("r", json!("ns"))).is_ok());
        let e = validate(crb, &binding("r", json!(null))).unwrap_err();
        assert!(
            e.message.contains("subjects[0].namespace: Required value"),
            "{}",
            e.message
        );
        let rb = def(id_of(Kind::RoleBinding));
        assert!(
            validate(rb, &binding("r", json!(null))).is_ok(),
            "defaults to the binding's namespace"
        );
        let e = validate_update(
            crb,
            &binding("r", json!("ns")),
            &binding("other", json!("ns")),
        )
        .unwrap_err();
        assert!(e.message.contains("cannot change roleRef"), "{}", e.message);
        assert!(
            validate_update(crb, &binding("r", json!("ns")), &binding("r", json!("ns2"))).is_ok()
        );
    }

    #[test]
    fn pod_spec_is_mostly_immutable() {
        let d = def(id_of(Kind::Pod));
        let old = pod(json!({ "containers": [{ "name": "c", "image": "a" }] }));
        let new_image = pod(json!({ "containers": [{ "name": "c", "image": "b" }] }));
        assert!(validate_update(d, &old, &new_image).is_ok());
        let bound = pod(json!({ "nodeName": "n1", "containers": [{ "name": "c", "image": "a" }] }));
        assert_eq!(validate_update(d, &old, &bound).unwrap_err().code, 422);
    }
}
