//! STATUS: can this node serve ADD right now? Not until the agent has written a ready node
//! state and created the bridge (agent mode), and not when every pod address is taken.

use super::network;
use super::{PluginError, Result};
use crate::config::NetConf;
use crate::ipam::{IpamStore, Pool};
use crate::netlink::Netlink;

pub fn status(conf: &NetConf) -> Result<()> {
    let unavailable = |e: &dyn std::fmt::Display| PluginError::NotAvailable(e.to_string());
    let params = network::params(conf).map_err(|e| unavailable(&e))?;
    if !params.owns_bridge {
        let bridge = Netlink::open()
            .and_then(|mut nl| nl.link_by_name(&params.bridge))
            .map_err(|e| unavailable(&e))?;
        if bridge.is_none() {
            return Err(unavailable(&PluginError::BridgeMissing {
                bridge: params.bridge,
            }));
        }
    }
    let pool = Pool::new(params.subnet, params.gateway).map_err(|e| unavailable(&e))?;
    let used = IpamStore::new(&conf.state_dir, &conf.name)
        .used(&pool)
        .map_err(|e| unavailable(&e))?;
    if used >= pool.capacity() {
        return Err(PluginError::NotAvailable(format!(
            "all {} pod addresses of {} are in use",
            pool.capacity(),
            pool.subnet()
        )));
    }
    Ok(())
}
