//! A pure evaluator of RBAC (`rbac.authorization.k8s.io/v1`) with the API server's matching rules,
//! so the install manifest can be checked against [`AGENT_API_CALLS`](super::AGENT_API_CALLS)
//! without a cluster.
//!
//! Matching follows the RBAC authorizer: a rule allows a request when its verbs, apiGroups and
//! resources match (each may be `*`; a resource may be `resource/subresource` or `*/subresource`)
//! and, when it lists `resourceNames`, the request names one of them. A ClusterRoleBinding grants
//! its role everywhere; a RoleBinding grants a Role or ClusterRole in its own namespace only.

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};

use veilnet::install::{ApiCall, Scope};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RbacError {
    #[error("{binding} references {kind} {name:?}, which is not among the given objects")]
    MissingRole {
        binding: String,
        kind: String,
        name: String,
    },
    #[error("{binding} has a roleRef of kind {kind:?}; only Role and ClusterRole exist")]
    BadRoleRef { binding: String, kind: String },
}

/// The RBAC objects of a manifest.
#[derive(Clone, Debug, Default)]
pub struct RbacObjects {
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
}

/// A rule in effect for one subject.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// `None`: everywhere (through a ClusterRoleBinding); `Some(ns)`: only in `ns`.
    pub namespace: Option<String>,
    pub rule: PolicyRule,
    /// The binding and role it comes from, for messages.
    pub source: String,
    /// The role aggregates other ClusterRoles: its rules are not all visible here.
    pub aggregated: bool,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn is_service_account(subject: &Subject, binding_ns: Option<&str>, sa_ns: &str, sa: &str) -> bool {
    // In a RoleBinding a ServiceAccount subject without a namespace means the binding's own.
    let ns = subject.namespace.as_deref().or(binding_ns);
    subject.kind == "ServiceAccount" && subject.name == sa && ns == Some(sa_ns)
}

/// Every rule granted to the ServiceAccount `sa_ns/sa`.
pub fn grants_for(objects: &RbacObjects, sa_ns: &str, sa: &str) -> Result<Vec<Grant>, RbacError> {
    let cluster_role = |binding: &str, name: &str| {
        objects
            .cluster_roles
            .iter()
            .find(|r| name_of(&r.metadata) == name)
            .ok_or_else(|| RbacError::MissingRole {
                binding: binding.to_string(),
                kind: "ClusterRole".into(),
                name: name.to_string(),
            })
    };
    let mut out = Vec::new();
    for b in &objects.cluster_role_bindings {
        let binding = format!("ClusterRoleBinding {}", name_of(&b.metadata));
        let bound = b.subjects.iter().flatten();
        if !bound
            .clone()
            .any(|s| is_service_account(s, None, sa_ns, sa))
        {
            continue;
        }
        if b.role_ref.kind != "ClusterRole" {
            return Err(RbacError::BadRoleRef {
                binding,
                kind: b.role_ref.kind.clone(),
            });
        }
        let role = cluster_role(&binding, &b.role_ref.name)?;
        for rule in role.rules.iter().flatten() {
            out.push(Grant {
                namespace: None,
                rule: rule.clone(),
                source: format!("{binding} → ClusterRole {}", b.role_ref.name),
                aggregated: role.aggregation_rule.is_some(),
            });
        }
    }
    for b in &objects.role_bindings {
        let ns = b.metadata.namespace.as_deref().unwrap_or("default");
        let binding = format!("RoleBinding {ns}/{}", name_of(&b.metadata));
        if !b
            .subjects
            .iter()
            .flatten()
            .any(|s| is_service_account(s, Some(ns), sa_ns, sa))
        {
            continue;
        }
        let (rules, aggregated) = match b.role_ref.kind.as_str() {
            "ClusterRole" => {
                let r = cluster_role(&binding, &b.role_ref.name)?;
                (r.rules.clone(), r.aggregation_rule.is_some())
            }
            "Role" => {
                let r = objects
                    .roles
                    .iter()
                    .find(|r| {
                        name_of(&r.metadata) == b.role_ref.name
                            && r.metadata.namespace.as_deref().unwrap_or("default") == ns
                    })
                    .ok_or_else(|| RbacError::MissingRole {
                        binding: binding.clone(),
                        kind: "Role".into(),
                        name: format!("{ns}/{}", b.role_ref.name),
                    })?;
                (r.rules.clone(), false)
            }
            other => {
                return Err(RbacError::BadRoleRef {
                    binding,
                    kind: other.to_string(),
                })
            }
        };
        for rule in rules.iter().flatten() {
            out.push(Grant {
                namespace: Some(ns.to_string()),
                rule: rule.clone(),
                source: format!("{binding} → {} {}", b.role_ref.kind, b.role_ref.name),
                aggregated,
            });
        }
    }
    Ok(out)
}

