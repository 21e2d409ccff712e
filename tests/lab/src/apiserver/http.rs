//! HTTP routing: one fallback handler parses the Kubernetes URL grammar
//! (`/api/v1[/namespaces/<ns>]/<resource>[/<name>[/<subresource>]]`, `/apis/<group>/<version>/…`,
//! legacy `/watch/` prefixes), negotiates the response form (`Accept`), and calls `crud`,
//! `lifecycle` and `watch`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::authorization;
use super::crud::{self, ListOptions, WriteOptions};
use super::discovery;
use super::errors::{success_status, ApiError};
use super::kinds::FieldValidation;
use super::lifecycle::{self, DeleteOptions, DeleteOutcome};
use super::meta;
use super::openapi;
use super::patch::PatchType;
use super::protobuf;
use super::resources::{def, find, ResourceDef, ResourceId};
use super::selectors::{FieldSelector, LabelSelector};
use super::state::ApiState;
use super::tables::{self, IncludeObject};
use super::watch::{self, Output, WatchRequest};

/// The in-process service: everything the API stand-in serves.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

type Params = HashMap<String, String>;

async fn dispatch(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = match handle(&state, &method, &uri, &headers, &body) {
        Ok(r) => r,
        Err(e) => {
            if e.code >= 500 || !matches!(e.code, 404 | 409 | 410) {
                tracing::warn!(%method, %uri, code = e.code, reason = e.reason, message = %e.message, "request failed");
            }
            e.into_response()
        }
    };
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "request");
    response
}

fn json_response(status: StatusCode, value: &Value, warnings: &[String]) -> Response {
    let mut resp = (status, value.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.append(header::WARNING, v);
        }
    }
    resp
}

fn ok(value: &Value) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, value, &[]))
}

fn body_encoding(headers: &HeaderMap) -> authorization::Encoding {
    authorization::Encoding::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )
}

fn created(value: &Value) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::CREATED, value, &[]))
}

/// Picks the response form from `Accept`: plain JSON, a `meta.k8s.io` Table, or
/// PartialObjectMetadata; 406 if nothing offered is servable.
pub fn negotiate(headers: &HeaderMap, params: &Params) -> Result<Output, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Output::Json);
    };
    if accept.trim().is_empty() {
        return Ok(Output::Json);
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let essence = parts.next().unwrap_or("").to_ascii_lowercase();
        let p: HashMap<&str, &str> = parts
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        if !matches!(
            essence.as_str(),
            "application/json" | "*/*" | "application/*"
        ) {
            continue;
        }
        match p.get("as").copied() {
            None => return Ok(Output::Json),
            Some("Table")
                if p.get("g") == Some(&"meta.k8s.io")
                    && matches!(p.get("v").copied(), Some("v1") | Some("v1beta1")) =>
            {
                return Ok(Output::Table(IncludeObject::parse(
                    params.get("includeObject").map(String::as_str),
                )));
            }
            Some("PartialObjectMetadata") | Some("PartialObjectMetadataList")
                if p.get("g") == Some(&"meta.k8s.io") =>
            {
                return Ok(Output::Metadata);
            }
            Some(_) => continue,
        }
    }
    Err(ApiError::not_acceptable(accept))
}

fn render_object(d: &ResourceDef, obj: &Value, output: Output) -> Value {
    match output {
        Output::Json => obj.clone(),
        Output::Metadata => tables::partial_metadata(obj),
        Output::Table(include) => tables::to_table(
            d,
            [obj],
            include,
            json!({ "resourceVersion": meta::resource_version(obj) }),
        ),
    }
}

fn render_list(d: &ResourceDef, list: &crud::ListResult, output: Output) -> Value {
    match output {
        Output::Json => crud::list_json(d, list),
        Output::Table(include) => {
            let full = crud::list_json(d, list);
            tables::to_table(
                d,
                list.items.iter().map(|o| o.as_ref()),
                include,
                full["metadata"].clone(),
            )
        }
        Output::Metadata => {
            let full = crud::list_json(d, list);
            json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": full["metadata"],
                "items": list.items.iter().map(|o| tables::partial_metadata(o)).collect::<Vec<_>>(),
            })
        }
    }
}

/// A parsed resource URL.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    res: ResourceId,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
    legacy_watch: bool,
}

