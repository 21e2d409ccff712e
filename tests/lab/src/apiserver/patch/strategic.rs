//! Strategic merge patch (`application/strategic-merge-patch+json`) for the served kinds.
//!
//! Maps merge recursively and `null` deletes a key, as in a JSON merge patch. Lists follow the
//! `patchStrategy` / `patchMergeKey` tags of the Go types, which live here as a table keyed by
//! field path ([`list_strategy`]); lists without a tag are replaced whole. Directives:
//! `$patch: replace|delete|merge` (on maps and on list elements), `$retainKeys`,
//! `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>`.

use serde_json::{Map, Value};

use crate::apiserver::resources::Kind;

/// How a list field is patched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    /// No strategy tag: the patch's list replaces the whole list.
    Atomic,
    /// `patchStrategy:"merge"` with `patchMergeKey`: elements are maps matched by this key.
    MergeByKey(&'static str),
    /// `patchStrategy:"merge"` on a list of scalars: set union.
    MergeSet,
}

/// The strategy of the list at `path` (field names from the object root, list levels omitted),
/// transcribed from the patch tags of the k8s.io/api types.
pub fn list_strategy(kind: Kind, path: &str) -> ListStrategy {
    use ListStrategy::*;
    match path {
        "metadata.finalizers" => return MergeSet,
        "metadata.ownerReferences" => return MergeByKey("uid"),
        _ => {}
    }
    match kind {
        Kind::Pod => pod_list_strategy(path),
        // A DaemonSet's pod template carries the Pod's tags under `spec.template`.
        Kind::DaemonSet => match path {
            "status.conditions" => MergeByKey("type"),
            _ => path
                .strip_prefix("spec.template.")
                .map_or(Atomic, pod_list_strategy),
        },
        Kind::ServiceAccount => match path {
            "secrets" => MergeByKey("name"),
            _ => Atomic,
        },
        Kind::Node => match path {
            "spec.podCIDRs" => MergeSet,
            "status.addresses" | "status.conditions" => MergeByKey("type"),
            _ => Atomic,
        },
        Kind::Namespace => match path {
            "status.conditions" => MergeByKey("type"),
            _ => Atomic,
        },
        Kind::Service => match path {
            "spec.ports" => MergeByKey("port"),
            "status.conditions" => MergeByKey("type"),
            _ => Atomic,
        },
        // ConfigMap, Lease, NetworkPolicy, the events and the RBAC kinds (rules and subjects are
        // atomic lists) carry no list patch tags.
        Kind::ConfigMap
        | Kind::Lease
        | Kind::NetworkPolicy
        | Kind::CoreEvent
        | Kind::Event
        | Kind::ClusterRole
        | Kind::ClusterRoleBinding
        | Kind::Role
        | Kind::RoleBinding => Atomic,
    }
}

/// The list strategies of a Pod (`path` from the Pod's root).
fn pod_list_strategy(path: &str) -> ListStrategy {
    use ListStrategy::*;
    let container_list = [
        "spec.containers",
        "spec.initContainers",
        "spec.ephemeralContainers",
    ]
    .into_iter()
    .find_map(|p| path.strip_prefix(p));
    if let Some(rest) = container_list {
        return match rest {
            "" => MergeByKey("name"),
            ".ports" => MergeByKey("containerPort"),
            ".env" => MergeByKey("name"),
            ".volumeMounts" => MergeByKey("mountPath"),
            ".volumeDevices" => MergeByKey("devicePath"),
            _ => Atomic,
        };
    }
    match path {
        "spec.volumes"
        | "spec.imagePullSecrets"
        | "spec.schedulingGates"
        | "spec.resourceClaims" => MergeByKey("name"),
        "spec.hostAliases" => MergeByKey("ip"),
        "spec.topologySpreadConstraints" => MergeByKey("topologyKey"),
        "status.conditions" => MergeByKey("type"),
        "status.podIPs" | "status.hostIPs" => MergeByKey("ip"),
        "status.resourceClaimStatuses" => MergeByKey("name"),
        _ => Atomic,
    }
}

/// Why a strategic merge patch could not be applied (answered as 400 / 422 by the caller).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategicPatchError {
    #[error("strategic merge patch must be a JSON object")]
    NotAnObject,
    #[error("unknown patch type: {0}")]
    UnknownDirective(String),
    #[error("map: {element} does not contain declared merge key: {key}")]
    MissingMergeKey { element: String, key: String },
    #[error("invalid {directive} for field {field}: expected a list")]
    BadDirective { directive: String, field: String },
}

