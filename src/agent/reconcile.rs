//! The reconcile loop: one [`ClusterSnapshot`] → one [`NodePlan`] ([`plan_node`]) → apply.
//!
//! Every pass plans from the reflectors' complete current state, so it is safe to run at any time
//! and any number of times; a pass with nothing to change writes nothing (no netlink write, no API
//! write, no datapath or nftables write, no file write).
//!
//! The [`Reconciler`] is generic over what it writes to: the kernel ([`OverlayKernel`]), the
//! WireGuard datapath ([`Datapath`]), the API server ([`Publisher`]) and the wire table
//! ([`WireTable`]), so whole passes are tested in memory (see `tests` below).

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::reflector::Store;

use super::cni_config;
use super::config::AgentConfig;
use super::events::EventType;
use super::plan::{plan_node, NodePlan, PlanInput};
use super::ports::{Publisher, WireError, WireTable};
use super::snapshot::{ClusterSnapshot, SelfInfo};
use super::status;
use super::wireguard::{self, WireGuard};
use crate::cluster::podcidr::{self, AllocationRecord};
use crate::cluster::publish;
use crate::datapath::client::{Datapath, DatapathClient};
use crate::kernel::apply::{apply, ApplyError};
use crate::kernel::netlink::NetlinkKernel;
use crate::kernel::wire::WireRules;
use crate::kernel::OverlayKernel;
use crate::model::encryption::{Mode, Path, PeerPath};
use crate::model::overlay::{OverlayError, RejectedPeer};

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
    #[error(transparent)]
    Wire(#[from] WireError),
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

pub struct Reconciler<
    K = NetlinkKernel,
    D = DatapathClient,
    P = super::ports::KubePublisher,
    W = super::ports::NftWireTable,
> {
    pub cfg: AgentConfig,
    pub kernel: K,
    pub publisher: P,
    pub wire: W,
    pub nodes: Store<Node>,
    pub records: Store<ConfigMap>,
    pub me: SelfInfo,
    pub wg: WireGuard<D>,
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
    /// Connections masqueraded to the node's address (the wire table's `masqueraded` counter).
    masqueraded: u64,
    pub dataplane_ready: bool,
    /// The key rotation failure last reported (each distinct one once, not on every retry).
    rotation_reported: Option<String>,
}

/// What the apply steps wrote, by target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassWrites {
    pub kernel: usize,
    pub annotations: usize,
    pub wireguard: bool,
    pub wire: bool,
    pub cni: bool,
}

impl PassWrites {
    pub fn none(&self) -> bool {
        *self == PassWrites::default()
    }
}

