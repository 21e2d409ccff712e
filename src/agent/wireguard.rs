//! The agent's side of encryption: this node's key (persisted, rotatable), the desired peer set
//! derived from the path plan, and the link to the datapath process that runs the WireGuard
//! device (`crate::datapath`).
//!
//! The agent is the only writer of the datapath's configuration, and it re-sends all of it
//! whenever it finds the datapath without it (first start, a datapath restart without its saved
//! state): every response carries the datapath's identity and device, so that costs no extra
//! polling.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::datapath::client::{ClientError, Datapath, DatapathClient};
use crate::datapath::protocol::{DeviceSpec, Info, Outcome, Reply, Request};
use crate::model::encryption::{Path as PeerPathKind, PeerPath};
use crate::wg::{keys, DeviceStats, PeerChanges, PeerConfig, PeerStats, PublicKey};

/// Name of the WireGuard TUN device on every node.
pub const TUN_NAME: &str = "veilwg0";

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("WireGuard key {path}: {source}")]
    Key {
        path: PathBuf,
        source: keys::KeyError,
    },
    #[error(transparent)]
    Datapath(#[from] ClientError),
    #[error("the datapath refused {what}: {message}")]
    Refused { what: &'static str, message: String },
    #[error("the datapath answered {what} with an unexpected reply")]
    UnexpectedReply { what: &'static str },
    #[error("rotation marker {path}: {source}")]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the agent last learned about its datapath (for `veilnet status` and metrics).
#[derive(Debug, Clone, Default)]
pub struct DatapathView {
    pub info: Option<Info>,
    /// The last call's failure; `None` after a successful call.
    pub error: Option<String>,
}

pub struct WireGuard<D = DatapathClient> {
    client: D,
    spec: DeviceSpec,
    key_path: PathBuf,
    public: PublicKey,
    rotation_marker: PathBuf,
    /// The last peer set asked for, sent again to a datapath that lost it.
    peers: Option<Vec<PeerConfig>>,
    /// The peer set the datapath last took: an unchanged set is not sent again.
    sent: Option<Vec<PeerConfig>>,
    stats: Vec<PeerStats>,
    device_stats: DeviceStats,
    view: DatapathView,
    /// Why the last requested rotation failed (the node keeps its current key), until a
    /// rotation succeeds or the request is withdrawn.
    rotation_error: Option<String>,
    /// A request this key already rotated for whose marker the disk refused: remembered here so
    /// the key is not rotated again on every pass, and the marker written once the disk allows.
    handled_unsaved: Option<String>,
}

/// `<state dir>/wireguard/private.key`: persistent (not tmpfs), so a reboot keeps the key.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("wireguard").join("private.key")
}

impl WireGuard<DatapathClient> {
    /// Loads (or creates, mode 0600) the node's key, then waits until the datapath at `socket`
    /// answers and runs a device with this key, port and MTU. A datapath that already does (the
    /// agent restarted) is left alone: its sessions and traffic carry on.
    pub async fn start(
        state_dir: &Path,
        socket: &Path,
        port: u16,
        mtu: u32,
    ) -> Result<Self, WireGuardError> {
        let mut wg = WireGuard::with_client(DatapathClient::new(socket), state_dir, port, mtu)?;
        // Unreachable, or refusing the device (e.g. the TUN is still held by an agent of the
        // release before the datapath split, during that upgrade): both pass, so keep trying.
        let mut attempts: u64 = 0;
        loop {
            match wg.request("hello", Request::Hello).await {
                Ok(_) => return Ok(wg),
                Err(e) => {
                    if attempts % 10 == 0 {
                        tracing::warn!(error = %e, "waiting for the datapath (the veilnet-datapath DaemonSet; `veilnet datapath --run-dir` outside Kubernetes)");
                    }
                    attempts += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl<D: Datapath> WireGuard<D> {
    /// Loads (or creates, mode 0600) the node's key; nothing is sent to `client` yet.
    pub fn with_client(
        client: D,
        state_dir: &Path,
        port: u16,
        mtu: u32,
    ) -> Result<Self, WireGuardError> {
        let key_path = key_path(state_dir);
        let private = keys::load_or_create(&key_path).map_err(|source| WireGuardError::Key {
            path: key_path.clone(),
            source,
        })?;
        Ok(WireGuard {
            client,
            spec: DeviceSpec::new(TUN_NAME, port, mtu, &private),
            public: keys::public_key(&private),
            rotation_marker: key_path.with_file_name("rotation-handled"),
            key_path,
            peers: None,
            sent: None,
            stats: Vec::new(),
            device_stats: DeviceStats::default(),
            view: DatapathView::default(),
            rotation_error: None,
            handled_unsaved: None,
        })
    }
}

impl<D> WireGuard<D> {
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }
    pub fn public_key_b64(&self) -> String {
        keys::encode_public(&self.public)
    }
    pub fn fingerprint(&self) -> String {
        keys::fingerprint(&self.public)
    }
    /// Per-peer statistics as of the last [`WireGuard::refresh`].
    pub fn stats(&self) -> &[PeerStats] {
        &self.stats
    }
    /// The datapath's device-wide counters as of the last [`WireGuard::refresh`].
    pub fn device_stats(&self) -> &DeviceStats {
        &self.device_stats
    }
    pub fn datapath(&self) -> &DatapathView {
        &self.view
    }
    /// Why the requested key rotation has not happened (see [`WireGuard::rotate_if_requested`]).
    pub fn rotation_error(&self) -> Option<&str> {
        self.rotation_error.as_deref()
    }
    /// A requested rotation (or its marker) is still to be done: worth another try soon.
    pub fn rotation_pending(&self) -> bool {
        self.rotation_error.is_some() || self.handled_unsaved.is_some()
    }
}

impl<D: Datapath> WireGuard<D> {
    /// Sets exactly these peers (see [`wireguard_peers`]). A set the datapath already took is
    /// not sent again (`None`; a datapath that lost it gets it back on the next call that
    /// notices).
    pub async fn set_peers(
        &mut self,
        peers: &[PeerConfig],
    ) -> Result<Option<PeerChanges>, WireGuardError> {
        self.peers = Some(peers.to_vec());
        if self.sent.as_deref() == Some(peers) {
            return Ok(None);
        }
        let reply = self
            .request(
                "the peer set",
                Request::SetPeers {
                    peers: peers.to_vec(),
                },
            )
            .await?;
        match reply {
            Reply::PeerChanges(changes) => {
                self.sent = Some(peers.to_vec());
                Ok(Some(changes))
            }
            _ => Err(WireGuardError::UnexpectedReply {
                what: "the peer set",
            }),
        }
    }

    /// Reads the datapath's counters (and so notices a restart of it, and reconfigures it).
    pub async fn refresh(&mut self) -> Result<(), WireGuardError> {
        match self.request("statistics", Request::Stats).await? {
            Reply::Stats { peers, device } => {
                self.stats = peers;
                self.device_stats = device;
                Ok(())
            }
            _ => Err(WireGuardError::UnexpectedReply { what: "statistics" }),
        }
    }

    /// Rotates the key when `request` (the value of the rotation annotation) was not handled yet.
    /// Returns true when the key changed. On failure (the state dir full or read-only, the
    /// datapath away) the error is also kept for `veilnet status` until a rotation succeeds; the
    /// request stays unhandled, so the next call tries again.
    pub async fn rotate_if_requested(
        &mut self,
        request: Option<&str>,
    ) -> Result<bool, WireGuardError> {
        let result = self.rotate_inner(request).await;
        self.rotation_error = result.as_ref().err().map(ToString::to_string);
        result
    }

    async fn rotate_inner(&mut self, request: Option<&str>) -> Result<bool, WireGuardError> {
        let Some(request) = request.map(str::trim) else {
            return Ok(false);
        };
        if let Some(unsaved) = self.handled_unsaved.take() {
            if unsaved == request {
                if let Err(e) = self.save_marker(request) {
                    self.handled_unsaved = Some(unsaved);
                    return Err(e);
                }
                return Ok(false);
            }
        }
        let handled = std::fs::read_to_string(&self.rotation_marker).unwrap_or_default();
        if handled.trim() == request {
            return Ok(false);
        }
        let private = keys::generate();
        // The new key reaches the disk before anything uses it: a key the disk refused is never
        // published, so a restart cannot bring back a key the peers no longer know.
        keys::write_atomic(&self.key_path, &private).map_err(|source| WireGuardError::Key {
            path: self.key_path.clone(),
            source,
        })?;
        self.public = keys::public_key(&private);
        self.spec = DeviceSpec::new(TUN_NAME, self.spec.listen_port, self.spec.mtu, &private);
        self.request("the new key", Request::Hello).await?;
        if let Err(e) = self.save_marker(request) {
            // The key did rotate; only the record of it is missing (retried on the next call).
            tracing::warn!(error = %e, "the WireGuard key rotated, but its marker could not be written");
            self.handled_unsaved = Some(request.to_string());
        }
        Ok(true)
    }

    fn save_marker(&self, request: &str) -> Result<(), WireGuardError> {
        crate::fsutil::write_atomic(&self.rotation_marker, request.as_bytes()).map_err(|source| {
            WireGuardError::Marker {
                path: self.rotation_marker.clone(),
                source,
            }
        })
    }

    /// Sends `req`, first bringing the datapath up to date when its answer shows it lacks our
    /// device (or runs an old key, port or MTU), or that it restarted.
    async fn request(&mut self, what: &'static str, req: Request) -> Result<Reply, WireGuardError> {
        let result = self.request_inner(what, req).await;
        if let Err(e) = &result {
            self.view.error = Some(e.to_string());
        }
        result
    }

    async fn request_inner(
        &mut self,
        what: &'static str,
        req: Request,
    ) -> Result<Reply, WireGuardError> {
        let mut resp = self.client.call(&req).await?;
        let restarted = self
            .view
            .info
            .as_ref()
            .is_some_and(|old| old.instance != resp.info.instance);
        let stale = !resp
            .info
            .device
            .as_ref()
            .is_some_and(|d| self.spec.matches(d));
        if stale || restarted {
            if restarted {
                tracing::warn!(pid = resp.info.pid, instance = %resp.info.instance, "the datapath restarted");
            }
            self.push_everything(stale).await?;
            resp = self.client.call(&req).await?;
        }
        self.view = DatapathView {
            info: Some(resp.info),
            error: None,
        };
        match resp.outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Error(message) => Err(WireGuardError::Refused { what, message }),
        }
    }

    /// Configures the device (when `device` is set) and the last peer set.
    async fn push_everything(&mut self, device: bool) -> Result<(), WireGuardError> {
        if device {
            let resp = self
                .client
                .call(&Request::Configure {
                    device: self.spec.clone(),
                })
                .await?;
            if let Outcome::Error(message) = resp.outcome {
                return Err(WireGuardError::Refused {
                    what: "the device",
                    message,
                });
            }
            tracing::info!(pid = resp.info.pid, instance = %resp.info.instance, port = self.spec.listen_port, mtu = self.spec.mtu, "datapath configured");
        }
        self.sent = None;
        if let Some(peers) = self.peers.clone() {
            let resp = self
                .client
                .call(&Request::SetPeers {
                    peers: peers.clone(),
                })
                .await?;
            if let Outcome::Error(message) = resp.outcome {
                return Err(WireGuardError::Refused {
                    what: "the peer set",
                    message,
                });
            }
            tracing::info!(peers = peers.len(), "peer set sent again to the datapath");
            self.sent = Some(peers);
        }
        Ok(())
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
                refused_downgrade: false,
            },
            PeerPath {
                node: "b".into(),
                mode: Some(Mode::Off),
                path: PeerPathKind::Vxlan,
                refused_downgrade: false,
            },
            PeerPath {
                node: "c".into(),
                mode: Some(Mode::Off),
                path: PeerPathKind::Blocked(BlockReason::WeAreStrict),
                refused_downgrade: false,
            },
            PeerPath {
                node: "d".into(),
                mode: Some(Mode::On),
                path: PeerPathKind::Wireguard {
                    public_key: [4; 32],
                    endpoint: "172.30.0.14:51820".parse().unwrap(),
                },
                refused_downgrade: false,
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
