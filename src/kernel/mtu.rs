//! Finding the underlay interface and its MTU: ask the kernel which route it would use to reach
//! a peer (like `ip route get`), then take the route's MTU metric if set, else the device's MTU.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::stream::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric};
use rtnetlink::RouteMessageBuilder;

use super::netlink::NetlinkKernel;
use super::KernelError;

/// The path towards one underlay destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub dst: IpAddr,
    pub ifindex: u32,
    pub dev: String,
    pub device_mtu: u32,
    /// The route's `mtu` metric, when the route (or a learned PMTU) sets one.
    pub route_mtu: Option<u32>,
    /// The source address the kernel would use: a good default for this node's underlay IP.
    pub source: Option<IpAddr>,
}

impl Underlay {
    /// The MTU packets towards `dst` can use.
    pub fn mtu(&self) -> u32 {
        effective_mtu(self.route_mtu, self.device_mtu)
    }
}

/// A route's MTU metric overrides the device's (it is how operators express a smaller path MTU).
pub fn effective_mtu(route_mtu: Option<u32>, device_mtu: u32) -> u32 {
    match route_mtu {
        Some(m) if m > 0 => m,
        _ => device_mtu,
    }
}

fn lookup_message(dst: IpAddr) -> RouteMessage {
    match dst {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .build(),
    }
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Resolves the interface, MTU and source address the kernel would use to reach `dst`.
pub async fn underlay_for(kernel: &NetlinkKernel, dst: IpAddr) -> Result<Underlay, KernelError> {
    let answer: Vec<RouteMessage> = kernel
        .handle()
        .route()
        .get(lookup_message(dst))
        .execute()
        .try_collect()
        .await
        .map_err(|e| match e {
            rtnetlink::Error::NetlinkError(ref m) if m.raw_code() != 0 => {
                if matches!(m.raw_code().abs(), libc::ENETUNREACH | libc::EHOSTUNREACH) {
                    KernelError::NoRoute { dst }
                } else {
                    KernelError::Errno {
                        op: "route_get",
                        target: dst.to_string(),
                        errno: m.raw_code().abs(),
                    }
                }
            }
            other => KernelError::Netlink {
                op: "route_get",
                target: dst.to_string(),
                source: Box::new(other),
            },
        })?;
    let route = answer.first().ok_or(KernelError::NoRoute { dst })?;
    let mut oif = None;
    let mut route_mtu = None;
    let mut source = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            RouteAttribute::Metrics(metrics) => {
                route_mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) => Some(*mtu),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    let ifindex = oif.ok_or(KernelError::NoOutputDevice { dst })?;
    let link = kernel.link_by_index(ifindex).await?;
    Ok(Underlay {
        dst,
        ifindex,
        dev: link.name,
        device_mtu: link.mtu,
        route_mtu,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metric_wins_over_device() {
        assert_eq!(effective_mtu(Some(1400), 1500), 1400);
        assert_eq!(effective_mtu(None, 1500), 1500);
        assert_eq!(effective_mtu(Some(0), 9000), 9000);
        // A route metric may also be larger (jumbo path over a device with a bigger MTU).
        assert_eq!(effective_mtu(Some(9000), 9001), 9000);
    }
}
