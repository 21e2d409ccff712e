//! The node state file: the agent's hand-off to the plugin (`<runDir>/node-state.json`).
//!
//! The agent owns the node's pod CIDRs, bridge and MTU; the plugin only reads them. The file is
//! replaced atomically (temp file, fsync, rename, fsync of the directory) so the plugin never sees
//! a half-written state, even when the agent crashes mid-write.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// The file name under `runDir`.
pub const NODE_STATE_FILE: &str = "node-state.json";

/// The format version this build writes and understands. Bump on incompatible changes.
pub const NODE_STATE_VERSION: u32 = 1;

/// What the agent tells the plugin about this node. Unknown keys are ignored on load, so the
/// agent may add fields without breaking older plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Format version, [`NODE_STATE_VERSION`].
    pub version: u32,
    /// The Kubernetes node name.
    pub node_name: String,
    /// The node's pod CIDRs (`spec.podCIDRs`), e.g. `["10.244.1.0/24"]`.
    pub pod_cidrs: Vec<IpNet>,
    /// The bridge address of each pod CIDR, same order as `pod_cidrs` (usually its first host).
    pub gateways: Vec<IpAddr>,
    /// The bridge pods attach to; the agent creates it with the gateway addresses.
    pub bridge: String,
    /// The MTU for pod interfaces (already reduced by the overlay/encryption overhead).
    pub mtu: u32,
    /// False while the agent is still setting the node up; the plugin refuses ADD until true.
    pub ready: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("node state file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state file {path} is malformed: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("node state file {path} has format version {found}, this plugin understands {NODE_STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

impl NodeState {
    /// The path of the state file under `run_dir`.
    pub fn path_in(run_dir: &Path) -> PathBuf {
        run_dir.join(NODE_STATE_FILE)
    }

    /// Replaces the file at `path` atomically and durably; creates the parent directory.
    pub fn write_atomic(&self, path: &Path) -> Result<(), NodeStateError> {
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| NodeStateError::Io {
                op,
                path: p,
                source,
            }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let mut body =
            serde_json::to_vec_pretty(self).map_err(|source| NodeStateError::Decode {
                path: path.to_path_buf(),
                source,
            })?;
        body.push(b'\n');
        crate::fsutil::write_atomic(path, &body, crate::fsutil::WriteOptions::DURABLE)
            .map_err(io("write", path))
    }

    /// Reads and validates the file. A missing file is [`NodeStateError::NotFound`], so callers
    /// can tell "agent not started yet" from real failures.
    pub fn load(path: &Path) -> Result<NodeState, NodeStateError> {
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NodeStateError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                NodeStateError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let state: NodeState =
            serde_json::from_slice(&bytes).map_err(|source| NodeStateError::Decode {
                path: path.to_path_buf(),
                source,
            })?;
        if state.version != NODE_STATE_VERSION {
            return Err(NodeStateError::Version {
                path: path.to_path_buf(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// The first IPv4 pod CIDR and its gateway (the matching `gateways` entry, or the CIDR's
    /// first host when the agent gave none).
    pub fn ipv4_network(&self) -> Option<(Ipv4Net, Ipv4Addr)> {
        self.pod_cidrs
            .iter()
            .enumerate()
            .find_map(|(i, cidr)| match cidr {
                IpNet::V4(net) => {
                    let gw = match self.gateways.get(i) {
                        Some(IpAddr::V4(gw)) => *gw,
                        _ => first_host(*net)?,
                    };
                    Some((net.trunc(), gw))
                }
                IpNet::V6(_) => None,
            })
    }
}

/// The first usable address of `net` (`None` for /31 and /32, which have no network address).
pub fn first_host(net: Ipv4Net) -> Option<Ipv4Addr> {
    if net.prefix_len() >= 31 {
        return None;
    }
    let n = u32::from(net.network()).checked_add(1)?;
    Some(Ipv4Addr::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState {
            version: NODE_STATE_VERSION,
            node_name: "n1".into(),
            pod_cidrs: vec![
                "fd00:10::/64".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap(),
            ],
            gateways: vec!["fd00:10::1".parse().unwrap(), "10.244.1.1".parse().unwrap()],
            bridge: "veilbr0".into(),
            mtu: 1420,
            ready: true,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = NodeState::path_in(&dir.path().join("run"));
        state().write_atomic(&path).unwrap();
        assert_eq!(NodeState::load(&path).unwrap(), state());
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(NODE_STATE_FILE)]);
    }

    #[test]
    fn json_keys_are_camel_case() {
        let v = serde_json::to_value(state()).unwrap();
        for key in [
            "version", "nodeName", "podCidrs", "gateways", "bridge", "mtu", "ready",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn overwrite_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_STATE_FILE);
        state().write_atomic(&path).unwrap();
        let mut s = state();
        s.ready = false;
        s.mtu = 1380;
        s.write_atomic(&path).unwrap();
        assert_eq!(NodeState::load(&path).unwrap(), s);
    }

    #[test]
    fn load_errors_are_distinguished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_STATE_FILE);
        assert!(matches!(
            NodeState::load(&path),
            Err(NodeStateError::NotFound { .. })
        ));
        fs::write(&path, b"{\"version\": 1, \"nodeName\": ").unwrap();
        assert!(matches!(
            NodeState::load(&path),
            Err(NodeStateError::Decode { .. })
        ));
        let mut v = serde_json::to_value(state()).unwrap();
        v["version"] = 99.into();
        v["futureKey"] = "ignored".into();
        fs::write(&path, v.to_string()).unwrap();
        assert!(matches!(
            NodeState::load(&path),
            Err(NodeStateError::Version { found: 99, .. })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_STATE_FILE);
        let mut v = serde_json::to_value(state()).unwrap();
        v["futureKey"] = "ignored".into();
        fs::write(&path, v.to_string()).unwrap();
        assert_eq!(NodeState::load(&path).unwrap(), state());
    }

    #[test]
    fn picks_ipv4_network() {
        let (net, gw) = state().ipv4_network().unwrap();
        assert_eq!(net, "10.244.1.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(gw, Ipv4Addr::new(10, 244, 1, 1));
        let mut s = state();
        s.gateways.clear();
        assert_eq!(s.ipv4_network().unwrap().1, Ipv4Addr::new(10, 244, 1, 1));
        s.pod_cidrs.truncate(1);
        assert_eq!(s.ipv4_network(), None);
    }
}