impl<K, D, P, W> Reconciler<K, D, P, W>
where
    K: OverlayKernel + Send,
    D: Datapath,
    P: Publisher,
    W: WireTable,
{
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: AgentConfig,
        kernel: K,
        publisher: P,
        wire: W,
        nodes: Store<Node>,
        records: Store<ConfigMap>,
        me: SelfInfo,
        wg: WireGuard<D>,
    ) -> Self {
        Self {
            cfg,
            kernel,
            publisher,
            wire,
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
            masqueraded: 0,
            dataplane_ready: false,
            rotation_reported: None,
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
        Ok(self.pass().await?.kernel)
    }

    /// One pass: snapshot → plan → apply. Returns what it wrote.
    pub async fn pass(&mut self) -> Result<PassWrites, ReconcileError> {
        let started = Instant::now();
        let cluster =
            ClusterSnapshot::take(&self.cfg.node_name, &self.nodes.state(), &self.record());
        // The key is an input of the plan (published, and refused to peers), so a requested
        // rotation happens first.
        self.rotate_if_requested(&cluster).await;
        let (incumbents, key_bindings) = self.history();
        let plan = plan_node(&PlanInput {
            cfg: &self.cfg,
            me: &self.me,
            cluster: &cluster,
            wg_key: self.wg.public_key(),
            incumbents: &incumbents,
            key_bindings: &key_bindings,
        })?;
        self.report(&plan).await;
        let writes = self.apply(&plan).await?;
        if writes.kernel > 0 {
            tracing::info!(
                writes = writes.kernel,
                peers = plan.overlay.accepted.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "dataplane updated"
            );
        } else {
            tracing::debug!(
                peers = plan.overlay.accepted.len(),
                "dataplane already up to date"
            );
        }
        self.dataplane_ready = true;
        self.last = Some(status::Snapshot::of(&plan));
        Ok(writes)
    }

    /// The previous pass's bindings: accepted peers and the WireGuard keys used for them.
    fn history(
        &self,
    ) -> (
        BTreeMap<String, crate::model::overlay::AcceptedPeer>,
        BTreeMap<String, [u8; 32]>,
    ) {
        let Some(last) = &self.last else {
            return Default::default();
        };
        let keys = last
            .paths
            .iter()
            .filter_map(|p| match &p.path {
                Path::Wireguard { public_key, .. } => Some((p.node.clone(), *public_key)),
                _ => None,
            })
            .collect();
        (last.bindings.clone(), keys)
    }

    /// A pass succeeded but left work to retry soon (a key rotation the disk refused), without
    /// counting as a failed pass.
    pub fn retry_wanted(&self) -> bool {
        self.wg.rotation_pending()
    }

    /// Rotates the key when asked. A rotation that fails (the state dir full or read-only, the
    /// datapath away) keeps the current key and does not fail the pass: the rest of it (peers'
    /// new keys and endpoints, routes, the CNI hand-off) must not wait for this node's disk.
    async fn rotate_if_requested(&mut self, cluster: &ClusterSnapshot) {
        let request = cluster
            .own
            .as_ref()
            .and_then(|o| o.rotate_request.as_deref());
        match self.wg.rotate_if_requested(request).await {
            Ok(true) => {
                self.rotation_reported = None;
                tracing::info!(fingerprint = %self.wg.fingerprint(), "WireGuard key rotated");
                let msg = format!("WireGuard key rotated; new key {}", self.wg.fingerprint());
                self.publisher
                    .node_event(
                        &self.cfg.node_name,
                        EventType::Normal,
                        "VeilnetKeyRotated",
                        &msg,
                    )
                    .await;
            }
            Ok(false) => self.rotation_reported = None,
            Err(e) => {
                let error = e.to_string();
                if self.rotation_reported.as_deref() == Some(error.as_str()) {
                    tracing::debug!(%error, "WireGuard key rotation still failing; retrying");
                    return;
                }
                tracing::warn!(%error, fingerprint = %self.wg.fingerprint(), "WireGuard key rotation failed; keeping the current key and retrying");
                let msg = format!(
                    "WireGuard key rotation ({}={}) failed: {error}; keeping key {} and retrying",
                    crate::model::annotations::ROTATE_KEY,
                    request.unwrap_or_default(),
                    self.wg.fingerprint()
                );
                self.publisher
                    .node_event(
                        &self.cfg.node_name,
                        EventType::Warning,
                        "VeilnetKeyRotationFailed",
                        &msg,
                    )
                    .await;
                self.rotation_reported = Some(error);
            }
        }
    }

    /// Logs and Events for what the plan refuses or changes (rate-limited per peer).
    async fn report(&mut self, plan: &NodePlan) {
        if let Some(e) = &plan.bad_label {
            tracing::warn!(error = %e, default = %self.cfg.encryption, "bad encryption label; using the default");
            let msg = format!(
                "label {}: {e}; using the default mode {}",
                crate::model::annotations::ENCRYPTION_LABEL,
                self.cfg.encryption
            );
            self.publisher
                .node_event(
                    &self.cfg.node_name,
                    EventType::Warning,
                    "VeilnetBadEncryptionLabel",
                    &msg,
                )
                .await;
        }
        self.report_rejections(&plan.overlay.rejected).await;
        self.report_paths(&plan.paths).await;
    }

    /// Writes the plan, in an order that never drops or leaks a packet on the way: annotations,
    /// WireGuard peers before the routes into the TUN (a route before its peer only drops), wire
    /// rules before the routes (a pair moving to VXLAN accepts the peer's VXLAN before this node
    /// sends any), the kernel, then the CNI hand-off.
    async fn apply(&mut self, plan: &NodePlan) -> Result<PassWrites, ReconcileError> {
        let mut writes = PassWrites::default();
        if !plan.publish.is_empty() {
            tracing::info!(changes = ?plan.publish.keys().collect::<Vec<_>>(), "publishing this node's annotations");
            self.publisher
                .publish(&self.cfg.node_name, &plan.publish)
                .await?;
            writes.annotations = plan.publish.len();
        }

        if let Some(changed) = self.wg.set_peers(&plan.wg_peers).await? {
            writes.wireguard = true;
            if !changed.is_empty() {
                tracing::info!(
                    added = changed.added.len(),
                    removed = changed.removed.len(),
                    updated = changed.updated.len(),
                    "WireGuard peers updated"
                );
            }
        }

        if self.wire_loaded.as_ref() != Some(&plan.wire) {
            let replaced = self
                .wire
                .load(self.wire_loaded.as_ref(), &plan.wire)
                .await?;
            tracing::info!(
                strict = plan.mode == Mode::Strict,
                vxlan_peers = plan.wire.vxlan_peers.len(),
                replaced,
                "wire rules loaded"
            );
            self.wire_loaded = Some(plan.wire.clone());
            writes.wire = true;
        }

        writes.kernel = apply(&mut self.kernel, &plan.overlay).await?.writes();

        writes.cni = cni_config::install(
            &plan.cni,
            &self.cfg.run_dir,
            &self.cfg.state_dir,
            &self.cfg.cni_conf_dir,
        )?;
        if writes.cni {
            tracing::info!(mtu = plan.cni.mtu, conf_dir = %self.cfg.cni_conf_dir.display(), "CNI configuration installed");
        }
        Ok(writes)
    }

    /// Refreshes the datapath's counters (and thereby notices, and repairs, a datapath that
    /// restarted without its configuration). A failure shows in the status; it is not a
    /// reconcile failure.
    pub async fn refresh_datapath(&mut self) {
        match self.wire.drops().await {
            Ok(drops) if drops.is_empty() => {
                self.wire_drops = drops;
                // The table's named counters are gone: someone deleted the table (or flushed
                // the ruleset). Put it back now rather than at the next change.
                if let Some(rules) = self.wire_loaded.clone() {
                    match self.wire.load(None, &rules).await {
                        Ok(_) => tracing::warn!(
                            table = crate::kernel::wire::TABLE,
                            "the wire table was gone; restored"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "the wire table is gone and could not be restored; the next pass retries");
                            self.wire_loaded = None;
                        }
                    }
                }
            }
            Ok(mut counters) => {
                // The table also counts what it masquerades: not a drop.
                self.masqueraded = counters
                    .remove(crate::kernel::masquerade::COUNTER)
                    .unwrap_or(0);
                self.wire_drops = counters;
            }
            Err(e) => tracing::debug!(error = %e, "could not read the wire table's counters"),
        }
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

    /// Writes `<run dir>/status.json` for `veilnet status` (live WireGuard counters included) and
    /// returns it for the metrics endpoint.
    pub fn write_status(&self) -> Option<status::NodeStatus> {
        let last = self.last.as_ref()?;
        let st = status::build(
            &self.cfg,
            &self.me,
            &self.wg,
            last,
            &self.wire_drops,
            self.masqueraded,
        );
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
                self.publisher
                    .node_event(node, EventType::Warning, "VeilnetPathBlocked", &msg)
                    .await;
            } else if path == "vxlan" && before.is_some_and(|b| b.starts_with("wireguard")) {
                tracing::warn!(peer = %node, "pod traffic with this peer is now plaintext VXLAN (both nodes' labels or the default allow it)");
                let msg = format!(
                    "node {}'s pod traffic with this node is no longer encrypted: the pair moved from WireGuard to plaintext VXLAN",
                    self.cfg.node_name
                );
                self.publisher
                    .node_event(node, EventType::Warning, "VeilnetPathDowngraded", &msg)
                    .await;
            } else {
                tracing::info!(peer = %node, %path, "path to peer");
            }
        }
        self.paths = now;
    }

    async fn report_rejections(&mut self, rejected: &[RejectedPeer]) {
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
                self.publisher
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
}

