//! Pod CIDR ownership.
//!
//! A node's pod CIDR is the Node's `spec.podCIDR(s)` when kube-controller-manager assigns them.
//! Otherwise veilnet allocates one from the cluster CIDR. Concurrent agents must never pick the same
//! subnet, so allocations go through **one** shared object, the ConfigMap
//! `<veilnet namespace>/veilnet-pod-cidrs` (`data: {<node name>: <cidr>}`), written with optimistic
//! concurrency: read, decide, replace with the read `resourceVersion`, and start over on 409.
//! A per-node annotation is not safe: two agents can each see the other's subnet as free.
//!
//! The record is also the proof of ownership for peers: a peer's CIDR is routed only if the cluster
//! (spec or record) says it is that peer's, never because the peer claims it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::Api;

/// Name of the allocation record.
pub const RECORD_NAME: &str = "veilnet-pod-cidrs";
/// How many times an allocation is retried after a conflict before giving up.
const MAX_ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum PodCidrError {
    #[error("cluster CIDR {cluster} has no free /{prefix} subnet left for node {node}")]
    Exhausted {
        cluster: Ipv4Net,
        prefix: u8,
        node: String,
    },
    #[error("node prefix /{prefix} does not fit in cluster CIDR {cluster}")]
    BadPrefix { cluster: Ipv4Net, prefix: u8 },
    #[error("gave up allocating a pod CIDR for {node} after {attempts} conflicting updates")]
    TooManyConflicts { node: String, attempts: usize },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub type Result<T> = std::result::Result<T, PodCidrError>;

/// The parsed allocation record. Entries that do not parse are kept aside, never routed, and never
/// overwritten silently (they still block their subnet if they parse as a CIDR at all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocationRecord {
    pub cidrs: BTreeMap<String, Ipv4Net>,
    pub invalid: BTreeMap<String, String>,
}

impl AllocationRecord {
    pub fn from_data(data: Option<&BTreeMap<String, String>>) -> Self {
        let mut rec = Self::default();
        for (node, value) in data.into_iter().flatten() {
            match value.trim().parse::<Ipv4Net>() {
                Ok(net) if net == net.trunc() => {
                    rec.cidrs.insert(node.clone(), net);
                }
                _ => {
                    rec.invalid.insert(node.clone(), value.clone());
                }
            }
        }
        rec
    }

    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data: BTreeMap<String, String> = self
            .cidrs
            .iter()
            .map(|(n, c)| (n.clone(), c.to_string()))
            .collect();
        data.extend(self.invalid.clone());
        data
    }
}

/// Outcome of a pure allocation decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub cidr: Ipv4Net,
    /// True when the record must be written (a new entry).
    pub changed: bool,
}

/// Picks `node`'s subnet: its existing entry, else the lowest subnet of `cluster` that overlaps no
/// recorded allocation and no CIDR in `reserved` (other nodes' `spec.podCIDR`s).
pub fn decide(
    record: &AllocationRecord,
    cluster: Ipv4Net,
    prefix: u8,
    node: &str,
    reserved: &[Ipv4Net],
) -> Result<Decision> {
    if let Some(existing) = record.cidrs.get(node) {
        if cluster.contains(existing) {
            return Ok(Decision {
                cidr: *existing,
                changed: false,
            });
        }
    }
    let subnets = cluster
        .subnets(prefix)
        .map_err(|_| PodCidrError::BadPrefix { cluster, prefix })?;
    let taken: Vec<Ipv4Net> = record
        .cidrs
        .iter()
        .filter(|(n, _)| n.as_str() != node)
        .map(|(_, c)| *c)
        .chain(
            record
                .invalid
                .values()
                .filter_map(|v| v.trim().parse::<Ipv4Net>().ok()),
        )
        .chain(reserved.iter().copied())
        .collect();
    subnets
        .into_iter()
        .find(|s| !taken.iter().any(|t| overlaps(s, t)))
        .map(|cidr| Decision {
            cidr,
            changed: true,
        })
        .ok_or_else(|| PodCidrError::Exhausted {
            cluster,
            prefix,
            node: node.to_string(),
        })
}

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Record entries whose node no longer exists.
pub fn stale_entries(record: &AllocationRecord, live_nodes: &BTreeSet<String>) -> Vec<String> {
    record
        .cidrs
        .keys()
        .chain(record.invalid.keys())
        .filter(|n| !live_nodes.contains(*n))
        .cloned()
        .collect()
}

