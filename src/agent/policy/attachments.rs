//! The pods the CNI plugin attached on this node, as it reported them at ADD: host veth, MAC and
//! IP per pod. The API has neither the veth nor the MAC, and shows the IP only after the kubelet
//! reports it, so this registry is the agent's source for anti-spoofing and for programming a pod
//! before its IP reaches the API.
//!
//! Each attachment is also a file `<runDir>/attachments/<containerID>-<ifname>.json`, so an agent
//! restart keeps every running pod's anti-spoofing entry (and with it the pod's connectivity, since
//! unknown `veil*` ports are dropped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use veilnet_cni::agent_protocol::PodAttachment;
use veilnet_cni::env::{validate_container_id, validate_ifname};
use veilnet_cni::HOST_VETH_PREFIX;

use crate::policy::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("invalid attachment: {0}")]
    Invalid(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks what the plugin sent before the agent acts on it (the socket is root-only, but a
/// malformed report must never reach the ruleset).
pub fn validate(a: &PodAttachment) -> Result<MacAddr, AttachmentError> {
    let bad = |m: String| Err(AttachmentError::Invalid(m));
    if let Err(e) = validate_container_id(&a.container_id) {
        return bad(format!("container id {:?} {e}", a.container_id));
    }
    if let Err(e) = validate_ifname(&a.ifname) {
        return bad(format!("ifname {:?} {e}", a.ifname));
    }
    if validate_ifname(&a.host_veth).is_err()
        || !a.host_veth.starts_with(HOST_VETH_PREFIX)
        || !a
            .host_veth
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad(format!("host veth {:?} is not a veilnet veth", a.host_veth));
    }
    if a.namespace.is_empty() || a.name.is_empty() || a.namespace.len() > 253 || a.name.len() > 253
    {
        return bad(format!("pod {:?}/{:?}", a.namespace, a.name));
    }
    if a.ips.is_empty() {
        return bad("no IP".into());
    }
    a.mac
        .parse::<MacAddr>()
        .map_err(|e| AttachmentError::Invalid(e.to_string()))
}

/// The registry, in memory and (optionally) on disk.
#[derive(Debug, Default)]
pub struct Attachments {
    dir: Option<PathBuf>,
    /// (container id, ifname) → (insertion sequence, attachment).
    entries: BTreeMap<(String, String), (u64, PodAttachment)>,
    seq: u64,
}

impl Attachments {
    /// An in-memory registry (tests, benchmarks).
    pub fn in_memory() -> Self {
        Attachments::default()
    }

    /// Loads every valid record of `dir`; unreadable ones are reported and removed.
    pub fn load(dir: &Path) -> (Self, Vec<String>) {
        let mut me = Attachments {
            dir: Some(dir.to_path_buf()),
            ..Default::default()
        };
        let mut problems = Vec::new();
        let Ok(read) = std::fs::read_dir(dir) else {
            return (me, problems);
        };
        let mut records: Vec<(std::time::SystemTime, PodAttachment)> = Vec::new();
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<PodAttachment>(&b).map_err(|e| e.to_string())
                })
                .and_then(|a| validate(&a).map(|_| a).map_err(|e| e.to_string()));
            match parsed {
                Ok(a) => {
                    let mtime = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    records.push((mtime, a));
                }
                Err(e) => {
                    problems.push(format!("{}: {e}; removed", path.display()));
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Oldest first, so that `for_pod` prefers the newest attachment of a pod.
        records.sort_by_key(|(t, _)| *t);
        for (_, a) in records {
            me.insert_memory(a);
        }
        (me, problems)
    }

    fn file_of(&self, container_id: &str, ifname: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{container_id}-{ifname}.json")))
    }

    fn insert_memory(&mut self, a: PodAttachment) {
        self.seq += 1;
        self.entries
            .insert((a.container_id.clone(), a.ifname.clone()), (self.seq, a));
    }

    /// Records (and persists) `a`, replacing older attachments of the same pod interface, which a
    /// new sandbox supersedes. Returns the container ids it replaced.
    pub fn insert(&mut self, a: PodAttachment) -> Result<Vec<String>, AttachmentError> {
        validate(&a)?;
        let superseded: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(k, (_, old))| {
                old.namespace == a.namespace
                    && old.name == a.name
                    && old.ifname == a.ifname
                    && k.0 != a.container_id
            })
            .map(|(k, _)| k.clone())
            .collect();
        if let Some(path) = self.file_of(&a.container_id, &a.ifname) {
            write_atomic(&path, &a)?;
        }
        for (cid, ifname) in &superseded {
            self.remove(cid, ifname);
        }
        self.insert_memory(a);
        Ok(superseded.into_iter().map(|(c, _)| c).collect())
    }

    /// Forgets an attachment (and its file). Returns whether it existed.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> bool {
        if let Some(path) = self.file_of(container_id, ifname) {
            let _ = std::fs::remove_file(path);
        }
        self.entries
            .remove(&(container_id.to_string(), ifname.to_string()))
            .is_some()
    }

    /// Keeps the attachments for which `keep` holds; returns the removed ones.
    pub fn retain(&mut self, mut keep: impl FnMut(&PodAttachment) -> bool) -> Vec<PodAttachment> {
        let gone: Vec<PodAttachment> = self
            .entries
            .values()
            .filter(|(_, a)| !keep(a))
            .map(|(_, a)| a.clone())
            .collect();
        for a in &gone {
            self.remove(&a.container_id, &a.ifname);
        }
        gone
    }

    /// The newest attachment of pod `namespace/name` (its `eth0`-like first interface).
    pub fn for_pod(&self, namespace: &str, name: &str) -> Option<&PodAttachment> {
        self.entries
            .values()
            .filter(|(_, a)| a.namespace == namespace && a.name == name)
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, a)| a)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PodAttachment> {
        self.entries.values().map(|(_, a)| a)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn write_atomic(path: &Path, a: &PodAttachment) -> Result<(), AttachmentError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| AttachmentError::Io { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create directory"))?;
    }
    let body = serde_json::to_vec(a).map_err(|e| io("encode")(std::io::Error::other(e)))?;
    crate::fsutil::write_atomic(path, &body).map_err(io("write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn att(cid: &str, ns: &str, name: &str, ip: &str) -> PodAttachment {
        PodAttachment {
            container_id: cid.into(),
            ifname: "eth0".into(),
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            ips: vec![ip.parse().unwrap()],
            mac: "0a:58:0a:f4:01:05".into(),
            host_veth: format!("veil{cid:0>11}"),
        }
    }

    #[test]
    fn validation_rejects_what_could_reach_the_ruleset_wrongly() {
        assert!(validate(&att("c1", "x", "a", "10.0.0.1")).is_ok());
        let mut a = att("c1", "x", "a", "10.0.0.1");
        a.host_veth = "eth0".into();
        assert!(validate(&a).is_err());
        let mut a = att("c1", "x", "a", "10.0.0.1");
        a.host_veth = "veil\"; drop".into();
        assert!(validate(&a).is_err());
        let mut a = att("c1", "x", "a", "10.0.0.1");
        a.mac = "zz".into();
        assert!(validate(&a).is_err());
        let mut a = att("c1", "x", "a", "10.0.0.1");
        a.ips.clear();
        assert!(validate(&a).is_err());
        let mut a = att("c1", "", "a", "10.0.0.1");
        a.container_id = "../etc".into();
        assert!(validate(&a).is_err());
    }

    #[test]
    fn newer_sandbox_supersedes_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reg, problems) = Attachments::load(dir.path());
        assert!(problems.is_empty() && reg.is_empty());
        reg.insert(att("c1", "x", "a", "10.0.0.1")).unwrap();
        reg.insert(att("c2", "x", "b", "10.0.0.2")).unwrap();
        let replaced = reg.insert(att("c3", "x", "a", "10.0.0.3")).unwrap();
        assert_eq!(replaced, vec!["c1".to_string()]);
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.for_pod("x", "a").unwrap().container_id, "c3");
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();

        let (mut again, problems) = Attachments::load(dir.path());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(!dir.path().join("junk.json").exists());
        assert_eq!(again.len(), 2);
        assert_eq!(
            again.for_pod("x", "a").unwrap().ips[0].to_string(),
            "10.0.0.3"
        );
        let gone = again.retain(|a| a.name != "b");
        assert_eq!(gone.len(), 1);
        assert!(again.for_pod("x", "b").is_none());
        assert_eq!(Attachments::load(dir.path()).0.len(), 1);
    }
}
