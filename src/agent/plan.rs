//! The node planner: from one [`ClusterSnapshot`] to everything this node should be, in one pure
//! function ([`plan_node`]).
//!
//! The plan holds, each computed once and never edited afterwards:
//! - this node's mode and the annotations it must publish;
//! - the overlay (links, addresses, routes of both tables, policy rules, neighbours, FDB): the
//!   peers are validated by [`plan_peers`], each accepted peer gets its path ([`plan_paths`]),
//!   and the routes follow the paths ([`plan_routing`]);
//! - the WireGuard peer set, each peer allowed only its cluster-recorded CIDRs and node address;
//! - the `veilnet_wire` rules;
//! - the CNI node state;
//! - the node-pair path matrix for `veilnet status`.
//!
//! Only peers the overlay accepted (their CIDRs are proven theirs) are path candidates.

use std::collections::BTreeMap;

use ipnet::IpNet;
use veilnet_cni::NodeState;

use super::cni_config;
use super::config::AgentConfig;
use super::snapshot::{ClusterSnapshot, SelfInfo};
use super::wireguard::{self, TUN_NAME};
use crate::cluster::publish::{self, AnnotationChanges};
use crate::kernel::masquerade;
use crate::kernel::wire::{self, WireRules};
use crate::model::annotations;
use crate::model::encryption::{own_mode, plan_paths, InvalidMode, Mode, PeerCrypto, PeerPath};
use crate::model::overlay::{
    plan_peers, AcceptedPeer, DesiredOverlay, OverlayError, OverlayInput, SelfNode, VxlanConfig,
};
use crate::model::peer::{Claim, PeerRecord};
use crate::model::routing::{plan_routing, wireguard_allowed_ips, RoutingInput};
use crate::wg::{keys, PeerConfig, PublicKey, OVERHEAD_IPV4};

/// node → peer → path name.
pub type PathMatrix = BTreeMap<String, BTreeMap<String, String>>;

/// What the planner reads.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub cfg: &'a AgentConfig,
    pub me: &'a SelfInfo,
    pub cluster: &'a ClusterSnapshot,
    /// This node's WireGuard public key.
    pub wg_key: &'a PublicKey,
    /// The peers the previous pass accepted: the bindings it defends against newcomers.
    pub incumbents: &'a BTreeMap<String, AcceptedPeer>,
    /// The WireGuard keys the previous pass used, by peer.
    pub key_bindings: &'a BTreeMap<String, [u8; 32]>,
}

/// This node's whole desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub mode: Mode,
    /// This node's label is not a mode: [`NodePlan::mode`] is the default.
    pub bad_label: Option<InvalidMode>,
    /// The annotations this node publishes.
    pub annotations: BTreeMap<String, String>,
    /// Those that differ from what its Node carries now (empty while the Node is not seen).
    pub publish: AnnotationChanges,
    pub overlay: DesiredOverlay,
    /// The path to every accepted peer, sorted by name.
    pub paths: Vec<PeerPath>,
    /// The WireGuard datapath's peer set.
    pub wg_peers: Vec<PeerConfig>,
    pub wire: WireRules,
    pub cni: NodeState,
    pub matrix: PathMatrix,
}

/// The annotations this node publishes (pure).
pub fn own_annotations(
    cfg: &AgentConfig,
    me: &SelfInfo,
    wg_key: &str,
    mode: Mode,
) -> BTreeMap<String, String> {
    let endpoint = std::net::SocketAddr::new(me.underlay.ip, cfg.wireguard_port);
    BTreeMap::from([
        (annotations::VTEP_MAC.to_string(), me.vtep_mac.to_string()),
        (
            annotations::UNDERLAY_IP.to_string(),
            me.underlay.ip.to_string(),
        ),
        (
            annotations::POD_CIDRS.to_string(),
            annotations::format_cidr_list(&me.pod_cidrs),
        ),
        (
            annotations::VXLAN_VNI.to_string(),
            cfg.vxlan_vni.to_string(),
        ),
        (annotations::WG_PUBLIC_KEY.to_string(), wg_key.to_string()),
        (annotations::WG_ENDPOINT.to_string(), endpoint.to_string()),
        (annotations::ENCRYPTION_MODE.to_string(), mode.to_string()),
    ])
}

