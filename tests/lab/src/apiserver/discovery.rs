//! Discovery documents: `/version`, `/api`, `/apis`, and the per group-version
//! `APIResourceList`s that kubectl and kube-rs use to map kinds to resources.

use serde_json::{json, Value};

use super::resources::{group_versions, ResourceDef, RESOURCES, VERBS};

/// The Kubernetes version this stand-in reports.
pub const GIT_VERSION: &str = "v1.33.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "" }],
    })
}

/// The self-review group of `kubectl auth can-i` (`authorization`): create-only resources that
/// store nothing, so they are not in `RESOURCES`.
pub const AUTHORIZATION_GROUP: (&str, &str) = ("authorization.k8s.io", "v1");
const REVIEWS: &[(&str, &str)] = &[
    ("selfsubjectaccessreviews", "SelfSubjectAccessReview"),
    ("selfsubjectrulesreviews", "SelfSubjectRulesReview"),
];

/// Every served group version: the stored resources' and the self-review group.
fn served_group_versions() -> Vec<(&'static str, &'static str)> {
    let mut all = group_versions();
    all.push(AUTHORIZATION_GROUP);
    all
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = served_group_versions()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| {
            let gv = json!({ "groupVersion": format!("{g}/{v}"), "version": v });
            json!({ "name": g, "versions": [gv.clone()], "preferredVersion": gv })
        })
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `/apis/<group>` (an `APIGroup`).
pub fn api_group(group: &str) -> Option<Value> {
    let (g, v) = served_group_versions()
        .into_iter()
        .find(|(g, _)| *g == group && !g.is_empty())?;
    let gv = json!({ "groupVersion": format!("{g}/{v}"), "version": v });
    Some(
        json!({ "kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv }),
    )
}

fn resource_entries(d: &ResourceDef) -> Vec<Value> {
    let mut main = json!({
        "name": d.plural,
        "singularName": d.singular,
        "namespaced": d.namespaced,
        "kind": d.kind,
        "verbs": VERBS,
    });
    if !d.short_names.is_empty() {
        main["shortNames"] = json!(d.short_names);
    }
    if !d.categories.is_empty() {
        main["categories"] = json!(d.categories);
    }
    let mut out = vec![main];
    for sub in d.subresources {
        let (kind, verbs): (&str, &[&str]) = match *sub {
            "binding" => ("Binding", &["create"]),
            _ => (d.kind, &["get", "patch", "update"]),
        };
        let mut entry = json!({
            "name": format!("{}/{sub}", d.plural),
            "singularName": "",
            "namespaced": d.namespaced,
            "kind": kind,
            "verbs": verbs,
        });
        if *sub == "binding" {
            entry["group"] = json!("");
            entry["version"] = json!("v1");
        }
        out.push(entry);
    }
    out
}

/// `/api/v1` or `/apis/<group>/<version>`; None for a group version this server does not serve.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = if (group, version) == AUTHORIZATION_GROUP {
        REVIEWS
            .iter()
            .map(|(plural, kind)| {
                json!({ "name": plural, "singularName": "", "namespaced": false, "kind": kind, "verbs": ["create"] })
            })
            .collect()
    } else {
        RESOURCES
            .iter()
            .filter(|d| d.group == group && d.version == version)
            .flat_map(resource_entries)
            .collect()
    };
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_resources_with_short_names_and_subresources() {
        let l = api_resource_list("", "v1").unwrap();
        let names: Vec<&str> = l["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for n in [
            "pods",
            "pods/status",
            "pods/binding",
            "nodes",
            "nodes/status",
            "namespaces",
            "configmaps",
            "events",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let pods = l["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods")
            .unwrap();
        assert_eq!(pods["shortNames"], json!(["po"]));
        assert_eq!(pods["namespaced"], true);
        assert!(pods["verbs"].as_array().unwrap().contains(&json!("watch")));
        let np = api_resource_list("networking.k8s.io", "v1").unwrap();
        assert_eq!(np["resources"][0]["shortNames"], json!(["netpol"]));
        let apps = api_resource_list("apps", "v1").unwrap();
        assert_eq!(apps["resources"][0]["name"], "daemonsets");
        assert_eq!(apps["resources"][0]["shortNames"], json!(["ds"]));
        assert!(api_resource_list("batch", "v1").is_none());
    }

    #[test]
    fn groups() {
        let g = api_group_list();
        let names: Vec<&str> = g["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "coordination.k8s.io",
                "networking.k8s.io",
                "events.k8s.io",
                "apps",
                "rbac.authorization.k8s.io",
                "authorization.k8s.io"
            ]
        );
        assert!(api_group("networking.k8s.io").is_some());
        assert!(api_group("authorization.k8s.io").is_some());
        let reviews = api_resource_list("authorization.k8s.io", "v1").unwrap();
        assert_eq!(reviews["resources"][0]["name"], "selfsubjectaccessreviews");
        assert_eq!(reviews["resources"][0]["verbs"], json!(["create"]));
        assert!(api_group("").is_none());
    }
}
