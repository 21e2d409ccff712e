//! Deletion as the real server does it: finalizers hold objects (with `deletionTimestamp` set)
//! until they are removed; pods bound to a node delete gracefully and wait for the kubelet's
//! final `gracePeriodSeconds=0` delete; namespaces turn Terminating, have their contents deleted,
//! and disappear once empty (the namespace controller's job, done here after every write).

use std::sync::Arc;

use serde_json::{json, Value};

use super::errors::ApiError;
use super::meta;
use super::resources::{def, id_of, Kind, ResourceId, RESOURCES};
use super::store::Store;

/// `DeleteOptions`, from the body and/or the query string.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
    pub dry_run: bool,
}

impl DeleteOptions {
    /// Reads a `DeleteOptions` JSON body (absent or empty is fine).
    pub fn from_body(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        let s = |path: &[&str]| meta::str_at(&v, path).map(str::to_string);
        Ok(DeleteOptions {
            grace_period_seconds: v.get("gracePeriodSeconds").and_then(Value::as_i64),
            precondition_uid: s(&["preconditions", "uid"]),
            precondition_resource_version: s(&["preconditions", "resourceVersion"]),
            dry_run: v
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x == "All")),
        })
    }
}

#[derive(Debug)]
pub enum DeleteOutcome {
    /// Still present (finalizers, graceful pod deletion, terminating namespace).
    Pending(Arc<Value>),
    /// Gone.
    Removed(Arc<Value>),
}

fn is_terminal_pod(obj: &Value) -> bool {
    matches!(
        meta::str_at(obj, &["status", "phase"]),
        Some("Succeeded") | Some("Failed")
    )
}

/// The grace period a delete gets: pods that a kubelet must stop get the requested period or
/// their own terminationGracePeriodSeconds; everything else goes at once.
fn grace_period(kind: Kind, obj: &Value, requested: Option<i64>) -> i64 {
    if kind != Kind::Pod {
        return 0;
    }
    let bound = meta::str_at(obj, &["spec", "nodeName"]).is_some_and(|n| !n.is_empty());
    if !bound || is_terminal_pod(obj) {
        return 0;
    }
    requested
        .or_else(|| {
            meta::value_at(obj, &["spec", "terminationGracePeriodSeconds"]).and_then(Value::as_i64)
        })
        .unwrap_or(30)
        .max(0)
}

pub fn delete(
    store: &mut Store,
    res: ResourceId,
    ns: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<DeleteOutcome, ApiError> {
    let outcome = delete_one(store, res, ns, name, opts)?;
    if !opts.dry_run {
        finalize_namespaces(store);
    }
    Ok(outcome)
}

fn delete_one(
    store: &mut Store,
    res: ResourceId,
    ns: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<DeleteOutcome, ApiError> {
    let d = def(res);
    let current = store
        .get(res, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(d.group, d.plural, name))?;
    if let Some(uid) = &opts.precondition_uid {
        if uid != meta::uid(&current) {
            return Err(ApiError::conflict(
                d.group,
                d.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::uid(&current)
                ),
            ));
        }
    }
    if let Some(rv) = &opts.precondition_resource_version {
        if rv != meta::resource_version(&current) {
            return Err(ApiError::conflict(
                d.group,
                d.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta::resource_version(&current)
                ),
            ));
        }
    }

    if d.kind_id == Kind::Namespace {
        if meta::is_deleting(&current) {
            return Ok(DeleteOutcome::Pending(current));
        }
        let mut ns_obj = (*current).clone();
        meta::set_meta(&mut ns_obj, "deletionTimestamp", json!(meta::now_rfc3339()));
        meta::set_meta(&mut ns_obj, "deletionGracePeriodSeconds", json!(0));
        meta::object_field_mut(&mut ns_obj, "status").insert("phase".into(), json!("Terminating"));
        if opts.dry_run {
            return Ok(DeleteOutcome::Pending(Arc::new(ns_obj)));
        }
        return Ok(DeleteOutcome::Pending(store.put(res, ns_obj)));
    }

    let grace = grace_period(d.kind_id, &current, opts.grace_period_seconds);
    let has_finalizers = !meta::finalizers(&current).is_empty();
    let pending_grace = meta::value_at(&current, &["metadata", "deletionGracePeriodSeconds"])
        .and_then(Value::as_i64);

    if meta::is_deleting(&current) {
        // A repeated delete can only shorten a pending grace period.
        let shorter = pending_grace.is_some_and(|g| grace < g);
        if !shorter {
            return Ok(DeleteOutcome::Pending(current));
        }
    }
    if grace == 0 && !has_finalizers {
        if opts.dry_run {
            return Ok(DeleteOutcome::Removed(current));
        }
        return store
            .remove(res, ns, name)
            .map(DeleteOutcome::Removed)
            .ok_or_else(|| ApiError::not_found(d.group, d.plural, name));
    }
    let mut obj = (*current).clone();
    meta::set_meta(
        &mut obj,
        "deletionTimestamp",
        json!(meta::rfc3339_in(grace)),
    );
    meta::set_meta(&mut obj, "deletionGracePeriodSeconds", json!(grace));
    if opts.dry_run {
        return Ok(DeleteOutcome::Pending(Arc::new(obj)));
    }
    Ok(DeleteOutcome::Pending(store.put(res, obj)))
}

