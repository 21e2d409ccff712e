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
    plan_overlay, AcceptedPeer, OverlayError, OverlayInput, PeerNode, SelfNode, VxlanConfig,
};
use crate::model::routing::{plan_routing, wireguard_allowed_ips, RoutingInput};
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

/// At most [`ReportLimit::BURST`] reports (log line and Event) per peer per
/// [`ReportLimit::WINDOW`]: ordinary transitions are all reported, a peer whose data keeps
/// changing is not.
#[derive(Debug, Default)]
pub struct ReportLimit {
    /// Peer → (start of its window, reports in it).
    windows: BTreeMap<String, (Instant, u32)>,
}

impl ReportLimit {
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    pub const BURST: u32 = 5;

    pub fn allow(&mut self, peer: &str) -> bool {
        self.allow_at(peer, Instant::now())
    }

    fn allow_at(&mut self, peer: &str, now: Instant) -> bool {
        let window = self.windows.entry(peer.to_string()).or_insert((now, 0));
        if now.duration_since(window.0) >= Self::WINDOW {
            *window = (now, 0);
        }
        if window.1 >= Self::BURST {
            if window.1 == Self::BURST {
                tracing::warn!(peer, "this peer's data keeps changing: further reports about it are suppressed for a minute");
                window.1 += 1;
            }
            return false;
        }
        window.1 += 1;
        true
    }
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
    /// A few reports (log lines and Events) per peer per minute: a Node writer who keeps changing
    /// a value must not be able to flood the log or the Events.
    report_limit: ReportLimit,
    /// The wire rules last loaded (reloaded only when they change).
    wire_loaded: Option<WireRules>,
    /// The last pass's view, for the status file.
    pub last: Option<status::Snapshot>,
    /// The wire table's drop counters as of the last refresh.
    wire_drops: BTreeMap<String, u64>,
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

/// The Node's `metadata.creationTimestamp` in Unix seconds: who was there first.
fn created_seconds(node: &Node) -> Option<i64> {
    node.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

/// The addresses the cluster records for a Node (`status.addresses`: InternalIP and ExternalIP).
pub fn recorded_addresses(node: &Node) -> Vec<std::net::IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
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
    incumbents: BTreeMap<String, AcceptedPeer>,
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
            let mut peer = PeerNode::from_annotations(name, anns, cidrs, recorded_addresses(n));
            peer.created = created_seconds(n);
            Some(peer)
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
        incumbents,
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
            report_limit: ReportLimit::default(),
            wire_loaded: None,
            last: None,
            wire_drops: BTreeMap::new(),
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

        let incumbents = self
            .last
            .as_ref()
            .map(|l| l.bindings.clone())
            .unwrap_or_default();
        let input = overlay_input(&self.cfg, &self.me, &nodes, &self.record(), incumbents);
        let mut desired = plan_overlay(&input)?;
        self.report_rejections(&desired.rejected).await;

        // Paths: only peers the overlay accepted (their CIDRs are proven theirs) are candidates.
        let crypto: Vec<PeerCrypto> = nodes
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                let accepted = desired.peers.iter().find(|p| p.name == name)?;
                let mut c = PeerCrypto::from_node(
                    name,
                    n.metadata.annotations.as_ref().unwrap_or(&empty),
                    n.metadata.labels.as_ref().unwrap_or(&empty),
                );
                c.underlay_ip = Some(accepted.underlay_ip);
                c.created = created_seconds(n);
                c.vxlan_unusable = accepted.vxlan_unusable.clone();
                Some(c)
            })
            .collect();
        let key_bindings: BTreeMap<String, [u8; 32]> = self
            .last
            .iter()
            .flat_map(|l| &l.paths)
            .filter_map(|p| match &p.path {
                Path::Wireguard { public_key, .. } => Some((p.node.clone(), *public_key)),
                _ => None,
            })
            .collect();
        let paths = plan_paths(
            mode,
            self.cfg.encryption,
            self.wg.public_key().as_bytes(),
            &crypto,
            &key_bindings,
        );
        self.report_paths(&paths).await;
        let cluster = IpNet::V4(self.cfg.cluster_cidr);
        let routing = plan_routing(&RoutingInput {
            underlay_ip: self.me.underlay.ip,
            pod_cidrs: &self.me.pod_cidrs,
            cluster_cidr: cluster,
            vxlan_dev: &desired.vxlan.link.name,
            wg_dev: wireguard::TUN_NAME,
            peers: &desired.peers,
            paths: &paths,
        });
        desired.routes = routing.routes;
        desired.rules = routing.rules;
        desired
            .external_devices
            .insert(wireguard::TUN_NAME.to_string());
        let allowed_ips = |name: &str| {
            desired
                .peers
                .iter()
                .find(|p| p.name == name)
                .map(wireguard_allowed_ips)
                .unwrap_or_default()
        };

        // Peers first, then routes: a route to the TUN before its peer exists only drops.
        let changed = self.wg.set_peers(&paths, &allowed_ips).await?;
        if !changed.is_empty() {
            tracing::info!(
                added = changed.added.len(),
                removed = changed.removed.len(),
                updated = changed.updated.len(),
                "WireGuard peers updated"
            );
        }
        // Wire rules before routes: a pair moving to VXLAN accepts the peer's VXLAN before this
        // node sends any, so the first replies are not dropped.
        let wire_rules = WireRules {
            underlay_dev: self.me.underlay.dev.clone(),
            underlay_ip: self.me.underlay.ip,
            wg_dev: wireguard::TUN_NAME.into(),
            vxlan_port: self.cfg.vxlan_port,
            wg_port: self.cfg.wireguard_port,
            cluster_cidr: cluster,
            strict: mode == Mode::Strict,
            vxlan_peers: Vec::new(),
            peer_nodes: Default::default(),
            agent_ports: agent_ports(&self.cfg),
            agent_conns_per_source: wire::AGENT_CONNS_PER_SOURCE,
        }
        .with_peers(&desired.peers, &paths);
        if self.wire_loaded.as_ref() != Some(&wire_rules) {
            let to_load = wire_rules.clone();
            let replaced = tokio::task::spawn_blocking(move || wire::load(&to_load)).await??;
            tracing::info!(
                strict = mode == Mode::Strict,
                vxlan_peers = wire_rules.vxlan_peers.len(),
                replaced,
                "wire rules loaded"
            );
            self.wire_loaded = Some(wire_rules);
        }

        let report = apply(&mut self.kernel, &desired).await?;
        let writes = report.writes();

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
            matrix: status::path_matrix(&nodes, self.cfg.encryption),
            bindings: desired
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
        });
        Ok(writes)
    }

    /// Writes `<run dir>/status.json` for `veilnet status` (live WireGuard counters included) and
    /// returns it for the metrics endpoint.
    /// Refreshes the datapath's counters (and thereby notices, and repairs, a datapath that
    /// restarted without its configuration). A failure shows in the status; it is not a
    /// reconcile failure.
    pub async fn refresh_datapath(&mut self) {
        self.refresh_wire_drops().await;
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

    /// Reads the wire table's counters (one netlink dump of its counter objects).
    async fn refresh_wire_drops(&mut self) {
        let read =
            tokio::task::spawn_blocking(|| crate::policy::counters::read_counters_of(wire::TABLE))
                .await;
        match read {
            Ok(Ok(counters)) => {
                self.wire_drops = counters.into_iter().map(|c| (c.name, c.packets)).collect();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "could not read the wire table's counters"),
            Err(e) => tracing::debug!(error = %e, "wire counter reader failed"),
        }
    }

    pub fn write_status(&self) -> Option<status::NodeStatus> {
        let last = self.last.as_ref()?;
        let st = status::build(&self.cfg, &self.me, &self.wg, last, &self.wire_drops);
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
                    other if p.refused_downgrade => format!(
                        "{} (the peer publishes a weaker mode than its label or the cluster default allow: refused)",
                        other.name()
                    ),
                    other => other.name().to_string(),
                };
                (p.node.clone(), text)
            })
            .collect();
        for (node, path) in &now {
            let before = self.paths.get(node);
            if before == Some(path) || !self.report_limit.allow(node) {
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
            } else if path == "vxlan" && before.is_some_and(|b| b.starts_with("wireguard")) {
                tracing::warn!(peer = %node, "pod traffic with this peer is now plaintext VXLAN (both nodes' labels or the default allow it)");
                let msg = format!(
                    "node {}'s pod traffic with this node is no longer encrypted: the pair moved from WireGuard to plaintext VXLAN",
                    self.cfg.node_name
                );
                self.events
                    .node_event(node, EventType::Warning, "VeilnetPathDowngraded", &msg)
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
            if self.rejected.get(node) != Some(reason) && self.report_limit.allow(node) {
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
        // The cluster records the address the node publishes (the kubelet's InternalIP).
        let addresses: Vec<serde_json::Value> = annotations
            .get(annotations::UNDERLAY_IP)
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
            .into_iter()
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"podCIDR": spec_cidr},
                "status": {"addresses": addresses},
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
        let input = overlay_input(&cfg(), &me(), &nodes, &record, BTreeMap::new());
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
    fn reports_are_limited_per_peer() {
        let mut l = ReportLimit::default();
        let t0 = Instant::now();
        let second = std::time::Duration::from_secs(1);
        for _ in 0..ReportLimit::BURST {
            assert!(l.allow_at("a", t0));
        }
        assert!(!l.allow_at("a", t0 + second));
        assert!(!l.allow_at("a", t0 + second));
        assert!(l.allow_at("b", t0 + second), "other peers are not affected");
        assert!(l.allow_at("a", t0 + ReportLimit::WINDOW));
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
