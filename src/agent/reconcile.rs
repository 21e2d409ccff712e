//! The overlay reconcile loop: cluster state → `plan_overlay` → `kernel::apply` → CNI hand-off.
//!
//! Every pass plans from the reflectors' complete current state, so it is safe to run at any time
//! and any number of times; a pass with nothing to change writes nothing (no netlink write, no API
//! write, no file write).

use std::collections::BTreeMap;
use std::time::Instant;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::reflector::Store;

use super::cni_config;
use super::config::AgentConfig;
use super::events::{EventSink, EventType};
use super::status;
use super::underlay::UnderlayDevice;
use super::wireguard::{self, WireGuard};
use crate::cluster::podcidr::{self, AllocationRecord};
use crate::cluster::publish;
use crate::kernel::apply::{apply, ApplyError};
use crate::kernel::netlink::NetlinkKernel;
use crate::kernel::wire::{self, WireRules};
use crate::model::annotations;
use crate::model::encryption::{own_mode, plan_paths, Mode, Path, PeerCrypto, PeerPath};
use crate::model::mac::{derive_vtep_mac, MacAddr};
use crate::model::overlay::{
    plan_overlay, DesiredOverlay, OverlayError, OverlayInput, PeerNode, RouteSpec, SelfNode,
    VxlanConfig,
};
use crate::wg::OVERHEAD_IPV4;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("this node's own overlay settings are invalid: {0}")]
    Plan(#[from] OverlayError),
    #[error("programming the kernel: {0}")]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
    #[error(transparent)]
    Cni(#[from] cni_config::CniConfigError),
    #[error(transparent)]
    WireGuard(#[from] wireguard::WireGuardError),
    #[error("wire rules: {0}")]
    Wire(#[from] crate::kernel::nft::NftError),
    #[error("wire rules: the blocking task failed: {0}")]
    WireTask(#[from] tokio::task::JoinError),
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

/// What the agent decided about itself at start; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct SelfInfo {
    pub underlay: UnderlayDevice,
    pub pod_cidrs: Vec<IpNet>,
    pub vtep_mac: MacAddr,
    /// True when the pod CIDR came from veilnet's allocation record (not `spec.podCIDR`).
    pub allocated: bool,
}

impl SelfInfo {
    pub fn new(
        node: &str,
        underlay: UnderlayDevice,
        pod_cidrs: Vec<IpNet>,
        allocated: bool,
    ) -> Self {
        Self {
            underlay,
            pod_cidrs,
            vtep_mac: derive_vtep_mac(node),
            allocated,
        }
    }
}

pub struct Reconciler {
    pub cfg: AgentConfig,
    pub client: kube::Client,
    pub kernel: NetlinkKernel,
    pub events: EventSink,
    pub nodes: Store<Node>,
    pub records: Store<ConfigMap>,
    pub me: SelfInfo,
    pub wg: WireGuard,
    /// Peer → reason of the last pass, so a refusal is logged when it starts or changes, not on
    /// every pass.
    rejected: BTreeMap<String, String>,
    /// Peer → path of the last pass (same purpose).
    paths: BTreeMap<String, String>,
    /// The wire rules last loaded (reloaded only when they change).
    wire_loaded: Option<String>,
    /// The last pass's view, for the status file.
    pub last: Option<status::Snapshot>,
    pub dataplane_ready: bool,
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

/// Rewrites the overlay's routes for the chosen paths (pure): a WireGuard peer's CIDRs go to the
/// TUN, a blocked peer's CIDRs get no route, and the whole cluster CIDR falls back to the TUN,
/// whose datapath drops what no peer owns. So a pod packet to a blocked, unknown or
/// not-yet-handshaken peer is dropped, never sent in plaintext (not even by the default route).
pub fn route_paths(
    desired: &mut DesiredOverlay,
    paths: &[PeerPath],
    cidrs_of: &dyn Fn(&str) -> Vec<IpNet>,
    wg_dev: &str,
    cluster_cidr: IpNet,
) {
    let to_tun = |dst| RouteSpec {
        dst,
        via: None,
        dev: wg_dev.to_string(),
        onlink: false,
    };
    for p in paths {
        let cidrs = cidrs_of(&p.node);
        match &p.path {
            Path::Vxlan => {}
            Path::Wireguard { .. } => {
                for dst in cidrs {
                    desired.routes.retain(|r| r.dst != dst);
                    desired.routes.insert(to_tun(dst));
                }
            }
            Path::Blocked(_) => desired.routes.retain(|r| !cidrs.contains(&r.dst)),
        }
    }
    desired.routes.retain(|r| r.dst != cluster_cidr);
    desired.routes.insert(to_tun(cluster_cidr));
    desired.external_devices.insert(wg_dev.to_string());
}

fn has_veilnet_annotations(anns: &BTreeMap<String, String>) -> bool {
    anns.keys().any(|k| k.starts_with(annotations::PREFIX))
}

/// The planner's input from the cluster state (pure). A peer's pod CIDRs come from its
/// `spec.podCIDR(s)`, else from the allocation record: never from what the peer claims.
pub fn overlay_input(
    cfg: &AgentConfig,
    me: &SelfInfo,
    nodes: &[std::sync::Arc<Node>],
    record: &AllocationRecord,
) -> OverlayInput {
    let peers = nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            if name == cfg.node_name {
                return None;
            }
            let mut cidrs: Vec<String> = podcidr::spec_cidrs(n)
                .iter()
                .map(|c| c.to_string())
                .collect();
            if cidrs.is_empty() {
                cidrs.extend(record.cidrs.get(name).map(|c| c.to_string()));
            }
            let empty = BTreeMap::new();
            let anns = n.metadata.annotations.as_ref().unwrap_or(&empty);
            if !has_veilnet_annotations(anns) {
                // Its agent has not started yet (or it runs no veilnet): not a fault to report.
                tracing::debug!(peer = name, "peer has not published its overlay data yet");
                return None;
            }
            Some(PeerNode::from_annotations(name, anns, cidrs))
        })
        .collect();
    OverlayInput {
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
        peers,
    }
}

impl Reconciler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: AgentConfig,
        client: kube::Client,
        kernel: NetlinkKernel,
        events: EventSink,
        nodes: Store<Node>,
        records: Store<ConfigMap>,
        me: SelfInfo,
        wg: WireGuard,
    ) -> Self {
        Self {
            cfg,
            client,
            kernel,
            events,
            nodes,
            records,
            me,
            wg,
            rejected: BTreeMap::new(),
            paths: BTreeMap::new(),
            wire_loaded: None,
            last: None,
            dataplane_ready: false,
        }
    }

    fn record(&self) -> AllocationRecord {
        self.records
            .state()
            .iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(podcidr::RECORD_NAME))
            .map(|cm| AllocationRecord::from_data(cm.data.as_ref()))
            .unwrap_or_default()
    }

    /// One pass. Returns the number of kernel writes.
    pub async fn reconcile(&mut self) -> Result<usize, ReconcileError> {
        let started = Instant::now();
        let nodes = self.nodes.state();
        let own = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.cfg.node_name.as_str()))
            .cloned();
        let empty = BTreeMap::new();
        let own_labels = own
            .as_ref()
            .and_then(|n| n.metadata.labels.as_ref())
            .unwrap_or(&empty);
        let own_anns = own
            .as_ref()
            .and_then(|n| n.metadata.annotations.as_ref())
            .unwrap_or(&empty);

        // This node's mode: its label, else the configured default.
        let (mode, bad_label) = own_mode(
            own_labels
                .get(annotations::ENCRYPTION_LABEL)
                .map(String::as_str),
            self.cfg.encryption,
        );
        if let Some(e) = bad_label {
            tracing::warn!(error = %e, default = %self.cfg.encryption, "bad encryption label; using the default");
            let msg = format!(
                "label {}: {e}; using the default mode {}",
                annotations::ENCRYPTION_LABEL,
                self.cfg.encryption
            );
            self.events
                .node_event(
                    &self.cfg.node_name,
                    EventType::Warning,
                    "VeilnetBadEncryptionLabel",
                    &msg,
                )
                .await;
        }
        if self
            .wg
            .rotate_if_requested(own_anns.get(annotations::ROTATE_KEY).map(String::as_str))
            .await?
        {
            tracing::info!(fingerprint = %self.wg.fingerprint(), "WireGuard key rotated");
            let msg = format!("WireGuard key rotated; new key {}", self.wg.fingerprint());
            self.events
                .node_event(
                    &self.cfg.node_name,
                    EventType::Normal,
                    "VeilnetKeyRotated",
                    &msg,
                )
                .await;
        }

        // Our own annotations: re-published if anyone changed or removed them.
        let desired_annotations =
            own_annotations(&self.cfg, &self.me, &self.wg.public_key_b64(), mode);
        let changes = publish::diff(
            own.as_ref().and_then(|n| n.metadata.annotations.as_ref()),
            &desired_annotations,
            &desired_annotations
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        if !changes.is_empty() && own.is_some() {
            tracing::info!(changes = ?changes.keys().collect::<Vec<_>>(), "publishing this node's annotations");
            publish::publish(self.client.clone(), &self.cfg.node_name, &changes).await?;
        }

        let input = overlay_input(&self.cfg, &self.me, &nodes, &self.record());
        let mut desired = plan_overlay(&input)?;
        self.report_rejections(&desired.rejected).await;

        // Paths: only peers the overlay accepted (their CIDRs are proven theirs) are candidates.
        let crypto: Vec<PeerCrypto> = nodes
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                desired.accepted.iter().any(|a| a == name).then(|| {
                    PeerCrypto::from_annotations(
                        name,
                        n.metadata.annotations.as_ref().unwrap_or(&empty),
                    )
                })
            })
            .collect();
        let paths = plan_paths(mode, self.wg.public_key().as_bytes(), &crypto);
        self.report_paths(&paths).await;
        let peer_cidrs: BTreeMap<String, Vec<IpNet>> = input
            .peers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.pod_cidrs
                        .iter()
                        .filter_map(|c| annotations::parse_cidr(c).ok())
                        .collect(),
                )
            })
            .collect();
        let cidrs_of = |name: &str| peer_cidrs.get(name).cloned().unwrap_or_default();
        let cluster = IpNet::V4(self.cfg.cluster_cidr);
        route_paths(
            &mut desired,
            &paths,
            &cidrs_of,
            wireguard::TUN_NAME,
            cluster,
        );

        // Peers first, then routes: a route to the TUN before its peer exists only drops.
        let changed = self.wg.set_peers(&paths, &cidrs_of).await?;
        if !changed.is_empty() {
            tracing::info!(
                added = changed.added.len(),
                removed = changed.removed.len(),
                updated = changed.updated.len(),
                "WireGuard peers updated"
            );
        }
        let report = apply(&mut self.kernel, &desired).await?;
        let writes = report.writes();

        let rules = wire::render(&WireRules {
            underlay_dev: self.me.underlay.dev.clone(),
            wg_dev: wireguard::TUN_NAME.into(),
            vxlan_port: self.cfg.vxlan_port,
            cluster_cidr: cluster,
            strict: mode == Mode::Strict,
            agent_ports: agent_ports(&self.cfg),
            agent_conns_per_source: wire::AGENT_CONNS_PER_SOURCE,
        });
        if self.wire_loaded.as_deref() != Some(rules.as_str()) {
            let script = rules.clone();
            tokio::task::spawn_blocking(move || wire::apply(&script)).await??;
            tracing::info!(strict = mode == Mode::Strict, "wire rules loaded");
            self.wire_loaded = Some(rules);
        }

        if writes > 0 {
            tracing::info!(
                writes,
                peers = desired.accepted.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "dataplane updated"
            );
        } else {
            tracing::debug!(
                peers = desired.accepted.len(),
                "dataplane already up to date"
            );
        }

        // Pods get the WireGuard MTU whatever the current paths: a live mode toggle must not leave
        // running pods with packets too large for the new path.
        let wg_mtu = self.me.underlay.mtu.saturating_sub(OVERHEAD_IPV4);
        let mtu = self.cfg.mtu.unwrap_or(desired.pod_mtu.min(wg_mtu));
        let state =
            cni_config::node_state(&self.cfg.node_name, &self.me.pod_cidrs, &desired, Some(mtu));
        if cni_config::install(
            &state,
            &self.cfg.run_dir,
            &self.cfg.state_dir,
            &self.cfg.cni_conf_dir,
        )? {
            tracing::info!(mtu = state.mtu, conf_dir = %self.cfg.cni_conf_dir.display(), "CNI configuration installed");
        }
        self.dataplane_ready = true;
        self.last = Some(status::Snapshot {
            mode,
            pod_mtu: mtu,
            paths,
            rejected: desired
                .rejected
                .iter()
                .map(|r| (r.node.clone(), r.reason.to_string()))
                .collect(),
            matrix: status::path_matrix(&nodes),
        });
        Ok(writes)
    }

    /// Writes `<run dir>/status.json` for `veilnet status` (live WireGuard counters included) and
    /// returns it for the metrics endpoint.
    /// Refreshes the datapath's counters (and thereby notices, and repairs, a datapath that
    /// restarted without its configuration). A failure shows in the status; it is not a
    /// reconcile failure.
    pub async fn refresh_datapath(&mut self) {
        let was_down = self.wg.datapath().error.is_some();
        match self.wg.refresh().await {
            // Logged when it goes down and when it is back, not every 2 s in between.
            Err(e) if !was_down => {
                tracing::warn!(error = %e, "datapath unavailable; encrypted traffic to peers is stopped, never sent in plaintext")
            }
            Ok(()) if was_down => tracing::info!("datapath reachable again"),
            _ => {}
        }
    }

    pub fn write_status(&self) -> Option<status::NodeStatus> {
        let last = self.last.as_ref()?;
        let st = status::build(&self.cfg, &self.me, &self.wg, last);
        if let Err(e) = status::write(&self.cfg.run_dir, &st) {
            tracing::warn!(error = %e, "could not write the status file");
        }
        Some(st)
    }

    async fn report_paths(&mut self, paths: &[PeerPath]) {
        let now: BTreeMap<String, String> = paths
            .iter()
            .map(|p| {
                let text = match &p.path {
                    Path::Blocked(reason) => format!("blocked: {reason}"),
                    other => other.name().to_string(),
                };
                (p.node.clone(), text)
            })
            .collect();
        for (node, path) in &now {
            if self.paths.get(node) == Some(path) {
                continue;
            }
            if path.starts_with("blocked") {
                tracing::warn!(peer = %node, %path, "no pod traffic with this peer");
                let msg = format!(
                    "node {} carries no pod traffic with this node: {path}",
                    self.cfg.node_name
                );
                self.events
                    .node_event(node, EventType::Warning, "VeilnetPathBlocked", &msg)
                    .await;
            } else {
                tracing::info!(peer = %node, %path, "path to peer");
            }
        }
        self.paths = now;
    }

    async fn report_rejections(&mut self, rejected: &[crate::model::overlay::RejectedPeer]) {
        let now: BTreeMap<String, String> = rejected
            .iter()
            .map(|r| (r.node.clone(), r.reason.to_string()))
            .collect();
        for (node, reason) in &now {
            if self.rejected.get(node) != Some(reason) {
                tracing::warn!(peer = %node, %reason, "peer ignored: it gets no routes from this node");
                let msg = format!(
                    "node {} ignores this node as a peer: {reason}",
                    self.cfg.node_name
                );
                self.events
                    .node_event(node, EventType::Warning, "VeilnetPeerRejected", &msg)
                    .await;
            }
        }
        for node in self.rejected.keys() {
            if !now.contains_key(node) {
                tracing::info!(peer = %node, "peer accepted again");
            }
        }
        self.rejected = now;
    }

    /// Releases the pod CIDRs of deleted nodes (only meaningful when veilnet allocates them).
    pub async fn release_deleted(&self) {
        if !self.me.allocated {
            return;
        }
        match podcidr::release_deleted(self.client.clone(), &self.cfg.namespace).await {
            Ok(released) if !released.is_empty() => {
                tracing::info!(nodes = ?released, "released the pod CIDRs of deleted nodes")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the pod CIDRs of deleted nodes")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::agent::config::AgentArgs;

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

    fn node(name: &str, spec_cidr: Option<&str>, anns: &[(&str, &str)]) -> Arc<Node> {
        let annotations: BTreeMap<String, String> = anns
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"podCIDR": spec_cidr},
            }))
            .unwrap(),
        )
    }

    fn good_anns(ip: &str, mac: &str, claimed: &str) -> Vec<(&'static str, String)> {
        vec![
            (annotations::UNDERLAY_IP, ip.to_string()),
            (annotations::VTEP_MAC, mac.to_string()),
            (annotations::POD_CIDRS, claimed.to_string()),
        ]
    }

    fn node_owned(name: &str, spec: Option<&str>, anns: Vec<(&'static str, String)>) -> Arc<Node> {
        let refs: Vec<(&str, &str)> = anns.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node(name, spec, &refs)
    }

    #[test]
    fn peer_cidrs_come_from_the_cluster_never_from_the_claim() {
        let record = AllocationRecord::from_data(Some(&BTreeMap::from([(
            "n3".to_string(),
            "10.244.3.0/24".to_string(),
        )])));
        let nodes = vec![
            node_owned(
                "n1",
                Some("10.244.1.0/24"),
                good_anns("172.30.0.11", "06:00:00:00:00:01", "10.244.1.0/24"),
            ),
            // Spec wins over the (lying) annotation.
            node_owned(
                "n2",
                Some("10.244.2.0/24"),
                good_anns("172.30.0.12", "06:00:00:00:00:02", "10.244.1.0/24"),
            ),
            // No spec: the allocation record.
            node_owned(
                "n3",
                None,
                good_anns("172.30.0.13", "06:00:00:00:00:03", "10.244.99.0/24"),
            ),
            // Neither: no CIDR at all, whatever it claims.
            node_owned(
                "n4",
                None,
                good_anns("172.30.0.14", "06:00:00:00:00:04", "10.244.4.0/24"),
            ),
            // No veilnet annotations yet: not a peer (its agent has not started).
            node("n5", Some("10.244.5.0/24"), &[]),
        ];
        let input = overlay_input(&cfg(), &me(), &nodes, &record);
        let peers: BTreeMap<&str, &Vec<String>> = input
            .peers
            .iter()
            .map(|p| (p.name.as_str(), &p.pod_cidrs))
            .collect();
        assert_eq!(peers.len(), 3, "{peers:?}");
        assert_eq!(peers["n2"], &vec!["10.244.2.0/24".to_string()]);
        assert_eq!(peers["n3"], &vec!["10.244.3.0/24".to_string()]);
        assert!(peers["n4"].is_empty());

        let desired = plan_overlay(&input).unwrap();
        assert_eq!(desired.accepted, vec!["n2".to_string(), "n3".to_string()]);
        assert_eq!(desired.rejected.len(), 1);
        assert_eq!(desired.rejected[0].node, "n4");
        let dsts: Vec<String> = desired.routes.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(dsts, vec!["10.244.2.0/24", "10.244.3.0/24"]);
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
}