fn list(v: &Option<Vec<String>>) -> &[String] {
    v.as_deref().unwrap_or(&[])
}

fn contains_or_star(list: &[String], wanted: &str) -> bool {
    list.iter().any(|x| x == "*" || x == wanted)
}

fn resource_matches(rule: &PolicyRule, call: &ApiCall) -> bool {
    let combined = call.rbac_resource();
    list(&rule.resources).iter().any(|r| {
        r == "*" || *r == combined || call.subresource.is_some_and(|sub| *r == format!("*/{sub}"))
    })
}

fn rule_allows(rule: &PolicyRule, call: &ApiCall) -> bool {
    let names = list(&rule.resource_names);
    contains_or_star(&rule.verbs, call.verb)
        && contains_or_star(list(&rule.api_groups), call.group)
        && resource_matches(rule, call)
        && (names.is_empty()
            || call
                .resource_name
                .is_some_and(|n| names.iter().any(|x| x == n)))
}

/// The namespace a call is made in; `None` for cluster scope.
fn call_namespace<'a>(call: &ApiCall, own_ns: &'a str) -> Option<&'a str> {
    match call.scope {
        Scope::Cluster => None,
        Scope::OwnNamespace => Some(own_ns),
        Scope::Namespace(ns) => Some(ns),
    }
}

/// Whether `grants` allow `call` (made with veilnet's namespace `own_ns`).
pub fn allows(grants: &[Grant], call: &ApiCall, own_ns: &str) -> bool {
    let ns = call_namespace(call, own_ns);
    grants.iter().any(|g| {
        let in_scope = match (&g.namespace, ns) {
            (None, _) => true,
            (Some(gns), Some(cns)) => gns == cns,
            (Some(_), None) => false,
        };
        in_scope && rule_allows(&g.rule, call)
    })
}

/// Both directions of the check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Calls the grants do not allow.
    pub missing: Vec<String>,
    /// Permissions granted beyond the calls (wildcards, extra verbs, resources, scope or names).
    pub excess: Vec<String>,
}

impl Report {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.excess.is_empty()
    }
}

/// Checks `grants` against `calls`: every call allowed, nothing granted beyond them.
pub fn check(grants: &[Grant], calls: &[ApiCall], own_ns: &str) -> Report {
    let mut report = Report {
        missing: calls
            .iter()
            .filter(|c| !allows(grants, c, own_ns))
            .map(|c| format!("{c} is not allowed (needed by {})", c.why))
            .collect(),
        excess: Vec::new(),
    };
    for g in grants {
        report.excess.extend(excess_of(g, calls, own_ns));
    }
    report
}

