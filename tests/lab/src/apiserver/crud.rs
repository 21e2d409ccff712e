//! The write and read verbs over the store: create, update (PUT), patch, list, binding. These are
//! pure functions of the store and the request (no HTTP), so they are what the semantics tests
//! pin down; `http` only parses requests and renders results.

use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use super::errors::{ApiError, Cause};
use super::kinds::{self, FieldValidation};
use super::lifecycle;
use super::meta;
use super::patch::{self, apply, PatchType};
use super::resources::{def, Kind, ResourceDef, ResourceId};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ObjectKey, Store};

#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    pub field_manager: Option<String>,
    /// Server-side apply `force`.
    pub force: bool,
}

/// A successful write: the object, warnings for the `Warning` header, and whether it was created
/// (201) rather than updated (200).
#[derive(Debug)]
pub struct Written {
    pub object: Arc<Value>,
    pub warnings: Vec<String>,
    pub created: bool,
}

/// Checks or fills `apiVersion` and `kind` of a request body.
fn check_type_meta(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of the request must be a {} object",
            def.kind
        )));
    };
    let want_av = def.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("apiVersion".into(), json!(want_av));
        }
        Some(av) if av == want_av => {}
        Some(av) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )))
        }
    }
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("kind".into(), json!(def.kind));
        }
        Some(k) if k == def.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )))
        }
    }
    Ok(())
}

/// Defaults the namespace from the URL, rejecting a body that names another one.
fn check_namespace(
    def: &ResourceDef,
    url_ns: Option<&str>,
    obj: &mut Value,
) -> Result<(), ApiError> {
    if !def.namespaced {
        meta::remove_meta(obj, "namespace");
        return Ok(());
    }
    let url_ns = url_ns.unwrap_or("");
    let body_ns = meta::namespace(obj).to_string();
    if body_ns.is_empty() {
        meta::set_meta(obj, "namespace", json!(url_ns));
    } else if body_ns != url_ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

/// 404 if the namespace is missing, 403 if it is being deleted (no new content then).
fn check_namespace_accepts(
    store: &Store,
    def: &ResourceDef,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    if !def.namespaced {
        return Ok(());
    }
    let ns_res = super::resources::id_of(Kind::Namespace);
    match store.get(ns_res, "", ns) {
        None => Err(ApiError::not_found("", "namespaces", ns)),
        Some(n) if meta::is_deleting(n) => Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                super::errors::qualified(def.group, def.plural),
            ),
            details: Some(json!({ "kind": def.plural, "causes": [{ "reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace" }] })),
        }),
        Some(_) => Ok(()),
    }
}

pub fn get(store: &Store, res: ResourceId, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
    let d = def(res);
    store
        .get(res, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(d.group, d.plural, name))
}