type Result<T> = std::result::Result<T, StrategicPatchError>;

const PATCH: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

/// Applies `patch` to `original` for an object of `kind`.
pub fn apply(kind: Kind, original: &Value, patch: &Value) -> Result<Value> {
    let patch = patch.as_object().ok_or(StrategicPatchError::NotAnObject)?;
    let empty = Map::new();
    let orig = original.as_object().unwrap_or(&empty);
    let merged = merge_map(kind, "", orig, patch)?;
    Ok(Value::Object(merged.unwrap_or_default()))
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Merges `patch` into `orig`; `None` means the map itself is deleted (`$patch: delete`).
fn merge_map(
    kind: Kind,
    path: &str,
    orig: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>> {
    match patch.get(PATCH).map(|v| v.as_str().unwrap_or("")) {
        None | Some("merge") => {}
        Some("replace") => {
            // The patch, minus its directives, is the new value.
            return merge_map(kind, path, &Map::new(), &without_key(patch, PATCH));
        }
        Some("delete") => return Ok(None),
        Some(other) => return Err(StrategicPatchError::UnknownDirective(other.to_string())),
    }

    let mut result = orig.clone();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE) {
            let doomed = value
                .as_array()
                .ok_or_else(|| StrategicPatchError::BadDirective {
                    directive: key.clone(),
                    field: field.to_string(),
                })?;
            if let Some(list) = result.get_mut(field).and_then(Value::as_array_mut) {
                list.retain(|v| !doomed.contains(v));
            }
        }
    }
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        let field_path = child_path(path, key);
        match value {
            Value::Null => {
                result.remove(key);
            }
            Value::Object(p) => {
                let empty = Map::new();
                let o = result.get(key).and_then(Value::as_object).unwrap_or(&empty);
                match merge_map(kind, &field_path, o, p)? {
                    Some(m) => {
                        result.insert(key.clone(), Value::Object(m));
                    }
                    None => {
                        result.remove(key);
                    }
                }
            }
            Value::Array(p) => {
                let empty = Vec::new();
                let o = result.get(key).and_then(Value::as_array).unwrap_or(&empty);
                let merged = merge_list(kind, &field_path, o, p)?;
                result.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                result.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix(SET_ORDER) {
            let order = value
                .as_array()
                .ok_or_else(|| StrategicPatchError::BadDirective {
                    directive: key.clone(),
                    field: field.to_string(),
                })?;
            let strategy = list_strategy(kind, &child_path(path, field));
            if let Some(list) = result.get_mut(field).and_then(Value::as_array_mut) {
                reorder(list, order, strategy);
            }
        }
    }
    if let Some(retain) = patch.get(RETAIN_KEYS) {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| StrategicPatchError::BadDirective {
                directive: RETAIN_KEYS.into(),
                field: path.to_string(),
            })?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        result.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(result))
}

fn without_key(map: &Map<String, Value>, key: &str) -> Map<String, Value> {
    let mut m = map.clone();
    m.remove(key);
    m
}

/// A patch list element that is only a directive, e.g. `{"$patch": "replace"}`.
fn directive_of(v: &Value) -> Option<&str> {
    v.as_object()?.get(PATCH)?.as_str()
}

/// A list value as it will be stored: nested maps go through the merge so that their nulls and
/// directives are resolved rather than stored.
fn fresh(kind: Kind, path: &str, v: &Value) -> Result<Option<Value>> {
    match v {
        Value::Object(m) => Ok(merge_map(kind, path, &Map::new(), m)?.map(Value::Object)),
        other => Ok(Some(other.clone())),
    }
}

