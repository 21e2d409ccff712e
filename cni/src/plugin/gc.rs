//! GC: release every allocation whose attachment the runtime no longer lists in
//! `cni.dev/valid-attachments`, and remove the host veths of those attachments if any survived;
//! drop their hostPort mappings (and DNAT rules) too.

use std::collections::HashSet;

use super::{host_veth_name, PluginError, Result};
use crate::config::{ConfigError, NetConf, VALID_ATTACHMENTS_KEY};
use crate::hostport::HostPortStore;
use crate::ipam::IpamStore;
use crate::netlink::Netlink;

pub fn gc(conf: &NetConf) -> Result<()> {
    let valid: HashSet<_> = conf
        .valid_attachments
        .as_ref()
        .ok_or(ConfigError::Missing {
            key: VALID_ATTACHMENTS_KEY,
        })?
        .iter()
        .cloned()
        .collect();
    let report = IpamStore::new(&conf.state_dir, &conf.name).gc(&valid)?;
    let mut failures: Vec<PluginError> = report.errors.into_iter().map(Into::into).collect();
    // hostPort mappings of attachments the runtime no longer knows, and their DNAT rules.
    if let Err(e) = HostPortStore::new(&conf.state_dir).gc(&conf.name, &valid) {
        failures.push(e.into());
    }
    if !report.released.is_empty() {
        // Normally gone with their namespaces; a leaked namespace would keep them alive.
        match Netlink::open() {
            Ok(mut host) => {
                for record in &report.released {
                    if let Err(e) = host.delete_link_by_name(&host_veth_name(&record.attachment)) {
                        failures.push(e.into());
                    }
                }
            }
            Err(e) => failures.push(e.into()),
        }
    }
    PluginError::from_list(failures)
}
