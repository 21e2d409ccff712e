//! Loads `manifests/veilnet.yaml` for the manifest and RBAC tests: every document as JSON, and
//! typed (k8s-openapi) with unknown fields reported, as the API server's strict validation would.

#![allow(dead_code)]

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use veilnet_lab::rbac::RbacObjects;

pub fn manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests/veilnet.yaml")
}

/// Every non-empty document of the manifest.
pub fn documents() -> Vec<Value> {
    documents_in(&manifest_path())
}

/// Every non-empty document of the YAML file at `path`.
pub fn documents_in(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Paths present in `input` but dropped by the typed round trip (misspelt or unknown fields).
pub fn unknown_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = format!("{path}.{k}");
                match o.get(k) {
                    Some(ov) => unknown_fields(v, ov, &p, out),
                    None if v.is_null() => {}
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

/// Decodes `doc` as `T`, failing on any field `T` does not know.
pub fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let mut unknown = Vec::new();
    unknown_fields(doc, &serde_json::to_value(&t).unwrap(), "", &mut unknown);
    assert!(
        unknown.is_empty(),
        "{} {}: unknown fields {unknown:?}",
        doc["kind"],
        doc["metadata"]["name"]
    );
    t
}

pub fn of_kind(kind: &str) -> Vec<Value> {
    documents()
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect()
}

/// The agent's DaemonSet (`veilnet`).
pub fn daemonset() -> DaemonSet {
    daemonset_named("veilnet")
}

/// The WireGuard datapath's DaemonSet.
pub fn datapath_daemonset() -> DaemonSet {
    daemonset_named("veilnet-datapath")
}

fn daemonset_named(name: &str) -> DaemonSet {
    let all = of_kind("DaemonSet");
    assert_eq!(all.len(), 2, "the agent and the datapath");
    let ds: Vec<&Value> = all
        .iter()
        .filter(|d| d["metadata"]["name"] == name)
        .collect();
    assert_eq!(ds.len(), 1, "one DaemonSet {name}");
    typed(ds[0])
}

pub fn config_map(name: &str) -> ConfigMap {
    let cm = of_kind("ConfigMap")
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ConfigMap {name}"));
    typed(&cm)
}

pub fn rbac_objects() -> RbacObjects {
    RbacObjects {
        cluster_roles: of_kind("ClusterRole").iter().map(typed).collect(),
        cluster_role_bindings: of_kind("ClusterRoleBinding").iter().map(typed).collect(),
        roles: of_kind("Role").iter().map(typed).collect(),
        role_bindings: of_kind("RoleBinding").iter().map(typed).collect(),
    }
}

/// The agent's namespace and ServiceAccount, as the manifest's DaemonSet runs it.
pub fn agent_identity() -> (String, String) {
    let ds = daemonset();
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