/// The agent's TCP ports that are not on loopback (loopback is out of every pod's reach).
fn agent_ports(cfg: &AgentConfig) -> Vec<u16> {
    let mut ports: Vec<u16> = [cfg.health_addr, cfg.metrics_addr]
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The largest cluster whose whole node-pair matrix the status carries. The matrix costs
/// nodes² cells each pass: at 1,000 nodes that was a second of CPU per pass and half a GiB held,
/// for a table no one can read. Above it each node's status shows its own row, its peers.
pub const MATRIX_MAX_NODES: usize = 32;

/// The node-pair path matrix from every node's published mode and key (pure): a node that
/// publishes no mode is no column, one whose mode is malformed no row. Empty above
/// [`MATRIX_MAX_NODES`] nodes.
pub fn path_matrix<'a>(
    nodes: impl IntoIterator<Item = &'a PeerRecord>,
    default: Mode,
) -> PathMatrix {
    let published: Vec<&PeerRecord> = nodes
        .into_iter()
        .filter(|r| !r.mode.is_missing())
        .take(MATRIX_MAX_NODES + 1)
        .collect();
    if published.len() > MATRIX_MAX_NODES {
        return PathMatrix::new();
    }
    let published: Vec<(&PeerRecord, PeerCrypto)> = published
        .into_iter()
        .map(|r| (r, PeerCrypto::of(r, r.recorded_underlay(), None)))
        .collect();
    let mut matrix = PathMatrix::new();
    for (record, _) in &published {
        let Claim::Valid(mode) = record.mode else {
            continue;
        };
        let key = record.public_key.valid().copied().unwrap_or([0; 32]);
        let others: Vec<PeerCrypto> = published
            .iter()
            .filter(|(r, _)| r.name != record.name)
            .map(|(_, c)| c.clone())
            .collect();
        let row = plan_paths(mode, default, &key, &others, &BTreeMap::new())
            .into_iter()
            .map(|p| (p.node, p.path.name().to_string()))
            .collect();
        matrix.insert(record.name.clone(), row);
    }
    matrix
}