/// Releases the pod CIDRs of deleted nodes (only meaningful when veilnet allocates them).
pub async fn release_deleted(client: kube::Client, cfg: &AgentConfig, me: &SelfInfo) {
    if !me.allocated {
        return;
    }
    match podcidr::release_deleted(client, &cfg.namespace).await {
        Ok(released) if !released.is_empty() => {
            tracing::info!(nodes = ?released, "released the pod CIDRs of deleted nodes")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not release the pod CIDRs of deleted nodes")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ipnet::IpNet;
    use kube::runtime::reflector;

    use super::*;
    use crate::agent::config::AgentArgs;
    use crate::agent::fakes::{FakeApi, FakeDatapath, FakeWire};
    use crate::agent::snapshot::tests::node;
    use crate::agent::underlay::UnderlayDevice;
    use crate::kernel::fake::FakeKernel;
    use crate::kernel::VEILNET_ROUTE_PROTOCOL;
    use crate::model::annotations;
    use crate::model::overlay::POD_TO_NODE_TABLE;
    use crate::wg::{keys, PublicKey};

    const MAIN: u32 = 254;

    type TestReconciler = Reconciler<FakeKernel, FakeDatapath, FakeApi, FakeWire>;

    /// One node (`n1`, 172.30.0.11, 10.244.1.0/24) of a cluster that lives in memory.
    struct Node1 {
        rec: TestReconciler,
        datapath: FakeDatapath,
        _dir: tempfile::TempDir,
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from([n; 32])
    }

    /// Node `n<n>` as its agent publishes it in `mode` (its label says the same), with
    /// WireGuard key `key`.
    fn peer(n: u8, mode: &str, key_byte: u8) -> k8s_openapi::api::core::v1::Node {
        let ip = format!("172.30.0.{}", 10 + n);
        let anns = [
            (annotations::UNDERLAY_IP, ip.clone()),
            (annotations::VTEP_MAC, format!("06:00:00:00:00:{n:02x}")),
            (annotations::VXLAN_VNI, "1".into()),
            (annotations::ENCRYPTION_MODE, mode.into()),
            (
                annotations::WG_PUBLIC_KEY,
                keys::encode_public(&key(key_byte)),
            ),
            (annotations::WG_ENDPOINT, format!("{ip}:51820")),
        ];
        let refs: Vec<(&str, &str)> = anns.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let cidr = format!("10.244.{n}.0/24");
        (*node(
            &format!("n{n}"),
            Some(&cidr),
            &refs,
            &[(annotations::ENCRYPTION_LABEL, mode)],
        ))
        .clone()
    }

    fn set_annotation(n: &mut k8s_openapi::api::core::v1::Node, key: &str, value: &str) {
        n.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
    }

    /// What an operator relabelling a peer does, and its agent then publishes.
    fn set_mode(n: &mut k8s_openapi::api::core::v1::Node, mode: &str) {
        set_annotation(n, annotations::ENCRYPTION_MODE, mode);
        set_label(n, mode);
    }

    fn set_label(n: &mut k8s_openapi::api::core::v1::Node, mode: &str) {
        n.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(annotations::ENCRYPTION_LABEL.into(), mode.into());
    }

    impl Node1 {
        fn new(own_label: Option<&str>) -> Node1 {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = AgentConfig::resolve(&AgentArgs {
                node_name: Some("n1".into()),
                state_dir: Some(dir.path().join("state")),
                run_dir: Some(dir.path().join("run")),
                cni_conf_dir: Some(dir.path().join("net.d")),
                ..Default::default()
            })
            .unwrap();
            cfg.encryption = Mode::On;
            for d in [
                cfg.state_dir.join("wireguard"),
                cfg.run_dir.clone(),
                cfg.cni_conf_dir.clone(),
            ] {
                std::fs::create_dir_all(d).unwrap();
            }
            let (api, nodes) = FakeApi::new();
            let labels: Vec<(&str, &str)> = own_label
                .map(|l| (annotations::ENCRYPTION_LABEL, l))
                .into_iter()
                .collect();
            let mut own = (*node("n1", Some("10.244.1.0/24"), &[], &labels)).clone();
            own.status = serde_json::from_value(serde_json::json!(
                {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"}]}
            ))
            .unwrap();
            api.put(own);
            let (records, _) = reflector::store();
            let mut kernel = FakeKernel::new();
            kernel.add_device("eth0", 1500);
            // The datapath's TUN (the datapath process creates it).
            kernel.add_device(wireguard::TUN_NAME, 1440);
            let me = SelfInfo::new(
                "n1",
                UnderlayDevice {
                    ip: "172.30.0.11".parse().unwrap(),
                    dev: "eth0".into(),
                    mtu: 1500,
                },
                vec!["10.244.1.0/24".parse().unwrap()],
                false,
            );
            let datapath = FakeDatapath::default();
            let wg =
                WireGuard::with_client(datapath.clone(), &cfg.state_dir, cfg.wireguard_port, 1440)
                    .unwrap();
            let rec = Reconciler::new(
                cfg,
                kernel,
                api,
                FakeWire::default(),
                nodes,
                records,
                me,
                wg,
            );
            Node1 {
                rec,
                datapath,
                _dir: dir,
            }
        }

        fn api(&self) -> &FakeApi {
            &self.rec.publisher
        }

        async fn pass(&mut self) -> PassWrites {
            self.rec.pass().await.unwrap()
        }

        /// Runs passes until one writes nothing (at most three) and returns the first's writes.
        async fn converge(&mut self) -> PassWrites {
            let first = self.pass().await;
            for _ in 0..2 {
                if self.pass().await.none() {
                    return first;
                }
            }
            panic!("no quiet pass after {first:?}");
        }

        /// The device veilnet's route to `dst` in `table` leaves on, in the (fake) kernel.
        fn route_dev(&self, dst: &str, table: u32) -> Option<String> {
            let dst: IpNet = dst.parse().unwrap();
            let st = self.rec.kernel.state();
            let route = st.routes.iter().find(|r| {
                r.dst == dst && r.table == table && r.protocol == VEILNET_ROUTE_PROTOCOL
            })?;
            st.links.get(&route.oif?).map(|l| l.name.clone())
        }

        fn fdb_dsts(&self) -> Vec<IpAddr> {
            self.rec
                .kernel
                .state()
                .fdb
                .iter()
                .filter_map(|f| f.dst)
                .collect()
        }

        fn datapath_keys(&self) -> Vec<PublicKey> {
            self.datapath
                .state()
                .peers
                .iter()
                .map(|p| p.public_key)
                .collect()
        }

        fn path(&self, peer: &str) -> String {
            let last = self.rec.last.as_ref().unwrap();
            let p = last.paths.iter().find(|p| p.node == peer).unwrap();
            p.path.name().to_string()
        }

        fn last_wire(&self) -> &WireRules {
            self.rec.wire.loads.last().unwrap()
        }
    }

    #[tokio::test]
    async fn the_first_pass_writes_everything_and_the_second_nothing() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        n1.api().put(peer(3, "on", 3));
        let first = n1.pass().await;
        assert!(first.kernel > 0, "{first:?}");
        assert!(first.wireguard && first.wire && first.cni, "{first:?}");
        assert_eq!(first.annotations, 7, "every annotation of this node");
        let own = n1.api().get("n1").unwrap();
        let anns = own.metadata.annotations.unwrap();
        assert_eq!(
            anns[annotations::WG_PUBLIC_KEY],
            keys::encode_public(n1.rec.wg.public_key())
        );
        assert_eq!(
            n1.route_dev("10.244.2.0/24", MAIN).as_deref(),
            Some(wireguard::TUN_NAME)
        );
        assert_eq!(n1.datapath_keys(), [key(2), key(3)]);
        let written =
            veilnet_cni::NodeState::load(&veilnet_cni::NodeState::path_in(&n1.rec.cfg.run_dir))
                .unwrap();
        assert_eq!(
            (written.bridge.as_str(), written.mtu, written.ready),
            ("veilbr0", 1440, true)
        );
        assert_eq!(written.pod_cidrs, n1.rec.me.pod_cidrs);
        assert!(n1
            .rec
            .cfg
            .cni_conf_dir
            .join(cni_config::CONFLIST_NAME)
            .exists());

        let kernel_writes = n1.rec.kernel.writes().len();
        let (patches, sets, loads) = (
            n1.api().patch_count(),
            n1.datapath.state().peer_sets,
            n1.rec.wire.loads.len(),
        );
        let second = n1.pass().await;
        assert!(second.none(), "{second:?}");
        assert_eq!(n1.rec.kernel.writes().len(), kernel_writes);
        assert_eq!(n1.api().patch_count(), patches);
        assert_eq!(n1.datapath.state().peer_sets, sets);
        assert_eq!(n1.rec.wire.loads.len(), loads);
    }

    #[tokio::test]
    async fn a_mode_toggle_moves_the_pair_between_vxlan_wireguard_and_blocked() {
        let mut n1 = Node1::new(Some("off"));
        n1.api().put(peer(2, "off", 2));
        n1.converge().await;
        // Plaintext: VXLAN routes, no WireGuard peer, the wire accepts n2's VXLAN only.
        assert_eq!(n1.path("n2"), "vxlan");
        assert_eq!(
            n1.route_dev("10.244.2.0/24", MAIN).as_deref(),
            Some("veilvx1")
        );
        assert_eq!(
            n1.route_dev("172.30.0.12/32", POD_TO_NODE_TABLE).as_deref(),
            Some("veilvx1")
        );
        assert!(n1.datapath_keys().is_empty());
        let vxlan: Vec<IpAddr> = n1
            .last_wire()
            .vxlan_peers
            .iter()
            .map(|p| p.underlay_ip)
            .collect();
        assert_eq!(vxlan, ["172.30.0.12".parse::<IpAddr>().unwrap()]);
        assert!(!n1.last_wire().strict);

        // Both nodes on: WireGuard.
        n1.api().edit("n1", |n| set_label(n, "on"));
        n1.api().edit("n2", |n| set_mode(n, "on"));
        let toggle = n1.converge().await;
        assert!(
            toggle.kernel > 0 && toggle.wireguard && toggle.wire,
            "{toggle:?}"
        );
        assert_eq!(toggle.annotations, 1, "the published mode");
        assert_eq!(n1.path("n2"), "wireguard");
        assert_eq!(
            n1.route_dev("10.244.2.0/24", MAIN).as_deref(),
            Some(wireguard::TUN_NAME)
        );
        assert_eq!(
            n1.route_dev("172.30.0.12/32", POD_TO_NODE_TABLE).as_deref(),
            Some(wireguard::TUN_NAME)
        );
        assert_eq!(n1.datapath_keys(), [key(2)]);
        assert!(n1.last_wire().vxlan_peers.is_empty());

        // This node strict, the peer back to off: blocked, no plaintext anywhere.
        n1.api().edit("n1", |n| set_label(n, "strict"));
        n1.api().edit("n2", |n| set_mode(n, "off"));
        n1.converge().await;
        assert_eq!(n1.path("n2"), "blocked");
        assert_eq!(n1.route_dev("10.244.2.0/24", MAIN), None);
        assert_eq!(
            n1.route_dev("172.30.0.12/32", POD_TO_NODE_TABLE).as_deref(),
            Some(wireguard::TUN_NAME),
            "into the TUN, which has no peer for it: dropped"
        );
        assert!(n1.datapath_keys().is_empty());
        assert!(n1.last_wire().strict && n1.last_wire().vxlan_peers.is_empty());
        let own = n1.api().get("n1").unwrap().metadata.annotations.unwrap();
        assert_eq!(own[annotations::ENCRYPTION_MODE], "strict");
        assert!(n1
            .api()
            .events()
            .iter()
            .any(|e| e.node == "n2" && e.reason == "VeilnetPathBlocked"));
    }

    #[tokio::test]
    async fn a_peer_key_change_reaches_the_datapath_and_nothing_else() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        n1.converge().await;
        assert_eq!(n1.datapath_keys(), [key(2)]);
        let kernel_writes = n1.rec.kernel.writes().len();
        n1.api().edit("n2", |n| {
            set_annotation(
                n,
                annotations::WG_PUBLIC_KEY,
                &keys::encode_public(&key(22)),
            )
        });
        let change = n1.converge().await;
        assert!(change.wireguard, "{change:?}");
        assert_eq!(change.kernel, 0, "routes do not depend on the key");
        assert_eq!(n1.rec.kernel.writes().len(), kernel_writes);
        assert_eq!(n1.datapath_keys(), [key(22)]);
        assert_eq!(
            n1.datapath.state().peers[0].endpoint.to_string(),
            "172.30.0.12:51820"
        );
    }

    #[tokio::test]
    async fn a_rotation_the_disk_refuses_keeps_the_key_and_the_rest_of_the_pass_goes_on() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        n1.converge().await;
        let before = n1.rec.wg.public_key_b64();
        let key_path = wireguard::key_path(&n1.rec.cfg.state_dir);
        let saved = std::fs::read(&key_path).unwrap();
        // A directory in the key file's place: the rename of the new key fails (root ignores
        // permission bits, so a read-only mode would not stop the write in CI).
        std::fs::remove_file(&key_path).unwrap();
        std::fs::create_dir(&key_path).unwrap();
        n1.api()
            .edit("n1", |n| set_annotation(n, annotations::ROTATE_KEY, "r1"));
        // The peer rotates at the same time: its new key must still be taken.
        n1.api().edit("n2", |n| {
            set_annotation(
                n,
                annotations::WG_PUBLIC_KEY,
                &keys::encode_public(&key(22)),
            )
        });
        let writes = n1
            .rec
            .pass()
            .await
            .expect("a refused rotation fails no pass");
        assert!(writes.wireguard, "{writes:?}");
        assert_eq!(
            n1.datapath_keys(),
            [key(22)],
            "the peer's new key is applied"
        );
        assert_eq!(n1.rec.wg.public_key_b64(), before, "the key stays");
        let own = n1.api().get("n1").unwrap().metadata.annotations.unwrap();
        assert_eq!(
            own[annotations::WG_PUBLIC_KEY],
            before,
            "nothing new published"
        );
        let error = n1
            .rec
            .wg
            .rotation_error()
            .expect("the failure is kept")
            .to_string();
        assert!(error.contains("private.key"), "{error}");
        assert!(n1.rec.retry_wanted());
        // Reported once, not on every retry.
        n1.rec.pass().await.unwrap();
        let failed: Vec<_> = n1
            .api()
            .events()
            .into_iter()
            .filter(|e| e.reason == "VeilnetKeyRotationFailed")
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].warning && failed[0].message.contains("keeping key"),
            "{failed:?}"
        );
        let st = status::build(
            &n1.rec.cfg,
            &n1.rec.me,
            &n1.rec.wg,
            n1.rec.last.as_ref().unwrap(),
            &BTreeMap::new(),
            0,
        );
        assert_eq!(st.key_rotation_error.as_deref(), Some(error.as_str()));
        assert!(status::render(&st).contains("key rotation FAILED"));

        // Space again: the next pass rotates, publishes and clears the error.
        std::fs::remove_dir(&key_path).unwrap();
        std::fs::write(&key_path, &saved).unwrap();
        n1.converge().await;
        let after = n1.rec.wg.public_key_b64();
        assert_ne!(after, before);
        let own = n1.api().get("n1").unwrap().metadata.annotations.unwrap();
        assert_eq!(own[annotations::WG_PUBLIC_KEY], after);
        assert_ne!(
            std::fs::read(&key_path).unwrap(),
            saved,
            "the new key is on disk"
        );
        assert!(n1.rec.wg.rotation_error().is_none() && !n1.rec.retry_wanted());
        assert!(n1
            .api()
            .events()
            .iter()
            .any(|e| e.reason == "VeilnetKeyRotated"));
    }

    #[tokio::test]
    async fn a_removed_peer_loses_its_routes_fdb_and_datapath_entry() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        let mut plain = peer(3, "off", 3);
        set_mode(&mut plain, "off");
        n1.api().put(plain);
        n1.api().edit("n1", |n| set_label(n, "on"));
        n1.converge().await;
        assert_eq!(n1.path("n3"), "vxlan");
        assert_eq!(
            n1.route_dev("10.244.3.0/24", MAIN).as_deref(),
            Some("veilvx1")
        );
        assert!(n1.fdb_dsts().contains(&"172.30.0.13".parse().unwrap()));

        n1.api().delete("n3");
        n1.api().delete("n2");
        let removal = n1.converge().await;
        assert!(
            removal.kernel > 0 && removal.wireguard && removal.wire,
            "{removal:?}"
        );
        assert_eq!(n1.route_dev("10.244.3.0/24", MAIN), None);
        assert_eq!(n1.route_dev("10.244.2.0/24", MAIN), None);
        assert_eq!(n1.route_dev("172.30.0.13/32", POD_TO_NODE_TABLE), None);
        assert!(n1.fdb_dsts().is_empty());
        assert!(n1.datapath_keys().is_empty());
        assert!(n1.last_wire().vxlan_peers.is_empty() && n1.last_wire().peer_nodes.is_empty());
        // The fallback for the whole cluster CIDR stays.
        assert_eq!(
            n1.route_dev("10.244.0.0/16", MAIN).as_deref(),
            Some(wireguard::TUN_NAME)
        );
    }

    #[tokio::test]
    async fn rogue_peers_are_refused_with_the_reason_and_the_incumbent_keeps_working() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        n1.converge().await;
        let kernel_writes = n1.rec.kernel.writes().len();

        // n4: its pod CIDR overlaps this node's.
        let mut overlap = peer(4, "on", 4);
        overlap.spec.as_mut().unwrap().pod_cidr = Some("10.244.1.128/25".into());
        n1.api().put(overlap);
        // n5: n2's WireGuard key.
        n1.api().put(peer(5, "on", 2));
        // n6: n2's underlay address (and the cluster records it for n6 too).
        let mut twin = peer(6, "on", 6);
        set_annotation(&mut twin, annotations::UNDERLAY_IP, "172.30.0.12");
        set_annotation(&mut twin, annotations::WG_ENDPOINT, "172.30.0.12:51820");
        twin.status = serde_json::from_value(serde_json::json!(
            {"addresses": [{"type": "InternalIP", "address": "172.30.0.12"}]}
        ))
        .unwrap();
        n1.api().put(twin);
        n1.converge().await;

        let st = n1.rec.write_status().unwrap();
        assert!(
            st.rejected["n4"].contains("overlaps this node's pod CIDR"),
            "{:?}",
            st.rejected
        );
        assert!(
            st.rejected["n6"].contains("172.30.0.12 is held by node n2"),
            "{:?}",
            st.rejected
        );
        let n5 = st.peers.iter().find(|p| p.node == "n5").unwrap();
        assert_eq!(n5.path, "blocked");
        assert!(
            n5.reason.as_deref().unwrap().contains("held by n2"),
            "{n5:?}"
        );
        // The same reasons went out as Events about the rogue nodes.
        let events = n1.api().events();
        let event = |node: &str, reason: &str| {
            events
                .iter()
                .find(|e| e.node == node && e.reason == reason)
                .map(|e| e.message.clone())
                .unwrap_or_else(|| panic!("no {reason} for {node}: {events:?}"))
        };
        assert!(event("n4", "VeilnetPeerRejected").contains(&st.rejected["n4"]));
        assert!(event("n6", "VeilnetPeerRejected").contains(&st.rejected["n6"]));
        assert!(event("n5", "VeilnetPathBlocked").contains("held by n2"));

        // n2 is untouched: same routes, same (only) datapath peer.
        assert_eq!(n1.path("n2"), "wireguard");
        assert_eq!(n1.datapath_keys(), [key(2)]);
        assert_eq!(
            n1.route_dev("10.244.2.0/24", MAIN).as_deref(),
            Some(wireguard::TUN_NAME)
        );
        assert_eq!(n1.route_dev("10.244.1.128/25", MAIN), None);
        assert_eq!(n1.route_dev("10.244.6.0/24", MAIN), None);
        // The only kernel writes are for n5 (accepted by the overlay, blocked by its key): its
        // node address into the TUN, its VTEP's neighbour and FDB entries.
        let new: Vec<&String> = n1.rec.kernel.writes()[kernel_writes..].iter().collect();
        assert!(!new.is_empty());
        assert!(
            new.iter()
                .all(|w| w.contains("172.30.0.15") || w.contains("10.244.5.0")),
            "{new:?}"
        );
    }

    #[tokio::test]
    async fn a_restarted_datapath_gets_its_device_and_peer_set_back() {
        let mut n1 = Node1::new(None);
        n1.api().put(peer(2, "on", 2));
        n1.api().put(peer(3, "on", 3));
        n1.converge().await;
        n1.rec.refresh_datapath().await;
        let configures = n1.datapath.state().configures;
        assert_eq!(n1.datapath_keys(), [key(2), key(3)]);

        n1.datapath.restart();
        assert!(n1.datapath_keys().is_empty());
        // The status refresh notices the new instance and sends everything again.
        n1.rec.refresh_datapath().await;
        assert_eq!(n1.datapath.state().configures, configures + 1);
        assert_eq!(n1.datapath_keys(), [key(2), key(3)]);
        assert!(n1.rec.wg.datapath().error.is_none());
        // And the next pass has nothing to do.
        assert!(n1.pass().await.none());
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
}
