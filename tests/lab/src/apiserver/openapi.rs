//! OpenAPI v3 discovery (`/openapi/v3` and one document per group version).
//!
//! The documents describe paths and operations only, not schemas. That is what kubectl needs:
//! a `patch` operation with a `fieldValidation` parameter, `x-kubernetes-action` and
//! `x-kubernetes-group-version-kind` makes `kubectl apply` leave validation to the server
//! (`fieldValidation=Strict`); without schemas, kubectl computes apply patches from its
//! built-in types, which carry the same patch strategies as the real documents.
//!
//! `/openapi/v2` (protobuf, as kubectl asks for it) is a document with no definitions. kubectl
//! falls back to it for the one thing v3 cannot answer, validating a `kind: List`: it checks the
//! List's shape and skips items whose kind the document does not define, so each item is left to
//! the server's strict field validation, as with a single object.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use super::discovery::GIT_VERSION;
use super::resources::{group_versions, ResourceDef, RESOURCES};

fn gv_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn param(name: &str, location: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": location,
        "description": description,
        "required": location == "path",
        "schema": { "type": if name == "limit" || name == "timeoutSeconds" || name == "gracePeriodSeconds" { "integer" } else if name == "watch" || name == "allowWatchBookmarks" || name == "force" { "boolean" } else { "string" } },
        "uniqueItems": true,
    })
}

fn operation(
    d: &ResourceDef,
    action: &str,
    verb: &str,
    params: Vec<Value>,
    body_types: &[&str],
) -> Value {
    let gvk = json!({ "group": d.group, "version": d.version, "kind": d.kind });
    let group_camel: String = d
        .group
        .split('.')
        .next()
        .map(|g| {
            let mut c = g.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "Core".into());
    let scope = if d.namespaced { "Namespaced" } else { "" };
    let suffix = if action == "deletecollection" {
        format!("CollectionOf{}", d.kind)
    } else {
        d.kind.to_string()
    };
    let mut op = json!({
        "operationId": format!("{verb}{group_camel}{}{scope}{suffix}", capitalize(d.version)),
        "parameters": params,
        "responses": { "200": { "description": "OK", "content": { "application/json": { "schema": { "type": "object" } } } },
                       "401": { "description": "Unauthorized" } },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    });
    if !body_types.is_empty() {
        let content: Map<String, Value> = body_types
            .iter()
            .map(|t| (t.to_string(), json!({ "schema": { "type": "object" } })))
            .collect();
        op["requestBody"] = json!({ "content": content, "required": true });
    }
    op
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

const PATCH_TYPES: &[&str] = &[
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];

fn write_params() -> Vec<Value> {
    vec![
        param("dryRun", "query", "When present, indicates that modifications should not be persisted."),
        param("fieldManager", "query", "fieldManager is a name associated with the actor or entity that is making these changes."),
        param("fieldValidation", "query", "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn (default), Strict."),
    ]
}

fn list_params() -> Vec<Value> {
    [
        "allowWatchBookmarks",
        "continue",
        "fieldSelector",
        "labelSelector",
        "limit",
        "resourceVersion",
        "resourceVersionMatch",
        "sendInitialEvents",
        "timeoutSeconds",
        "watch",
    ]
    .iter()
    .map(|n| param(n, "query", n))
    .collect()
}

fn add_paths(d: &ResourceDef, paths: &mut BTreeMap<String, Value>) {
    let prefix = d.gv_prefix();
    let (collection, path_params) = if d.namespaced {
        (
            format!("{prefix}/namespaces/{{namespace}}/{}", d.plural),
            vec![param(
                "namespace",
                "path",
                "object name and auth scope, such as for teams and projects",
            )],
        )
    } else {
        (format!("{prefix}/{}", d.plural), vec![])
    };
    let mut item_params = vec![param("name", "path", &format!("name of the {}", d.kind))];
    item_params.extend(path_params.clone());

    let mut patch_params = write_params();
    patch_params.push(param(
        "force",
        "query",
        "Force is going to \"force\" Apply requests.",
    ));
    let item = json!({
        "parameters": item_params,
        "get": operation(d, "get", "read", vec![], &[]),
        "put": operation(d, "put", "replace", write_params(), &["*/*"]),
        "patch": operation(d, "patch", "patch", patch_params.clone(), PATCH_TYPES),
        "delete": operation(d, "delete", "delete", vec![param("gracePeriodSeconds", "query", "The duration in seconds before the object should be deleted."), param("dryRun", "query", "dry run")], &["*/*"]),
    });
    paths.insert(format!("{collection}/{{name}}"), item);
    paths.insert(
        collection.clone(),
        json!({
            "parameters": path_params,
            "get": operation(d, "list", "list", list_params(), &[]),
            "post": operation(d, "post", "create", write_params(), &["*/*"]),
            "delete": operation(d, "deletecollection", "deletecollection", list_params(), &["*/*"]),
        }),
    );
    for sub in d.subresources {
        let sub_item = if *sub == "binding" {
            json!({ "parameters": item_params, "post": operation(d, "post", "create", write_params(), &["*/*"]) })
        } else {
            json!({
                "parameters": item_params,
                "get": operation(d, "get", "read", vec![], &[]),
                "put": operation(d, "put", "replace", write_params(), &["*/*"]),
                "patch": operation(d, "patch", "patch", patch_params.clone(), PATCH_TYPES),
            })
        };
        paths.insert(format!("{collection}/{{name}}/{sub}"), sub_item);
    }
    if d.namespaced {
        paths.insert(
            format!("{prefix}/{}", d.plural),
            json!({ "get": operation(d, "list", "list", list_params(), &[]) }),
        );
    }
}

fn build_document(group: &str, version: &str) -> Value {
    let mut paths = BTreeMap::new();
    for d in RESOURCES
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        add_paths(d, &mut paths);
    }
    json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": GIT_VERSION },
        "paths": paths,
        "components": { "schemas": {} },
    })
}