/// The IPv4 pod CIDRs from a Node's spec (`podCIDRs` first, then the legacy `podCIDR`).
pub fn spec_cidrs(node: &Node) -> Vec<Ipv4Net> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<Ipv4Net> = spec
        .pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|c| c.trunc())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Reads the record; `None` when it does not exist yet.
async fn read(api: &Api<ConfigMap>) -> Result<Option<(AllocationRecord, ConfigMap)>> {
    Ok(api
        .get_opt(RECORD_NAME)
        .await?
        .map(|cm| (AllocationRecord::from_data(cm.data.as_ref()), cm)))
}

/// Writes `record` as a new version of `base` (or creates it). Ok(false) on a conflict.
async fn write(
    api: &Api<ConfigMap>,
    base: Option<ConfigMap>,
    record: &AllocationRecord,
) -> Result<bool> {
    let result = match base {
        Some(mut cm) => {
            // `cm.metadata.resourceVersion` is the version read: a concurrent writer makes this 409.
            cm.data = Some(record.to_data());
            api.replace(RECORD_NAME, &PostParams::default(), &cm)
                .await
                .map(|_| ())
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(RECORD_NAME.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".into(),
                        "veilnet".into(),
                    )])),
                    ..Default::default()
                },
                data: Some(record.to_data()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await.map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn backoff(attempt: usize) -> Duration {
    // Jitter keeps agents that collided once from colliding again in lockstep.
    let base = 20u64 * (1 << attempt.min(5));
    Duration::from_millis(base + rand::random::<u64>() % base)
}

/// Allocates (or finds) `node`'s pod CIDR in the shared record.
pub async fn ensure_allocated(
    client: kube::Client,
    namespace: &str,
    node: &str,
    cluster: Ipv4Net,
    prefix: u8,
) -> Result<Ipv4Net> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let nodes: Api<Node> = Api::all(client);
    for attempt in 0..MAX_ATTEMPTS {
        let (record, base) = match read(&cms).await? {
            Some((r, cm)) => (r, Some(cm)),
            None => (AllocationRecord::default(), None),
        };
        let reserved: Vec<Ipv4Net> = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(node))
            .flat_map(spec_cidrs)
            .collect();
        let decision = decide(&record, cluster, prefix, node, &reserved)?;
        if !decision.changed {
            return Ok(decision.cidr);
        }
        let mut next = record.clone();
        next.cidrs.insert(node.to_string(), decision.cidr);
        if write(&cms, base, &next).await? {
            return Ok(decision.cidr);
        }
        tracing::debug!(node, attempt, "pod CIDR record changed under us; retrying");
        tokio::time::sleep(backoff(attempt)).await;
    }
    Err(PodCidrError::TooManyConflicts {
        node: node.to_string(),
        attempts: MAX_ATTEMPTS,
    })
}

