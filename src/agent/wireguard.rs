//! The agent's side of encryption: this node's key (persisted, rotatable), its userspace WireGuard
//! device, and the peer set derived from the path plan.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::model::encryption::{Path as PeerPathKind, PeerPath};
use crate::wg::{self, keys, PeerChanges, PeerConfig, PeerStats, PublicKey, WgConfig, WgDevice};

/// Name of the WireGuard TUN device on every node.
pub const TUN_NAME: &str = "veilwg0";

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("WireGuard key {path}: {source}")]
    Key {
        path: PathBuf,
        source: keys::KeyError,
    },
    #[error("WireGuard device: {0}")]
    Device(#[from] wg::WgError),
    #[error("rotation marker {path}: {source}")]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct WireGuard {
    device: WgDevice,
    key_path: PathBuf,
    public: PublicKey,
    rotation_marker: PathBuf,
}

/// `<state dir>/wireguard/private.key`: persistent (not tmpfs), so a reboot keeps the key.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("wireguard").join("private.key")
}

impl WireGuard {
    /// Loads (or creates, mode 0600) the node's key and starts the device. Call inside the node's
    /// network namespace (the agent runs there).
    pub async fn start(state_dir: &Path, port: u16, mtu: u32) -> Result<Self, WireGuardError> {
        let key_path = key_path(state_dir);
        let private = keys::load_or_create(&key_path).map_err(|source| WireGuardError::Key {
            path: key_path.clone(),
            source,
        })?;
        let public = keys::public_key(&private);
        let device = WgDevice::start(WgConfig {
            tun_name: TUN_NAME.into(),
            listen_port: port,
            private_key: private,
            mtu,
            fwmark: None,
            // The TUN (and the routes on it) outlive the agent: a restart or upgrade re-attaches
            // and re-handshakes instead of dropping every encrypted flow.
            persistent: true,
            busy_poll: wg::DEFAULT_BUSY_POLL,
        })
        .await?;
        Ok(Self {
            device,
            rotation_marker: key_path.with_file_name("rotation-handled"),
            key_path,
            public,
        })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }
    pub fn public_key_b64(&self) -> String {
        keys::encode_public(&self.public)
    }
    pub fn fingerprint(&self) -> String {
        keys::fingerprint(&self.public)
    }
    pub fn stats(&self) -> Vec<PeerStats> {
        self.device.stats()
    }

    /// Sets exactly the peers whose path is WireGuard, each allowed only its cluster-recorded CIDRs.
    pub fn set_peers(
        &self,
        paths: &[PeerPath],
        cidrs: &dyn Fn(&str) -> Vec<IpNet>,
    ) -> Result<PeerChanges, WireGuardError> {
        let peers = wireguard_peers(paths, cidrs);
        Ok(self.device.set_peers(peers)?)
    }

    /// Rotates the key when `request` (the value of the rotation annotation) was not handled yet.
    /// Returns true when the key changed.
    pub fn rotate_if_requested(&mut self, request: Option<&str>) -> Result<bool, WireGuardError> {
        let Some(request) = request else {
            return Ok(false);
        };
        let handled = std::fs::read_to_string(&self.rotation_marker).unwrap_or_default();
        if handled.trim() == request.trim() {
            return Ok(false);
        }
        let private = keys::generate();
        keys::write_atomic(&self.key_path, &private).map_err(|source| WireGuardError::Key {
            path: self.key_path.clone(),
            source,
        })?;
        self.public = keys::public_key(&private);
        self.device.set_private_key(private);
        std::fs::write(&self.rotation_marker, request.trim()).map_err(|source| {
            WireGuardError::Marker {
                path: self.rotation_marker.clone(),
                source,
            }
        })?;
        Ok(true)
    }
}

/// The WireGuard peer set of a path plan (pure).
pub fn wireguard_peers(paths: &[PeerPath], cidrs: &dyn Fn(&str) -> Vec<IpNet>) -> Vec<PeerConfig> {
    paths
        .iter()
        .filter_map(|p| match &p.path {
            PeerPathKind::Wireguard {
                public_key,
                endpoint,
            } => Some(peer_config(*public_key, *endpoint, cidrs(&p.node))),
            _ => None,
        })
        .filter(|p| !p.allowed_ips.is_empty())
        .collect()
}

fn peer_config(key: [u8; 32], endpoint: SocketAddr, allowed_ips: Vec<IpNet>) -> PeerConfig {
    PeerConfig {
        public_key: PublicKey::from(key),
        endpoint,
        allowed_ips,
        persistent_keepalive: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::encryption::{BlockReason, Mode};

    #[test]
    fn only_wireguard_paths_with_cidrs_become_peers() {
        let paths = vec![
            PeerPath {
                node: "a".into(),
                mode: Some(Mode::On),
                path: PeerPathKind::Wireguard {
                    public_key: [1; 32],
                    endpoint: "172.30.0.12:51820".parse().unwrap(),
                },
            },
            PeerPath {
                node: "b".into(),
                mode: Some(Mode::Off),
                path: PeerPathKind::Vxlan,
            },
            PeerPath {
                node: "c".into(),
                mode: Some(Mode::Off),
                path: PeerPathKind::Blocked(BlockReason::WeAreStrict),
            },
            PeerPath {
                node: "d".into(),
                mode: Some(Mode::On),
                path: PeerPathKind::Wireguard {
                    public_key: [4; 32],
                    endpoint: "172.30.0.14:51820".parse().unwrap(),
                },
            },
        ];
        let cidrs = |n: &str| match n {
            "a" => vec!["10.244.2.0/24".parse().unwrap()],
            _ => vec![],
        };
        let peers = wireguard_peers(&paths, &cidrs);
        assert_eq!(
            peers.len(),
            1,
            "d has no recorded CIDR, so it gets no peer entry"
        );
        assert_eq!(peers[0].public_key, PublicKey::from([1u8; 32]));
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn rotation_is_handled_once_per_request_and_persists_the_key() {
        // Exercised without a device: the marker and key-file logic only.
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let k1 = keys::load_or_create(&path).unwrap();
        let k2 = keys::load_or_create(&path).unwrap();
        assert_eq!(
            keys::public_key(&k1),
            keys::public_key(&k2),
            "the key survives a restart"
        );
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