/// POST: creates `body` in `url_ns`.
pub fn create(
    store: &mut Store,
    res: ResourceId,
    url_ns: Option<&str>,
    mut body: Value,
    opts: &WriteOptions,
) -> Result<Written, ApiError> {
    let d = def(res);
    check_type_meta(d, &mut body)?;
    check_namespace(d, url_ns, &mut body)?;
    let ns = meta::namespace(&body).to_string();
    if d.namespaced && ns.is_empty() {
        return Err(ApiError::bad_request(
            "namespace is required for namespaced resources",
        ));
    }
    if !meta::resource_version(&body).is_empty() {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let generate = meta::str_at(&body, &["metadata", "generateName"])
        .unwrap_or("")
        .to_string();
    if meta::name(&body).is_empty() {
        if generate.is_empty() {
            return Err(ApiError::invalid(
                d.group,
                d.kind,
                "",
                vec![Cause {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        // Retry on the (unlikely) collision, as the real server's clients would.
        let mut name = meta::generated_name(&generate);
        for _ in 0..8 {
            if store.get(res, &ns, &name).is_none() {
                break;
            }
            name = meta::generated_name(&generate);
        }
        meta::set_meta(&mut body, "name", json!(name));
    }
    let name = meta::name(&body).to_string();
    kinds::validate_name(d, &name)?;
    check_namespace_accepts(store, d, &ns, &name)?;
    kinds::validate(d, &body)?;
    let decoded = kinds::decode(d, &body, opts.field_validation)?;
    let mut obj = decoded.object;
    kinds::apply_defaults(d, &mut obj);
    kinds::prepare_for_create(d, &mut obj);
    {
        let md = meta::metadata_mut(&mut obj);
        md.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        md.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
        md.remove("deletionTimestamp");
        md.remove("deletionGracePeriodSeconds");
        md.remove("selfLink");
        if d.tracks_generation {
            md.insert("generation".into(), json!(1));
        } else {
            md.remove("generation");
        }
    }
    if store.get(res, &ns, &name).is_some() {
        return Err(ApiError::already_exists(d.group, d.plural, &name));
    }
    let object = if opts.dry_run {
        Arc::new(obj)
    } else {
        store.put(res, obj)
    };
    Ok(Written {
        object,
        warnings: decoded.warnings,
        created: true,
    })
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// Shared tail of PUT, PATCH and apply: `candidate` is the full new object the client wants.
fn update_existing(
    store: &mut Store,
    res: ResourceId,
    old: Arc<Value>,
    mut candidate: Value,
    status_only: bool,
    opts: &WriteOptions,
) -> Result<Written, ApiError> {
    let d = def(res);
    let name = meta::name(&old).to_string();
    check_type_meta(d, &mut candidate)?;
    let cand_name = meta::name(&candidate);
    if cand_name.is_empty() {
        meta::set_meta(&mut candidate, "name", json!(name));
    } else if cand_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({cand_name}) does not match the name on the URL ({name})"
        )));
    }
    check_namespace(d, Some(meta::namespace(&old)), &mut candidate)?;
    let rv = meta::resource_version(&candidate);
    if !rv.is_empty() && rv != meta::resource_version(&old) {
        return Err(ApiError::stale(d.group, d.plural, &name));
    }
    let uid = meta::uid(&candidate);
    if !uid.is_empty() && uid != meta::uid(&old) {
        return Err(ApiError::conflict(
            d.group,
            d.plural,
            &name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta::uid(&old)
            ),
        ));
    }

    let mut new = if status_only {
        // The status subresource resets what the real server's status strategies reset (their
        // `GetResetFields`): the spec, and for pods deletionTimestamp and ownerReferences. Labels
        // and annotations written through `/status` are kept: Flannel, and veilnet, publish node
        // annotations this way so their RBAC needs only `nodes/status`.
        let mut n = candidate;
        match old.get("spec") {
            Some(s) => n["spec"] = s.clone(),
            None => {
                if let Some(m) = n.as_object_mut() {
                    m.remove("spec");
                }
            }
        }
        if d.plural == "pods" {
            for key in ["deletionTimestamp", "ownerReferences"] {
                match old["metadata"].get(key) {
                    Some(v) => n["metadata"][key] = v.clone(),
                    None => {
                        if let Some(m) = n["metadata"].as_object_mut() {
                            m.remove(key);
                        }
                    }
                }
            }
        }
        n
    } else {
        if d.has_status_subresource() {
            // The main resource ignores status changes.
            match old.get("status") {
                Some(s) => candidate["status"] = s.clone(),
                None => {
                    if let Some(m) = candidate.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        candidate
    };

    kinds::validate(d, &new)?;
    let decoded = kinds::decode(d, &new, opts.field_validation)?;
    new = decoded.object;
    {
        let old_md = old.get("metadata").cloned().unwrap_or_default();
        let md = meta::metadata_mut(&mut new);
        for key in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_md.get(key) {
                Some(v) => md.insert(key.into(), v.clone()),
                None => md.remove(key),
            };
        }
        md.remove("selfLink");
        if !md.contains_key("managedFields") {
            if let Some(mf) = old_md.get("managedFields") {
                md.insert("managedFields".into(), mf.clone());
            }
        }
        md.insert(
            "resourceVersion".into(),
            json!(meta::resource_version(&old)),
        );
    }
    kinds::apply_defaults(d, &mut new);
    if meta::is_deleting(&old) {
        let before = meta::finalizers(&old);
        if meta::finalizers(&new).iter().any(|f| !before.contains(f)) {
            return Err(ApiError::invalid(
                d.group,
                d.kind,
                &name,
                vec![Cause::forbidden(
                    "metadata.finalizers",
                    "no new finalizers can be added if the object is being deleted",
                )],
            ));
        }
    }
    kinds::validate_update(d, &old, &new)?;
    if d.tracks_generation && spec_part(&old) != spec_part(&new) {
        let g = meta::value_at(&old, &["metadata", "generation"])
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta::set_meta(&mut new, "generation", json!(g + 1));
    }
    if new == *old {
        // A no-op write does not bump the resourceVersion, as with the real server.
        return Ok(Written {
            object: old,
            warnings: decoded.warnings,
            created: false,
        });
    }
    if opts.dry_run {
        return Ok(Written {
            object: Arc::new(new),
            warnings: decoded.warnings,
            created: false,
        });
    }
    let object = store.put(res, new);
    lifecycle::remove_if_finalized(store, res, &object);
    lifecycle::finalize_namespaces(store);
    Ok(Written {
        object,
        warnings: decoded.warnings,
        created: false,
    })
}

/// PUT. A missing object is created only for resources that allow it (leases, events).
pub fn update(
    store: &mut Store,
    res: ResourceId,
    ns: &str,
    name: &str,
    mut body: Value,
    status_only: bool,
    opts: &WriteOptions,
) -> Result<Written, ApiError> {
    let d = def(res);
    match store.get(res, ns, name).cloned() {
        Some(old) => update_existing(store, res, old, body, status_only, opts),
        None if d.allow_create_on_update && !status_only => {
            if meta::name(&body).is_empty() {
                meta::set_meta(&mut body, "name", json!(name));
            } else if meta::name(&body) != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    meta::name(&body)
                )));
            }
            meta::remove_meta(&mut body, "resourceVersion");
            let url_ns = if d.namespaced { Some(ns) } else { None };
            create(store, res, url_ns, body, opts)
        }
        None => Err(ApiError::not_found(d.group, d.plural, name)),
    }
}