fn merge_list(kind: Kind, path: &str, orig: &[Value], patch: &[Value]) -> Result<Vec<Value>> {
    let strategy = list_strategy(kind, path);
    let replace_all = patch
        .iter()
        .any(|v| directive_of(v) == Some("replace") && v.as_object().is_some_and(|m| m.len() == 1));
    if strategy == ListStrategy::Atomic || replace_all {
        let mut out = Vec::new();
        for v in patch {
            if directive_of(v).is_some() && v.as_object().is_some_and(|m| m.len() == 1) {
                continue;
            }
            if let Some(v) = fresh(kind, path, v)? {
                out.push(v);
            }
        }
        return Ok(out);
    }
    match strategy {
        ListStrategy::MergeSet => {
            let mut out = orig.to_vec();
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = orig.to_vec();
            for p in patch {
                let Some(pm) = p.as_object() else {
                    // Scalars in a keyed list cannot be matched; keep them as given.
                    if !out.contains(p) {
                        out.push(p.clone());
                    }
                    continue;
                };
                let k = pm
                    .get(key)
                    .ok_or_else(|| StrategicPatchError::MissingMergeKey {
                        element: p.to_string(),
                        key: key.to_string(),
                    })?;
                let pos = out.iter().position(|o| o.get(key) == Some(k));
                if directive_of(p) == Some("delete") {
                    out.retain(|o| o.get(key) != Some(k));
                    continue;
                }
                match pos {
                    Some(i) => {
                        let empty = Map::new();
                        let o = out[i].as_object().unwrap_or(&empty);
                        match merge_map(kind, path, o, pm)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(v) = fresh(kind, path, p)? {
                            out.push(v);
                        }
                    }
                }
            }
            Ok(out)
        }
        ListStrategy::Atomic => unreachable!("handled above"),
    }
}

