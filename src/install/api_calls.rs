//! Every Kubernetes API call the veilnet agent makes, in one place.
//!
//! The install manifest's ClusterRole and Roles are tested against this list in both directions
//! (`tests/rbac.rs`): each call must be allowed, and nothing beyond the list may be granted. A
//! source scan in the same test catches calls added to `src/agent` or `src/cluster` without an
//! entry here. When the agent starts calling something new, add it here first.

use std::fmt;

/// Where a call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A cluster-scoped resource, or a namespaced one across all namespaces (`Api::all`).
    Cluster,
    /// veilnet's own namespace (`--namespace`, `veilnet-system` in the manifest).
    OwnNamespace,
    /// One fixed namespace.
    Namespace(&'static str),
}

/// One (group, resource, subresource, verb, scope) the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// Plural resource name as RBAC spells it.
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: &'static str,
    pub scope: Scope,
    /// The one object the call is about, when it is always the same name. RBAC can then restrict
    /// it with `resourceNames` (list and watch too, when they select `metadata.name=<name>`;
    /// create never, since the name is not part of the request URL).
    pub resource_name: Option<&'static str>,
    /// Who calls it and why, for people reading the RBAC test output.
    pub why: &'static str,
}

impl ApiCall {
    /// `resource` or `resource/subresource`, as RBAC rules name it.
    pub fn rbac_resource(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        }
    }
}

impl fmt::Display for ApiCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.rbac_resource())?;
        if let Some(name) = self.resource_name {
            write!(f, " {name:?}")?;
        }
        match self.scope {
            Scope::Cluster => write!(f, " (cluster)"),
            Scope::OwnNamespace => write!(f, " (own namespace)"),
            Scope::Namespace(ns) => write!(f, " (namespace {ns})"),
        }
    }
}

/// Name of veilnet's pod CIDR allocation record (`cluster::podcidr::RECORD_NAME`).
const RECORD: &str = crate::cluster::podcidr::RECORD_NAME;

const fn call(
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    scope: Scope,
    why: &'static str,
) -> ApiCall {
    ApiCall {
        group,
        resource,
        subresource: None,
        verb,
        scope,
        resource_name: None,
        why,
    }
}

const fn record(verb: &'static str, why: &'static str) -> ApiCall {
    ApiCall {
        group: "",
        resource: "configmaps",
        subresource: None,
        verb,
        scope: Scope::OwnNamespace,
        resource_name: Some(RECORD),
        why,
    }
}

/// The agent's API calls.
pub const AGENT_API_CALLS: &[ApiCall] = &[
    // Nodes: peers' annotations, addresses and pod CIDRs.
    call(
        "",
        "nodes",
        "get",
        Scope::Cluster,
        "agent::own_node: this node's Node at start (name only known at run time)",
    ),
    call(
        "",
        "nodes",
        "list",
        Scope::Cluster,
        "agent::watch reflector; podcidr: a fresh list of live nodes",
    ),
    call(
        "",
        "nodes",
        "watch",
        Scope::Cluster,
        "agent::watch reflector",
    ),
    ApiCall {
        group: "",
        resource: "nodes",
        subresource: Some("status"),
        verb: "patch",
        scope: Scope::Cluster,
        resource_name: None,
        why: "cluster::publish: this node's annotations (merge patch of nodes/status)",
    },
    // The pod CIDR allocation record, in veilnet's namespace only.
    record("get", "cluster::podcidr: read the record"),
    record(
        "list",
        "agent::watch reflector on the record (fieldSelector metadata.name)",
    ),
    record(
        "watch",
        "agent::watch reflector on the record (fieldSelector metadata.name)",
    ),
    record(
        "update",
        "cluster::podcidr: replace with the read resourceVersion",
    ),
    call(
        "",
        "configmaps",
        "create",
        Scope::OwnNamespace,
        "cluster::podcidr: create the record (create cannot be limited by name)",
    ),
    // Node events go to `default`, where kubelet posts its Node events; alert Events go to the
    // pod's namespace, which can be any.
    call(
        "",
        "events",
        "create",
        Scope::Cluster,
        "agent::events: Events about nodes the agent refuses (in default); agent::alerts: \
         Warning Events on pods that raise network anomaly alerts (in their namespace)",
    ),
    // NetworkPolicy enforcement: reflectors over what the policy compiler reads.
    call(
        "",
        "pods",
        "list",
        Scope::Cluster,
        "policy: pod IPs and labels (reflector)",
    ),
    call(
        "",
        "pods",
        "watch",
        Scope::Cluster,
        "policy: pod IPs and labels (reflector)",
    ),
    call(
        "",
        "namespaces",
        "list",
        Scope::Cluster,
        "policy: namespace labels (reflector)",
    ),
    call(
        "",
        "namespaces",
        "watch",
        Scope::Cluster,
        "policy: namespace labels (reflector)",
    ),
    call(
        "networking.k8s.io",
        "networkpolicies",
        "list",
        Scope::Cluster,
        "policy: NetworkPolicies (reflector)",
    ),
    call(
        "networking.k8s.io",
        "networkpolicies",
        "watch",
        Scope::Cluster,
        "policy: NetworkPolicies (reflector)",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_unique_and_well_formed() {
        const VERBS: &[&str] = &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ];
        for (i, c) in AGENT_API_CALLS.iter().enumerate() {
            assert!(VERBS.contains(&c.verb), "{c}");
            assert!(
                !(c.verb == "create" && c.resource_name.is_some()),
                "create cannot be restricted by name: {c}"
            );
            assert!(!c.why.is_empty(), "{c}");
            for other in &AGENT_API_CALLS[i + 1..] {
                let same = (c.group, c.rbac_resource(), c.verb, c.scope)
                    == (other.group, other.rbac_resource(), other.verb, other.scope);
                assert!(!same, "duplicate entry {c}");
            }
        }
    }

    #[test]
    fn display_names_the_call() {
        let patch = AGENT_API_CALLS
            .iter()
            .find(|c| c.subresource == Some("status"))
            .unwrap();
        assert_eq!(patch.to_string(), "patch core/nodes/status (cluster)");
        let rec = AGENT_API_CALLS.iter().find(|c| c.verb == "update").unwrap();
        assert_eq!(
            rec.to_string(),
            "update core/configmaps \"veilnet-pod-cidrs\" (own namespace)"
        );
    }
}