/// FNV-1a, as a stable content hash for the `?hash=` cache-buster kubectl keys on.
fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

struct Documents {
    index: Value,
    by_gv: BTreeMap<String, Value>,
}

fn documents() -> &'static Documents {
    static DOCS: OnceLock<Documents> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut by_gv = BTreeMap::new();
        let mut index = Map::new();
        for (g, v) in group_versions() {
            let key = gv_key(g, v);
            let doc = build_document(g, v);
            let hash = fnv_hex(doc.to_string().as_bytes());
            index.insert(
                key.clone(),
                json!({ "serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}") }),
            );
            by_gv.insert(key, doc);
        }
        Documents {
            index: json!({ "paths": index }),
            by_gv,
        }
    })
}

/// `/openapi/v3`.
pub fn index() -> &'static Value {
    &documents().index
}

/// `/openapi/v3/<api/v1 | apis/g/v>`.
pub fn document(gv_path: &str) -> Option<&'static Value> {
    documents().by_gv.get(gv_path.trim_matches('/'))
}

/// Media type of `/openapi/v2` in protobuf (gnostic's `openapi.v2.Document`).
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// One length-delimited protobuf field (wire type 2).
fn proto_field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push((tag << 3) | 2);
    let mut len = bytes.len();
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(bytes);
}

/// `/openapi/v2`: `Document { swagger: "2.0", info: { title, version } }`, no paths or definitions.
pub fn v2_protobuf() -> Vec<u8> {
    let mut info = Vec::new();
    proto_field(1, b"Kubernetes", &mut info);
    proto_field(2, GIT_VERSION.as_bytes(), &mut info);
    let mut doc = Vec::new();
    proto_field(1, b"2.0", &mut doc);
    proto_field(2, &info, &mut doc);
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_document_is_a_protobuf_document_with_swagger_and_info() {
        let doc = v2_protobuf();
        // swagger = 1: "2.0"
        assert_eq!(&doc[..5], &[0x0a, 3, b'2', b'.', b'0']);
        // info = 2: { title = 1: "Kubernetes", version = 2: GIT_VERSION }
        assert_eq!(doc[5], 0x12);
        assert_eq!(doc[6] as usize, doc.len() - 7);
        assert_eq!(&doc[7..9], &[0x0a, 10]);
        assert_eq!(&doc[9..19], b"Kubernetes");
        assert_eq!(&doc[19..21], &[0x12, GIT_VERSION.len() as u8]);
        assert_eq!(&doc[21..], GIT_VERSION.as_bytes());
    }

    #[test]
    fn index_points_at_every_group_version() {
        let idx = index();
        let url = idx["paths"]["api/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/api/v1?hash="));
        assert!(idx["paths"]["apis/networking.k8s.io/v1"].is_object());
        assert!(document("apis/networking.k8s.io/v1").is_some());
        assert!(document("apis/apps/v1").is_some());
        assert!(document("apis/rbac.authorization.k8s.io/v1").is_some());
        assert!(document("apis/batch/v1").is_none());
    }

    #[test]
    fn patch_operations_let_kubectl_skip_client_validation() {
        let doc = document("api/v1").unwrap();
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-action"], "patch");
        assert_eq!(
            patch["x-kubernetes-group-version-kind"],
            json!({ "group": "", "version": "v1", "kind": "Pod" })
        );
        assert!(patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        let node = &doc["paths"]["/api/v1/nodes/{name}/status"]["patch"];
        assert_eq!(node["x-kubernetes-group-version-kind"]["kind"], "Node");
    }
}
