//! Prometheus metrics of the agent (`/metrics`), named by Prometheus' conventions: `veilnet_`
//! prefix, `_total` for counters, `_seconds` and `_bytes` units.
//!
//! Per-peer values (path, handshake age, bytes) are encoded at scrape time from the agent's latest
//! status snapshot (refreshed every 2 s, the same data `veilnet status` shows), so they need no
//! bookkeeping per peer and vanish with the peer. IPAM usage is read from the plugin's store on
//! scrape. Reconcile durations and errors are ordinary instruments.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use tokio::sync::watch;

use super::policy::status::PolicyStatus;
use super::status::NodeStatus;

/// Where the scrape-time collector finds its data.
#[derive(Debug, Default)]
pub struct Sources {
    pub status: Mutex<Option<NodeStatus>>,
    /// `(state dir, network name, pod CIDR, gateway)` of the IPAM store to report on.
    pub ipam: Mutex<Option<(PathBuf, String, ipnet::Ipv4Net, std::net::Ipv4Addr)>>,
    /// The policy enforcer's status, in memory ([`crate::agent::policy::PolicyAgent::status_feed`]),
    /// read on scrape; `None` while no enforcer runs.
    pub policy_status: Mutex<Option<watch::Receiver<PolicyStatus>>>,
    /// The listeners' connection caps, reported on scrape.
    pub listeners: Mutex<Vec<Arc<crate::listen::ConnLimit>>>,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Counter,
    pub sources: Arc<Sources>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("veilnet");
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass (plan, apply, publish)",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed",
            reconcile_errors.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(SnapshotCollector(sources.clone())));
        Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            sources,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct SnapshotCollector(Arc<Sources>);

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (labels, m) in &rows {
        m.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let listeners = self
            .0
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rows = |f: &dyn Fn(&crate::listen::ConnLimit) -> i64| -> Vec<(Labels, ConstGauge)> {
            listeners
                .iter()
                .map(|l| {
                    (
                        vec![("listener", l.name().to_string())],
                        ConstGauge::new(f(l)),
                    )
                })
                .collect()
        };
        let counters =
            |f: &dyn Fn(&crate::listen::ConnLimit) -> u64| -> Vec<(Labels, ConstCounter)> {
                listeners
                    .iter()
                    .map(|l| {
                        (
                            vec![("listener", l.name().to_string())],
                            ConstCounter::new(f(l)),
                        )
                    })
                    .collect()
            };
        family(
            &mut encoder,
            "connections_open",
            "Connections a listener of the agent holds open now",
            rows(&|l| l.open() as i64),
        )?;
        family(
            &mut encoder,
            "connections_max",
            "Connections a listener of the agent holds open at most",
            rows(&|l| l.max() as i64),
        )?;
        family(
            &mut encoder,
            "connections_rejected",
            "Connections closed at once because their listener was at its cap",
            counters(&|l| l.rejected()),
        )?;
        family(
            &mut encoder,
            "connections_refused",
            "Connections closed at once because their source may not use the listener (pods, on the flows endpoint)",
            counters(&|l| l.refused()),
        )?;
        let status = self
            .0
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(st) = status {
            family(
                &mut encoder,
                "node_info",
                "This node's encryption mode (value 1)",
                vec![(
                    vec![("node", st.node.clone()), ("mode", st.mode.to_string())],
                    ConstGauge::new(1i64),
                )],
            )?;
            family(
                &mut encoder,
                "peer_path",
                "Path to each peer: wireguard, vxlan or blocked (value 1)",
                st.peers
                    .iter()
                    .map(|p| {
                        (
                            vec![("peer", p.node.clone()), ("path", p.path.clone())],
                            ConstGauge::new(1i64),
                        )
                    })
                    .collect(),
            )?;
            if let Some(dp) = &st.datapath {
                family(
                    &mut encoder,
                    "datapath_up",
                    "1 while the WireGuard datapath process answers the agent, else 0",
                    vec![(vec![], ConstGauge::new(i64::from(dp.error.is_none())))],
                )?;
                family(
                    &mut encoder,
                    "wireguard_dropped_datagrams",
                    "Datagrams on the WireGuard port no peer took, by reason (invalid, unknown_peer, rate_limited)",
                    dp.drops
                        .iter()
                        .map(|(reason, n)| (vec![("reason", reason.clone())], ConstCounter::new(*n)))
                        .collect(),
                )?;
                family(
                    &mut encoder,
                    "wireguard_cookie_replies",
                    "Cookie replies sent because handshake initiations came faster than the device's limit",
                    vec![(vec![], ConstCounter::new(dp.cookie_replies))],
                )?;
                if let Some(started) = dp.started_at {
                    family(
                        &mut encoder,
                        "datapath_start_time_seconds",
                        "Unix time the datapath process started (a change means it restarted)",
                        vec![(
                            vec![],
                            ConstGauge::new(i64::try_from(started).unwrap_or(i64::MAX)),
                        )],
                    )?;
                }
            }
            let wg: Vec<_> = st.peers.iter().filter(|p| p.path == "wireguard").collect();
            family(
                &mut encoder,
                "wireguard_handshake_age_seconds",
                "Seconds since the last completed WireGuard handshake with the peer",
                wg.iter()
                    .filter_map(|p| {
                        p.last_handshake_seconds
                            .map(|s| (vec![("peer", p.node.clone())], ConstGauge::new(s as i64)))
                    })
                    .collect(),
            )?;
            family(
                &mut encoder,
                "wireguard_received_bytes",
                "Bytes received from the peer over WireGuard (current session set)",
                wg.iter()
                    .map(|p| {
                        (
                            vec![("peer", p.node.clone())],
                            ConstCounter::new(p.rx_bytes),
                        )
                    })
                    .collect(),
            )?;
            family(
                &mut encoder,
                "wireguard_sent_bytes",
                "Bytes sent to the peer over WireGuard (current session set)",
                wg.iter()
                    .map(|p| {
                        (
                            vec![("peer", p.node.clone())],
                            ConstCounter::new(p.tx_bytes),
                        )
                    })
                    .collect(),
            )?;
            family(
                &mut encoder,
                "wireguard_rejected_datagrams",
                "Datagrams from the peer's address its tunnel rejected (replayed or duplicated counter, failed authentication, handshake out of turn)",
                wg.iter()
                    .map(|p| {
                        (
                            vec![("peer", p.node.clone())],
                            ConstCounter::new(p.rx_rejected),
                        )
                    })
                    .collect(),
            )?;
            family(
                &mut encoder,
                "key_rotation_failing",
                "1 while a requested WireGuard key rotation fails (the state dir read-only or full): the node keeps its current key and retries",
                vec![(
                    vec![],
                    ConstGauge::new(i64::from(st.key_rotation_error.is_some())),
                )],
            )?;
            family(
                &mut encoder,
                "peers_rejected",
                "Peers the overlay refuses (malformed or conflicting data)",
                vec![(vec![], ConstGauge::new(st.rejected.len() as i64))],
            )?;
            family(
                &mut encoder,
                "masqueraded_connections",
                "Connections from pods to outside the cluster masqueraded to the node's address",
                vec![(vec![], ConstCounter::new(st.masqueraded))],
            )?;
            family(
                &mut encoder,
                "wire_dropped_packets",
                "Packets the wire table dropped on the underlay, by reason (raw_pod_traffic, plaintext_vxlan, vxlan_rejected, wireguard_rejected)",
                st.wire_drops
                    .iter()
                    .map(|(reason, n)| (vec![("reason", reason.clone())], ConstCounter::new(*n)))
                    .collect(),
            )?;
        }
        let policy = self
            .0
            .policy_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(feed) = policy {
            // Cloned so the enforcer is never held up by an encoder.
            let ps = feed.borrow().clone();
            encode_policy(&mut encoder, &ps)?;
        }
        let ipam = self
            .0
            .ipam
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((dir, network, cidr, gateway)) = ipam {
            if let Ok(pool) = veilnet_cni::ipam::Pool::new(cidr, gateway) {
                let used = veilnet_cni::ipam::IpamStore::new(&dir, &network)
                    .used(&pool)
                    .unwrap_or(0);
                let capacity = pool.capacity();
                let labels = || vec![("cidr", cidr.to_string())];
                family(
                    &mut encoder,
                    "ipam_addresses_used",
                    "Pod addresses allocated on this node",
                    vec![(labels(), ConstGauge::new(i64::from(used)))],
                )?;
                family(
                    &mut encoder,
                    "ipam_addresses_free",
                    "Pod addresses still free on this node",
                    vec![(
                        labels(),
                        ConstGauge::new(i64::from(capacity.saturating_sub(used))),
                    )],
                )?;
            }
        }
        Ok(())
    }
}

