//! Pod sandboxes: one network namespace per pod, attached with CNI as containerd's
//! `RunPodSandbox` / `StopPodSandbox` do.
//!
//! Each pod has a directory `<kubelet-dir>/pods/<ns>_<name>_<uid>/` holding `sandbox.json` (written
//! before the namespace is created, so a crash at any point leaves enough to clean up), the
//! container logs and pid files. The CNI result cache lives in `<kubelet-dir>/cni-cache`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cni::{self, CniError, CniRuntime, NetworkConfigList, RuntimeConf};
use veilnet::netns::{self, NetnsError};

/// Interface name of the pod's network in its namespace.
pub const POD_IFNAME: &str = "eth0";
/// Name of the record file in a pod dir.
const RECORD_FILE: &str = "sandbox.json";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("failed to create network namespace {netns} for sandbox {sandbox_id:?}: {source}")]
    CreateNetns {
        netns: String,
        sandbox_id: String,
        source: NetnsError,
    },
    #[error("failed to remove network namespace {netns}: {source}")]
    DeleteNetns { netns: String, source: NetnsError },
    #[error("failed to setup network for sandbox {sandbox_id:?}: {source}")]
    SetupNetwork {
        sandbox_id: String,
        source: CniError,
    },
    #[error("failed to check network for sandbox {sandbox_id:?}: {source}")]
    CheckNetwork {
        sandbox_id: String,
        source: CniError,
    },
    #[error("failed to destroy network for sandbox {sandbox_id:?}: {source}")]
    TeardownNetwork {
        sandbox_id: String,
        source: CniError,
    },
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Join(String),
}

/// Identity of a pod, as far as the node is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodKey {
    /// None for objects without name or uid (nothing sensible can be done with them).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone().filter(|n| !n.is_empty())?;
        let uid = pod.metadata.uid.clone().filter(|u| !u.is_empty())?;
        Some(Self {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name,
            uid,
        })
    }

    /// `<ns>_<name>_<uid>`, restricted to filename-safe characters.
    pub fn dir_name(&self) -> String {
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        };
        format!(
            "{}_{}_{}",
            safe(&self.namespace),
            safe(&self.name),
            safe(&self.uid)
        )
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// FNV-1a 64 with a seed: a stable, dependency-free mixer (ids need uniqueness, not secrecy).
fn fnv64(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The sandbox (infra container) id of a pod: 64 lowercase hex, stable for a uid. A UUID's own
/// 32 hex digits come first (so the id is recognizable), the rest is a hash of the uid.
pub fn sandbox_id(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let is_uuid = hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    let mut id = if is_uuid { hex } else { String::new() };
    let mut seed = 0u64;
    while id.len() < 64 {
        id.push_str(&format!("{:016x}", fnv64(seed, uid.as_bytes())));
        seed += 1;
    }
    id.truncate(64);
    id
}

/// The pod's namespace name: prefix + 12 hex of the sandbox id (the uid's first 12 for UUIDs).
pub fn netns_name(prefix: &str, uid: &str) -> String {
    format!("{prefix}{}", &sandbox_id(uid)[..12])
}

/// What the node remembers about a sandbox (`sandbox.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub pod: PodKey,
    pub sandbox_id: String,
    pub netns: String,
    pub ifname: String,
    /// Network the attachment was made on; None until ADD succeeded.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `hostNetwork: true`: no namespace, no CNI; the pod uses the node's network.
    #[serde(default)]
    pub host_network: bool,
}

impl SandboxRecord {
    /// The namespace containers run in; None for host-network pods (the kubelet's own).
    pub fn netns_name(&self) -> Option<&str> {
        (!self.host_network).then_some(self.netns.as_str())
    }

    /// True if the sandbox can be used as it is (after a restart, or while running).
    pub fn usable(&self) -> bool {
        self.host_network || (self.network.is_some() && netns::exists(&self.netns))
    }

    pub fn netns_path(&self) -> String {
        netns::path(&self.netns).display().to_string()
    }

