//! What the agent hands the CNI plugin: the node state file (pod CIDR, gateway, bridge, MTU) and the
//! network configuration list in the CNI conf dir. The conflist is installed only once the node's
//! dataplane is in place, so the runtime reports the node NotReady until then (as with every CNI).

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use veilnet_cni::NodeState;

use crate::model::overlay::{gateway_address, DesiredOverlay};

/// File name of veilnet's network configuration list. The `10-` prefix makes it sort before most
/// others, since the runtime uses the lexically first file.
pub const CONFLIST_NAME: &str = "10-veilnet.conflist";
/// The network's name (also the IPAM store's directory name).
pub const NETWORK_NAME: &str = "veilnet";

#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the node state: {0}")]
    NodeState(#[from] veilnet_cni::NodeStateError),
}

/// The node state for `desired` (pure).
pub fn node_state(
    node: &str,
    pod_cidrs: &[IpNet],
    desired: &DesiredOverlay,
    mtu_override: Option<u32>,
) -> NodeState {
    NodeState {
        version: veilnet_cni::NODE_STATE_VERSION,
        node_name: node.to_string(),
        pod_cidrs: pod_cidrs.to_vec(),
        gateways: pod_cidrs.iter().map(gateway_address).collect(),
        bridge: desired.bridge.name.clone(),
        mtu: mtu_override.unwrap_or(desired.pod_mtu),
        ready: true,
    }
}

/// The conflist (pure). It declares every capability the plugin honours
/// ([`veilnet_cni::capabilities::SUPPORTED`]: `ips`, `mac`, `bandwidth`, `portMappings`), so the
/// runtime passes their `runtimeConfig` values.
pub fn conflist(run_dir: &Path, state_dir: &Path) -> serde_json::Value {
    let capabilities: serde_json::Map<String, serde_json::Value> =
        veilnet_cni::capabilities::SUPPORTED
            .iter()
            .map(|c| (c.to_string(), true.into()))
            .collect();
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": NETWORK_NAME,
        "plugins": [{
            "type": "veilnet-cni",
            "runDir": run_dir,
            "stateDir": state_dir,
            "capabilities": capabilities,
        }]
    })
}

/// Writes `content` to `path` atomically, and only when it differs (no churn for file watchers).
pub fn write_if_changed(path: &Path, content: &[u8]) -> Result<bool, CniConfigError> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let err = |source| CniConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    crate::fsutil::write_atomic(path, content).map_err(err)?;
    Ok(true)
}

/// Writes the node state (if it changed) and installs the conflist (if it changed).
pub fn install(
    state: &NodeState,
    run_dir: &Path,
    state_dir: &Path,
    cni_conf_dir: &Path,
) -> Result<bool, CniConfigError> {
    let path = NodeState::path_in(run_dir);
    let current = NodeState::load(&path).ok();
    let mut changed = false;
    if current.as_ref() != Some(state) {
        state.write_atomic(&path)?;
        changed = true;
    }
    let conf =
        serde_json::to_vec_pretty(&conflist(run_dir, state_dir)).expect("json value serialises");
    changed |= write_if_changed(&cni_conf_dir.join(CONFLIST_NAME), &conf)?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_declares_the_capabilities() {
        let list = conflist(Path::new("/run/veilnet"), Path::new("/var/lib/veilnet"));
        let caps = &list["plugins"][0]["capabilities"];
        for cap in ["ips", "mac", "bandwidth", "portMappings"] {
            assert_eq!(caps[cap], true, "{list}");
        }
    }
}
