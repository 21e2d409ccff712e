//! A small synchronous rtnetlink client over `netlink-sys`: exactly the verbs the plugin needs
//! (links, IPv4 addresses and routes), with errno classified in one place ([`classify`]).
//!
//! A socket belongs to the network namespace it was opened in, for its whole life; see
//! [`crate::sandbox`] for opening one inside a pod's namespace.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    BridgeBooleanOptionFlags, BridgeBooleanOptions, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoPortKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Large enough for any single datagram the kernel sends for our requests (dumps are capped at
/// 32 KiB per datagram).
const RECV_BUFFER: usize = 64 * 1024;

/// The errno classes callers react to; everything else is a plain failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrnoKind {
    /// `EEXIST`: the object is already there.
    AlreadyExists,
    /// `ENOENT`, `ENODEV`, `ESRCH`, `EADDRNOTAVAIL`: the object (or what it refers to) is absent.
    NotFound,
    Other,
}

/// The single place that interprets kernel errnos.
pub fn classify(errno: i32) -> ErrnoKind {
    match errno {
        libc::EEXIST => ErrnoKind::AlreadyExists,
        libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL => ErrnoKind::NotFound,
        _ => ErrnoKind::Other,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket {op}: {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        kind: ErrnoKind,
        source: std::io::Error,
    },
    #[error("{op}: unexpected netlink reply: {detail}")]
    Protocol { op: String, detail: String },
}

impl NetlinkError {
    pub fn kind(&self) -> ErrnoKind {
        match self {
            NetlinkError::Kernel { kind, .. } => *kind,
            _ => ErrnoKind::Other,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        self.kind() == ErrnoKind::AlreadyExists
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrnoKind::NotFound
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// What we read back about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub up: bool,
    /// Index of the bridge (or other controller) the link is attached to.
    pub controller: Option<u32>,
    /// `IFLA_INFO_KIND`, e.g. "bridge" or "veth".
    pub kind: Option<String>,
    /// The bridge-port settings, when the link is a bridge port (`IFLA_INFO_PORT_DATA`).
    pub port: Option<BridgePortFlags>,
}

/// The bridge-port settings veilnet cares about (`None`: the kernel did not report it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgePortFlags {
    pub learning: Option<bool>,
    pub unicast_flood: Option<bool>,
    pub group_fwd_mask: Option<u16>,
}

/// `fdb_max_learned` of a pod bridge (kernel 6.8+; older kernels ignore it): pod ports never
/// learn, so this only bounds the FDB's memory should some port learn after all (~125 B each).
pub const BRIDGE_FDB_MAX_LEARNED: u32 = 1024;

/// `group_fwd_mask` of a pod's port: LLDP (`01:80:c2:00:00:0e`) takes the bridge's forward path,
/// through `table bridge veilnet prerouting`, where it is dropped and counted as spoofing. (The
/// bridge handles LLDP locally otherwise, with no netfilter hook at all.)
pub const POD_PORT_GROUP_FWD_MASK: u16 = 1 << 0x0e;

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// How a pod's bridge port differs from what ADD made of it (flags of [`BridgePortFlags::pod_port`]
/// and a static FDB entry for the pod's MAC), if it does (pure: CHECK and the agent's repair).
pub fn pod_port_drift(
    port: Option<&BridgePortFlags>,
    static_macs: &[Vec<u8>],
    pod_mac: &[u8],
) -> Option<String> {
    let want = BridgePortFlags::pod_port();
    let have = port.cloned().unwrap_or_default();
    let mut drift = Vec::new();
    if have.learning != want.learning {
        drift.push(format!("learning {:?}, want off", have.learning));
    }
    if have.unicast_flood != want.unicast_flood {
        drift.push(format!("unicast flood {:?}, want off", have.unicast_flood));
    }
    if have.group_fwd_mask != want.group_fwd_mask {
        drift.push(format!(
            "group_fwd_mask {:?}, want {:#x}",
            have.group_fwd_mask, POD_PORT_GROUP_FWD_MASK
        ));
    }
    if !static_macs.iter().any(|m| m == pod_mac) {
        drift.push(format!("no static FDB entry for {}", format_mac(pod_mac)));
    }
    (!drift.is_empty()).then(|| drift.join(", "))
}

impl BridgePortFlags {
    /// What a pod's port must look like: no learning (the pod's MAC is a static FDB entry), no
    /// unknown-unicast flooding to it, LLDP through the netfilter hook.
    pub fn pod_port() -> BridgePortFlags {
        BridgePortFlags {
            learning: Some(false),
            unicast_flood: Some(false),
            group_fwd_mask: Some(POD_PORT_GROUP_FWD_MASK),
        }
    }
}

impl Link {
    /// `aa:bb:cc:dd:ee:ff`, as CNI results spell MACs.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteV4 {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// A veth pair whose peer is created directly inside another namespace.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub host_name: &'a str,
    pub peer_name: &'a str,
    pub mtu: u32,
    /// An open fd of the peer's network namespace.
    pub peer_netns_fd: RawFd,
    /// Bridge to attach the host end to.
    pub controller: Option<u32>,
    /// The peer's MAC (the `mac` capability); `None`: the kernel picks a random one.
    pub peer_mac: Option<[u8; 6]>,
    /// Create the host end up. Down keeps the pair without carrier (no frame either way) until
    /// the caller brings it up, e.g. once the pod's policy is in place.
    pub host_up: bool,
}

/// A route socket bound to the namespace it was created in.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink> {
        let sock_err = |op| move |source| NetlinkError::Socket { op, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err("open"))?;
        // Let the kernel filter dumps by the header fields we set (e.g. address by ifindex).
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(sock_err("set strict check"))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(sock_err("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(sock_err("connect"))?;
        Ok(Netlink {
            socket,
            sequence: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// Sends one request and collects the replies: up to the ACK for writes and single gets,
    /// up to `NLMSG_DONE` for dumps.
    fn request(
        &mut self,
        op: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        self.sequence = self.sequence.wrapping_add(1);
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetlinkError::Socket { op: "send", source })?;

        let protocol = |detail: String| NetlinkError::Protocol {
            op: op.to_string(),
            detail,
        };
        let mut replies = Vec::new();
        loop {
            let size = match self.socket.recv(&mut &mut self.buffer[..], 0) {
                Ok(size) => size,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Socket { op: "recv", source }),
            };
            let mut offset = 0;
            while offset < size {
                let chunk = &self.buffer[offset..size];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(chunk)
                    .map_err(|e| protocol(e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 || length > chunk.len() {
                    return Err(protocol(format!("bad message length {length}")));
                }
                // Netlink messages are 4-byte aligned within a datagram.
                offset += (length + 3) & !3;
                if reply.header.sequence_number != self.sequence {
                    continue; // a leftover from an earlier, abandoned request
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(code) => {
                            let errno = code.get().abs();
                            return Err(NetlinkError::Kernel {
                                op: op.to_string(),
                                kind: classify(errno),
                                source: std::io::Error::from_raw_os_error(errno),
                            });
                        }
                    },
                    NetlinkPayload::Overrun(_) => {
                        return Err(protocol("receive buffer overrun".into()))
                    }
                    _ => {}
                }
            }
        }
    }

    fn get_link(&mut self, op: String, message: LinkMessage) -> Result<Option<Link>> {
        match self.request(&op, RouteNetlinkMessage::GetLink(message), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(parse_link(link)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(format!("get link {name}"), m)
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.get_link(format!("get link #{index}"), m)
    }

    /// Creates a bridge, up, that learns nothing from link-local frames. `EEXIST` comes back as an error for the caller to judge.
    pub fn create_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        // Link-local frames (01:80:c2:00:00:0X) never teach the FDB; learned entries are capped.
        let no_ll_learn = BridgeBooleanOptionFlags::NoLinkLocalLearn;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::MultiBoolOpt(BridgeBooleanOptions {
                    value: no_ll_learn,
                    mask: no_ll_learn,
                }),
                InfoBridge::FdbMaxLearned(BRIDGE_FDB_MAX_LEARNED),
            ])),
        ]));
        self.request(
            &format!("create bridge {name}"),
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Creates a veth pair in one request: the host end (up if asked) attached to its bridge, the peer
    /// (still down) directly in its namespace, so there is never a half-placed pair to undo.
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<()> {
        // The peer is brought up afterwards through the pod's socket: recent kernels refuse
        // IFF_UP on a veth peer at creation (ENOTCONN).
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(spec.peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
        peer.attributes
            .push(LinkAttribute::NetNsFd(spec.peer_netns_fd));
        if let Some(mac) = spec.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }

        let mut m = LinkMessage::default();
        if spec.host_up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        m.attributes
            .push(LinkAttribute::IfName(spec.host_name.to_string()));
        m.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if let Some(controller) = spec.controller {
            m.attributes.push(LinkAttribute::Controller(controller));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            &format!("create veth {} <-> {}", spec.host_name, spec.peer_name),
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Deletes a link by name. Returns false when it did not exist.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(
            &format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(
            &format!("set link #{index} up"),
            RouteNetlinkMessage::SetLink(m),
            0,
        )
        .map(drop)
    }

    /// Sets a bridge port's flags to `flags` (`ip link set dev X type bridge_slave learning off
    /// flood off group_fwd_mask …`) and flushes its dynamic FDB entries (static ones stay), so no
    /// MAC learned before stays pointed at the port. Idempotent.
    pub fn set_bridge_port(&mut self, index: u32, flags: &BridgePortFlags) -> Result<()> {
        let mut data = Vec::new();
        if let Some(v) = flags.learning {
            data.push(InfoBridgePort::Learning(v));
        }
        if let Some(v) = flags.unicast_flood {
            data.push(InfoBridgePort::UnicastFlood(v));
        }
        if let Some(v) = flags.group_fwd_mask {
            data.push(InfoBridgePort::GroupFwdMask(v));
        }
        // The kernel applies the flags first, then the flush.
        data.push(InfoBridgePort::Flush);
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(data)),
        ]));
        self.request(
            &format!("set bridge port flags of link #{index}"),
            RouteNetlinkMessage::NewLink(m),
            0,
        )
        .map(drop)
    }

    /// `ip link set dev X type bridge_slave hairpin on|off`: whether the bridge may send a frame
    /// back out the port it came in on (hostPort hairpin, see `crate::hostport`). Only this flag
    /// is sent, so the port's other settings stay as they are.
    pub fn set_bridge_port_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                on,
            )])),
        ]));
        self.request(
            &format!("set hairpin mode of link #{index}"),
            RouteNetlinkMessage::NewLink(m),
            0,
        )
        .map(drop)
    }

    /// `bridge fdb replace MAC dev <port> master static`: the bridge forwards `mac` to the port
    /// and never moves it elsewhere (static entries are not learned over). Idempotent; an entry
    /// for `mac` on another port is moved here.
    pub fn replace_static_fdb(&mut self, port: u32, mac: &[u8]) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = port;
        m.header.state = NeighbourState::Noarp;
        m.header.flags = NeighbourFlags::Controller;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            &format!("replace static fdb {} on link #{port}", format_mac(mac)),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// The static (`NUD_NOARP` or permanent) bridge FDB entries pointing at `port`, as MACs.
    pub fn static_fdb_on(&mut self, port: u32) -> Result<Vec<Vec<u8>>> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = port;
        let replies = self.request(
            &format!("list fdb of link #{port}"),
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                // Dumps carry no NTF_MASTER flag: a bridge's entries name it in NDA_MASTER.
                RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == port
                        && matches!(
                            n.header.state,
                            NeighbourState::Noarp | NeighbourState::Permanent
                        )
                        && n.attributes
                            .iter()
                            .any(|a| matches!(a, NeighbourAttribute::Controller(_))) =>
                {
                    n.attributes.into_iter().find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(mac) => Some(mac),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds `addr` (host bits = the address) to the link. `EEXIST` is returned to the caller.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Net) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = addr.prefix_len();
        m.header.scope = AddressScope::Universe;
        m.header.index = index;
        m.attributes
            .push(AddressAttribute::Local(addr.addr().into()));
        m.attributes
            .push(AddressAttribute::Address(addr.addr().into()));
        if addr.prefix_len() < 31 {
            m.attributes
                .push(AddressAttribute::Broadcast(addr.broadcast()));
        }
        self.request(
            &format!("add address {addr} to link #{index}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// IPv4 addresses on the link.
    pub fn addresses_v4(&mut self, index: u32) -> Result<Vec<Ipv4Net>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = index;
        let replies = self.request(
            &format!("list addresses of link #{index}"),
            RouteNetlinkMessage::GetAddress(m),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let prefix = a.header.prefix_len;
                    a.attributes.into_iter().find_map(|attr| match attr {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip)) => {
                            Ipv4Net::new(ip, prefix).ok()
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a main-table route to `dst` via `gateway` out of `oif`. `EEXIST` goes to the caller.
    pub fn add_route_v4(
        &mut self,
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = dst.prefix_len();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        m.header.kind = RouteType::Unicast;
        if dst.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    dst.network(),
                )));
        }
        if let Some(gw) = gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        self.request(
            &format!("add route {dst}{via} dev #{oif}"),
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Unicast IPv4 routes of the main table.
    pub fn routes_v4(&mut self) -> Result<Vec<RouteV4>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let replies = self.request(
            "list IPv4 routes",
            RouteNetlinkMessage::GetRoute(m),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(route) => parse_route(route),
                _ => None,
            })
            .collect())
    }
}