    fn runtime_conf(&self, capability_args: Map<String, Value>) -> RuntimeConf {
        RuntimeConf {
            container_id: self.sandbox_id.clone(),
            netns: self.netns_path(),
            ifname: self.ifname.clone(),
            args: cni::kubernetes_cni_args(
                &self.pod.namespace,
                &self.pod.name,
                &self.sandbox_id,
                &self.pod.uid,
            ),
            capability_args,
        }
    }
}

/// Creates and destroys sandboxes of one node.
#[derive(Clone, Debug)]
pub struct Sandboxes {
    pub cni: CniRuntime,
    pub netns_prefix: String,
    pub kubelet_dir: PathBuf,
    /// Sandbox setups hold it shared, a CNI GC exclusively, so GC's list of valid attachments
    /// is read while no ADD is in flight and names every attachment an ADD made. Without it a
    /// GC racing a burst of ADDs told the plugin that their attachments were stale, and the
    /// plugin rightly deleted their veths and released their addresses (containerd serialises
    /// its CNI GC with sandbox setup the same way).
    setup: std::sync::Arc<tokio::sync::RwLock<()>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SandboxError::Join(e.to_string()))
}

impl Sandboxes {
    pub fn new(cni: CniRuntime, netns_prefix: String, kubelet_dir: PathBuf) -> Self {
        Self {
            cni,
            netns_prefix,
            kubelet_dir,
            setup: std::sync::Arc::default(),
        }
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.kubelet_dir.join("pods")
    }

    pub fn pod_dir(&self, key: &PodKey) -> PathBuf {
        self.pods_dir().join(key.dir_name())
    }

    /// The record a new sandbox of `key` gets.
    pub fn plan(&self, key: &PodKey) -> SandboxRecord {
        SandboxRecord {
            pod: key.clone(),
            sandbox_id: sandbox_id(&key.uid),
            netns: netns_name(&self.netns_prefix, &key.uid),
            ifname: POD_IFNAME.into(),
            network: None,
            ips: Vec::new(),
            host_network: false,
        }
    }

    /// The "sandbox" of a host-network pod: just a record, so that it is adopted and cleaned up
    /// like any other. Needs no network readiness (CNI daemons run this way).
    pub fn create_host(
        &self,
        key: &PodKey,
        node_ip: IpAddr,
    ) -> Result<SandboxRecord, SandboxError> {
        let record = SandboxRecord {
            netns: String::new(),
            ips: vec![node_ip],
            host_network: true,
            ..self.plan(key)
        };
        self.write_record(&record)?;
        Ok(record)
    }