/// PATCH with any of the four patch types.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &mut Store,
    res: ResourceId,
    ns: &str,
    name: &str,
    patch_type: PatchType,
    body: &[u8],
    status_only: bool,
    opts: &WriteOptions,
) -> Result<Written, ApiError> {
    let d = def(res);
    let current = store.get(res, ns, name).cloned();
    if patch_type == PatchType::Apply {
        let manager = opts
            .field_manager
            .as_deref()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::bad_request("PATCH, application/apply-patch+yaml: fieldManager is required for apply requests"))?;
        let mut applied = apply::parse_body(body)?;
        check_type_meta(d, &mut applied)?;
        if meta::name(&applied).is_empty() {
            meta::set_meta(&mut applied, "name", json!(name));
        } else if meta::name(&applied) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&applied)
            )));
        }
        if d.namespaced {
            check_namespace(d, Some(ns), &mut applied)?;
        }
        let merged = apply::server_side_apply(
            d.kind_id,
            current.as_deref(),
            &applied,
            manager,
            opts.force,
            &d.api_version(),
        )?;
        return match current {
            Some(old) => update_existing(store, res, old, merged, status_only, opts),
            None if status_only => Err(ApiError::not_found(d.group, d.plural, name)),
            None => {
                let url_ns = if d.namespaced { Some(ns) } else { None };
                create(store, res, url_ns, merged, opts)
            }
        };
    }
    let old = current.ok_or_else(|| ApiError::not_found(d.group, d.plural, name))?;
    let candidate = patch::apply_patch(d.kind_id, &old, patch_type, body)?;
    update_existing(store, res, old, candidate, status_only, opts)
}

