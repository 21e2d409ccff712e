//! ADD: a veth pair from the bridge into the pod, an address from IPAM, the default route.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::guard::{LeaseGuard, LinkGuard};
use super::network::{self, with_prefix};
use super::{host_veth_name, PluginError, Result};
use crate::config::NetConf;
use crate::env::Target;
use crate::ipam::{IpamStore, Pool};
use crate::netlink::{Netlink, VethSpec};
use crate::sandbox::PodNetns;
use crate::spec::{Interface, IpConfig, Route, SuccessResult};

pub fn add(conf: &NetConf, target: &Target) -> Result<SuccessResult> {
    let ifname = &target.attachment.ifname;
    let params = network::params(conf)?;
    let pod_ns = PodNetns::open(&target.netns)?;
    let mut host = Netlink::open()?;
    let prepared = network::prepare(&params, &mut host)?;
    let mut pod = pod_ns.netlink()?;
    // The spec: ADD must fail if the interface already exists in the container.
    if pod.link_by_name(ifname)?.is_some() {
        return Err(PluginError::InterfaceExists {
            ifname: ifname.clone(),
            netns: target.netns.clone(),
        });
    }

    let store = IpamStore::new(&conf.state_dir, &conf.name);
    let pool = Pool::new(params.subnet, params.gateway)?;
    let allocation = store.allocate(&pool, &target.attachment)?;
    let lease = LeaseGuard::new(&store, &target.attachment);

    let host_name = host_veth_name(&target.attachment);
    let spec = VethSpec {
        host_name: &host_name,
        peer_name: ifname,
        mtu: prepared.mtu,
        peer_netns_fd: pod_ns.fd(),
        controller: Some(prepared.bridge.index),
    };
    match host.create_veth(&spec) {
        Ok(()) => {}
        Err(e) if e.is_already_exists() => {
            // The pod has no `ifname` (checked above), so the clash is on the host name, which
            // only this attachment uses: a leftover of an earlier, interrupted ADD. Replace it.
            if !host.delete_link_by_name(&host_name)? {
                return Err(PluginError::InterfaceExists {
                    ifname: ifname.clone(),
                    netns: target.netns.clone(),
                });
            }
            host.create_veth(&spec)?;
        }
        Err(e) => return Err(e.into()),
    }
    let veth = LinkGuard::new(&host_name);

    let vanished = |what: String| PluginError::Vanished { what };
    let host_link = host
        .link_by_name(&host_name)?
        .ok_or_else(|| vanished(format!("host veth {host_name}")))?;
    let pod_link = pod
        .link_by_name(ifname)?
        .ok_or_else(|| vanished(format!("{ifname} in {}", target.netns.display())))?;
    if !pod_link.up {
        pod.set_up(pod_link.index)?;
    }
    let address = with_prefix(allocation.ip, params.subnet);
    pod.add_address(pod_link.index, address)?;
    let default_route = Ipv4Net::default();
    pod.add_route_v4(default_route, Some(params.gateway), pod_link.index)?;

    veth.commit();
    lease.commit();

    let mut result = conf
        .prev_result
        .clone()
        .unwrap_or_else(|| SuccessResult::empty(conf.cni_version));
    let pod_index = result.interfaces.len() + 1;
    result.interfaces.push(Interface {
        name: host_name,
        mac: host_link.mac_string(),
        mtu: Some(host_link.mtu),
        ..Interface::default()
    });
    result.interfaces.push(Interface {
        name: ifname.clone(),
        mac: pod_link.mac_string(),
        mtu: Some(pod_link.mtu),
        sandbox: target.netns.to_string_lossy().into_owned(),
        ..Interface::default()
    });
    let gateway = IpAddr::V4(params.gateway);
    result.ips.push(IpConfig {
        address: IpNet::V4(address),
        gateway: Some(gateway),
        interface: Some(pod_index),
        version: None,
    });
    result
        .routes
        .push(Route::via(IpNet::V4(default_route), Some(gateway)));
    if result.dns == Default::default() {
        result.dns = conf.dns.clone();
    }
    Ok(result.for_version(conf.cni_version))
}
