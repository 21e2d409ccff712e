//! [`OverlayKernel`] over `rtnetlink`: one connection, bound to one network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::stream::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    BridgeBooleanOptionFlags, BridgeBooleanOptions, InfoBridge, InfoData, InfoKind, InfoVxlan,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder,
};

use super::{
    BridgeAttrs, KernelError, KernelRoute, LinkChange, LinkKind, NewLink, NewLinkKind,
    ObservedAddress, ObservedFdb, ObservedLink, ObservedNeigh, ObservedRoute, ObservedRule,
    OverlayKernel, VxlanAttrs, MAIN_TABLE, POD_BRIDGE_OPTIONS, POD_TO_NODE_TABLE,
    VEILNET_ROUTE_PROTOCOL,
};
use crate::model::overlay::RuleSpec;
use crate::model::MacAddr;
use crate::netns;

/// The real kernel, through one rtnetlink connection. Cheap to clone (clones share the socket).
#[derive(Clone, Debug)]
pub struct NetlinkKernel {
    handle: Handle,
}

/// Turns an rtnetlink failure into a [`KernelError`], keeping the errno when there is one.
fn nl_error(op: &'static str, target: impl ToString, e: rtnetlink::Error) -> KernelError {
    match &e {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => KernelError::Errno {
            op,
            target: target.to_string(),
            errno: msg.raw_code().abs(),
        },
        _ => KernelError::Netlink {
            op,
            target: target.to_string(),
            source: Box::new(e),
        },
    }
}

impl NetlinkKernel {
    /// Connects in the calling thread's namespace and drives the connection on the current tokio
    /// runtime. For an agent that already runs inside the node's namespace.
    pub fn connect() -> Result<Self, KernelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| KernelError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| KernelError::Connect { source })?;
        runtime.spawn(connection);
        Ok(NetlinkKernel { handle })
    }

    /// Connects inside the named namespace: the socket is opened on a thread that entered it, and
    /// stays bound to it; the connection is driven on the current tokio runtime.
    pub fn connect_in(netns_name: &str) -> Result<Self, KernelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| KernelError::NoRuntime)?;
        let for_thread = runtime.clone();
        let (connection, handle, _) = netns::run_in(netns_name, move || {
            // The socket registers with the runtime's reactor when it is created.
            let _guard = for_thread.enter();
            rtnetlink::new_connection()
        })?
        .map_err(|source| KernelError::Connect { source })?;
        runtime.spawn(connection);
        Ok(NetlinkKernel { handle })
    }

    /// Wraps an existing handle (its connection must already be driven).
    pub fn from_handle(handle: Handle) -> Self {
        NetlinkKernel { handle }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// One link by index.
    pub async fn link_by_index(&self, index: u32) -> Result<ObservedLink, KernelError> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => observe_link(&msg).ok_or(KernelError::NoSuchLink { index }),
            Ok(None) => Err(KernelError::NoSuchLink { index }),
            Err(e) => Err(nl_error("get_link", index, e)),
        }
    }
}

