//! In-memory stand-ins for what a reconcile pass writes to, for the whole-pass tests: the API
//! server with the Node reflector ([`FakeApi`]), the datapath process ([`FakeDatapath`]) and the
//! wire table ([`FakeWire`]). The kernel's is `crate::kernel::fake::FakeKernel`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;

use super::events::EventType;
use super::ports::{Publisher, WireError, WireTable};
use crate::cluster::publish::{AnnotationChanges, PublishError};
use crate::datapath::client::{ClientError, Datapath};
use crate::datapath::protocol::{
    DeviceInfo, DeviceSpec, Info, Outcome, Reply, Request, Response, PROTOCOL,
};
use crate::kernel::wire::WireRules;
use crate::wg::{keys, DeviceStats, PeerChanges, PeerConfig};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An Event as posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedEvent {
    pub node: String,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The Node objects of a cluster, served to the agent through a real reflector store; an
/// annotation patch lands in the store as the API server and the watch would bring it back.
pub struct FakeApi {
    writer: Mutex<Writer<Node>>,
    nodes: Mutex<BTreeMap<String, Node>>,
    pub patches: Mutex<Vec<(String, AnnotationChanges)>>,
    pub events: Mutex<Vec<PostedEvent>>,
}

impl FakeApi {
    pub fn new() -> (FakeApi, Store<Node>) {
        let (store, writer) = reflector::store();
        let api = FakeApi {
            writer: Mutex::new(writer),
            nodes: Mutex::default(),
            patches: Mutex::default(),
            events: Mutex::default(),
        };
        (api, store)
    }

    /// Creates or replaces a Node.
    pub fn put(&self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        lock(&self.nodes).insert(name, node.clone());
        lock(&self.writer).apply_watcher_event(&watcher::Event::Apply(node));
    }

    /// Changes a Node in place.
    pub fn edit(&self, name: &str, f: impl FnOnce(&mut Node)) {
        let mut node = lock(&self.nodes)
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name}"));
        f(&mut node);
        self.put(node);
    }

    pub fn delete(&self, name: &str) {
        if let Some(node) = lock(&self.nodes).remove(name) {
            lock(&self.writer).apply_watcher_event(&watcher::Event::Delete(node));
        }
    }

    pub fn get(&self, name: &str) -> Option<Node> {
        lock(&self.nodes).get(name).cloned()
    }

    pub fn patch_count(&self) -> usize {
        lock(&self.patches).len()
    }

    pub fn events(&self) -> Vec<PostedEvent> {
        lock(&self.events).clone()
    }
}

impl Publisher for FakeApi {
    async fn publish(&self, node: &str, changes: &AnnotationChanges) -> Result<(), PublishError> {
        lock(&self.patches).push((node.to_string(), changes.clone()));
        self.edit(node, |n| {
            let anns = n.metadata.annotations.get_or_insert_with(BTreeMap::new);
            for (k, v) in changes {
                match v {
                    Some(v) => anns.insert(k.clone(), v.clone()),
                    None => anns.remove(k),
                };
            }
        });
        Ok(())
    }

    async fn node_event(&self, node: &str, kind: EventType, reason: &str, message: &str) {
        lock(&self.events).push(PostedEvent {
            node: node.to_string(),
            warning: kind == EventType::Warning,
            reason: reason.to_string(),
            message: message.to_string(),
        });
    }
}

/// What the fake datapath process holds.
#[derive(Debug, Default)]
pub struct DatapathState {
    /// Bumped by [`FakeDatapath::restart`].
    pub instance: u32,
    pub device: Option<DeviceSpec>,
    pub peers: Vec<PeerConfig>,
    pub configures: usize,
    pub peer_sets: usize,
}

/// A datapath process that answers like the real one: no peers before a device, a new
/// instance (without device or peers) after a restart.
#[derive(Debug, Clone, Default)]
pub struct FakeDatapath(pub Arc<Mutex<DatapathState>>);

impl FakeDatapath {
    pub fn state(&self) -> MutexGuard<'_, DatapathState> {
        lock(&self.0)
    }

    /// The process restarts without its saved configuration.
    pub fn restart(&self) {
        let mut st = self.state();
        st.instance += 1;
        st.device = None;
        st.peers.clear();
    }

    fn answer(&self, req: &Request) -> Response {
        let mut st = self.state();
        let outcome = match req {
            Request::Hello => Outcome::Ok(Reply::Info),
            Request::Configure { device } => {
                st.device = Some(device.clone());
                st.configures += 1;
                Outcome::Ok(Reply::Info)
            }
            Request::SetPeers { .. } if st.device.is_none() => {
                Outcome::Error("no device configured".into())
            }
            Request::SetPeers { peers } => {
                st.peer_sets += 1;
                let changes = changes(&st.peers, peers);
                st.peers = peers.clone();
                Outcome::Ok(Reply::PeerChanges(changes))
            }
            Request::Stats => Outcome::Ok(Reply::Stats {
                peers: Vec::new(),
                device: DeviceStats::default(),
            }),
        };
        let device = st.device.as_ref().map(|d| DeviceInfo {
            tun_name: d.tun_name.clone(),
            listen_port: d.listen_port,
            mtu: d.mtu,
            public_key: d
                .key()
                .map(|k| keys::encode_public(&keys::public_key(&k)))
                .unwrap_or_default(),
            peers: st.peers.len(),
            offloads: String::new(),
            turn_age_ms: 0,
        });
        Response {
            info: Info {
                protocol: PROTOCOL,
                version: "fake".into(),
                instance: format!("fake-{}", st.instance),
                pid: 1,
                started_at: 0,
                device,
            },
            outcome,
        }
    }
}

fn changes(old: &[PeerConfig], new: &[PeerConfig]) -> PeerChanges {
    let find = |set: &[PeerConfig], p: &PeerConfig| {
        set.iter().find(|q| q.public_key == p.public_key).cloned()
    };
    let mut out = PeerChanges::default();
    for p in new {
        match find(old, p) {
            None => out.added.push(p.public_key),
            Some(q) if q != *p => out.updated.push(p.public_key),
            Some(_) => out.unchanged += 1,
        }
    }
    out.removed = old
        .iter()
        .filter(|p| find(new, p).is_none())
        .map(|p| p.public_key)
        .collect();
    out
}

impl Datapath for FakeDatapath {
    async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        Ok(self.answer(req))
    }
}

/// The wire table: remembers every load.
#[derive(Debug, Default)]
pub struct FakeWire {
    pub loads: Vec<WireRules>,
}

impl WireTable for FakeWire {
    async fn load(
        &mut self,
        _previous: Option<&WireRules>,
        rules: &WireRules,
    ) -> Result<bool, WireError> {
        self.loads.push(rules.clone());
        Ok(false)
    }

    async fn drops(&mut self) -> Result<BTreeMap<String, u64>, WireError> {
        // Like the kernel: the named counters exist once the table is loaded.
        Ok(if self.loads.is_empty() {
            BTreeMap::new()
        } else {
            crate::kernel::wire::COUNTERS
                .iter()
                .map(|c| (c.to_string(), 0))
                .collect()
        })
    }
}