fn parse_link(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mtu: 0,
        mac: Vec::new(),
        up: message.header.flags.contains(LinkFlags::Up),
        controller: None,
        kind: None,
        port: None,
    };
    for attr in message.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Controller(index) => link.controller = Some(index),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            let mut port = BridgePortFlags::default();
                            for attr in attrs {
                                match attr {
                                    InfoBridgePort::Learning(v) => port.learning = Some(v),
                                    InfoBridgePort::UnicastFlood(v) => port.unicast_flood = Some(v),
                                    InfoBridgePort::GroupFwdMask(v) => {
                                        port.group_fwd_mask = Some(v)
                                    }
                                    _ => {}
                                }
                            }
                            link.port = Some(port);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_route(route: RouteMessage) -> Option<RouteV4> {
    let mut table = u32::from(route.header.table);
    let mut dst_ip = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    for attr in route.attributes {
        match attr {
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst_ip = ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(ip),
            RouteAttribute::Oif(index) => oif = Some(index),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let dst = Ipv4Net::new(dst_ip, route.header.destination_prefix_length).ok()?;
    Some(RouteV4 { dst, gateway, oif })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classes() {
        assert_eq!(classify(libc::EEXIST), ErrnoKind::AlreadyExists);
        assert_eq!(classify(libc::ENODEV), ErrnoKind::NotFound);
        assert_eq!(classify(libc::ENOENT), ErrnoKind::NotFound);
        assert_eq!(classify(libc::EPERM), ErrnoKind::Other);
    }

    #[test]
    fn pod_port_drift_names_every_difference() {
        let mac = vec![0x0a, 0x58, 0, 0, 0, 1];
        let good = BridgePortFlags::pod_port();
        assert_eq!(
            pod_port_drift(Some(&good), std::slice::from_ref(&mac), &mac),
            None
        );
        // A port from before veilnet pinned MACs: kernel defaults, no static entry.
        let old = BridgePortFlags {
            learning: Some(true),
            unicast_flood: Some(true),
            group_fwd_mask: Some(0),
        };
        let d = pod_port_drift(Some(&old), &[], &mac).unwrap();
        for what in ["learning", "unicast flood", "group_fwd_mask", "static FDB"] {
            assert!(d.contains(what), "{d}");
        }
        // Unknown flags (not a bridge port) count as drift; another MAC is not the pod's.
        assert!(pod_port_drift(None, std::slice::from_ref(&mac), &mac).is_some());
        assert!(pod_port_drift(Some(&good), &[vec![2; 6]], &mac)
            .unwrap()
            .contains("static FDB"));
    }

    #[test]
    fn mac_parse() {
        assert_eq!(
            parse_mac("02:ab:00:01:10:ff"),
            Some([2, 0xab, 0, 1, 0x10, 0xff])
        );
        for bad in [
            "",
            "02:ab:00:01:10",
            "02:ab:00:01:10:ff:00",
            "2:ab:00:01:10:ff",
            "zz:ab:00:01:10:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac(&[0x02, 0xab, 0, 1, 0x10, 0xff]),
            "02:ab:00:01:10:ff"
        );
    }
}