fn parse_target<'a>(group: &str, version: &str, rest: &[&'a str]) -> Result<Target<'a>, ApiError> {
    let (legacy_watch, rest) = match rest.first() {
        Some(&"watch") => (true, &rest[1..]),
        _ => (false, rest),
    };
    let (namespace, plural, tail) = if rest.len() >= 3
        && rest[0] == "namespaces"
        && !matches!(rest[2], "status" | "finalize")
    {
        (Some(rest[1]), rest[2], &rest[3..])
    } else if !rest.is_empty() {
        (None, rest[0], &rest[1..])
    } else {
        return Err(ApiError::no_such_path());
    };
    if tail.len() > 2 {
        return Err(ApiError::no_such_path());
    }
    let res = find(group, version, plural).ok_or_else(ApiError::no_such_path)?;
    let d = def(res);
    let name = tail.first().copied();
    let subresource = tail.get(1).copied();
    if (!d.namespaced && namespace.is_some())
        || (d.namespaced && namespace.is_none() && name.is_some())
    {
        return Err(ApiError::no_such_path());
    }
    if let Some(sub) = subresource {
        if !d.subresources.contains(&sub) {
            return Err(ApiError::no_such_path());
        }
    }
    Ok(Target {
        res,
        namespace,
        name,
        subresource,
        legacy_watch,
    })
}

fn handle(
    state: &Arc<ApiState>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let path = uri.path();
    let params: Params = Query::<Params>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let is_get = method == Method::GET;
    match segs.as_slice() {
        ["version"] if is_get => ok(&discovery::version()),
        [probe, rest @ ..] if is_get && matches!(*probe, "healthz" | "readyz" | "livez") => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            probe_body(probe, rest, params.contains_key("verbose")),
        )
            .into_response()),
        ["api"] if is_get => ok(&discovery::api_versions()),
        ["apis"] if is_get => ok(&discovery::api_group_list()),
        ["openapi", "v3"] if is_get => ok(openapi::index()),
        ["openapi", "v2"] if is_get => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, openapi::V2_PROTOBUF)],
            openapi::v2_protobuf(),
        )
            .into_response()),
        ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]
            if method == Method::POST =>
        {
            created(&authorization::self_subject_access_review(
                body,
                body_encoding(headers),
            )?)
        }
        ["apis", "authorization.k8s.io", "v1", "selfsubjectrulesreviews"]
            if method == Method::POST =>
        {
            created(&authorization::self_subject_rules_review(
                body,
                body_encoding(headers),
            )?)
        }
        ["openapi", "v3", rest @ ..] if is_get => openapi::document(&rest.join("/"))
            .ok_or_else(ApiError::no_such_path)
            .and_then(ok),
        ["api", version] | ["apis", _, version] if is_get => {
            let group = if segs[0] == "api" { "" } else { segs[1] };
            discovery::api_resource_list(group, version)
                .ok_or_else(ApiError::no_such_path)
                .and_then(|v| ok(&v))
        }
        ["apis", group] if is_get => discovery::api_group(group)
            .ok_or_else(ApiError::no_such_path)
            .and_then(|v| ok(&v)),
        ["api", version, rest @ ..] => {
            let target = parse_target("", version, rest)?;
            resource_request(state, method, target, &params, headers, body)
        }
        ["apis", group, version, rest @ ..] => {
            let target = parse_target(group, version, rest)?;
            resource_request(state, method, target, &params, headers, body)
        }
        _ if !is_get
            && matches!(
                segs.first(),
                Some(&"version") | Some(&"api") | Some(&"apis")
            ) =>
        {
            Err(ApiError::method_not_allowed(method.as_str()))
        }
        _ => Err(ApiError::no_such_path()),
    }
}

/// The health probes' body: `ok`, or with `?verbose` one `[+]check ok` line per check the
/// stand-in has (no etcd, no post-start hooks) and `<probe> check passed`, as the real server.
fn probe_body(probe: &str, rest: &[&str], verbose: bool) -> String {
    if !verbose || !rest.is_empty() {
        return "ok".into();
    }
    format!("[+]ping ok\n[+]log ok\n{probe} check passed\n")
}

fn flag(params: &Params, key: &str) -> bool {
    params.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn write_options(params: &Params) -> Result<WriteOptions, ApiError> {
    let dry_run = match params.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unsupported dryRun value {other:?}; only \"All\" is supported"
            )))
        }
    };
    Ok(WriteOptions {
        dry_run,
        field_validation: FieldValidation::parse(
            params.get("fieldValidation").map(String::as_str),
        )?,
        field_manager: params.get("fieldManager").cloned(),
        force: flag(params, "force"),
    })
}

fn list_options(d: &ResourceDef, params: &Params) -> Result<ListOptions, ApiError> {
    let limit = match params.get("limit").map(String::as_str) {
        None | Some("") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
    };
    Ok(ListOptions {
        labels: LabelSelector::parse(
            params
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )?,
        fields: FieldSelector::parse(
            params
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or(""),
            d,
        )?,
        limit,
        continue_token: params.get("continue").cloned(),
        resource_version: params.get("resourceVersion").cloned(),
        resource_version_match: params
            .get("resourceVersionMatch")
            .cloned()
            .filter(|s| !s.is_empty()),
    })
}

