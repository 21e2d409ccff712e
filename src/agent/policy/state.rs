//! From the watch caches and the attachment registry to the compiler's [`ClusterState`] (pure).
//!
//! Local pods get their host veth and MAC from the plugin's report, and the reported IPs replace
//! the API's: the plugin's are the ones the pod really has, and are known before the kubelet
//! writes them to the pod's status (that is what lets ADD wait for the pod's rules).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::attachments::Attachments;
use crate::policy::{ClusterState, MacAddr, NamespaceInfo, ObjectRef, PodInfo};

/// Builds the compiler's input for `node`.
pub fn cluster_state(
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    policies: &[Arc<NetworkPolicy>],
    attachments: &Attachments,
    node: &str,
) -> ClusterState {
    let pods = pods
        .iter()
        .filter_map(|pod| {
            let mut info = PodInfo::from_k8s(pod)?;
            if info.node == node && !info.host_network {
                if let Some(a) = attachments.for_pod(&info.namespace, &info.name) {
                    let uid = pod.metadata.uid.as_deref();
                    // An attachment of an earlier pod with the same name is not this pod's.
                    let same_pod = match (uid, a.uid.as_deref()) {
                        (Some(api), Some(cni)) => api == cni,
                        _ => true,
                    };
                    if same_pod {
                        info.host_veth = Some(a.host_veth.clone());
                        info.mac = a.mac.parse::<MacAddr>().ok();
                        info.ips = a.ips.clone();
                    }
                }
            }
            Some(info)
        })
        .collect();
    ClusterState {
        pods,
        namespaces: namespaces
            .iter()
            .filter_map(|n| NamespaceInfo::from_k8s(n))
            .collect(),
        policies: policies.iter().map(|p| (**p).clone()).collect(),
    }
}

/// Who owns an IP, for flow logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub pod: ObjectRef,
    pub node: String,
}

/// IP → pod, over every pod of the cluster (host-network pods excluded: their IPs are nodes').
#[derive(Clone, Debug, Default)]
pub struct IpIndex {
    by_ip: HashMap<IpAddr, PodRef>,
    /// ifindex-free lookup of local bridge ports: host veth → pod.
    by_veth: HashMap<String, ObjectRef>,
}

impl IpIndex {
    pub fn new(state: &ClusterState) -> Self {
        let mut index = IpIndex::default();
        for p in state.pods.iter().filter(|p| !p.host_network) {
            for ip in &p.ips {
                index.by_ip.entry(*ip).or_insert_with(|| PodRef {
                    pod: p.object_ref(),
                    node: p.node.clone(),
                });
            }
            if let Some(veth) = &p.host_veth {
                index.by_veth.insert(veth.clone(), p.object_ref());
            }
        }
        index
    }

    pub fn pod(&self, ip: &IpAddr) -> Option<&PodRef> {
        self.by_ip.get(ip)
    }

    pub fn pod_of_veth(&self, veth: &str) -> Option<&ObjectRef> {
        self.by_veth.get(veth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veilnet_cni::agent_protocol::PodAttachment;

    fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, uid: &str) -> Arc<Pod> {
        let mut v = serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}
        });
        if let Some(ip) = ip {
            v["status"]["podIP"] = ip.into();
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn attachment(ns: &str, name: &str, ip: &str, uid: Option<&str>) -> PodAttachment {
        PodAttachment {
            container_id: format!("c{name}"),
            ifname: "eth0".into(),
            namespace: ns.into(),
            name: name.into(),
            uid: uid.map(str::to_string),
            ips: vec![ip.parse().unwrap()],
            mac: "0a:58:00:00:00:01".into(),
            host_veth: format!("veil{name:0>11}"),
        }
    }

    #[test]
    fn local_pods_take_the_plugins_facts() {
        let mut reg = Attachments::in_memory();
        // a: no IP in the API yet; b: a stale attachment of an earlier pod named b.
        reg.insert(attachment("x", "a", "10.244.1.5", Some("u-a")))
            .unwrap();
        reg.insert(attachment("x", "b", "10.244.1.6", Some("old")))
            .unwrap();
        reg.insert(attachment("x", "r", "10.244.1.7", None))
            .unwrap();
        let pods = vec![
            pod("x", "a", "n1", None, "u-a"),
            pod("x", "b", "n1", Some("10.244.1.9"), "u-b"),
            pod("x", "r", "n2", Some("10.244.2.3"), "u-r"),
        ];
        let state = cluster_state(&pods, &[], &[], &reg, "n1");
        let a = &state.pods[0];
        assert_eq!(a.ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.host_veth.as_deref(), Some("veil0000000000a"));
        assert_eq!(a.mac.unwrap().to_string(), "0a:58:00:00:00:01");
        let b = &state.pods[1];
        assert_eq!(b.host_veth, None);
        assert_eq!(b.ips, vec!["10.244.1.9".parse::<IpAddr>().unwrap()]);
        // Pods of other nodes keep the API's facts even if an attachment has their name.
        let r = &state.pods[2];
        assert_eq!(
            (r.host_veth.as_deref(), r.ips[0].to_string().as_str()),
            (None, "10.244.2.3")
        );

        let index = IpIndex::new(&state);
        let who = index.pod(&"10.244.1.5".parse().unwrap()).unwrap();
        assert_eq!(
            (who.pod.to_string(), who.node.as_str()),
            ("x/a".into(), "n1")
        );
        assert_eq!(index.pod_of_veth("veil0000000000a").unwrap().name, "a");
        assert!(index.pod(&"10.9.9.9".parse().unwrap()).is_none());
    }
}