/// Releases the subnets of nodes that no longer exist. Reads a fresh Node list (never a cache), so a
/// node that is merely slow to appear in a watch is never released.
pub async fn release_deleted(client: kube::Client, namespace: &str) -> Result<Vec<String>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let nodes: Api<Node> = Api::all(client);
    for attempt in 0..MAX_ATTEMPTS {
        let Some((record, base)) = read(&cms).await? else {
            return Ok(Vec::new());
        };
        let live: BTreeSet<String> = nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let stale = stale_entries(&record, &live);
        if stale.is_empty() {
            return Ok(stale);
        }
        let mut next = record.clone();
        for n in &stale {
            next.cidrs.remove(n);
            next.invalid.remove(n);
        }
        if write(&cms, Some(base), &next).await? {
            return Ok(stale);
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
    Err(PodCidrError::TooManyConflicts {
        node: "<release>".into(),
        attempts: MAX_ATTEMPTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn record(entries: &[(&str, &str)]) -> AllocationRecord {
        let data: BTreeMap<String, String> = entries
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        AllocationRecord::from_data(Some(&data))
    }

    #[test]
    fn first_allocation_is_the_lowest_subnet() {
        let d = decide(
            &AllocationRecord::default(),
            net("10.244.0.0/16"),
            24,
            "a",
            &[],
        )
        .unwrap();
        assert_eq!(
            d,
            Decision {
                cidr: net("10.244.0.0/24"),
                changed: true
            }
        );
    }

    #[test]
    fn existing_entry_is_kept() {
        let r = record(&[("a", "10.244.7.0/24")]);
        let d = decide(&r, net("10.244.0.0/16"), 24, "a", &[]).unwrap();
        assert_eq!(
            d,
            Decision {
                cidr: net("10.244.7.0/24"),
                changed: false
            }
        );
    }

    #[test]
    fn skips_recorded_reserved_and_invalid_but_parseable() {
        let r = record(&[
            ("a", "10.244.0.0/24"),
            ("b", "10.244.1.0/24"),
            ("c", "10.244.2.5/24"),
        ]);
        // c's entry is not a network address: invalid, yet its subnet stays blocked.
        assert!(r.invalid.contains_key("c"));
        let d = decide(&r, net("10.244.0.0/16"), 24, "new", &[net("10.244.3.0/24")]).unwrap();
        assert_eq!(d.cidr, net("10.244.4.0/24"));
    }

    #[test]
    fn an_entry_outside_the_cluster_cidr_is_reallocated() {
        let r = record(&[("a", "192.168.0.0/24")]);
        let d = decide(&r, net("10.244.0.0/16"), 24, "a", &[]).unwrap();
        assert_eq!(
            d,
            Decision {
                cidr: net("10.244.0.0/24"),
                changed: true
            }
        );
    }

    #[test]
    fn exhaustion_and_bad_prefix_are_errors() {
        let r = record(&[("a", "10.244.0.0/25"), ("b", "10.244.0.128/25")]);
        assert!(matches!(
            decide(&r, net("10.244.0.0/24"), 25, "c", &[]),
            Err(PodCidrError::Exhausted { .. })
        ));
        assert!(matches!(
            decide(
                &AllocationRecord::default(),
                net("10.244.0.0/24"),
                16,
                "c",
                &[]
            ),
            Err(PodCidrError::BadPrefix { .. })
        ));
    }

    #[test]
    fn reserved_supernet_blocks_its_subnets() {
        let d = decide(
            &AllocationRecord::default(),
            net("10.244.0.0/16"),
            24,
            "n",
            &[net("10.244.0.0/23")],
        )
        .unwrap();
        assert_eq!(d.cidr, net("10.244.2.0/24"));
    }

    #[test]
    fn stale_entries_are_those_of_missing_nodes() {
        let r = record(&[
            ("a", "10.244.0.0/24"),
            ("b", "10.244.1.0/24"),
            ("bad", "zzz"),
        ]);
        let live: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(
            stale_entries(&r, &live),
            vec!["b".to_string(), "bad".to_string()]
        );
    }

    #[test]
    fn record_round_trips_including_invalid_entries() {
        let r = record(&[("a", "10.244.0.0/24"), ("bad", "not-a-cidr")]);
        assert_eq!(AllocationRecord::from_data(Some(&r.to_data())), r);
    }

    #[test]
    fn spec_cidrs_ignores_garbage_and_ipv6() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64", "junk"]}
        }))
        .unwrap();
        assert_eq!(spec_cidrs(&node), vec![net("10.244.1.0/24")]);
    }
}
