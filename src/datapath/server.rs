//! The datapath process's state: at most one WireGuard device, built and changed by the agent's
//! requests, and its configuration saved so that a restarted datapath resumes on its own.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::wg::{keys, PeerChanges, PeerConfig, WgConfig, WgDevice};

use super::protocol::{DeviceInfo, DeviceSpec, Info, Outcome, Reply, Request, PROTOCOL};
use super::DatapathError;

/// What is saved to the state file: enough to rebuild the device and its peers.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    device: DeviceSpec,
    peers: Vec<PeerConfig>,
}

struct Running {
    spec: DeviceSpec,
    device: WgDevice,
    peers: Vec<PeerConfig>,
}

pub struct Datapath {
    instance: String,
    started_at: u64,
    state_file: PathBuf,
    running: Option<Running>,
}

impl Datapath {
    pub fn new(state_file: PathBuf) -> Datapath {
        Datapath {
            instance: format!("{:016x}", rand::random::<u64>()),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            state_file,
            running: None,
        }
    }

    pub fn info(&self) -> Info {
        Info {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance: self.instance.clone(),
            pid: std::process::id(),
            started_at: self.started_at,
            device: self.running.as_ref().map(|r| DeviceInfo {
                tun_name: r.spec.tun_name.clone(),
                listen_port: r.device.listen_port(),
                mtu: r.spec.mtu,
                public_key: keys::encode_public(&r.device.public_key()),
                peers: r.peers.len(),
                offloads: r.device.offload_summary().to_string(),
                turn_age_ms: r.device.datapath_turn_age().as_millis() as u64,
            }),
        }
    }

    /// Serves one request. Failures become an error outcome: nothing a client sends can stop the
    /// datapath or its traffic.
    pub async fn handle(&mut self, req: Request) -> Outcome {
        tracing::debug!(?req, "request");
        let result = match req {
            Request::Hello => Ok(Reply::Info),
            Request::Configure { device } => self.configure(device).await.map(|()| Reply::Info),
            Request::SetPeers { peers } => self.set_peers(peers).map(Reply::PeerChanges),
            Request::Stats => self.running().map(|r| Reply::Stats {
                peers: r.device.stats(),
                device: r.device.device_stats(),
            }),
        };
        match result {
            Ok(reply) => Outcome::Ok(reply),
            Err(e) => {
                tracing::warn!(error = %e, "request refused");
                Outcome::Error(e.to_string())
            }
        }
    }

    fn running(&self) -> Result<&Running, DatapathError> {
        self.running.as_ref().ok_or(DatapathError::NotConfigured)
    }

    /// Builds the device, re-keys it in place (sessions re-handshake, the TUN and port stay), or
    /// rebuilds it when the TUN name, port or MTU changed (the TUN is persistent, so its routes
    /// survive; the peers are carried over).
    async fn configure(&mut self, spec: DeviceSpec) -> Result<(), DatapathError> {
        let key = spec.key().map_err(DatapathError::Key)?;
        if let Some(r) = self.running.as_mut() {
            let same_device = r.spec.tun_name == spec.tun_name
                && r.spec.listen_port == spec.listen_port
                && r.spec.mtu == spec.mtu;
            if same_device {
                if r.spec.private_key != spec.private_key {
                    r.device.set_private_key(key);
                    tracing::info!(public_key = %keys::encode_public(&r.device.public_key()), "private key replaced");
                }
                r.spec = spec;
                self.save();
                return Ok(());
            }
        }
        let peers = match self.running.take() {
            Some(old) => {
                tracing::info!(from = ?old.spec, to = ?spec, "rebuilding the device");
                old.device.shutdown().await;
                old.peers
            }
            None => Vec::new(),
        };
        let mut cfg = WgConfig::new(spec.tun_name.clone(), key, spec.mtu);
        cfg.listen_port = spec.listen_port;
        // The TUN and its routes outlive this process: a restarted datapath re-attaches instead
        // of making the agent rebuild routes.
        cfg.persistent = true;
        let device = WgDevice::start(cfg).await?;
        if !peers.is_empty() {
            if let Err(e) = device.set_peers(peers.clone()) {
                tracing::warn!(error = %e, "the previous peers do not fit the rebuilt device");
            }
        }
        self.running = Some(Running {
            spec,
            device,
            peers,
        });
        self.save();
        Ok(())
    }

    fn set_peers(&mut self, peers: Vec<PeerConfig>) -> Result<PeerChanges, DatapathError> {
        let r = self.running.as_mut().ok_or(DatapathError::NotConfigured)?;
        let changes = r.device.set_peers(peers.clone())?;
        r.peers = peers;
        if !changes.is_empty() {
            tracing::info!(
                added = changes.added.len(),
                removed = changes.removed.len(),
                updated = changes.updated.len(),
                unchanged = changes.unchanged,
                "peers updated"
            );
        }
        self.save();
        Ok(changes)
    }

    /// Saves the configuration (0600: it holds the private key). A failure is logged, not
    /// returned: the device works; only a restart of this process would need the agent again.
    fn save(&self) {
        let Some(r) = &self.running else { return };
        let saved = Saved {
            device: r.spec.clone(),
            peers: r.peers.clone(),
        };
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|body| crate::fsutil::write_private(&self.state_file, &body));
        if let Err(e) = result {
            tracing::warn!(file = %self.state_file.display(), error = %e, "could not save the datapath configuration");
        }
    }

    /// Rebuilds the device from the state file, if there is one: traffic resumes after a datapath
    /// restart even while no agent runs. A missing file is normal (first start); an unreadable
    /// one is logged and ignored (the agent configures us again).
    pub async fn restore(&mut self) {
        let body = match std::fs::read(&self.state_file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %self.state_file.display(), error = %e, "cannot read the saved configuration; waiting for the agent");
                return;
            }
        };
        let saved: Saved = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %self.state_file.display(), error = %e, "saved configuration is malformed; waiting for the agent");
                return;
            }
        };
        let peers = saved.peers.len();
        if let Err(e) = self.configure(saved.device).await {
            tracing::warn!(error = %e, "restoring the saved device failed; waiting for the agent");
            return;
        }
        match self.set_peers(saved.peers) {
            Ok(_) => tracing::info!(peers, "restored the saved device and peers"),
            Err(e) => tracing::warn!(error = %e, "restoring the saved peers failed"),
        }
    }

    /// Stops the device; the persistent TUN stays for the next start.
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.device.shutdown().await;
        }
    }
}
