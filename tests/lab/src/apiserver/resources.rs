//! The registry of served resources: one static row per resource with what discovery, routing and
//! the generic store need to know about it. Kind-specific behaviour (validation, defaulting) lives
//! in `kinds`, keyed by [`Kind`].

/// Which built-in type a resource holds; selects validation, defaulting, tables and patch metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    ConfigMap,
    CoreEvent,
    Service,
    Lease,
    NetworkPolicy,
    Event,
    ServiceAccount,
    DaemonSet,
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
}

#[derive(Debug)]
pub struct ResourceDef {
    pub kind_id: Kind,
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Served subresources besides the main resource (`status`, `binding`).
    pub subresources: &'static [&'static str],
    /// `metadata.generation` is maintained (bumped on spec changes).
    pub tracks_generation: bool,
    /// DELETE answers with the object rather than a `Status` (as the real pods/namespaces do).
    pub return_deleted_object: bool,
    /// PUT of a missing object creates it (the real leases/events allow this).
    pub allow_create_on_update: bool,
    /// Field selector labels beyond `metadata.name` / `metadata.namespace`.
    pub field_labels: &'static [&'static str],
}

/// Index into [`RESOURCES`]; the store keeps one map per index.
pub type ResourceId = usize;

pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_status_subresource(&self) -> bool {
        self.subresources.contains(&"status")
    }

    /// The path prefix of the group version: `/api/v1` or `/apis/<group>/<version>`.
    pub fn gv_prefix(&self) -> String {
        gv_prefix(self.group, self.version)
    }
}

pub fn gv_prefix(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    }
}

const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

pub static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        kind_id: Kind::Namespace,
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        subresources: &["status"],
        tracks_generation: false,
        return_deleted_object: true,
        allow_create_on_update: false,
        field_labels: &["status.phase"],
    },
    ResourceDef {
        kind_id: Kind::Node,
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        subresources: &["status"],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &["spec.unschedulable"],
    },
    ResourceDef {
        kind_id: Kind::Pod,
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        subresources: &["status", "binding"],
        tracks_generation: true,
        return_deleted_object: true,
        allow_create_on_update: false,
        field_labels: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    ResourceDef {
        kind_id: Kind::ConfigMap,
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::CoreEvent,
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: true,
        field_labels: CORE_EVENT_FIELDS,
    },
    ResourceDef {
        kind_id: Kind::Service,
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        subresources: &["status"],
        tracks_generation: false,
        return_deleted_object: true,
        allow_create_on_update: false,
        field_labels: &["spec.clusterIP", "spec.type"],
    },
    ResourceDef {
        kind_id: Kind::Lease,
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: true,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::NetworkPolicy,
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        short_names: &["netpol"],
        categories: &[],
        subresources: &[],
        tracks_generation: true,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::Event,
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: true,
        field_labels: CORE_EVENT_FIELDS,
    },
    ResourceDef {
        kind_id: Kind::ServiceAccount,
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::DaemonSet,
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short_names: &["ds"],
        categories: &["all"],
        subresources: &["status"],
        tracks_generation: true,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::ClusterRole,
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short_names: &[],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::ClusterRoleBinding,
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short_names: &[],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::Role,
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
    ResourceDef {
        kind_id: Kind::RoleBinding,
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        tracks_generation: false,
        return_deleted_object: false,
        allow_create_on_update: false,
        field_labels: &[],
    },
];

pub fn def(id: ResourceId) -> &'static ResourceDef {
    &RESOURCES[id]
}

/// Looks a resource up by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn id_of(kind: Kind) -> ResourceId {
    RESOURCES
        .iter()
        .position(|r| r.kind_id == kind)
        .unwrap_or_default()
}

/// The group versions served, in discovery order (core first).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_exactly_one_row() {
        for (i, r) in RESOURCES.iter().enumerate() {
            assert_eq!(id_of(r.kind_id), i, "{}", r.plural);
            assert_eq!(find(r.group, r.version, r.plural), Some(i));
        }
    }

    #[test]
    fn core_group_comes_first() {
        let gvs = group_versions();
        assert_eq!(gvs[0], ("", "v1"));
        assert!(gvs.contains(&("networking.k8s.io", "v1")));
    }
}
