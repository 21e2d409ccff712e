//! ADD: a veth pair from the bridge into the pod, an address from IPAM, the default route.
//!
//! When the agent enforces NetworkPolicy (it wrote `<runDir>/policy-admission.json`), the host end
//! stays down until the agent confirms that the pod's rules are in the kernel; see
//! [`crate::agent_protocol`].

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::guard::{HostPortGuard, LeaseGuard, LinkGuard};
use super::network::{self, with_prefix};
use super::{host_veth_name, PluginError, Result};
use crate::agent_protocol::{self, AdmissionConfig, AdmissionError, PodAttachment};
use crate::config::{Mode, NetConf};
use crate::env::Target;
use crate::hostport::{self, HostPortStore};
use crate::ipam::{IpamStore, Pool};
use crate::netlink::{BridgePortFlags, Netlink, VethSpec};
use crate::sandbox::PodNetns;
use crate::spec::{Interface, IpConfig, Route, SuccessResult};

pub fn add(conf: &NetConf, target: &Target) -> Result<SuccessResult> {
    let ifname = &target.attachment.ifname;
    let params = network::params(conf)?;
    let admission = match &conf.mode {
        Mode::Agent { run_dir } => AdmissionConfig::load(run_dir)?,
        Mode::Standalone(_) => None,
    };
    if admission.is_some() && target.k8s_pod.is_none() {
        return Err(AdmissionError::NoPodIdentity.into());
    }
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

    // The bandwidth request is judged before anything is created (it needs the MTU).
    let bandwidth = conf.runtime.bandwidth.unwrap_or_default();
    let tbf = |limit: Option<crate::capabilities::Limit>, dir: &str| {
        limit
            .map(|l| l.tbf(prepared.mtu))
            .transpose()
            .map_err(|e| PluginError::Capability(format!("bandwidth: {dir}: {e}")))
    };
    let ingress_tbf = tbf(bandwidth.ingress, "ingress")?;
    let egress_tbf = tbf(bandwidth.egress, "egress")?;

    let store = IpamStore::new(&conf.state_dir, &conf.name);
    let pool = Pool::new(params.subnet, params.gateway)?;
    // The `ips` capability: exactly that address, through the same locked store.
    let allocation = match conf.runtime.ip {
        Some(ip) => store.allocate_requested(&pool, &target.attachment, ip)?,
        None => store.allocate(&pool, &target.attachment)?,
    };
    let lease = LeaseGuard::new(&store, &target.attachment);

    // The `portMappings` capability: reserved (or refused, naming the holder) and its DNAT
    // rules loaded before any link exists, so a conflict costs no veth. DNAT to an address
    // without a pod yet only loses packets for the moments until the pod is up.
    let hostports = HostPortStore::new(&conf.state_dir);
    let hostport_guard = if conf.runtime.port_mappings.is_empty() {
        None
    } else {
        hostports.add(hostport::Entry {
            network: conf.name.clone(),
            container_id: target.attachment.container_id.clone(),
            ifname: ifname.clone(),
            pod: target
                .k8s_pod
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name)),
            pod_ip: allocation.ip,
            mappings: conf.runtime.port_mappings.clone(),
        })?;
        Some(HostPortGuard::new(
            &hostports,
            &conf.name,
            &target.attachment,
        ))
    };

    let host_name = host_veth_name(&target.attachment);
    let spec = VethSpec {
        host_name: &host_name,
        peer_name: ifname,
        mtu: prepared.mtu,
        peer_netns_fd: pod_ns.fd(),
        controller: Some(prepared.bridge.index),
        peer_mac: conf.runtime.mac,
        host_up: admission.is_none(),
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
    // The `mac` capability: the pod end carries the requested MAC, so the static FDB entry
    // below and the agent's anti-spoofing rules (from `PodAttachment::mac`) use it.
    if let Some(mac) = conf.runtime.mac {
        if pod_link.mac != mac {
            return Err(PluginError::Capability(format!(
                "mac: asked for {} but {ifname} has {}",
                crate::netlink::format_mac(&mac),
                pod_link.mac_string()
            )));
        }
    }
    // The port never learns: the pod's MAC is a static FDB entry on it, so no frame a pod sends
    // (link-local or not) can move another MAC on the bridge or grow the FDB. Done before the pod
    // end is up, so no frame has crossed the port yet.
    host.set_bridge_port(host_link.index, &BridgePortFlags::pod_port())?;
    host.replace_static_fdb(host_link.index, &pod_link.mac)?;
    // hostPort hairpin: br_netfilter DNATs the pod's frame to the node's address in the bridge
    // path and, the new destination being behind the same bridge, bridges it straight back to
    // the pod's own port, which a bridge only does in hairpin mode (the reference bridge
    // plugin's `hairpinMode`). Only ports of pods with mappings get it; a frame a pod sends to
    // its own MAC is all it adds.
    if !conf.runtime.port_mappings.is_empty() {
        host.set_bridge_port_hairpin(host_link.index, true)?;
    }
    if !pod_link.up {
        pod.set_up(pod_link.index)?;
    }
    let address = with_prefix(allocation.ip, params.subnet);
    pod.add_address(pod_link.index, address)?;
    pod.add_route_v4(Ipv4Net::default(), Some(params.gateway), pod_link.index)?;

    // The `bandwidth` capability (see `crate::tc` for why both are TBFs): traffic to the pod is
    // shaped leaving the host veth, traffic from the pod leaving its own interface. Both qdiscs
    // go away with the veth, so the rollback guard and DEL need nothing more.
    if let Some(tbf) = &ingress_tbf {
        crate::tc::set_tbf(&host_name, tbf)?;
    }
    if let Some(tbf) = &egress_tbf {
        pod_ns.run_in(|| crate::tc::set_tbf(ifname, tbf))??;
    }

    if let (Some(config), Some(k8s_pod)) = (&admission, &target.k8s_pod) {
        let attachment = PodAttachment {
            container_id: target.attachment.container_id.clone(),
            ifname: ifname.clone(),
            namespace: k8s_pod.namespace.clone(),
            name: k8s_pod.name.clone(),
            uid: k8s_pod.uid.clone(),
            ips: vec![IpAddr::V4(allocation.ip)],
            mac: pod_link.mac_string(),
            host_veth: host_name.clone(),
        };
        agent_protocol::admit(&config.socket, &attachment, config.timeout())?;
        // Only now can frames flow: the pod's policy and anti-spoofing rules are in place.
        host.set_up(host_link.index)?;
    }

    veth.commit();
    if let Some(guard) = hostport_guard {
        guard.commit();
    }
    lease.commit();

    let attached = Attached {
        host: Interface {
            name: host_name,
            mac: host_link.mac_string(),
            mtu: Some(host_link.mtu),
            ..Interface::default()
        },
        pod: Interface {
            name: ifname.clone(),
            mac: pod_link.mac_string(),
            mtu: Some(pod_link.mtu),
            sandbox: target.netns.to_string_lossy().into_owned(),
            ..Interface::default()
        },
        address,
        gateway: params.gateway,
    };
    Ok(build_result(conf, attached))
}

