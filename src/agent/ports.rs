//! What a reconcile pass writes to besides the kernel: the Kubernetes API ([`Publisher`]: this
//! node's annotations and Events) and the `veilnet_wire` nftables table ([`WireTable`]). Each is a
//! small trait with the real implementation here; the whole-pass tests put fakes behind them (and
//! behind [`crate::kernel::OverlayKernel`] and [`crate::datapath::client::Datapath`]).

use std::collections::BTreeMap;
use std::future::Future;

use super::events::{EventSink, EventType};
use crate::cluster::publish::{self, AnnotationChanges, PublishError};
use crate::kernel::wire::{self, WireRules};
use crate::netfilter::{counters, NetfilterError};

/// Writes to the cluster on this node's behalf.
pub trait Publisher: Send + Sync {
    /// Patches `node`'s annotations (`None` removes one).
    fn publish(
        &self,
        node: &str,
        changes: &AnnotationChanges,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Posts an Event about `node` (best effort: a failure is logged, never fatal).
    fn node_event(
        &self,
        node: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) -> impl Future<Output = ()> + Send;
}

/// The API server through the agent's client.
pub struct KubePublisher {
    client: kube::Client,
    events: EventSink,
}

impl KubePublisher {
    pub fn new(client: kube::Client, events: EventSink) -> Self {
        KubePublisher { client, events }
    }
}

impl Publisher for KubePublisher {
    async fn publish(&self, node: &str, changes: &AnnotationChanges) -> Result<(), PublishError> {
        publish::publish(self.client.clone(), node, changes).await
    }

    async fn node_event(&self, node: &str, kind: EventType, reason: &str, message: &str) {
        self.events.node_event(node, kind, reason, message).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("wire rules: {0}")]
    Nft(#[from] NetfilterError),
    #[error("reading the wire table's counters: {0}")]
    Counters(NetfilterError),
    #[error("wire rules: the blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The `veilnet_wire` table.
pub trait WireTable: Send {
    /// Loads `rules` (one transaction); `previous` is what this process loaded last, if the
    /// kernel should still hold it (then only changed set elements are written). Ok(true) when
    /// the table had to be replaced whole.
    fn load(
        &mut self,
        previous: Option<&WireRules>,
        rules: &WireRules,
    ) -> impl Future<Output = Result<bool, WireError>> + Send;
    /// The table's drop counters, by name.
    fn drops(&mut self) -> impl Future<Output = Result<BTreeMap<String, u64>, WireError>> + Send;
}

/// The kernel's table, through `nft` and the netfilter counter dump (blocking: run off the
/// runtime's workers).
/// After each load it records the table as the kernel holds it in `run_dir`
/// ([`crate::netfilter::applied`], for `veilnet doctor`'s drift check).
#[derive(Debug, Default)]
pub struct NftWireTable {
    pub run_dir: std::path::PathBuf,
}

impl WireTable for NftWireTable {
    async fn load(
        &mut self,
        previous: Option<&WireRules>,
        rules: &WireRules,
    ) -> Result<bool, WireError> {
        let (previous, rules) = (previous.cloned(), rules.clone());
        let run_dir = self.run_dir.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let replaced = wire::load(previous.as_ref(), &rules)?;
            crate::netfilter::applied::record_here(&run_dir, "inet", wire::TABLE);
            Ok::<_, NetfilterError>(replaced)
        })
        .await??)
    }

    async fn drops(&mut self) -> Result<BTreeMap<String, u64>, WireError> {
        let counters = tokio::task::spawn_blocking(|| counters::read_counters_of(wire::TABLE))
            .await?
            .map_err(WireError::Counters)?;
        Ok(counters.into_iter().map(|c| (c.name, c.packets)).collect())
    }
}