/// Parses a create/update body: JSON, also when labelled YAML (kubectl and kube-rs send JSON),
/// or protobuf for the kinds kubectl's typed client creates (`kubectl create namespace …`).
fn parse_object_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == protobuf::MEDIA_TYPE {
        return protobuf::object(body).map_err(|why| {
            if why.contains("only as JSON") {
                ApiError::unsupported_media_type(&format!("{content_type} ({why})"))
            } else {
                ApiError::bad_request(format!("error decoding request body: {why}"))
            }
        });
    }
    let json_like = matches!(
        essence.as_str(),
        "" | "application/json" | "*/*" | "application/yaml" | "text/plain"
    );
    if !json_like {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    serde_json::from_slice(body).map_err(|e| {
        if essence == "application/yaml" {
            ApiError::unsupported_media_type("application/yaml (only its JSON form is accepted)")
        } else {
            ApiError::bad_request(format!("error decoding request body: {e}"))
        }
    })
}

fn resource_request(
    state: &Arc<ApiState>,
    method: &Method,
    t: Target<'_>,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let d = def(t.res);
    let ns = t.namespace.unwrap_or("");
    let status_only = t.subresource == Some("status");
    let output = || negotiate(headers, params);
    match (method.as_str(), t.name, t.subresource) {
        ("GET", None, None) | ("GET", Some(_), None) if t.legacy_watch || flag(params, "watch") => {
            let mut opts = list_options(d, params)?;
            if let Some(name) = t.name {
                let combined = match params.get("fieldSelector").filter(|s| !s.is_empty()) {
                    Some(f) => format!("metadata.name={name},{f}"),
                    None => format!("metadata.name={name}"),
                };
                opts.fields = FieldSelector::parse(&combined, d)?;
            }
            let timeout = params
                .get("timeoutSeconds")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs);
            let req = WatchRequest {
                res: t.res,
                namespace: t.namespace.map(str::to_string),
                labels: opts.labels,
                fields: opts.fields,
                resource_version: opts.resource_version,
                resource_version_match: opts.resource_version_match,
                send_initial_events: params.get("sendInitialEvents").map(|v| v == "true"),
                allow_bookmarks: flag(params, "allowWatchBookmarks"),
                timeout,
                output: output()?,
            };
            let body: Body = watch::start(state, req)?;
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        ("GET", None, None) => {
            let output = output()?;
            let opts = list_options(d, params)?;
            let store = state.lock_store();
            let list = crud::list(&store, t.res, t.namespace, &opts)?;
            ok(&render_list(d, &list, output))
        }
        ("GET", Some(name), None) | ("GET", Some(name), Some("status")) => {
            let output = output()?;
            let store = state.lock_store();
            let obj = crud::get(&store, t.res, ns, name)?;
            ok(&render_object(d, &obj, output))
        }
        ("POST", None, None) => {
            if d.namespaced && t.namespace.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let output = output()?;
            let opts = write_options(params)?;
            let obj = parse_object_body(headers, body)?;
            let mut store = state.lock_store();
            let written = crud::create(&mut store, t.res, t.namespace, obj, &opts)?;
            Ok(json_response(
                StatusCode::CREATED,
                &render_object(d, &written.object, output),
                &written.warnings,
            ))
        }
        ("POST", Some(name), Some("binding")) => {
            let obj = parse_object_body(headers, body)?;
            let mut store = state.lock_store();
            let status = crud::bind(&mut store, t.res, ns, name, &obj)?;
            Ok(json_response(StatusCode::CREATED, &status, &[]))
        }
        ("PUT", Some(name), None) | ("PUT", Some(name), Some("status")) => {
            let output = output()?;
            let opts = write_options(params)?;
            let obj = parse_object_body(headers, body)?;
            let mut store = state.lock_store();
            let written = crud::update(&mut store, t.res, ns, name, obj, status_only, &opts)?;
            let code = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(
                code,
                &render_object(d, &written.object, output),
                &written.warnings,
            ))
        }
        ("PATCH", Some(name), None) | ("PATCH", Some(name), Some("status")) => {
            let output = output()?;
            let opts = write_options(params)?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = PatchType::from_content_type(content_type)?;
            let mut store = state.lock_store();
            let written = crud::patch(
                &mut store,
                t.res,
                ns,
                name,
                patch_type,
                body,
                status_only,
                &opts,
            )?;
            let code = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(
                code,
                &render_object(d, &written.object, output),
                &written.warnings,
            ))
        }
        ("DELETE", Some(name), None) => {
            let output = output()?;
            let opts = delete_options(params, body)?;
            let mut store = state.lock_store();
            match lifecycle::delete(&mut store, t.res, ns, name, &opts)? {
                DeleteOutcome::Pending(obj) => ok(&render_object(d, &obj, output)),
                DeleteOutcome::Removed(obj) if d.return_deleted_object => {
                    ok(&render_object(d, &obj, output))
                }
                DeleteOutcome::Removed(obj) => ok(&success_status(
                    name,
                    d.group,
                    d.plural,
                    Some(meta::uid(&obj)),
                )),
            }
        }
        ("DELETE", None, None) => {
            if d.namespaced && t.namespace.is_none() {
                return Err(ApiError::method_not_allowed("DELETE"));
            }
            let opts = delete_options(params, body)?;
            let list_opts = list_options(d, params)?;
            let mut store = state.lock_store();
            let listed = crud::list(
                &store,
                t.res,
                t.namespace,
                &ListOptions {
                    limit: None,
                    continue_token: None,
                    ..list_opts
                },
            )?;
            let mut items = Vec::new();
            for obj in &listed.items {
                match lifecycle::delete(
                    &mut store,
                    t.res,
                    meta::namespace(obj),
                    meta::name(obj),
                    &opts,
                ) {
                    Ok(DeleteOutcome::Pending(o)) | Ok(DeleteOutcome::Removed(o)) => items.push(o),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let result = crud::ListResult {
                items,
                resource_version: store.current_rv(),
                continue_token: None,
                remaining: None,
            };
            ok(&crud::list_json(d, &result))
        }
        (m, _, _) => Err(ApiError::method_not_allowed(m)),
    }
}