fn observe_link(msg: &LinkMessage) -> Option<ObservedLink> {
    let mut name = None;
    let mut mtu = 0;
    let mut mac = None;
    let mut kind = LinkKind::Device;
    let mut vxlan = None;
    let mut bridge = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Address(a) => mac = MacAddr::from_slice(a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Bridge) => kind = LinkKind::Bridge,
                        LinkInfo::Kind(InfoKind::Vxlan) => kind = LinkKind::Vxlan,
                        LinkInfo::Kind(other) => kind = LinkKind::Other(other.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => vxlan = Some(vxlan_attrs(data)),
                        LinkInfo::Data(InfoData::Bridge(data)) => bridge = Some(bridge_attrs(data)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(ObservedLink {
        index: msg.header.index,
        name: name?,
        kind,
        mtu,
        mac,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan,
        bridge,
    })
}

fn bridge_attrs(data: &[InfoBridge]) -> BridgeAttrs {
    let mut attrs = BridgeAttrs::default();
    for d in data {
        match d {
            InfoBridge::MultiBoolOpt(opts)
                if opts
                    .mask
                    .contains(BridgeBooleanOptionFlags::NoLinkLocalLearn) =>
            {
                attrs.no_linklocal_learn = Some(
                    opts.value
                        .contains(BridgeBooleanOptionFlags::NoLinkLocalLearn),
                );
            }
            InfoBridge::FdbMaxLearned(max) => attrs.fdb_max_learned = Some(*max),
            _ => {}
        }
    }
    attrs
}

/// `IFLA_INFO_DATA` of a bridge carrying the `Some` options of `opts`.
fn bridge_info(opts: &BridgeAttrs) -> Vec<InfoBridge> {
    let mut data = Vec::new();
    if let Some(v) = opts.no_linklocal_learn {
        let flag = BridgeBooleanOptionFlags::NoLinkLocalLearn;
        data.push(InfoBridge::MultiBoolOpt(BridgeBooleanOptions {
            value: if v {
                flag
            } else {
                BridgeBooleanOptionFlags::empty()
            },
            mask: flag,
        }));
    }
    if let Some(v) = opts.fdb_max_learned {
        // Kernels before 6.8 do not know the attribute and ignore it.
        data.push(InfoBridge::FdbMaxLearned(v));
    }
    data
}

fn vxlan_attrs(data: &[InfoVxlan]) -> VxlanAttrs {
    let mut attrs = VxlanAttrs::default();
    for d in data {
        match d {
            InfoVxlan::Id(vni) => attrs.vni = Some(*vni),
            InfoVxlan::Port(port) => attrs.port = Some(*port),
            InfoVxlan::Local(ip) => attrs.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => attrs.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::Link(index) => attrs.underlay_index = Some(*index),
            InfoVxlan::Learning(on) => attrs.learning = Some(*on),
            _ => {}
        }
    }
    attrs
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn observe_route(msg: &RouteMessage) -> Option<ObservedRoute> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut via = None;
    let mut oif = None;
    let mut src = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => via = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(a) => src = route_ip(a),
            _ => {}
        }
    }
    if table != MAIN_TABLE && table != POD_TO_NODE_TABLE {
        return None;
    }
    let dst = match (dst, msg.header.address_family) {
        (Some(ip), _) => ip,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    Some(ObservedRoute {
        dst: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
        via,
        oif,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(msg.header.protocol),
        src,
        table,
    })
}

fn observe_rule(msg: &RuleMessage) -> Option<ObservedRule> {
    let mut table = u32::from(msg.header.table);
    let mut priority = 0;
    let mut src = None;
    let mut protocol = 0;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Source(ip) => src = IpNet::new(*ip, msg.header.src_len).ok(),
            RuleAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    Some(ObservedRule {
        priority,
        src,
        table,
        protocol,
    })
}

fn neigh_ip(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        // AF_BRIDGE (FDB) messages carry the VXLAN remote as raw bytes; the length tells the
        // family.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn neigh_mac(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => MacAddr::from_slice(bytes),
        _ => None,
    })
}

fn route_message(route: &KernelRoute) -> RouteMessage {
    let mut msg = match (route.dst, route.via) {
        (IpNet::V4(dst), via) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len());
            if let Some(IpAddr::V4(gw)) = via {
                b = b.gateway(gw);
            }
            if let Some(IpAddr::V4(src)) = route.src {
                b = b.pref_source(src);
            }
            b.output_interface(route.oif).table_id(route.table).build()
        }
        (IpNet::V6(dst), via) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len());
            if let Some(IpAddr::V6(gw)) = via {
                b = b.gateway(gw);
            }
            if let Some(IpAddr::V6(src)) = route.src {
                b = b.pref_source(src);
            }
            b.output_interface(route.oif).table_id(route.table).build()
        }
    };
    msg.header.protocol = RouteProtocol::from(VEILNET_ROUTE_PROTOCOL);
    if route.onlink {
        msg.header.flags.insert(RouteFlags::Onlink);
    }
    msg
}

fn rule_target(rule: &RuleSpec) -> String {
    format!("from {} lookup {}", rule.src, rule.table)
}

/// `from <src> lookup <table> priority <priority> proto 86`.
fn rule_message(rule: &RuleSpec) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family_of(rule.src.addr());
    msg.header.src_len = rule.src.prefix_len();
    msg.header.action = RuleAction::ToTable;
    // The 8-bit header field only holds small tables; the attribute holds any.
    msg.header.table = u8::try_from(rule.table).unwrap_or(0);
    msg.attributes.extend([
        RuleAttribute::Table(rule.table),
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::Source(rule.src.network()),
        RuleAttribute::Protocol(RouteProtocol::from(VEILNET_ROUTE_PROTOCOL)),
    ]);
    msg
}

