//! CHECK: the pod still has what `prevResult` says we gave it: the host veth on the bridge, the
//! pod interface (up, same MAC and MTU), its address, our routes, the IPAM reservation, and its
//! hostPort DNAT rules.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::network;
use super::{host_veth_name, PluginError, Result};
use crate::config::NetConf;
use crate::env::Target;
use crate::hostport::{self, HostPortStore};
use crate::ipam::IpamStore;
use crate::netlink::{pod_port_drift, Netlink};
use crate::sandbox::PodNetns;

fn failed(message: String) -> PluginError {
    PluginError::CheckFailed(message)
}

pub fn check(conf: &NetConf, target: &Target) -> Result<()> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or(PluginError::MissingPrevResult)?;
    let ifname = &target.attachment.ifname;
    let netns = target.netns.to_string_lossy();
    let (pod_index, pod_iface) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| &i.name == ifname && i.sandbox == netns)
        .ok_or_else(|| failed(format!("prevResult lists no interface {ifname} in {netns}")))?;
    let ours: Vec<(Ipv4Net, Option<IpAddr>)> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(pod_index))
        .filter_map(|ip| match ip.address {
            IpNet::V4(net) => Some((net, ip.gateway)),
            IpNet::V6(_) => None,
        })
        .collect();
    let Some(&(address, gateway)) = ours.first() else {
        return Err(failed(format!(
            "prevResult has no IPv4 address for {ifname}"
        )));
    };

    // The sandbox first: once its namespace is gone the container is unknown, whatever is left
    // of its veth (the kernel removes the host end asynchronously, so checking the host side
    // first would answer "differs" or "unknown" depending on timing).
    let pod_ns = PodNetns::open(&target.netns)?;

    // Host side: the veth is up and on the bridge.
    let params = network::params(conf)?;
    let host_name = host_veth_name(&target.attachment);
    let mut host = Netlink::open()?;
    let host_link = host
        .link_by_name(&host_name)?
        .ok_or_else(|| failed(format!("host veth {host_name} is missing")))?;
    if !host_link.up {
        return Err(failed(format!("host veth {host_name} is down")));
    }
    let bridge = host
        .link_by_name(&params.bridge)?
        .ok_or_else(|| failed(format!("bridge {} is missing", params.bridge)))?;
    if host_link.controller != Some(bridge.index) {
        return Err(failed(format!(
            "host veth {host_name} is not attached to bridge {}",
            params.bridge
        )));
    }
    if let Some(listed) = prev.interfaces.iter().find(|i| i.name == host_name) {
        if !listed.mac.is_empty() && !listed.mac.eq_ignore_ascii_case(&host_link.mac_string()) {
            return Err(failed(format!(
                "host veth {host_name} has MAC {}, prevResult says {}",
                host_link.mac_string(),
                listed.mac
            )));
        }
    }

    // Pod side.
    let mut pod = pod_ns.netlink()?;
    let link = pod
        .link_by_name(ifname)?
        .ok_or_else(|| failed(format!("{ifname} is missing in {netns}")))?;
    if !link.up {
        return Err(failed(format!("{ifname} is down")));
    }
    if !pod_iface.mac.is_empty() && !pod_iface.mac.eq_ignore_ascii_case(&link.mac_string()) {
        return Err(failed(format!(
            "{ifname} has MAC {}, prevResult says {}",
            link.mac_string(),
            pod_iface.mac
        )));
    }
    // The bridge port: no learning, no flooding to it, the pod's MAC static on it.
    let static_macs = host.static_fdb_on(host_link.index)?;
    if let Some(drift) = pod_port_drift(host_link.port.as_ref(), &static_macs, &link.mac) {
        return Err(failed(format!(
            "bridge port {host_name} of {ifname}: {drift}"
        )));
    }
    if let Some(mtu) = pod_iface.mtu {
        if mtu != link.mtu {
            return Err(failed(format!(
                "{ifname} has MTU {}, prevResult says {mtu}",
                link.mtu
            )));
        }
    }
    let addresses = pod.addresses_v4(link.index)?;
    for (expected, _) in &ours {
        if !addresses.contains(expected) {
            return Err(failed(format!("{ifname} lacks address {expected}")));
        }
    }
    // Only routes through our gateway are ours; later plugins may own the others.
    let routes = pod.routes_v4()?;
    for route in &prev.routes {
        let (IpNet::V4(dst), Some(IpAddr::V4(gw))) = (route.dst, route.gw.or(gateway)) else {
            continue;
        };
        if Some(IpAddr::V4(gw)) != gateway {
            continue;
        }
        let present = routes
            .iter()
            .any(|r| r.dst == dst.trunc() && r.gateway == Some(gw) && r.oif == Some(link.index));
        if !present {
            return Err(failed(format!(
                "route {dst} via {gw} is missing in {netns}"
            )));
        }
    }

    // The address is still reserved for this attachment.
    let held = IpamStore::new(&conf.state_dir, &conf.name).lookup(&target.attachment)?;
    if held != Some(address.addr()) {
        return Err(failed(format!(
            "IPAM holds {} for this attachment, prevResult says {}",
            held.map(|ip| ip.to_string())
                .unwrap_or_else(|| "nothing".into()),
            address.addr()
        )));
    }

    // bandwidth: the shaping ADD installed is still the root qdisc on each side.
    let bandwidth = conf.runtime.bandwidth.unwrap_or_default();
    if bandwidth.ingress.is_some() {
        let kind = crate::tc::root_qdisc(&host_name)?;
        if kind.as_deref() != Some("tbf") {
            return Err(failed(format!(
                "ingress-bandwidth is asked for, but the root qdisc of {host_name} is {}",
                kind.as_deref().unwrap_or("none")
            )));
        }
    }
    if bandwidth.egress.is_some() {
        let kind = pod_ns.run_in(|| crate::tc::root_qdisc(ifname))??;
        if kind.as_deref() != Some("tbf") {
            return Err(failed(format!(
                "egress-bandwidth is asked for, but the root qdisc of the pod's {ifname} is {}",
                kind.as_deref().unwrap_or("none")
            )));
        }
    }

    // hostPort: what the runtime asks for is recorded for this attachment, and in the kernel.
    let recorded = HostPortStore::new(&conf.state_dir).lookup(&conf.name, &target.attachment)?;
    let wanted = &conf.runtime.port_mappings;
    match recorded {
        None if wanted.is_empty() => {}
        None => {
            return Err(failed(format!(
                "no hostPort mappings are recorded for this attachment, the runtime asks for {}",
                wanted.len()
            )))
        }
        Some(entry) => {
            let sorted = |v: &[hostport::PortMapping]| {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            if !wanted.is_empty() && sorted(wanted) != sorted(&entry.mappings) {
                return Err(failed(
                    "the recorded hostPort mappings differ from the runtime's portMappings".into(),
                ));
            }
            if entry.pod_ip != address.addr() {
                return Err(failed(format!(
                    "hostPort mappings point at {}, the pod has {}",
                    entry.pod_ip,
                    address.addr()
                )));
            }
            if let Some(why) = hostport::missing_in(hostport::list_table()?.as_deref(), &entry) {
                return Err(failed(why));
            }
        }
    }
    Ok(())
}