/// POST pods/<name>/binding: assigns an unbound pod to a node.
pub fn bind(
    store: &mut Store,
    res: ResourceId,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    let d = def(res);
    let old = get(store, res, ns, name)?;
    let node = meta::str_at(body, &["target", "name"]).unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::invalid(
            d.group,
            "Binding",
            name,
            vec![Cause::required("target.name")],
        ));
    }
    if let Some(existing) = meta::str_at(&old, &["spec", "nodeName"]).filter(|n| !n.is_empty()) {
        return Err(ApiError::conflict(
            d.group,
            d.plural,
            name,
            &format!("pod {name} is already assigned to node \"{existing}\""),
        ));
    }
    let mut new = (*old).clone();
    meta::object_field_mut(&mut new, "spec").insert("nodeName".into(), json!(node));
    store.put(res, new);
    Ok(
        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 }),
    )
}

// ---------------------------------------------------------------------------------------------
// list

#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

fn encode_continue(rv: u64, key: &(String, String)) -> String {
    let t = ContinueToken {
        rv,
        ns: key.0.clone(),
        name: key.1.clone(),
    };
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&t).unwrap_or_default())
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    let bad = || {
        ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

pub fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))
}

pub fn matches(
    ns: Option<&str>,
    opts_labels: &LabelSelector,
    opts_fields: &FieldSelector,
    obj: &Value,
) -> bool {
    ns.is_none_or(|ns| meta::namespace(obj) == ns)
        && opts_labels.matches(obj)
        && opts_fields.matches(obj)
}

pub fn list(
    store: &Store,
    res: ResourceId,
    ns: Option<&str>,
    opts: &ListOptions,
) -> Result<ListResult, ApiError> {
    let current = store.current_rv();
    let mut list_rv = current;
    let mut start_after = None;
    if let Some(token) = opts.continue_token.as_deref().filter(|t| !t.is_empty()) {
        let t = decode_continue(token)?;
        if t.rv < store.compacted_rv() {
            return Err(ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
        }
        list_rv = t.rv;
        start_after = Some((t.ns, t.name));
    } else if let Some(rv) = opts
        .resource_version
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "0")
    {
        let rv = parse_rv(rv)?;
        if rv > current {
            return Err(ApiError::too_large_resource_version(rv, current));
        }
        // Without snapshots, Exact can only be served for the current revision.
        if opts.resource_version_match.as_deref() == Some("Exact") && rv != current {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({current})"
            )));
        }
    }
    match opts.resource_version_match.as_deref() {
        None | Some("") | Some("NotOlderThan") | Some("Exact") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown resourceVersionMatch value: {other}"
            )));
        }
    }

    let candidates: Box<dyn Iterator<Item = (&ObjectKey, &Arc<Value>)>> = match &start_after {
        Some(after) => Box::new(
            store
                .iter_from(res, after)
                .take_while(move |(k, _)| ns.is_none_or(|ns| k.0 == ns)),
        ),
        None => Box::new(store.iter(res, ns)),
    };
    let mut items = Vec::new();
    let mut last_key = None;
    let mut remaining = 0usize;
    for (key, obj) in candidates {
        if !matches(ns, &opts.labels, &opts.fields, obj) {
            continue;
        }
        if opts.limit.is_some_and(|l| l > 0 && items.len() >= l) {
            remaining += 1;
            continue;
        }
        items.push(obj.clone());
        last_key = Some(key.clone());
    }
    let (continue_token, remaining) = match (remaining, last_key) {
        (0, _) | (_, None) => (None, None),
        (n, Some(k)) => (Some(encode_continue(list_rv, &k)), Some(n)),
    };
    Ok(ListResult {
        items,
        resource_version: list_rv,
        continue_token,
        remaining,
    })
}

/// The `<Kind>List` JSON of a list result.
pub fn list_json(d: &ResourceDef, r: &ListResult) -> Value {
    let mut md = json!({ "resourceVersion": r.resource_version.to_string() });
    if let Some(c) = &r.continue_token {
        md["continue"] = json!(c);
    }
    if let Some(n) = r.remaining {
        md["remainingItemCount"] = json!(n);
    }
    json!({
        "kind": format!("{}List", d.kind),
        "apiVersion": d.api_version(),
        "metadata": md,
        "items": r.items.iter().map(|o| (**o).clone()).collect::<Vec<_>>(),
    })
}
