//! Server-side apply (`application/apply-patch+yaml`), reduced to what controllers rely on:
//!
//! - the object is created when missing;
//! - the applied fields are merged in (strategic-merge semantics for lists);
//! - fields this manager applied before and has now left out are removed, unless another apply
//!   manager also owns them;
//! - a field another apply manager owns with a different value is a 409 conflict unless `force`.
//!
//! Ownership is recorded in `metadata.managedFields` (`operation: Apply`, `fieldsType: FieldsV1`),
//! in the real `f:` / `k:` / `v:` path syntax. Only JSON bodies are accepted (JSON is YAML; kubectl
//! and kube-rs both send JSON); ownership by non-apply updates is not tracked.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::strategic::{self, list_strategy, ListStrategy};
use crate::apiserver::errors::ApiError;
use crate::apiserver::meta;
use crate::apiserver::resources::Kind;

/// The real server's 409 for apply conflicts (structured-merge-diff's `Conflicts.Error()`): one
/// conflict on one line; several grouped by manager (sorted), one `- path` line each.
fn conflict_error(mut conflicts: Vec<(String, String)>) -> ApiError {
    let n = conflicts.len();
    let text = if n == 1 {
        format!("conflict with {:?}: {}", conflicts[0].0, conflicts[0].1)
    } else {
        conflicts.sort_by(|a, b| a.0.cmp(&b.0));
        let mut lines = Vec::new();
        for (i, (manager, path)) in conflicts.iter().enumerate() {
            if i == 0 || conflicts[i - 1].0 != *manager {
                lines.push(format!("conflicts with {manager:?}:"));
            }
            lines.push(format!("- {path}"));
        }
        lines.join("\n")
    };
    ApiError {
        code: 409,
        reason: "Conflict",
        message: format!(
            "Apply failed with {n} conflict{}: {text}",
            if n == 1 { "" } else { "s" }
        ),
        details: Some(json!({
            "causes": conflicts.iter().map(|(manager, path)| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {manager:?}"),
                "field": path,
            })).collect::<Vec<_>>(),
        })),
    }
}

/// One field path: elements `f:<field>`, `k:<json key map>` (list item by merge key) or
/// `v:<json value>` (set member).
type FieldPath = Vec<String>;
type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields the server owns; never part of a manager's field set.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk_map(
    kind: Kind,
    map: &Map<String, Value>,
    schema_path: &str,
    prefix: &FieldPath,
    out: &mut FieldSet,
) {
    for (k, v) in map {
        if schema_path.is_empty() && (k == "apiVersion" || k == "kind") {
            continue;
        }
        if schema_path == "metadata" && SYSTEM_METADATA.contains(&k.as_str()) {
            continue;
        }
        let mut p = prefix.clone();
        p.push(format!("f:{k}"));
        let fpath = child_path(schema_path, k);
        match v {
            Value::Object(m) if !m.is_empty() => walk_map(kind, m, &fpath, &p, out),
            Value::Array(items) => match list_strategy(kind, &fpath) {
                ListStrategy::MergeByKey(key) => {
                    for item in items {
                        match item.as_object().and_then(|m| m.get(key).map(|kv| (m, kv))) {
                            Some((m, kv)) => {
                                let mut ip = p.clone();
                                ip.push(format!("k:{}", json!({ key: kv })));
                                out.insert(ip.clone());
                                walk_map(kind, m, &fpath, &ip, out);
                            }
                            None => {
                                out.insert(p.clone());
                            }
                        }
                    }
                }
                ListStrategy::MergeSet => {
                    for item in items {
                        let mut ip = p.clone();
                        ip.push(format!("v:{item}"));
                        out.insert(ip);
                    }
                }
                ListStrategy::Atomic => {
                    out.insert(p);
                }
            },
            _ => {
                out.insert(p);
            }
        }
    }
}

/// The fields an applied configuration sets.
fn field_set(kind: Kind, applied: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(m) = applied.as_object() {
        walk_map(kind, m, "", &Vec::new(), &mut out);
    }
    out
}

/// Encodes a field set as a FieldsV1 tree: members are `{}` or carry `".": {}` when they also
/// have children.
fn encode(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Node {
        member: bool,
        children: BTreeMap<String, Node>,
    }
    fn to_json(n: &Node) -> Value {
        let mut m = Map::new();
        if n.member && !n.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), to_json(c));
        }
        Value::Object(m)
    }
    let mut root = Node::default();
    for path in set {
        let mut cur = &mut root;
        for el in path {
            cur = cur.children.entry(el.clone()).or_default();
        }
        cur.member = true;
    }
    to_json(&root)
}