/// Policy verdicts by policy, drops by direction, spoofing, and the enforcer's size.
fn encode_policy(
    encoder: &mut DescriptorEncoder,
    ps: &PolicyStatus,
) -> Result<(), std::fmt::Error> {
    let c = &ps.counters;
    family(
        encoder,
        "policy_allowed_packets",
        "New connections a NetworkPolicy allowed on this node, by policy",
        c.policies
            .iter()
            .map(|p| {
                (
                    vec![
                        ("namespace", p.namespace.clone()),
                        ("policy", p.name.clone()),
                    ],
                    ConstCounter::new(p.packets),
                )
            })
            .collect(),
    )?;
    family(
        encoder,
        "policy_denied_packets",
        "Packets dropped by default deny (no policy allowed them), by direction",
        vec![
            (
                vec![("direction", "ingress".to_string())],
                ConstCounter::new(c.deny_ingress.packets),
            ),
            (
                vec![("direction", "egress".to_string())],
                ConstCounter::new(c.deny_egress.packets),
            ),
        ],
    )?;
    family(
        encoder,
        "dns_queries",
        "DNS queries of local pods (UDP datagrams and TCP connections to ports 53 and 853), by \
         pod and whether the server is in trustedDns",
        c.dns
            .iter()
            .filter(|d| d.server != "nxdomain")
            .map(|d| {
                (
                    vec![
                        ("namespace", d.namespace.clone()),
                        ("pod", d.pod.clone()),
                        ("server", d.server.clone()),
                    ],
                    ConstCounter::new(d.queries),
                )
            })
            .collect(),
    )?;
    family(
        encoder,
        "dns_nxdomain_answers",
        "NXDOMAIN answers (UDP) that local pods received, by pod",
        c.dns
            .iter()
            .filter(|d| d.server == "nxdomain")
            .map(|d| {
                (
                    vec![("namespace", d.namespace.clone()), ("pod", d.pod.clone())],
                    ConstCounter::new(d.queries),
                )
            })
            .collect(),
    )?;
    family(
        encoder,
        "alerts",
        "Network anomaly alerts this node raised, by kind (each is also a Warning Event on the \
         pod and a line in alerts.jsonl)",
        crate::agent::alerts::AlertKind::ALL
            .iter()
            .map(|k| {
                (
                    vec![("kind", k.as_str().to_string())],
                    ConstCounter::new(ps.alerts.get(k.as_str()).copied().unwrap_or(0)),
                )
            })
            .collect(),
    )?;
    family(
        encoder,
        "policy_connections_cut",
        "Established connections cut because a policy change denied them (policyStrictMode)",
        vec![(vec![], ConstCounter::new(ps.connections_cut))],
    )?;
    family(
        encoder,
        "policy_sync_errors",
        "Policy syncs (compile and apply of the node's ruleset) that failed",
        vec![(vec![], ConstCounter::new(ps.sync_errors))],
    )?;
    family(
        encoder,
        "policy_sync_failing",
        "1 while the last policy sync failed: the node enforces an older ruleset",
        vec![(vec![], ConstGauge::new(i64::from(ps.last_error.is_some())))],
    )?;
    family(
        encoder,
        "spoofed_packets",
        "Frames dropped because a pod sent with an IP or MAC that is not its own",
        vec![(vec![], ConstCounter::new(c.spoofed.packets))],
    )?;
    family(
        encoder,
        "policies",
        "NetworkPolicies in the cluster and selecting pods of this node",
        vec![
            (
                vec![("scope", "cluster".to_string())],
                ConstGauge::new(ps.policies_total as i64),
            ),
            (
                vec![("scope", "node".to_string())],
                ConstGauge::new(ps.policies_local as i64),
            ),
        ],
    )?;
    family(
        encoder,
        "local_pods",
        "Pods on this node",
        vec![(vec![], ConstGauge::new(ps.local_pods as i64))],
    )
}