fn delete_options(params: &Params, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions::from_body(body)?;
    if let Some(g) = params.get("gracePeriodSeconds") {
        opts.grace_period_seconds = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        );
    }
    if params.get("dryRun").is_some_and(|v| v == "All") {
        opts.dry_run = true;
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{id_of, Kind};

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn negotiation() {
        let none = Params::new();
        assert_eq!(negotiate(&HeaderMap::new(), &none).unwrap(), Output::Json);
        let kubectl_get = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(
            negotiate(&accept(kubectl_get), &none).unwrap(),
            Output::Table(IncludeObject::Metadata)
        );
        let mut obj = Params::new();
        obj.insert("includeObject".into(), "Object".into());
        assert_eq!(
            negotiate(&accept(kubectl_get), &obj).unwrap(),
            Output::Table(IncludeObject::Object)
        );
        assert_eq!(
            negotiate(
                &accept("application/vnd.kubernetes.protobuf, application/json"),
                &none
            )
            .unwrap(),
            Output::Json
        );
        assert_eq!(
            negotiate(
                &accept("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
                &none
            )
            .unwrap(),
            Output::Metadata
        );
        assert_eq!(
            negotiate(&accept("application/vnd.kubernetes.protobuf"), &none)
                .unwrap_err()
                .code,
            406
        );
    }

    #[test]
    fn probes_list_their_checks_when_verbose() {
        assert_eq!(probe_body("readyz", &[], false), "ok");
        assert_eq!(probe_body("livez", &["ping"], true), "ok");
        assert_eq!(
            probe_body("readyz", &[], true),
            "[+]ping ok\n[+]log ok\nreadyz check passed\n"
        );
    }

    #[test]
    fn url_grammar() {
        let t = parse_target("", "v1", &["namespaces", "a", "pods", "p", "status"]).unwrap();
        assert_eq!(
            (t.res, t.namespace, t.name, t.subresource),
            (id_of(Kind::Pod), Some("a"), Some("p"), Some("status"))
        );
        let t = parse_target("", "v1", &["namespaces", "a", "status"]).unwrap();
        assert_eq!(
            (t.res, t.name, t.subresource),
            (id_of(Kind::Namespace), Some("a"), Some("status"))
        );
        let t = parse_target("", "v1", &["namespaces"]).unwrap();
        assert_eq!((t.res, t.name), (id_of(Kind::Namespace), None));
        let t = parse_target("", "v1", &["pods"]).unwrap();
        assert_eq!((t.res, t.namespace), (id_of(Kind::Pod), None));
        let t = parse_target("", "v1", &["watch", "namespaces", "a", "pods"]).unwrap();
        assert!(t.legacy_watch);
        assert!(
            parse_target("", "v1", &["pods", "p"]).is_err(),
            "namespaced item without namespace"
        );
        assert!(
            parse_target("", "v1", &["namespaces", "a", "nodes"]).is_err(),
            "cluster-scoped in a namespace"
        );
        assert!(parse_target("", "v1", &["namespaces", "a", "pods", "p", "exec"]).is_err());
        assert!(parse_target("", "v1", &["deployments"]).is_err());
        let t = parse_target(
            "networking.k8s.io",
            "v1",
            &["namespaces", "a", "networkpolicies", "n"],
        )
        .unwrap();
        assert_eq!(t.res, id_of(Kind::NetworkPolicy));
    }
}