fn address_message(index: u32, addr: IpNet) -> rtnetlink::packet_route::address::AddressMessage {
    match addr {
        IpNet::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(v4.addr(), v4.prefix_len())
            .build(),
        IpNet::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(v6.addr(), v6.prefix_len())
            .build(),
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

impl OverlayKernel for NetlinkKernel {
    async fn dump_links(&mut self) -> Result<Vec<ObservedLink>, KernelError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("dump_links", "all", e))?;
        Ok(msgs.iter().filter_map(observe_link).collect())
    }

    async fn dump_addresses(&mut self) -> Result<Vec<ObservedAddress>, KernelError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("dump_addresses", "all", e))?;
        let mut out = Vec::new();
        for msg in msgs {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address) {
                if let Ok(addr) = IpNet::new(ip, msg.header.prefix_len) {
                    out.push(ObservedAddress {
                        index: msg.header.index,
                        addr,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn dump_routes(&mut self) -> Result<Vec<ObservedRoute>, KernelError> {
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error("dump_routes", "main", e))?;
            out.extend(msgs.iter().filter_map(observe_route));
        }
        Ok(out)
    }

    async fn dump_rules(&mut self) -> Result<Vec<ObservedRule>, KernelError> {
        let mut out = Vec::new();
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let msgs: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error("dump_rules", "all", e))?;
            out.extend(msgs.iter().filter_map(observe_rule));
        }
        Ok(out)
    }

    async fn add_rule(&mut self, rule: &RuleSpec) -> Result<(), KernelError> {
        let mut request = self.handle.rule().add();
        *request.message_mut() = rule_message(rule);
        request
            .execute()
            .await
            .map_err(|e| nl_error("add_rule", rule_target(rule), e))
    }

    async fn del_rule(&mut self, rule: &RuleSpec) -> Result<(), KernelError> {
        self.handle
            .rule()
            .del(rule_message(rule))
            .execute()
            .await
            .map_err(|e| nl_error("del_rule", rule_target(rule), e))
    }

    async fn dump_neighbours(&mut self, index: u32) -> Result<Vec<ObservedNeigh>, KernelError> {
        let mut out = Vec::new();
        // Ask per family: an AF_UNSPEC dump would include the bridge FDB as well.
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let msgs: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error("dump_neighbours", index, e))?;
            for msg in msgs.iter().filter(|m| m.header.ifindex == index) {
                if let Some(ip) = neigh_ip(msg) {
                    out.push(ObservedNeigh {
                        index,
                        ip,
                        mac: neigh_mac(msg),
                        permanent: msg.header.state == NeighbourState::Permanent,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn dump_fdb(&mut self, index: u32) -> Result<Vec<ObservedFdb>, KernelError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("dump_fdb", index, e))?;
        Ok(msgs
            .iter()
            // Entries flagged "master" belong to a bridge the device is enslaved to, not to it.
            .filter(|m| {
                m.header.ifindex == index && !m.header.flags.contains(NeighbourFlags::Controller)
            })
            .filter_map(|m| {
                Some(ObservedFdb {
                    index,
                    mac: neigh_mac(m)?,
                    dst: neigh_ip(m),
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }

    async fn create_link(&mut self, link: &NewLink) -> Result<(), KernelError> {
        let msg = match &link.kind {
            NewLinkKind::Bridge => bridge_info(&POD_BRIDGE_OPTIONS)
                .into_iter()
                .fold(LinkBridge::new(&link.name), |b, info| {
                    b.append_info_data(info)
                })
                .mtu(link.mtu)
                .address(link.mac.octets().to_vec())
                .up()
                .build(),
            NewLinkKind::Vxlan {
                vni,
                port,
                local,
                underlay_index,
                learning,
            } => {
                let b = LinkVxlan::new(&link.name, *vni)
                    .port(*port)
                    .dev(*underlay_index)
                    .learning(*learning);
                let b = match local {
                    IpAddr::V4(v4) => b.local(*v4),
                    IpAddr::V6(v6) => b.local6(*v6),
                };
                b.mtu(link.mtu)
                    .address(link.mac.octets().to_vec())
                    .up()
                    .build()
            }
        };
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl_error("create_link", &link.name, e))
    }

    async fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), KernelError> {
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(mtu) = change.mtu {
            b = b.mtu(mtu);
        }
        if let Some(mac) = change.mac {
            b = b.address(mac.octets().to_vec());
        }
        if change.up {
            b = b.up();
        }
        let mut msg = b.build();
        if let Some(opts) = &change.bridge {
            msg.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(bridge_info(opts))),
            ]));
        }
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_error("set_link", index, e))
    }

    async fn delete_link(&mut self, index: u32) -> Result<(), KernelError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| nl_error("delete_link", index, e))
    }

    async fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), KernelError> {
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(|e| nl_error("add_address", addr, e))
    }

    async fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), KernelError> {
        self.handle
            .address()
            .del(address_message(index, addr))
            .execute()
            .await
            .map_err(|e| nl_error("del_address", addr, e))
    }

    async fn replace_route(&mut self, route: &KernelRoute) -> Result<(), KernelError> {
        self.handle
            .route()
            .add(route_message(route))
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error("replace_route", route.dst, e))
    }

    async fn del_route(&mut self, route: &KernelRoute) -> Result<(), KernelError> {
        // The protocol in the request makes the kernel refuse to delete a route that isn't ours.
        self.handle
            .route()
            .del(route_message(route))
            .execute()
            .await
            .map_err(|e| nl_error("del_route", route.dst, e))
    }

    async fn replace_neigh(
        &mut self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac.octets())
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error("replace_neigh", ip, e))
    }

    async fn del_neigh(&mut self, index: u32, ip: IpAddr) -> Result<(), KernelError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_of(ip);
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(neigh_address(ip)));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|e| nl_error("del_neigh", ip, e))
    }

    async fn replace_fdb(
        &mut self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.octets())
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error("replace_fdb", format!("{mac} dst {dst}"), e))
    }

    async fn del_fdb(&mut self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), KernelError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(neigh_address(dst)));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|e| nl_error("del_fdb", format!("{mac} dst {dst}"), e))
    }
}