/// Every sample name the agent's `/metrics` can export (`veilnet_…_total`, `…_bucket` and so on,
/// as a scrape shows them), found by encoding a [`Metrics`] whose sources are all filled: the names
/// come from the encoder itself, not from a list kept by hand. The dashboard and alert rules tests
/// check their queries against it (`tests/dashboards.rs`).
pub fn exported_names() -> std::collections::BTreeSet<String> {
    use super::status::{DatapathStatus, PeerStatus};
    use crate::agent::policy::status::PolicyCounter;
    let m = Metrics::new();
    m.reconcile_errors.inc();
    m.reconcile_duration.observe(0.001);
    let peer = PeerStatus {
        node: "node-2".into(),
        mode: None,
        path: "wireguard".into(),
        reason: None,
        endpoint: None,
        underlay_ip: None,
        pod_cidrs: Vec::new(),
        last_handshake_seconds: Some(1),
        rx_bytes: 1,
        tx_bytes: 1,
        rx_rejected: 0,
        key_rotation: false,
    };
    *m.sources.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(NodeStatus {
        node: "node-1".into(),
        mode: crate::model::encryption::Mode::On,
        wire_drops: std::collections::BTreeMap::from([("raw_pod_traffic".to_string(), 1)]),
        masqueraded: 1,
        key_rotation_error: None,
        agent_version: None,
        pod_cidrs: vec![],
        underlay_ip: String::new(),
        underlay_dev: String::new(),
        pod_mtu: 1440,
        public_key: String::new(),
        key_fingerprint: String::new(),
        peers: vec![peer],
        rejected: std::collections::BTreeMap::new(),
        matrix: std::collections::BTreeMap::new(),
        datapath: Some(DatapathStatus {
            pid: None,
            version: None,
            started_at: Some(1),
            offloads: None,
            error: None,
            drops: std::collections::BTreeMap::from([("invalid".to_string(), 1)]),
            cookie_replies: 1,
        }),
        updated_at: String::new(),
    });
    // A store that cannot exist (nothing is created under /proc): the usage reads as 0, and both
    // IPAM families are still encoded.
    *m.sources.ipam.lock().unwrap_or_else(|p| p.into_inner()) = Some((
        PathBuf::from("/proc/veilnet-metric-names"),
        "veilnet".into(),
        "10.244.1.0/24".parse().expect("a CIDR"),
        std::net::Ipv4Addr::new(10, 244, 1, 1),
    ));
    let mut ps = PolicyStatus::default();
    ps.counters.policies.push(PolicyCounter {
        namespace: "default".into(),
        name: "p".into(),
        packets: 1,
        bytes: 1,
    });
    let (_tx, rx) = watch::channel(ps);
    *m.sources
        .policy_status
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(rx);
    *m.sources
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = vec![crate::listen::ConnLimit::new("metrics", 1)];
    m.encode()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::agent::status::PeerStatus;
    use crate::model::encryption::Mode;

    #[test]
    fn peer_metrics_follow_the_snapshot() {
        let m = Metrics::new();
        m.reconcile_errors.inc();
        m.reconcile_duration.observe(0.004);
        *m.sources.status.lock().unwrap() = Some(NodeStatus {
            node: "node-1".into(),
            mode: Mode::On,
            wire_drops: BTreeMap::from([("vxlan_rejected".to_string(), 3)]),
            masqueraded: 9,
            key_rotation_error: None,
            agent_version: None,
            pod_cidrs: vec![],
            underlay_ip: "172.30.0.11".into(),
            underlay_dev: "eth0".into(),
            pod_mtu: 1440,
            public_key: String::new(),
            key_fingerprint: String::new(),
            peers: vec![
                PeerStatus {
                    node: "node-2".into(),
                    mode: Some(Mode::On),
                    path: "wireguard".into(),
                    reason: None,
                    endpoint: None,
                    underlay_ip: None,
                    pod_cidrs: Vec::new(),
                    last_handshake_seconds: Some(7),
                    rx_bytes: 1234,
                    tx_bytes: 5678,
                    rx_rejected: 12,
                    key_rotation: false,
                },
                PeerStatus {
                    node: "node-3".into(),
                    mode: Some(Mode::Off),
                    path: "vxlan".into(),
                    reason: None,
                    endpoint: None,
                    underlay_ip: None,
                    pod_cidrs: Vec::new(),
                    last_handshake_seconds: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_rejected: 0,
                    key_rotation: false,
                },
            ],
            rejected: BTreeMap::new(),
            matrix: BTreeMap::new(),
            datapath: Some(crate::agent::status::DatapathStatus {
                pid: Some(812),
                version: Some("0.1.0".into()),
                started_at: Some(1_700_000_000),
                offloads: None,
                error: None,
                drops: crate::agent::status::wireguard_drops(&crate::wg::DeviceStats {
                    rx_invalid: 41,
                    rx_rate_limited: 7,
                    ..Default::default()
                }),
                cookie_replies: 3,
            }),
            updated_at: String::new(),
        });
        let cap = crate::listen::ConnLimit::new("metrics", 2);
        *m.sources.listeners.lock().unwrap() = vec![cap.clone()];
        let _held = cap.try_admit().unwrap();
        assert!(cap.try_admit().is_some(), "a permit, released at once");
        let _second = cap.try_admit().unwrap();
        assert!(cap.try_admit().is_none());
        drop(_second);
        let text = m.encode();
        for line in [
            r#"veilnet_connections_open{listener="metrics"} 1"#,
            r#"veilnet_connections_max{listener="metrics"} 2"#,
            r#"veilnet_connections_rejected_total{listener="metrics"} 1"#,
            "veilnet_reconcile_errors_total 1",
            "veilnet_reconcile_duration_seconds_count 1",
            r#"veilnet_node_info{node="node-1",mode="on"} 1"#,
            r#"veilnet_peer_path{peer="node-2",path="wireguard"} 1"#,
            r#"veilnet_peer_path{peer="node-3",path="vxlan"} 1"#,
            r#"veilnet_wireguard_handshake_age_seconds{peer="node-2"} 7"#,
            r#"veilnet_wireguard_received_bytes_total{peer="node-2"} 1234"#,
            r#"veilnet_wireguard_sent_bytes_total{peer="node-2"} 5678"#,
            r#"veilnet_wireguard_rejected_datagrams_total{peer="node-2"} 12"#,
            "veilnet_datapath_up 1",
            "veilnet_datapath_start_time_seconds 1700000000",
            r#"veilnet_wire_dropped_packets_total{reason="vxlan_rejected"} 3"#,
            r#"veilnet_wireguard_dropped_datagrams_total{reason="invalid"} 41"#,
            r#"veilnet_wireguard_dropped_datagrams_total{reason="rate_limited"} 7"#,
            r#"veilnet_wireguard_dropped_datagrams_total{reason="unknown_peer"} 0"#,
            r#"veilnet_wireguard_cookie_replies_total 3"#,
            "veilnet_masqueraded_connections_total 9",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains(r#"wireguard_sent_bytes_total{peer="node-3"}"#));
    }

    #[test]
    fn policy_status_reaches_a_scrape_from_memory() {
        let m = Metrics::new();
        assert!(
            !m.encode().contains("veilnet_policy"),
            "no enforcer, no policy metrics"
        );
        let (tx, rx) = watch::channel(PolicyStatus::default());
        *m.sources.policy_status.lock().unwrap() = Some(rx);
        assert!(m
            .encode()
            .contains("veilnet_policy_connections_cut_total 0"));
        // An update by the enforcer is what the next scrape reports; no file is involved.
        tx.send_modify(|s| {
            s.connections_cut = 3;
            s.policies_total = 2;
            s.counters.spoofed.packets = 5;
            s.sync_errors = 2;
            s.last_error = Some("nft: No such file or directory".into());
        });
        let text = m.encode();
        for line in [
            "veilnet_policy_sync_errors_total 2",
            "veilnet_policy_sync_failing 1",
            "veilnet_policy_connections_cut_total 3",
            r#"veilnet_policies{scope="cluster"} 2"#,
            "veilnet_spoofed_packets_total 5",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn exported_names_cover_every_family() {
        let names = exported_names();
        for name in [
            "veilnet_datapath_up",
            "veilnet_datapath_start_time_seconds",
            "veilnet_reconcile_errors_total",
            "veilnet_reconcile_duration_seconds_bucket",
            "veilnet_wireguard_handshake_age_seconds",
            "veilnet_peer_path",
            "veilnet_node_info",
            "veilnet_ipam_addresses_used",
            "veilnet_ipam_addresses_free",
            "veilnet_policy_allowed_packets_total",
            "veilnet_policy_denied_packets_total",
            "veilnet_spoofed_packets_total",
            "veilnet_policy_sync_errors_total",
            "veilnet_policy_sync_failing",
            "veilnet_wire_dropped_packets_total",
            "veilnet_wireguard_dropped_datagrams_total",
            "veilnet_wireguard_cookie_replies_total",
            "veilnet_wireguard_rejected_datagrams_total",
            "veilnet_masqueraded_connections_total",
            "veilnet_connections_rejected_total",
            "veilnet_connections_refused_total",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("veilnet_reconcile_errors"), "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("veilnet_")), "{names:?}");
    }
}