/// `$setElementOrder`: elements named in `order` come first in that order; the rest (present
/// only on the server) keep their relative order after them.
fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: ListStrategy) {
    let rank = |v: &Value| -> Option<usize> {
        order.iter().position(|o| match strategy {
            ListStrategy::MergeByKey(key) => o.get(key).is_some() && o.get(key) == v.get(key),
            _ => o == v,
        })
    };
    let mut ranked: Vec<(usize, Value)> = Vec::new();
    let mut rest = Vec::new();
    for v in list.drain(..) {
        match rank(&v) {
            Some(r) => ranked.push((r, v)),
            None => rest.push(v),
        }
    }
    ranked.sort_by_key(|(r, _)| *r);
    list.extend(ranked.into_iter().map(|(_, v)| v));
    list.extend(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": { "name": "p", "labels": { "a": "1", "b": "2" }, "finalizers": ["x"] },
            "spec": {
                "containers": [
                    { "name": "c1", "image": "i1", "env": [{ "name": "E1", "value": "1" }],
                      "ports": [{ "containerPort": 80 }], "args": ["a", "b"] },
                    { "name": "c2", "image": "i2" }
                ],
                "tolerations": [{ "key": "k1" }],
                "volumes": [{ "name": "v1", "emptyDir": {} }]
            },
            "status": { "conditions": [{ "type": "Ready", "status": "False" }] }
        })
    }

    fn smp(kind: Kind, orig: &Value, patch: Value) -> Value {
        apply(kind, orig, &patch).unwrap()
    }

    #[test]
    fn maps_merge_and_null_deletes() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "metadata": { "labels": { "a": null, "c": "3" } } }),
        );
        assert_eq!(out["metadata"]["labels"], json!({ "b": "2", "c": "3" }));
    }

    #[test]
    fn containers_merge_by_name() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "containers": [
            { "name": "c2", "image": "new" }, { "name": "c3", "image": "i3" } ] } }),
        );
        let cs = &out["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 3);
        assert_eq!(cs[0]["image"], "i1");
        assert_eq!(cs[1]["image"], "new");
        assert_eq!(cs[2]["name"], "c3");
    }

    #[test]
    fn nested_lists_use_their_own_keys() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "containers": [
            { "name": "c1", "env": [{ "name": "E2", "value": "2" }], "ports": [{ "containerPort": 80, "name": "http" }],
              "args": ["z"] } ] } }),
        );
        let c = &out["spec"]["containers"][0];
        assert_eq!(c["env"].as_array().unwrap().len(), 2);
        assert_eq!(c["ports"], json!([{ "containerPort": 80, "name": "http" }]));
        assert_eq!(c["args"], json!(["z"]), "args has no strategy: replaced");
    }

    #[test]
    fn untagged_lists_are_replaced() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "tolerations": [{ "key": "k2" }] } }),
        );
        assert_eq!(out["spec"]["tolerations"], json!([{ "key": "k2" }]));
        let np = json!({ "spec": { "ingress": [{ "from": [] }, { "ports": [] }] } });
        let out = smp(
            Kind::NetworkPolicy,
            &np,
            json!({ "spec": { "ingress": [{ "ports": [{ "port": 1 }] }] } }),
        );
        assert_eq!(
            out["spec"]["ingress"],
            json!([{ "ports": [{ "port": 1 }] }])
        );
    }

    #[test]
    fn delete_element_directive() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "containers": [{ "name": "c1", "$patch": "delete" }] } }),
        );
        assert_eq!(
            out["spec"]["containers"],
            json!([{ "name": "c2", "image": "i2" }])
        );
    }

    #[test]
    fn replace_list_directive() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "containers": [
            { "name": "only", "image": "x" }, { "$patch": "replace" } ] } }),
        );
        assert_eq!(
            out["spec"]["containers"],
            json!([{ "name": "only", "image": "x" }])
        );
    }

    #[test]
    fn replace_and_delete_map_directives() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "metadata": { "labels": { "z": "9", "$patch": "replace" } } }),
        );
        assert_eq!(out["metadata"]["labels"], json!({ "z": "9" }));
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "status": { "$patch": "delete" } }),
        );
        assert!(out.get("status").is_none());
        let err = apply(
            Kind::Pod,
            &pod(),
            &json!({ "status": { "$patch": "explode" } }),
        )
        .unwrap_err();
        assert_eq!(err, StrategicPatchError::UnknownDirective("explode".into()));
    }

    #[test]
    fn finalizers_are_a_set() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "metadata": { "finalizers": ["y", "x"] } }),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "metadata": { "$deleteFromPrimitiveList/finalizers": ["x"] } }),
        );
        assert_eq!(out["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn set_element_order() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": {
            "$setElementOrder/containers": [{ "name": "c2" }, { "name": "c1" }],
            "containers": [{ "name": "c2", "image": "i2b" }] } }),
        );
        assert_eq!(out["spec"]["containers"][0]["name"], "c2");
        assert_eq!(out["spec"]["containers"][0]["image"], "i2b");
        assert_eq!(out["spec"]["containers"][1]["name"], "c1");
        let node = json!({ "spec": { "podCIDRs": ["10.0.0.0/24"] } });
        let out = smp(
            Kind::Node,
            &node,
            json!({ "spec": {
            "$setElementOrder/podCIDRs": ["fd00::/64", "10.0.0.0/24"], "podCIDRs": ["fd00::/64"] } }),
        );
        assert_eq!(out["spec"]["podCIDRs"], json!(["fd00::/64", "10.0.0.0/24"]));
    }

    #[test]
    fn retain_keys() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "volumes": [
            { "name": "v1", "hostPath": { "path": "/x" }, "$retainKeys": ["name", "hostPath"] } ] } }),
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([{ "name": "v1", "hostPath": { "path": "/x" } }])
        );
    }

    #[test]
    fn node_status_lists_merge_by_type() {
        let node = json!({ "status": {
            "addresses": [{ "type": "InternalIP", "address": "10.0.0.1" }, { "type": "Hostname", "address": "n1" }],
            "conditions": [{ "type": "Ready", "status": "False" }] } });
        let out = smp(
            Kind::Node,
            &node,
            json!({ "status": {
            "addresses": [{ "type": "InternalIP", "address": "10.0.0.2" }],
            "conditions": [{ "type": "Ready", "status": "True" }, { "type": "MemoryPressure", "status": "False" }] } }),
        );
        assert_eq!(out["status"]["addresses"][0]["address"], "10.0.0.2");
        assert_eq!(out["status"]["addresses"][1]["address"], "n1");
        assert_eq!(out["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(out["status"]["conditions"][0]["status"], "True");
    }

    #[test]
    fn missing_merge_key_is_an_error() {
        let err = apply(
            Kind::Pod,
            &pod(),
            &json!({ "spec": { "containers": [{ "image": "x" }] } }),
        )
        .unwrap_err();
        assert!(matches!(err, StrategicPatchError::MissingMergeKey { .. }));
        assert_eq!(
            apply(Kind::Pod, &pod(), &json!([1])).unwrap_err(),
            StrategicPatchError::NotAnObject
        );
    }

    #[test]
    fn new_elements_have_nulls_and_directives_resolved() {
        let out = smp(
            Kind::Pod,
            &pod(),
            json!({ "spec": { "containers": [
            { "name": "c9", "image": "x", "workingDir": null } ] } }),
        );
        assert_eq!(
            out["spec"]["containers"][2],
            json!({ "name": "c9", "image": "x" })
        );
    }

    #[test]
    fn owner_references_merge_by_uid() {
        let o = json!({ "metadata": { "ownerReferences": [{ "uid": "1", "name": "a" }] } });
        let out = smp(
            Kind::ConfigMap,
            &o,
            json!({ "metadata": { "ownerReferences": [{ "uid": "2", "name": "b" }] } }),
        );
        assert_eq!(
            out["metadata"]["ownerReferences"].as_array().unwrap().len(),
            2
        );
    }
}