fn excess_of(g: &Grant, calls: &[ApiCall], own_ns: &str) -> Vec<String> {
    let r = &g.rule;
    let mut out = Vec::new();
    let at = &g.source;
    if g.aggregated {
        out.push(format!(
            "{at}: aggregated ClusterRoles grant rules defined elsewhere"
        ));
    }
    if !list(&r.non_resource_urls).is_empty() {
        out.push(format!(
            "{at}: nonResourceURLs {:?}",
            list(&r.non_resource_urls)
        ));
    }
    let wildcard = [
        &Some(r.verbs.clone()),
        &r.api_groups,
        &r.resources,
        &r.resource_names,
    ]
    .into_iter()
    .any(|l| list(l).iter().any(|x| x.contains('*')));
    if wildcard {
        out.push(format!("{at}: wildcard in {r:?}"));
        return out;
    }
    for group in list(&r.api_groups) {
        for resource in list(&r.resources) {
            let (res, sub) = match resource.split_once('/') {
                Some((res, sub)) => (res, Some(sub)),
                None => (resource.as_str(), None),
            };
            for verb in &r.verbs {
                let fitting: Vec<&ApiCall> = calls
                    .iter()
                    .filter(|c| {
                        c.group == group
                            && c.resource == res
                            && c.subresource == sub
                            && c.verb == verb
                            && call_namespace(c, own_ns) == g.namespace.as_deref()
                    })
                    .collect();
                let scope = g.namespace.as_deref().unwrap_or("cluster-wide");
                let what = format!("{verb} {group:?}/{resource} ({scope})");
                if fitting.is_empty() {
                    out.push(format!(
                        "{at}: grants {what}, which the agent does not call"
                    ));
                    continue;
                }
                let names = list(&r.resource_names);
                let wanted: Vec<&str> = fitting.iter().filter_map(|c| c.resource_name).collect();
                if names.is_empty() {
                    if verb != "create" && wanted.len() == fitting.len() {
                        out.push(format!(
                            "{at}: grants {what} on every name; the agent only needs {wanted:?}"
                        ));
                    }
                } else if let Some(extra) = names.iter().find(|n| !wanted.contains(&n.as_str())) {
                    out.push(format!(
                        "{at}: grants {what} on {extra:?}, which the agent does not use"
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects(v: serde_json::Value) -> RbacObjects {
        let mut o = RbacObjects::default();
        for item in v.as_array().unwrap() {
            match item["kind"].as_str().unwrap() {
                "ClusterRole" => o
                    .cluster_roles
                    .push(serde_json::from_value(item.clone()).unwrap()),
                "ClusterRoleBinding" => o
                    .cluster_role_bindings
                    .push(serde_json::from_value(item.clone()).unwrap()),
                "Role" => o.roles.push(serde_json::from_value(item.clone()).unwrap()),
                "RoleBinding" => o
                    .role_bindings
                    .push(serde_json::from_value(item.clone()).unwrap()),
                k => panic!("{k}"),
            }
        }
        o
    }

    fn sa() -> serde_json::Value {
        json!([{ "kind": "ServiceAccount", "name": "agent", "namespace": "sys" }])
    }

    fn cluster(rules: serde_json::Value) -> RbacObjects {
        objects(json!([
            { "kind": "ClusterRole", "metadata": { "name": "r" }, "rules": rules },
            { "kind": "ClusterRoleBinding", "metadata": { "name": "b" },
              "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "r" },
              "subjects": sa() },
        ]))
    }

    const NODES_LIST: ApiCall = ApiCall {
        group: "",
        resource: "nodes",
        subresource: None,
        verb: "list",
        scope: Scope::Cluster,
        resource_name: None,
        why: "t",
    };
    const STATUS_PATCH: ApiCall = ApiCall {
        subresource: Some("status"),
        verb: "patch",
        ..NODES_LIST
    };
    const RECORD_GET: ApiCall = ApiCall {
        resource: "configmaps",
        verb: "get",
        scope: Scope::OwnNamespace,
        resource_name: Some("rec"),
        ..NODES_LIST
    };

    #[test]
    fn exact_grants_pass() {
        let o = cluster(json!([
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["list"] },
            { "apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"] },
        ]));
        let g = grants_for(&o, "sys", "agent").unwrap();
        let r = check(&g, &[NODES_LIST, STATUS_PATCH], "sys");
        assert!(r.is_exact(), "{r:?}");
    }

    #[test]
    fn the_main_resource_does_not_grant_its_subresource() {
        let o = cluster(
            json!([{ "apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "patch"] }]),
        );
        let g = grants_for(&o, "sys", "agent").unwrap();
        let r = check(&g, &[NODES_LIST, STATUS_PATCH], "sys");
        assert_eq!(r.missing.len(), 1, "{r:?}");
        assert!(r.missing[0].contains("nodes/status"));
        assert_eq!(r.excess.len(), 1, "{r:?}");
        assert!(r.excess[0].contains("grants patch \"\"/nodes"), "{r:?}");
    }

    #[test]
    fn wildcards_and_extra_verbs_are_excess() {
        let o = cluster(json!([
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "delete"] },
            { "apiGroups": [""], "resources": ["*/status"], "verbs": ["patch"] },
            { "nonResourceURLs": ["/metrics"], "verbs": ["get"] },
        ]));
        let g = grants_for(&o, "sys", "agent").unwrap();
        assert!(
            allows(&g, &STATUS_PATCH, "sys"),
            "*/status matches nodes/status"
        );
        let r = check(&g, &[NODES_LIST, STATUS_PATCH], "sys");
        assert!(r.missing.is_empty());
        assert_eq!(r.excess.len(), 3, "{r:?}");
        assert!(r.excess.iter().any(|e| e.contains("delete")));
        assert!(r.excess.iter().any(|e| e.contains("wildcard")));
        assert!(r.excess.iter().any(|e| e.contains("nonResourceURLs")));
    }

    #[test]
    fn namespaced_roles_grant_only_their_namespace_and_names() {
        let role = |ns: &str, names: serde_json::Value| {
            objects(json!([
                { "kind": "Role", "metadata": { "name": "r", "namespace": ns },
                  "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": names }] },
                { "kind": "RoleBinding", "metadata": { "name": "b", "namespace": ns },
                  "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r" },
                  "subjects": [{ "kind": "ServiceAccount", "name": "agent" }] },
            ]))
        };
        // The subject's namespace defaults to the binding's: "other" binds other/agent, not us.
        let g = grants_for(&role("other", json!(["rec"])), "sys", "agent").unwrap();
        assert!(g.is_empty());
        let g = grants_for(&role("sys", json!(["rec"])), "sys", "agent").unwrap();
        assert!(check(&g, &[RECORD_GET], "sys").is_exact());
        assert!(!allows(&g, &RECORD_GET, "elsewhere"));
        let other_name = ApiCall {
            resource_name: Some("x"),
            ..RECORD_GET
        };
        assert!(!allows(&g, &other_name, "sys"));
        // Without resourceNames the role is broader than the agent needs.
        let g = grants_for(&role("sys", json!(null)), "sys", "agent").unwrap();
        let r = check(&g, &[RECORD_GET], "sys");
        assert!(r.missing.is_empty());
        assert_eq!(r.excess.len(), 1);
        assert!(r.excess[0].contains("every name"), "{r:?}");
    }

    #[test]
    fn a_cluster_role_for_a_namespaced_call_is_too_broad() {
        let o = cluster(
            json!([{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["rec"] }]),
        );
        let g = grants_for(&o, "sys", "agent").unwrap();
        let r = check(&g, &[RECORD_GET], "sys");
        assert!(r.missing.is_empty());
        assert!(r.excess[0].contains("cluster-wide"), "{r:?}");
    }

    #[test]
    fn other_subjects_and_missing_roles() {
        let g = grants_for(
            &cluster(json!([{ "apiGroups": [""], "resources": ["nodes"], "verbs": ["list"] }])),
            "sys",
            "someone-else",
        )
        .unwrap();
        assert!(g.is_empty());
        let o = objects(
            json!([{ "kind": "ClusterRoleBinding", "metadata": { "name": "b" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "gone" },
            "subjects": sa() }]),
        );
        assert!(matches!(
            grants_for(&o, "sys", "agent"),
            Err(RbacError::MissingRole { .. })
        ));
    }
}