fn decode(tree: &Value) -> FieldSet {
    fn go(v: &Value, prefix: &FieldPath, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        for (k, child) in m {
            if k == "." {
                out.insert(prefix.clone());
                continue;
            }
            let mut p = prefix.clone();
            p.push(k.clone());
            if child.as_object().is_none_or(Map::is_empty) {
                out.insert(p);
            } else {
                go(child, &p, out);
            }
        }
    }
    let mut out = FieldSet::new();
    go(tree, &Vec::new(), &mut out);
    out
}

fn item_matches(item: &Value, el: &str) -> bool {
    if let Some(keys) = el.strip_prefix("k:") {
        let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(keys) else {
            return false;
        };
        keys.iter().all(|(k, v)| item.get(k) == Some(v))
    } else if let Some(v) = el.strip_prefix("v:") {
        serde_json::from_str::<Value>(v).is_ok_and(|v| *item == v)
    } else {
        false
    }
}

fn step<'a>(cur: &'a Value, el: &str) -> Option<&'a Value> {
    match el.strip_prefix("f:") {
        Some(f) => cur.get(f),
        None => cur.as_array()?.iter().find(|i| item_matches(i, el)),
    }
}

fn step_mut<'a>(cur: &'a mut Value, el: &str) -> Option<&'a mut Value> {
    match el.strip_prefix("f:") {
        Some(f) => cur.get_mut(f),
        None => cur.as_array_mut()?.iter_mut().find(|i| item_matches(i, el)),
    }
}

fn get_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |cur, el| step(cur, el))
}

fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for el in parent_path {
        match step_mut(cur, el) {
            Some(next) => cur = next,
            None => return,
        }
    }
    match last.strip_prefix("f:") {
        Some(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        None => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !item_matches(i, last));
            }
        }
    }
}

fn display_path(path: &[String]) -> String {
    path.iter()
        .map(|el| match el.strip_prefix("f:") {
            Some(f) => format!(".{f}"),
            None => format!("[{el}]"),
        })
        .collect()
}

/// Parses an apply body. YAML is accepted only in its JSON form.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(ApiError::bad_request("apply patch body must be an object")),
        Err(_) => Err(ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: "the lab API server accepts apply patches (application/apply-patch+yaml) only in JSON form; send the object as JSON".into(),
            details: None,
        }),
    }
}

fn managed_entry(manager: &str, api_version: &str, set: &FieldSet) -> Value {
    json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": api_version,
        "time": meta::now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": encode(set),
    })
}