/// After an update: an object being deleted whose finalizers are all gone (and whose grace
/// period is over) is removed.
pub fn remove_if_finalized(store: &mut Store, res: ResourceId, obj: &Value) {
    let grace = meta::value_at(obj, &["metadata", "deletionGracePeriodSeconds"])
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let namespace_spec_finalizers = meta::value_at(obj, &["spec", "finalizers"])
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
        && def(res).kind_id == Kind::Namespace;
    if meta::is_deleting(obj)
        && meta::finalizers(obj).is_empty()
        && grace == 0
        && !namespace_spec_finalizers
    {
        store.remove(res, meta::namespace(obj), meta::name(obj));
    }
}

/// The namespace controller: deletes the contents of Terminating namespaces and removes each
/// namespace once nothing is left in it. Idempotent; called after every write.
pub fn finalize_namespaces(store: &mut Store) {
    let ns_res = id_of(Kind::Namespace);
    let terminating: Vec<String> = store
        .iter(ns_res, None)
        .filter(|(_, o)| meta::is_deleting(o))
        .map(|(k, _)| k.1.clone())
        .collect();
    for ns in terminating {
        for (res, d) in RESOURCES.iter().enumerate() {
            if !d.namespaced {
                continue;
            }
            let names: Vec<String> = store
                .iter(res, Some(&ns))
                .filter(|(_, o)| !meta::is_deleting(o))
                .map(|(k, _)| k.1.clone())
                .collect();
            for name in names {
                // Errors cannot happen for objects just listed; the next pass retries anyway.
                let _ = delete_one(store, res, &ns, &name, &DeleteOptions::default());
            }
        }
        if store.count_in_namespace(&ns) > 0 {
            continue;
        }
        let Some(current) = store.get(ns_res, "", &ns).cloned() else {
            continue;
        };
        let mut obj = (*current).clone();
        let had_spec_finalizer = meta::value_at(&obj, &["spec", "finalizers"])
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if had_spec_finalizer {
            meta::object_field_mut(&mut obj, "spec").insert("finalizers".into(), json!([]));
            let updated = store.put(ns_res, obj);
            remove_if_finalized(store, ns_res, &updated);
        } else {
            remove_if_finalized(store, ns_res, &current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut Store, kind: Kind, obj: Value) -> Arc<Value> {
        store.put(id_of(kind), obj)
    }

    fn pod(node: Option<&str>, phase: &str) -> Value {
        json!({ "metadata": { "namespace": "a", "name": "p", "uid": "u1" },
                "spec": { "nodeName": node, "terminationGracePeriodSeconds": 7 },
                "status": { "phase": phase } })
    }

    #[test]
    fn unbound_and_terminal_pods_go_at_once() {
        let pods = id_of(Kind::Pod);
        for p in [pod(None, "Pending"), pod(Some("n1"), "Succeeded")] {
            let mut s = Store::new(100);
            put(&mut s, Kind::Pod, p);
            let out = delete(&mut s, pods, "a", "p", &DeleteOptions::default()).unwrap();
            assert!(matches!(out, DeleteOutcome::Removed(_)));
            assert!(s.get(pods, "a", "p").is_none());
        }
    }

    #[test]
    fn bound_pods_wait_for_the_kubelet() {
        let pods = id_of(Kind::Pod);
        let mut s = Store::new(100);
        put(&mut s, Kind::Pod, pod(Some("n1"), "Running"));
        let out = delete(&mut s, pods, "a", "p", &DeleteOptions::default()).unwrap();
        let DeleteOutcome::Pending(obj) = out else {
            panic!("expected pending")
        };
        assert_eq!(obj["metadata"]["deletionGracePeriodSeconds"], 7);
        // Repeating with a longer period changes nothing.
        let again = delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                grace_period_seconds: Some(60),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(again, DeleteOutcome::Pending(_)));
        let rv_before = s.current_rv();
        assert_eq!(rv_before, 2);
        let last = delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(last, DeleteOutcome::Removed(_)));
    }

    #[test]
    fn finalizers_hold_objects_until_removed() {
        let cms = id_of(Kind::ConfigMap);
        let mut s = Store::new(100);
        put(
            &mut s,
            Kind::ConfigMap,
            json!({ "metadata": { "namespace": "a", "name": "c", "finalizers": ["x/y"] } }),
        );
        let out = delete(&mut s, cms, "a", "c", &DeleteOptions::default()).unwrap();
        let DeleteOutcome::Pending(obj) = out else {
            panic!("expected pending")
        };
        assert!(meta::is_deleting(&obj));
        let mut cleared = (*obj).clone();
        cleared["metadata"]["finalizers"] = json!([]);
        let updated = s.put(cms, cleared);
        remove_if_finalized(&mut s, cms, &updated);
        assert!(s.get(cms, "a", "c").is_none());
    }

    #[test]
    fn preconditions() {
        let pods = id_of(Kind::Pod);
        let mut s = Store::new(100);
        put(&mut s, Kind::Pod, pod(None, "Pending"));
        let e = delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                precondition_uid: Some("other".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code, 409);
        let e = delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                precondition_resource_version: Some("99".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code, 409);
        assert!(delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                precondition_uid: Some("u1".into()),
                ..Default::default()
            }
        )
        .is_ok());
    }

    #[test]
    fn namespaces_drain_then_vanish() {
        let nss = id_of(Kind::Namespace);
        let pods = id_of(Kind::Pod);
        let mut s = Store::new(100);
        put(
            &mut s,
            Kind::Namespace,
            json!({ "metadata": { "name": "a" }, "spec": { "finalizers": ["kubernetes"] }, "status": { "phase": "Active" } }),
        );
        put(&mut s, Kind::Pod, pod(Some("n1"), "Running"));
        put(
            &mut s,
            Kind::ConfigMap,
            json!({ "metadata": { "namespace": "a", "name": "c" } }),
        );
        let out = delete(&mut s, nss, "", "a", &DeleteOptions::default()).unwrap();
        let DeleteOutcome::Pending(ns) = out else {
            panic!("expected pending")
        };
        assert_eq!(ns["status"]["phase"], "Terminating");
        assert!(s.get(id_of(Kind::ConfigMap), "a", "c").is_none());
        assert!(meta::is_deleting(s.get(pods, "a", "p").unwrap()));
        assert!(
            s.get(nss, "", "a").is_some(),
            "the bound pod keeps it alive"
        );
        delete(
            &mut s,
            pods,
            "a",
            "p",
            &DeleteOptions {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.get(nss, "", "a").is_none());
    }

    #[test]
    fn delete_options_body() {
        let o = DeleteOptions::from_body(br#"{"kind":"DeleteOptions","gracePeriodSeconds":0,"preconditions":{"uid":"u"},"dryRun":["All"]}"#).unwrap();
        assert_eq!(o.grace_period_seconds, Some(0));
        assert_eq!(o.precondition_uid.as_deref(), Some("u"));
        assert!(o.dry_run);
        assert_eq!(
            DeleteOptions::from_body(b"").unwrap(),
            DeleteOptions::default()
        );
        assert_eq!(DeleteOptions::from_body(b"{").unwrap_err().code, 400);
    }
}
