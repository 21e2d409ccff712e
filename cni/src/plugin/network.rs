//! The node's pod network as one ADD/CHECK/STATUS needs it, from either source: the agent's node
//! state file, or the standalone keys of the configuration (where we also own the bridge).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{PluginError, Result};
use crate::config::{Mode, NetConf, DEFAULT_MTU};
use crate::netlink::{Link, Netlink};
use crate::node_state::NodeState;

/// Where pods attach and which addresses they get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// `None` in standalone mode without `mtu`: use the bridge's.
    pub mtu: Option<u32>,
    /// Standalone mode: create the bridge when missing. Agent mode: the agent owns it.
    pub owns_bridge: bool,
}

/// Reads the parameters without touching the kernel. In agent mode this fails with a
/// "try again later" error until the agent has written a ready node state.
pub fn params(conf: &NetConf) -> Result<NetParams> {
    match &conf.mode {
        Mode::Standalone(net) => Ok(NetParams {
            subnet: net.subnet,
            gateway: net.gateway,
            bridge: net.bridge.clone(),
            mtu: net.mtu,
            owns_bridge: true,
        }),
        Mode::Agent { run_dir } => {
            let path = NodeState::path_in(run_dir);
            let state = NodeState::load(&path)?;
            if !state.ready {
                return Err(PluginError::AgentNotReady { path });
            }
            let (subnet, gateway) = state
                .ipv4_network()
                .ok_or(PluginError::NoIpv4Network { path })?;
            Ok(NetParams {
                subnet,
                gateway,
                bridge: state.bridge,
                mtu: Some(state.mtu),
                owns_bridge: false,
            })
        }
    }
}

/// A bridge ready for pods, and the MTU pods get.
pub struct Prepared {
    pub bridge: Link,
    pub mtu: u32,
}

/// Makes sure the bridge exists, is up and carries the gateway address. In standalone mode it
/// is created on first use; every step tolerates a concurrent ADD doing the same (EEXIST).
pub fn prepare(params: &NetParams, host: &mut Netlink) -> Result<Prepared> {
    let bridge = match host.link_by_name(&params.bridge)? {
        Some(link) => link,
        None if params.owns_bridge => {
            match host.create_bridge(&params.bridge, params.mtu) {
                Ok(()) => {}
                Err(e) if e.is_already_exists() => {} // a parallel ADD won the race
                Err(e) => return Err(e.into()),
            }
            host.link_by_name(&params.bridge)?
                .ok_or_else(|| PluginError::Vanished {
                    what: format!("bridge {}", params.bridge),
                })?
        }
        None => {
            return Err(PluginError::BridgeMissing {
                bridge: params.bridge.clone(),
            })
        }
    };
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(PluginError::NotABridge {
            name: params.bridge.clone(),
            kind: bridge.kind.clone().unwrap_or_else(|| "device".into()),
        });
    }
    if params.owns_bridge {
        let gateway = with_prefix(params.gateway, params.subnet);
        match host.add_address(bridge.index, gateway) {
            Ok(()) => {}
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e.into()),
        }
        if !bridge.up {
            host.set_up(bridge.index)?;
        }
    }
    let mtu = params.mtu.unwrap_or(if bridge.mtu > 0 {
        bridge.mtu
    } else {
        DEFAULT_MTU
    });
    Ok(Prepared { bridge, mtu })
}

/// `ip` with the prefix length of `subnet` (a valid `Ipv4Net` prefix is always <= 32).
pub fn with_prefix(ip: Ipv4Addr, subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(ip, subnet.prefix_len()).unwrap_or_else(|_| Ipv4Net::from(ip))
}