/// The object that results from `manager` applying `applied` over `current` (None: create).
pub fn server_side_apply(
    kind: Kind,
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
) -> Result<Value, ApiError> {
    let new_set = field_set(kind, applied);
    let Some(current) = current else {
        let mut obj = applied.clone();
        meta::set_meta(
            &mut obj,
            "managedFields",
            json!([managed_entry(manager, api_version, &new_set)]),
        );
        return Ok(obj);
    };

    let entries: Vec<Value> = meta::value_at(current, &["metadata", "managedFields"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_apply = |e: &Value| e.get("operation").and_then(Value::as_str) == Some("Apply");
    let manager_of = |e: &Value| {
        e.get("manager")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };

    let mut previous = FieldSet::new();
    let mut others: Vec<(usize, String, FieldSet)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if !is_apply(e) {
            continue;
        }
        let set = e.get("fieldsV1").map(decode).unwrap_or_default();
        if manager_of(e) == manager {
            previous = set;
        } else {
            others.push((i, manager_of(e), set));
        }
    }

    let mut conflicts = Vec::new();
    for path in &new_set {
        let leaf = path.last().is_some_and(|el| el.starts_with("f:"));
        if !leaf || get_at(current, path) == get_at(applied, path) {
            continue;
        }
        for (_, other, set) in others.iter_mut() {
            if set.contains(path) {
                if force {
                    set.remove(path);
                } else {
                    conflicts.push((other.to_string(), display_path(path)));
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflict_error(conflicts));
    }

    let mut obj = current.clone();
    // Shortest paths first: a released list item goes whole while its merge key still
    // identifies it; its own fields are then already gone.
    let mut released: Vec<&FieldPath> = previous
        .iter()
        .filter(|p| !new_set.contains(*p) && !others.iter().any(|(_, _, s)| s.contains(*p)))
        .collect();
    released.sort_by_key(|p| p.len());
    for path in released {
        remove_at(&mut obj, path);
    }
    let mut merged =
        strategic::apply(kind, &obj, applied).map_err(|e| ApiError::bad_request(e.to_string()))?;

    let mut new_entries = Vec::new();
    let mut placed = false;
    for (i, e) in entries.into_iter().enumerate() {
        if is_apply(&e) && manager_of(&e) == manager {
            new_entries.push(managed_entry(manager, api_version, &new_set));
            placed = true;
        } else if let Some((_, _, set)) = others.iter().find(|(j, _, _)| *j == i) {
            if !set.is_empty() {
                let mut e = e;
                e["fieldsV1"] = encode(set);
                new_entries.push(e);
            }
        } else {
            new_entries.push(e);
        }
    }
    if !placed {
        new_entries.push(managed_entry(manager, api_version, &new_set));
    }
    meta::set_meta(&mut merged, "managedFields", Value::Array(new_entries));
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_apply(annotations: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n1", "annotations": annotations } })
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let pod = json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "labels": { "a": "1" }, "finalizers": ["f"] },
            "spec": { "containers": [{ "name": "c", "image": "i" }], "tolerations": [{ "key": "k" }] } });
        let set = field_set(Kind::Pod, &pod);
        let tree = encode(&set);
        assert_eq!(
            tree["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["."],
            json!({})
        );
        assert_eq!(
            tree["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["f:image"],
            json!({})
        );
        assert_eq!(tree["f:metadata"]["f:finalizers"]["v:\"f\""], json!({}));
        assert_eq!(tree["f:spec"]["f:tolerations"], json!({}));
        assert!(tree["f:metadata"].get("f:name").is_none());
        assert_eq!(decode(&tree), set);
    }

    #[test]
    fn apply_creates_then_drops_fields_left_out() {
        let created = server_side_apply(
            Kind::Node,
            None,
            &node_apply(json!({ "a": "1", "b": "2" })),
            "agent",
            false,
            "v1",
        )
        .unwrap();
        assert_eq!(created["metadata"]["managedFields"][0]["manager"], "agent");
        let mut current = created.clone();
        current["metadata"]["annotations"]["other"] = json!("kept");
        let out = server_side_apply(
            Kind::Node,
            Some(&current),
            &node_apply(json!({ "a": "3" })),
            "agent",
            false,
            "v1",
        )
        .unwrap();
        assert_eq!(
            out["metadata"]["annotations"],
            json!({ "a": "3", "other": "kept" })
        );
        assert_eq!(
            out["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn shared_fields_survive_and_conflicts_need_force() {
        let one = server_side_apply(
            Kind::Node,
            None,
            &node_apply(json!({ "a": "1" })),
            "m1",
            false,
            "v1",
        )
        .unwrap();
        let two = server_side_apply(
            Kind::Node,
            Some(&one),
            &node_apply(json!({ "a": "1", "b": "2" })),
            "m2",
            false,
            "v1",
        )
        .unwrap();
        // m1 drops "a", but m2 still applies it: it stays.
        let three = server_side_apply(
            Kind::Node,
            Some(&two),
            &node_apply(json!({})),
            "m1",
            false,
            "v1",
        )
        .unwrap();
        assert_eq!(three["metadata"]["annotations"]["a"], "1");
        let e = server_side_apply(
            Kind::Node,
            Some(&three),
            &node_apply(json!({ "b": "changed" })),
            "m3",
            false,
            "v1",
        )
        .unwrap_err();
        assert_eq!(e.code, 409);
        assert!(
            e.message
                .contains("conflict with \"m2\": .metadata.annotations.b"),
            "{}",
            e.message
        );
        let forced = server_side_apply(
            Kind::Node,
            Some(&three),
            &node_apply(json!({ "b": "changed" })),
            "m3",
            true,
            "v1",
        )
        .unwrap();
        assert_eq!(forced["metadata"]["annotations"]["b"], "changed");
        // Several conflicts read as the real server writes them (kubectl prints this verbatim).
        let e = server_side_apply(
            Kind::Node,
            Some(&three),
            &node_apply(json!({ "a": "x", "b": "y" })),
            "m3",
            false,
            "v1",
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "Apply failed with 2 conflicts: conflicts with \"m2\":\n- .metadata.annotations.a\n- .metadata.annotations.b"
        );
        assert_eq!(
            e.details.unwrap()["causes"][0],
            json!({"reason": "FieldManagerConflict", "message": "conflict with \"m2\"", "field": ".metadata.annotations.a"})
        );
    }

    #[test]
    fn keyed_list_items_are_released_whole() {
        let applied = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n" },
            "status": { "conditions": [{ "type": "A", "status": "True" }, { "type": "B", "status": "True" }] } });
        let created = server_side_apply(Kind::Node, None, &applied, "m", false, "v1").unwrap();
        let applied2 = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n" },
            "status": { "conditions": [{ "type": "B", "status": "False" }] } });
        let out =
            server_side_apply(Kind::Node, Some(&created), &applied2, "m", false, "v1").unwrap();
        assert_eq!(
            out["status"]["conditions"],
            json!([{ "type": "B", "status": "False" }])
        );
    }

    #[test]
    fn only_json_bodies() {
        assert_eq!(
            parse_body(b"apiVersion: v1\nkind: Node\n")
                .unwrap_err()
                .code,
            415
        );
        assert!(parse_body(br#"{"apiVersion":"v1"}"#).is_ok());
    }
}