/// Plans this node from the snapshot (pure). Fails only on this node's own settings.
pub fn plan_node(input: &PlanInput<'_>) -> Result<NodePlan, OverlayError> {
    let PlanInput {
        cfg, me, cluster, ..
    } = *input;
    let own = cluster.own.as_ref();

    // This node's mode: its label, else the configured default.
    let (mode, bad_label) = own_mode(
        own.map_or(&Claim::Missing, |o| &o.record.label),
        cfg.encryption,
    );
    let annotations = own_annotations(cfg, me, &keys::encode_public(input.wg_key), mode);
    // Re-published if anyone changed or removed them.
    let publish = own.map_or_else(AnnotationChanges::new, |o| {
        let owned: Vec<&str> = annotations.keys().map(String::as_str).collect();
        publish::diff(Some(&o.annotations), &annotations, &owned)
    });

    let peers = plan_peers(&OverlayInput {
        node: SelfNode {
            name: cfg.node_name.clone(),
            underlay_ip: me.underlay.ip,
            underlay_dev: me.underlay.dev.clone(),
            pod_cidrs: me.pod_cidrs.clone(),
            vtep_mac: Some(me.vtep_mac),
        },
        vxlan: VxlanConfig {
            vni: cfg.vxlan_vni,
            port: cfg.vxlan_port,
            ..VxlanConfig::default()
        },
        underlay_mtu: me.underlay.mtu,
        peers: cluster.peers.clone(),
        incumbents: input.incumbents.clone(),
    })?;

    let records: BTreeMap<&str, &PeerRecord> =
        cluster.peers.iter().map(|r| (r.name.as_str(), r)).collect();
    let crypto: Vec<PeerCrypto> = peers
        .peers
        .iter()
        .filter_map(|accepted| {
            let record = records.get(accepted.name.as_str())?;
            Some(PeerCrypto::of(
                record,
                Some(accepted.underlay_ip),
                accepted.vxlan_unusable.clone(),
            ))
        })
        .collect();
    let paths = plan_paths(
        mode,
        cfg.encryption,
        input.wg_key.as_bytes(),
        &crypto,
        input.key_bindings,
    );

    let cluster_cidr = IpNet::V4(cfg.cluster_cidr);
    let routing = plan_routing(&RoutingInput {
        underlay_ip: me.underlay.ip,
        pod_cidrs: &me.pod_cidrs,
        cluster_cidr,
        vxlan_dev: &peers.vxlan.link.name,
        wg_dev: TUN_NAME,
        peers: &peers.peers,
        paths: &paths,
    });
    // By name: a linear search per peer was nodes² at 1,000 nodes.
    let by_name: BTreeMap<&str, &AcceptedPeer> =
        peers.peers.iter().map(|p| (p.name.as_str(), p)).collect();
    let allowed_ips = |name: &str| {
        by_name
            .get(name)
            .map(|p| wireguard_allowed_ips(p))
            .unwrap_or_default()
    };
    let wg_peers = wireguard::wireguard_peers(&paths, &allowed_ips);
    let wire = WireRules {
        underlay_dev: me.underlay.dev.clone(),
        underlay_ip: me.underlay.ip,
        wg_dev: TUN_NAME.into(),
        vxlan_port: cfg.vxlan_port,
        wg_port: cfg.wireguard_port,
        cluster_cidr,
        strict: mode == Mode::Strict,
        vxlan_peers: Vec::new(),
        peer_nodes: Default::default(),
        agent_ports: agent_ports(cfg),
        agent_conns_per_source: wire::AGENT_CONNS_PER_SOURCE,
        masquerade: masquerade::plan(
            cfg.masquerade,
            &me.pod_cidrs,
            &cfg.non_masquerade_cidrs
                .iter()
                .copied()
                .map(IpNet::V4)
                .collect::<Vec<_>>(),
            &[peers.vxlan.link.name.as_str(), TUN_NAME],
        ),
    }
    .with_peers(&peers.peers, &paths);
    let mut overlay =
        peers.into_desired(routing.routes, routing.rules, [TUN_NAME.to_string()].into());

    // Pods get the WireGuard MTU whatever the current paths: a live mode toggle must not leave
    // running pods with packets too large for the new path.
    let wg_mtu = me.underlay.mtu.saturating_sub(OVERHEAD_IPV4);
    let mtu = cfg.mtu.unwrap_or(overlay.pod_mtu.min(wg_mtu));
    // The bridge gets the pods' MTU too. Above it, the kernel lowers the bridge to its smallest
    // port as the first pod joins (and the next pass would raise it back: a link change), and the
    // node's own packets between the two sizes (UDP, ICMP) are dropped at the pod's port.
    overlay.bridge.mtu = mtu;
    let cni = cni_config::node_state(&cfg.node_name, &me.pod_cidrs, &overlay, Some(mtu));
    let matrix = path_matrix(
        own.map(|o| &o.record).into_iter().chain(&cluster.peers),
        cfg.encryption,
    );
    Ok(NodePlan {
        mode,
        bad_label,
        annotations,
        publish,
        overlay,
        paths,
        wg_peers,
        wire,
        cni,
        matrix,
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::agent::config::AgentArgs;
    use crate::agent::snapshot::tests::node;
    use crate::agent::underlay::UnderlayDevice;
    use crate::cluster::podcidr::AllocationRecord;
    use crate::model::encryption::Path;
    use crate::model::mac::derive_vtep_mac;
    use crate::model::overlay::{RejectReason, POD_TO_NODE_TABLE};
    use crate::model::routing::POD_TO_NODE_RULE_PRIORITY;

    fn cfg() -> AgentConfig {
        AgentConfig::resolve(&AgentArgs {
            node_name: Some("n1".into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn me() -> SelfInfo {
        SelfInfo::new(
            "n1",
            UnderlayDevice {
                ip: "172.30.0.11".parse().unwrap(),
                dev: "eth0".into(),
                mtu: 1500,
            },
            vec!["10.244.1.0/24".parse().unwrap()],
            false,
        )
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from([n; 32])
    }

    /// A peer that publishes what a healthy agent publishes (mode `on`).
    fn peer(n: u8) -> Vec<(&'static str, String)> {
        vec![
            (annotations::UNDERLAY_IP, format!("172.30.0.{}", 10 + n)),
            (annotations::VTEP_MAC, format!("06:00:00:00:00:0{n}")),
            (annotations::ENCRYPTION_MODE, "on".into()),
            (annotations::WG_PUBLIC_KEY, keys::encode_public(&key(n))),
            (
                annotations::WG_ENDPOINT,
                format!("172.30.0.{}:51820", 10 + n),
            ),
        ]
    }

    fn plan(nodes: &[std::sync::Arc<k8s_openapi::api::core::v1::Node>]) -> NodePlan {
        let cluster = ClusterSnapshot::take("n1", nodes, &AllocationRecord::default());
        plan_node(&PlanInput {
            cfg: &cfg(),
            me: &me(),
            cluster: &cluster,
            wg_key: &key(1),
            incumbents: &BTreeMap::new(),
            key_bindings: &BTreeMap::new(),
        })
        .unwrap()
    }

    /// Node `n{n}` as its agent publishes it in `mode` (its label says the same).
    fn peer_node(
        n: u8,
        spec: Option<&str>,
        mode: &str,
    ) -> std::sync::Arc<k8s_openapi::api::core::v1::Node> {
        let mut anns = peer(n);
        anns[2].1 = mode.into();
        let refs: Vec<(&str, &str)> = anns.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node(
            &format!("n{n}"),
            spec,
            &refs,
            &[(annotations::ENCRYPTION_LABEL, mode)],
        )
    }

    #[test]
    fn the_matrix_is_left_out_of_big_clusters() {
        let nodes: Vec<PeerRecord> = (0..=MATRIX_MAX_NODES)
            .map(|i| {
                let anns =
                    BTreeMap::from([(annotations::ENCRYPTION_MODE.to_string(), "off".to_string())]);
                PeerRecord::parse(
                    &format!("n{i}"),
                    &anns,
                    &BTreeMap::new(),
                    Default::default(),
                )
            })
            .collect();
        assert!(path_matrix(&nodes, Mode::Off).is_empty());
        let m = path_matrix(&nodes[..MATRIX_MAX_NODES], Mode::Off);
        assert_eq!(m.len(), MATRIX_MAX_NODES);
        assert_eq!(m["n0"].len(), MATRIX_MAX_NODES - 1);
    }

    #[test]
    fn matrix_follows_the_published_modes() {
        let record = |name: &str, mode: &str, key: u8| {
            let anns = BTreeMap::from([
                (annotations::ENCRYPTION_MODE.to_string(), mode.to_string()),
                (
                    annotations::WG_PUBLIC_KEY.to_string(),
                    keys::encode_public(&PublicKey::from([key; 32])),
                ),
                (
                    annotations::WG_ENDPOINT.to_string(),
                    "172.30.0.11:51820".into(),
                ),
                (annotations::UNDERLAY_IP.to_string(), "172.30.0.11".into()),
            ]);
            let labels =
                BTreeMap::from([(annotations::ENCRYPTION_LABEL.to_string(), mode.to_string())]);
            PeerRecord::parse(
                name,
                &anns,
                &labels,
                crate::model::peer::NodeFacts {
                    node_addresses: vec!["172.30.0.11".parse().unwrap()],
                    ..Default::default()
                },
            )
        };
        let nodes = [
            record("a", "on", 1),
            record("b", "off", 2),
            record("c", "strict", 3),
        ];
        let m = path_matrix(&nodes, Mode::Off);
        assert_eq!(m["a"]["b"], "vxlan");
        assert_eq!(m["a"]["c"], "wireguard");
        assert_eq!(m["b"]["c"], "blocked");
        assert_eq!(m["c"]["b"], "blocked");
        assert_eq!(m["c"]["a"], "wireguard");
    }

    #[test]
    fn own_annotations_describe_this_node() {
        let a = own_annotations(&cfg(), &me(), "KEY", Mode::Strict);
        assert_eq!(a[annotations::WG_ENDPOINT], "172.30.0.11:51820");
        assert_eq!(a[annotations::ENCRYPTION_MODE], "strict");
        assert_eq!(a[annotations::UNDERLAY_IP], "172.30.0.11");
        assert_eq!(a[annotations::POD_CIDRS], "10.244.1.0/24");
        assert_eq!(a[annotations::VXLAN_VNI], "1");
        assert_eq!(a[annotations::VTEP_MAC], derive_vtep_mac("n1").to_string());
    }

    #[test]
    fn one_plan_holds_the_whole_node() {
        let nodes = vec![
            node("n1", Some("10.244.1.0/24"), &[], &[]),
            peer_node(2, Some("10.244.2.0/24"), "on"),
            // Plaintext by its label and its published mode.
            peer_node(3, Some("10.244.3.0/24"), "off"),
            // No pod CIDR from the cluster: rejected, whatever it claims.
            peer_node(4, None, "on"),
        ];
        let p = plan(&nodes);
        assert_eq!(p.mode, Mode::On);
        assert!(p.bad_label.is_none());
        // The Node carries none of our annotations yet: all of them are published.
        assert_eq!(p.publish.len(), p.annotations.len());
        assert_eq!(p.overlay.accepted, ["n2", "n3"]);
        assert_eq!(p.overlay.rejected.len(), 1);
        assert_eq!(p.overlay.rejected[0].node, "n4");
        assert_eq!(p.overlay.rejected[0].reason, RejectReason::NoPodCidr);
        let path = |n: &str| p.paths.iter().find(|x| x.node == n).unwrap().path.name();
        assert_eq!((path("n2"), path("n3")), ("wireguard", "vxlan"));

        // Routes follow the paths: n2 into the TUN, n3 over VXLAN, both node addresses through
        // table 86, the cluster CIDR into the TUN as the fallback.
        let route = |dst: &str, table: u32| {
            let dst: IpNet = dst.parse().unwrap();
            p.overlay
                .routes
                .iter()
                .find(|r| r.dst == dst && r.table == table)
                .map(|r| r.dev.as_str())
        };
        assert_eq!(route("10.244.2.0/24", 254), Some(TUN_NAME));
        assert_eq!(route("10.244.3.0/24", 254), Some("veilvx1"));
        assert_eq!(route("172.30.0.12/32", POD_TO_NODE_TABLE), Some(TUN_NAME));
        assert_eq!(route("172.30.0.13/32", POD_TO_NODE_TABLE), Some("veilvx1"));
        assert_eq!(route("10.244.0.0/16", 254), Some(TUN_NAME));
        assert_eq!(p.overlay.routes.len(), 5);
        let rule = p.overlay.rules.iter().next().unwrap();
        assert_eq!(
            (rule.priority, rule.table),
            (POD_TO_NODE_RULE_PRIORITY, POD_TO_NODE_TABLE)
        );
        assert!(p.overlay.managed_devices().contains(TUN_NAME));

        // WireGuard: only n2, allowed its pod CIDR and node address.
        assert_eq!(p.wg_peers.len(), 1);
        assert_eq!(p.wg_peers[0].public_key, key(2));
        let allowed: Vec<String> = p.wg_peers[0]
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(allowed, ["10.244.2.0/24", "172.30.0.12/32"]);
        // Wire rules: VXLAN only from n3, every accepted peer's node address known.
        assert!(!p.wire.strict);
        let vxlan: Vec<IpAddr> = p.wire.vxlan_peers.iter().map(|v| v.underlay_ip).collect();
        assert_eq!(vxlan, ["172.30.0.13".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.wire.peer_nodes.len(), 2);
        // CNI: the WireGuard MTU (1500 - 60 < 1450), the bridge.
        assert_eq!(p.cni.mtu, 1500 - OVERHEAD_IPV4);
        assert_eq!(p.cni.mtu, 1440);
        assert_eq!(p.cni.bridge, "veilbr0");
        // The bridge has the pods' MTU (not VXLAN's 1450), so a joining pod never changes it.
        assert_eq!(p.overlay.bridge.mtu, p.cni.mtu);
        assert_eq!(p.overlay.vxlan.link.mtu, 1450);
        // The matrix: the peers that publish a mode (n1 publishes nothing yet).
        assert_eq!(p.matrix.keys().collect::<Vec<_>>(), ["n2", "n3", "n4"]);
        assert_eq!(p.matrix["n2"]["n3"], "vxlan");
    }

    #[test]
    fn strict_label_blocks_plaintext_peers_and_the_wire() {
        let own = node(
            "n1",
            Some("10.244.1.0/24"),
            &[],
            &[(annotations::ENCRYPTION_LABEL, "strict")],
        );
        let off = peer_node(3, Some("10.244.3.0/24"), "off");
        let p = plan(&[own, off]);
        assert_eq!(p.mode, Mode::Strict);
        assert_eq!(p.annotations[annotations::ENCRYPTION_MODE], "strict");
        assert!(matches!(p.paths[0].path, Path::Blocked(_)));
        assert!(p.wire.strict && p.wire.vxlan_peers.is_empty());
        assert!(p.wg_peers.is_empty());
        // No pod-CIDR route for a blocked peer; its node address leads into the TUN.
        assert!(!p
            .overlay
            .routes
            .iter()
            .any(|r| r.dst == "10.244.3.0/24".parse::<IpNet>().unwrap()));
    }

    #[test]
    fn a_bad_own_label_falls_back_to_the_default_and_is_reported() {
        let own = node(
            "n1",
            Some("10.244.1.0/24"),
            &[],
            &[(annotations::ENCRYPTION_LABEL, "stirct")],
        );
        let p = plan(&[own]);
        assert_eq!(p.mode, Mode::On);
        assert!(p.bad_label.is_some());
    }
}
