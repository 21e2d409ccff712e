//! DEL: best effort and idempotent. Deleting the host end of the veth removes the pod end too
//! (and if the pod's namespace is already gone, the kernel has removed both), so DEL never needs
//! to enter the pod. It does not need the agent either: only the IPAM directory.

use super::{host_veth_name, PluginError, Result};
use crate::config::NetConf;
use crate::env::Attachment;
use crate::hostport::HostPortStore;
use crate::ipam::IpamStore;
use crate::netlink::Netlink;

pub fn del(conf: &NetConf, attachment: &Attachment) -> Result<()> {
    let mut failures = Vec::new();
    let host_name = host_veth_name(attachment);
    if let Err(e) = Netlink::open().and_then(|mut nl| nl.delete_link_by_name(&host_name)) {
        failures.push(PluginError::from(e));
    }
    // The hostPort mappings (and their DNAT rules); without any, no kernel state is touched.
    if let Err(e) = HostPortStore::new(&conf.state_dir).remove(&conf.name, attachment) {
        failures.push(e.into());
    }
    // Release even if the link could not be deleted: a stuck veth must not also leak an IP.
    if let Err(e) = IpamStore::new(&conf.state_dir, &conf.name).release(attachment) {
        failures.push(e.into());
    }
    PluginError::from_list(failures)
}