    pub fn write_record(&self, record: &SandboxRecord) -> Result<(), SandboxError> {
        let dir = self.pod_dir(&record.pod);
        let path = dir.join(RECORD_FILE);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            veilnet::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(record)?)
        };
        write().map_err(|source| SandboxError::Write {
            path: path.clone(),
            source,
        })
    }

    pub fn read_record(&self, key: &PodKey) -> Option<SandboxRecord> {
        read_record_file(&self.pod_dir(key).join(RECORD_FILE))
    }

    /// Creates the namespace and attaches it with an ADD of `list`. On failure everything done so
    /// far is undone (DEL, namespace removed), as containerd does before reporting the error.
    pub async fn create(
        &self,
        key: &PodKey,
        list: &NetworkConfigList,
        capability_args: Map<String, Value>,
    ) -> Result<SandboxRecord, SandboxError> {
        let _no_gc = self.setup.read().await;
        let mut record = self.plan(key);
        self.write_record(&record)?;
        let ns = record.netns.clone();
        blocking(move || netns::add(&ns))
            .await?
            .map_err(|source| SandboxError::CreateNetns {
                netns: record.netns.clone(),
                sandbox_id: record.sandbox_id.clone(),
                source,
            })?;
        let rt = record.runtime_conf(capability_args);
        match self.cni.add_network_list(list, &rt).await {
            Ok(result) => {
                record.network = Some(list.name.clone());
                record.ips = result.pod_ips();
                self.write_record(&record)?;
                Ok(record)
            }
            Err(source) => {
                let mut undone = true;
                if let Err(e) = self.cni.del_network_list(list, &rt).await {
                    tracing::warn!(pod = %key, error = %e, "DEL after failed ADD failed");
                    undone = false;
                }
                let ns = record.netns.clone();
                match blocking(move || netns::delete(&ns)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(pod = %key, error = %e, "removing netns after failed ADD failed");
                        undone = false;
                    }
                    Err(_) => undone = false,
                }
                // Fully undone: nothing is left to tear down. Otherwise the record stays, and the
                // pod's teardown retries the DEL (a pod then stays Terminating, as with a real
                // runtime whose DEL fails).
                if undone {
                    let _ = std::fs::remove_file(self.pod_dir(key).join(RECORD_FILE));
                }
                Err(SandboxError::SetupNetwork {
                    sandbox_id: record.sandbox_id,
                    source,
                })
            }
        }
    }

    /// CNI GC of `list`: every attachment a sandbox record names is valid (a record is written
    /// before its ADD and removed only once its attachment is undone), read while no ADD runs.
    pub async fn gc(&self, list: &NetworkConfigList) -> Result<(), CniError> {
        let _no_setup = self.setup.write().await;
        let valid: Vec<cni::Attachment> = self
            .discover()
            .into_iter()
            .filter(|r| !r.host_network)
            .map(|r| cni::Attachment {
                container_id: r.sandbox_id,
                ifname: r.ifname,
            })
            .collect();
        self.cni.gc(list, &valid).await
    }

    /// CHECK an existing attachment (used when adopting a sandbox after a restart).
    pub async fn check(
        &self,
        record: &SandboxRecord,
        list: &NetworkConfigList,
        capability_args: Map<String, Value>,
    ) -> Result<(), SandboxError> {
        if record.host_network {
            return Ok(());
        }
        let list = self
            .attachment_config(record)
            .unwrap_or_else(|| list.clone());
        self.cni
            .check_network_list(&list, &record.runtime_conf(capability_args))
            .await
            .map_err(|source| SandboxError::CheckNetwork {
                sandbox_id: record.sandbox_id.clone(),
                source,
            })
    }

    /// The config an attachment was made with, from the CNI cache.
    fn attachment_config(&self, record: &SandboxRecord) -> Option<NetworkConfigList> {
        let network = record.network.as_deref()?;
        self.cni
            .cached(network, &record.sandbox_id, &record.ifname)?
            .config_list()
            .ok()
    }

    /// Detaches (DEL) and removes the namespace. DEL runs even when the namespace is already gone,
    /// with the cached config when there is one (the conf dir may have changed since ADD), else
    /// with `current` (an ADD may have half-happened before a crash). Processes still inside the
    /// namespace are killed: they would keep the kernel namespace alive.
    pub async fn teardown(
        &self,
        record: &SandboxRecord,
        current: Option<&NetworkConfigList>,
    ) -> Result<(), SandboxError> {
        if record.host_network {
            return Ok(());
        }
        let ns = record.netns.clone();
        blocking(move || kill_netns_processes(&ns)).await?;
        let cached = self
            .cni
            .cached_attachments()
            .into_iter()
            .find(|c| c.container_id == record.sandbox_id && c.if_name == record.ifname);
        let list = match &cached {
            Some(c) => c.config_list().ok(),
            None => None,
        }
        .or_else(|| current.cloned());
        if let Some(list) = list {
            let rt = match &cached {
                Some(c) => {
                    let mut rt = c.runtime_conf();
                    rt.netns = record.netns_path();
                    rt
                }
                None => record.runtime_conf(Map::new()),
            };
            self.cni
                .del_network_list(&list, &rt)
                .await
                .map_err(|source| SandboxError::TeardownNetwork {
                    sandbox_id: record.sandbox_id.clone(),
                    source,
                })?;
        }
        let ns = record.netns.clone();
        blocking(move || {
            // Whatever the containers left behind (children outside their group) dies with the
            // sandbox instead of running on in a deleted namespace.
            kill_netns_processes(&ns);
            netns::delete(&ns)
        })
        .await?
        .map_err(|source| SandboxError::DeleteNetns {
            netns: record.netns.clone(),
            source,
        })?;
        Ok(())
    }

    /// Removes the pod's directory (logs, pid files, record).
    pub fn remove_pod_dir(&self, key: &PodKey) {
        let dir = self.pod_dir(key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "failed to remove pod dir");
            }
        }
    }

    /// Every sandbox recorded on disk.
    pub fn discover(&self) -> Vec<SandboxRecord> {
        let Ok(entries) = std::fs::read_dir(self.pods_dir()) else {
            return Vec::new();
        };
        let mut records: Vec<SandboxRecord> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| read_record_file(&e.path().join(RECORD_FILE)))
            .collect();
        records.sort_by(|a, b| a.pod.cmp(&b.pod));
        records
    }

    /// Namespaces with this node's pod prefix that no known sandbox owns.
    pub fn stray_netns(&self, known: &HashSet<String>) -> Vec<String> {
        netns::list()
            .into_iter()
            .filter(|n| n.starts_with(&self.netns_prefix) && !known.contains(n))
            .collect()
    }

    /// Cached attachments that no known sandbox owns (a crash between ADD and the record update).
    pub fn stray_attachments(&self, known_ids: &HashSet<String>) -> Vec<cni::CachedAttachment> {
        self.cni
            .cached_attachments()
            .into_iter()
            .filter(|c| !known_ids.contains(&c.container_id))
            .collect()
    }

    /// Removes a namespace nobody owns (killing what is left inside).
    pub async fn remove_stray_netns(&self, name: String) -> Result<(), SandboxError> {
        let ns = name.clone();
        blocking(move || {
            kill_netns_processes(&ns);
            netns::delete(&ns)
        })
        .await?
        .map_err(|source| SandboxError::DeleteNetns {
            netns: name,
            source,
        })
    }

    /// DEL of a cached attachment nobody owns.
    pub async fn remove_stray_attachment(
        &self,
        cached: &cni::CachedAttachment,
    ) -> Result<(), SandboxError> {
        let fail = |source| SandboxError::TeardownNetwork {
            sandbox_id: cached.container_id.clone(),
            source,
        };
        let list = cached.config_list().map_err(fail)?;
        self.cni
            .del_network_list(&list, &cached.runtime_conf())
            .await
            .map_err(fail)
    }
}