/// What ADD created, for the result.
struct Attached {
    host: Interface,
    pod: Interface,
    address: Ipv4Net,
    gateway: Ipv4Addr,
}

/// The ADD result: `prevResult` (if a previous plugin in the chain produced one) with our
/// interfaces, address and route appended, in the caller's spec version.
fn build_result(conf: &NetConf, attached: Attached) -> SuccessResult {
    let mut result = conf
        .prev_result
        .clone()
        .unwrap_or_else(|| SuccessResult::empty(conf.cni_version));
    let pod_index = result.interfaces.len() + 1;
    result.interfaces.push(attached.host);
    result.interfaces.push(attached.pod);
    let gateway = IpAddr::V4(attached.gateway);
    result.ips.push(IpConfig {
        address: IpNet::V4(attached.address),
        gateway: Some(gateway),
        interface: Some(pod_index),
        version: None,
    });
    result
        .routes
        .push(Route::via(IpNet::V4(Ipv4Net::default()), Some(gateway)));
    if result.dns == Default::default() {
        result.dns = conf.dns.clone();
    }
    result.for_version(conf.cni_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use serde_json::json;

    fn attached() -> Attached {
        Attached {
            host: Interface {
                name: "veil0123456789a".into(),
                mac: "aa:aa:aa:aa:aa:aa".into(),
                mtu: Some(1400),
                ..Interface::default()
            },
            pod: Interface {
                name: "eth0".into(),
                mac: "bb:bb:bb:bb:bb:bb".into(),
                mtu: Some(1400),
                sandbox: "/run/netns/p".into(),
                ..Interface::default()
            },
            address: "10.1.0.5/24".parse().unwrap(),
            gateway: "10.1.0.1".parse().unwrap(),
        }
    }

    fn conf(extra: serde_json::Value) -> NetConf {
        let mut v = json!({"cniVersion": "1.1.0", "name": "n", "type": "veilnet-cni",
                           "subnet": "10.1.0.0/24"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        config::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn fresh_result() {
        let r = build_result(
            &conf(json!({"dns": {"nameservers": ["10.96.0.10"]}})),
            attached(),
        );
        assert_eq!(r.interfaces.len(), 2);
        assert_eq!(r.ips[0].interface, Some(1));
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.5/24");
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r.dns.nameservers, vec!["10.96.0.10".to_string()]);
    }

    #[test]
    fn appends_to_prev_result() {
        let prev = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "lo0"}],
            "ips": [{"address": "192.0.2.9/32", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]}
        });
        let r = build_result(
            &conf(json!({"prevResult": prev,
                                          "dns": {"nameservers": ["10.96.0.10"]}})),
            attached(),
        );
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.interfaces[0].name, "lo0");
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].interface, Some(0));
        // Our address points at our pod interface, after the previous ones.
        assert_eq!(r.ips[1].interface, Some(2));
        // A previous plugin's DNS wins over ours.
        assert_eq!(r.dns.nameservers, vec!["192.0.2.53".to_string()]);
    }

    #[test]
    fn rendered_in_the_callers_version() {
        let r = build_result(&conf(json!({"cniVersion": "0.4.0"})), attached());
        assert_eq!(r.cni_version, "0.4.0");
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        assert_eq!(r.interfaces[1].mtu, None);
    }
}
