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
use veilnet_cni::agent_protocol::PodAttachment;

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
    ClusterState {
        pods: pods
            .iter()
            .filter_map(|pod| pod_info(pod, attachment_for(pod, attachments, node)))
            .collect(),
        namespaces: namespace_infos(namespaces),
        policies: policies.iter().map(|p| (**p).clone()).collect(),
    }
}

fn namespace_infos(namespaces: &[Arc<Namespace>]) -> Vec<NamespaceInfo> {
    namespaces
        .iter()
        .filter_map(|n| NamespaceInfo::from_k8s(n))
        .collect()
}

/// The plugin's report that applies to `pod`: only for a pod of this node outside the host
/// network, and not one of an earlier pod with the same name.
fn attachment_for<'a>(
    pod: &Pod,
    attachments: &'a Attachments,
    node: &str,
) -> Option<&'a PodAttachment> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) || spec.host_network == Some(true) {
        return None;
    }
    let a = attachments.for_pod(
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
    )?;
    let same_pod = match (pod.metadata.uid.as_deref(), a.uid.as_deref()) {
        (Some(api), Some(cni)) => api == cni,
        _ => true,
    };
    same_pod.then_some(a)
}

/// A pod as the compiler sees it; a local pod takes its host veth, MAC and IPs from `attachment`.
fn pod_info(pod: &Pod, attachment: Option<&PodAttachment>) -> Option<PodInfo> {
    let mut info = PodInfo::from_k8s(pod)?;
    if let Some(a) = attachment {
        info.host_veth = Some(a.host_veth.clone());
        info.mac = a.mac.parse::<MacAddr>().ok();
        info.ips = a.ips.clone();
    }
    Some(info)
}

/// A converted pod and what it was converted from.
type PodEntry = ((Arc<Pod>, Option<PodAttachment>), PodInfo);

/// [`cluster_state`], incrementally: an object the caches still hold unchanged (the same `Arc`,
/// and for a local pod the same attachment) keeps its conversion from the previous call. A sync
/// after one label change thus converts one pod, not every pod and policy of the cluster (the
/// reflector replaces an object's `Arc` when it changes and keeps it otherwise).
#[derive(Default)]
pub struct StateCache {
    state: ClusterState,
    /// What each entry of `state.pods` was converted from (same index).
    pod_sources: Vec<(Arc<Pod>, Option<PodAttachment>)>,
    /// What each entry of `state.policies` was cloned from (same index).
    policy_sources: Vec<Arc<NetworkPolicy>>,
    /// Pods and policies converted by the last update (the rest were reused).
    pub converted: usize,
}

impl StateCache {
    /// The same state as [`cluster_state`] with these arguments.
    pub fn update(
        &mut self,
        pods: &[Arc<Pod>],
        namespaces: &[Arc<Namespace>],
        policies: &[Arc<NetworkPolicy>],
        attachments: &Attachments,
        node: &str,
    ) -> &ClusterState {
        self.converted = 0;
        // Keyed by address; the `Arc`s kept in the sources keep those addresses from being
        // reused until the lookup is done.
        let mut old_pods: HashMap<*const Pod, PodEntry> = std::mem::take(&mut self.pod_sources)
            .into_iter()
            .zip(std::mem::take(&mut self.state.pods))
            .map(|(source, info)| (Arc::as_ptr(&source.0), (source, info)))
            .collect();
        for pod in pods {
            let attachment = attachment_for(pod, attachments, node);
            let reused = old_pods
                .remove(&Arc::as_ptr(pod))
                .filter(|((_, was), _)| was.as_ref() == attachment)
                .map(|(_, info)| info);
            let info = match reused {
                Some(info) => info,
                None => {
                    self.converted += 1;
                    let Some(info) = pod_info(pod, attachment) else {
                        continue;
                    };
                    info
                }
            };
            self.state.pods.push(info);
            self.pod_sources.push((pod.clone(), attachment.cloned()));
        }
        let mut old_policies: HashMap<*const NetworkPolicy, (Arc<NetworkPolicy>, NetworkPolicy)> =
            std::mem::take(&mut self.policy_sources)
                .into_iter()
                .zip(std::mem::take(&mut self.state.policies))
                .map(|(source, p)| (Arc::as_ptr(&source), (source, p)))
                .collect();
        for policy in policies {
            let p = match old_policies.remove(&Arc::as_ptr(policy)) {
                Some((_, p)) => p,
                None => {
                    self.converted += 1;
                    (**policy).clone()
                }
            };
            self.state.policies.push(p);
            self.policy_sources.push(policy.clone());
        }
        self.state.namespaces = namespace_infos(namespaces);
        &self.state
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

    fn same_state(a: &ClusterState, b: &ClusterState) {
        let mut pa = a.pods.clone();
        let mut pb = b.pods.clone();
        pa.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        pb.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        assert_eq!(pa, pb);
        assert_eq!(a.namespaces, b.namespaces);
        assert_eq!(a.policies, b.policies);
    }

    #[test]
    fn the_cache_converts_only_what_changed_and_agrees_with_a_fresh_build() {
        let mut reg = Attachments::in_memory();
        reg.insert(attachment("x", "a", "10.244.1.5", Some("u-a")))
            .unwrap();
        let mut pods = vec![
            pod("x", "a", "n1", None, "u-a"),
            pod("x", "b", "n1", Some("10.244.1.9"), "u-b"),
            pod("x", "r", "n2", Some("10.244.2.3"), "u-r"),
        ];
        let policies: Vec<Arc<NetworkPolicy>> = vec![Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "x", "name": "p"}, "spec": {"podSelector": {}}
            }))
            .unwrap(),
        )];
        let mut cache = StateCache::default();
        let first = cache.update(&pods, &[], &policies, &reg, "n1").clone();
        assert_eq!(cache.converted, 4);
        same_state(&first, &cluster_state(&pods, &[], &policies, &reg, "n1"));

        // Nothing changed: nothing converted.
        cache.update(&pods, &[], &policies, &reg, "n1");
        assert_eq!(cache.converted, 0);

        // One pod relabelled (a new object, as the reflector stores it), one removed.
        let mut relabelled = (*pods[1]).clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("role".into(), "db".into());
        pods[1] = Arc::new(relabelled);
        pods.remove(2);
        let state = cache.update(&pods, &[], &policies, &reg, "n1").clone();
        assert_eq!(cache.converted, 1);
        same_state(&state, &cluster_state(&pods, &[], &policies, &reg, "n1"));
        assert_eq!(state.pods.len(), 2);

        // The plugin reports b: the same pod object is converted again with its attachment.
        reg.insert(attachment("x", "b", "10.244.1.6", Some("u-b")))
            .unwrap();
        let state = cache.update(&pods, &[], &[], &reg, "n1").clone();
        assert_eq!(cache.converted, 1);
        same_state(&state, &cluster_state(&pods, &[], &[], &reg, "n1"));
        let b = state.pods.iter().find(|p| p.name == "b").unwrap();
        assert_eq!(b.ips, vec!["10.244.1.6".parse::<IpAddr>().unwrap()]);
        assert!(state.policies.is_empty());
    }
}