fn read_record_file(path: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable sandbox record");
            None
        }
    }
}

/// SIGKILLs every process left in the namespace (and waits briefly for them to go).
fn kill_netns_processes(name: &str) {
    // Through pidfds (netns::signal_members): a recycled PID is never hit.
    for _ in 0..20 {
        match netns::signal_members(name, libc::SIGKILL) {
            Ok(0) | Err(_) => return,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_id_is_stable_hex_and_starts_with_the_uuid() {
        let uid = "1a2b3c4d-0000-4000-8000-00000000abcd";
        let id = sandbox_id(uid);
        assert_eq!(id.len(), 64);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(id.starts_with("1a2b3c4d000040008000"));
        assert_eq!(id, sandbox_id(uid));
        assert_ne!(id, sandbox_id("1a2b3c4d-0000-4000-8000-00000000abce"));
        // Odd uids still give a valid id.
        let odd = sandbox_id("not/a uuid");
        assert_eq!(odd.len(), 64);
        assert!(odd.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(odd, sandbox_id("not/a uuid2"));
    }

    #[test]
    fn netns_names_are_short_and_valid() {
        let n = netns_name("lab.n1.p-", "1A2B3C4D-0000-4000-8000-00000000abcd");
        assert_eq!(n, "lab.n1.p-1a2b3c4d0000");
    }

    #[test]
    fn pod_dir_names_are_sanitized() {
        let key = PodKey {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: "a/b".into(),
        };
        assert_eq!(key.dir_name(), "default_web-0_a-b");
    }
}
