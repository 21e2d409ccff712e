//! Reading the packets the ruleset logs (`log group N`) through NFLOG: a `NETLINK_NETFILTER`
//! socket subscribed to the group (subsystem `NFNL_SUBSYS_ULOG`), and a pure parser of what it
//! receives: the log prefix (which [`super::parse_prefix`] maps to a verdict and a policy) and the
//! packet's addresses, protocol and ports.
//!
//! The parser never panics on malformed input: a truncated message or attribute ends the walk, a
//! payload it cannot read gives no flow. Rate limiting is the ruleset's (`limit rate`), so the
//! reader never sees a flood.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use super::model::Protocol;
use super::netlink::{
    attributes, message, messages, open_socket, push_attr, set_recv_timeout, u16_ne_at, u32_ne_at,
    NFGENMSG_LEN, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_REQUEST,
};

#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("NFLOG socket ({op}): {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("binding NFLOG group {group}: {source}")]
    Bind { group: u16, source: std::io::Error },
}

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PACKET_HDR: u16 = 1;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_IFINDEX_PHYSINDEV: u16 = 6;
const NFULA_IFINDEX_PHYSOUTDEV: u16 = 7;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_HWHEADER: u16 = 16;
const NLM_F_ACK: u16 = 4;
/// How many bytes of each packet the kernel copies: enough for IPv6 + extension headers + ports.
const COPY_RANGE: u32 = 128;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One logged packet as NFLOG delivers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedPacket {
    /// `nfgenmsg.family`: `NFPROTO_*` of the hook that logged (inet tables report IPv4/IPv6,
    /// the bridge table `NFPROTO_BRIDGE`).
    pub family: u8,
    /// The frame's ethertype (`NFULA_PACKET_HDR`), 0 if absent.
    pub hw_protocol: u16,
    pub hook: u8,
    pub prefix: String,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// Bridge ports (with br_netfilter, or in the bridge family).
    pub physindev: Option<u32>,
    pub physoutdev: Option<u32>,
    /// From the network header on.
    pub payload: Vec<u8>,
    /// The link-layer header (`NFULA_HWHEADER`): for Ethernet, destination, source, ethertype.
    pub hw_header: Vec<u8>,
}

impl LoggedPacket {
    /// Destination and source MAC of an Ethernet frame, from its logged header.
    pub fn ether_addrs(&self) -> Option<([u8; 6], [u8; 6])> {
        let dst = self.hw_header.get(0..6)?.try_into().ok()?;
        let src = self.hw_header.get(6..12)?.try_into().ok()?;
        Some((dst, src))
    }
}

/// Transport of a logged packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowProtocol {
    L4(Protocol),
    Icmp,
    Arp,
    Other(u8),
}

impl FlowProtocol {
    pub fn as_str(&self) -> String {
        match self {
            FlowProtocol::L4(p) => p.to_string(),
            FlowProtocol::Icmp => "ICMP".into(),
            FlowProtocol::Arp => "ARP".into(),
            FlowProtocol::Other(n) => format!("IP-{n}"),
        }
    }
}

/// Addresses, protocol and ports of a logged packet. For ARP, `src`/`dst` are the sender and
/// target protocol addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: FlowProtocol,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Parses a buffer of netlink messages, keeping the NFLOG packets.
pub fn parse_messages(buf: &[u8]) -> Vec<LoggedPacket> {
    messages(buf)
        .filter(|(kind, body)| {
            *kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && body.len() >= NFGENMSG_LEN
        })
        .map(|(_, body)| parse_packet(body[0], &body[NFGENMSG_LEN..]))
        .collect()
}

fn parse_packet(family: u8, attrs: &[u8]) -> LoggedPacket {
    let mut p = LoggedPacket {
        family,
        ..Default::default()
    };
    let ifindex = |v: &[u8]| {
        v.get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    for (kind, value) in attributes(attrs) {
        match kind {
            NFULA_PACKET_HDR => {
                p.hw_protocol = u16_at(value, 0).unwrap_or(0);
                p.hook = value.get(2).copied().unwrap_or(0);
            }
            NFULA_PREFIX => {
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                p.prefix = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            NFULA_IFINDEX_INDEV => p.indev = ifindex(value),
            NFULA_IFINDEX_OUTDEV => p.outdev = ifindex(value),
            NFULA_IFINDEX_PHYSINDEV => p.physindev = ifindex(value),
            NFULA_IFINDEX_PHYSOUTDEV => p.physoutdev = ifindex(value),
            NFULA_PAYLOAD => p.payload = value.to_vec(),
            NFULA_HWHEADER => p.hw_header = value.to_vec(),
            _ => {}
        }
    }
    p
}

/// Reads the flow out of a logged packet: IPv4, IPv6 (past extension headers) or ARP.
pub fn parse_flow(packet: &LoggedPacket) -> Option<Flow> {
    let b = &packet.payload;
    let ethertype = match (packet.hw_protocol, packet.family) {
        (0, NFPROTO_IPV4) => ETH_P_IP,
        (0, NFPROTO_IPV6) => ETH_P_IPV6,
        (t, _) => t,
    };
    match ethertype {
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
            if u16_at(b, 0)? != 1 || u16_at(b, 2)? != ETH_P_IP || b.get(4..6)? != [6, 4] {
                return None;
            }
            let ip = |at: usize| -> Option<IpAddr> {
                let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(o)))
            };
            Some(Flow {
                src: ip(14)?,
                dst: ip(24)?,
                protocol: FlowProtocol::Arp,
                src_port: None,
                dst_port: None,
            })
        }
        ETH_P_IP if b.first()? >> 4 == 4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let src: [u8; 4] = b.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = b.get(16..20)?.try_into().ok()?;
            // Later fragments carry no transport header.
            let fragment_offset = u16_at(b, 6)? & 0x1fff;
            let l4 = if fragment_offset == 0 {
                b.get(ihl..)
            } else {
                None
            };
            Some(with_ports(
                IpAddr::V4(src.into()),
                IpAddr::V4(dst.into()),
                b[9],
                l4,
            ))
        }
        ETH_P_IPV6 if b.first()? >> 4 == 6 => {
            let src: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = b.get(24..40)?.try_into().ok()?;
            let mut next = b[6];
            let mut at = 40;
            // Hop-by-hop, routing, destination options: skip; a fragment header ends the walk.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        next = *b.get(at)?;
                        at += (usize::from(*b.get(at + 1)?) + 1) * 8;
                    }
                    44 => {
                        let offset = u16_at(b, at + 2)? >> 3;
                        next = *b.get(at)?;
                        at += 8;
                        if offset != 0 {
                            return Some(with_ports(
                                IpAddr::V6(Ipv6Addr::from(src)),
                                IpAddr::V6(Ipv6Addr::from(dst)),
                                next,
                                None,
                            ));
                        }
                    }
                    _ => break,
                }
            }
            Some(with_ports(
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                next,
                b.get(at..),
            ))
        }
        _ => None,
    }
}

fn with_ports(src: IpAddr, dst: IpAddr, proto: u8, l4: Option<&[u8]>) -> Flow {
    let protocol = match proto {
        6 => FlowProtocol::L4(Protocol::Tcp),
        17 => FlowProtocol::L4(Protocol::Udp),
        132 => FlowProtocol::L4(Protocol::Sctp),
        1 | 58 => FlowProtocol::Icmp,
        n => FlowProtocol::Other(n),
    };
    let (src_port, dst_port) = match (protocol, l4) {
        (FlowProtocol::L4(_), Some(h)) => (u16_at(h, 0), u16_at(h, 2)),
        _ => (None, None),
    };
    Flow {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
    }
}

/// One NFLOG config request: `nlmsghdr` + `nfgenmsg` (family unspecified, `res_id` = group) +
/// attributes.
fn config_message(group: u16, seq: u32, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    body.extend_from_slice(&group.to_be_bytes());
    for (kind, value) in attrs {
        push_attr(&mut body, *kind, value);
    }
    message(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &body,
    )
}

/// The two requests that subscribe to `group`: bind, then copy whole packets (up to
/// [`COPY_RANGE`] bytes).
pub fn subscribe_messages(group: u16) -> [Vec<u8>; 2] {
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    [
        config_message(group, 1, &[(NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND])]),
        config_message(group, 2, &[(NFULA_CFG_MODE, mode)]),
    ]
}

/// The error code of an `NLMSG_ERROR` reply (0 is an ACK), if `buf` starts with one.
fn ack_errno(buf: &[u8]) -> Option<i32> {
    if u16_ne_at(buf, 4)? != NLMSG_ERROR {
        return None;
    }
    Some(u32_ne_at(buf, NLMSG_HDRLEN)? as i32)
}

/// A socket subscribed to one NFLOG group in the calling thread's network namespace.
pub struct NflogSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl NflogSocket {
    /// Subscribes to `group`. `poll` bounds each [`recv`](Self::recv), so a reader thread can
    /// notice that it should stop.
    pub fn open(group: u16, poll: Duration) -> Result<NflogSocket, NflogError> {
        let sock = |op| move |source| NflogError::Socket { op, source };
        let fd = open_socket().map_err(sock("socket"))?;
        // SAFETY: zeroed sockaddr_nl is valid; bind(2) with its exact size.
        let bound = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(sock("bind")(std::io::Error::last_os_error()));
        }
        set_recv_timeout(&fd, poll).map_err(sock("SO_RCVTIMEO"))?;
        // A bigger receive buffer rides out bursts up to the rate limit.
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt(2) with an int; failure only means the default size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let mut s = NflogSocket {
            fd,
            buf: vec![0; 1 << 16],
        };
        for msg in subscribe_messages(group) {
            s.send(&msg).map_err(sock("send"))?;
            let n = s.recv_raw().map_err(sock("recv ack"))?;
            match ack_errno(&s.buf[..n]) {
                Some(0) | None => {}
                Some(e) => {
                    return Err(NflogError::Bind {
                        group,
                        source: std::io::Error::from_raw_os_error(-e),
                    })
                }
            }
        }
        Ok(s)
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        super::netlink::send(&self.fd, msg)
    }

    fn recv_raw(&mut self) -> std::io::Result<usize> {
        super::netlink::recv(&self.fd, &mut self.buf)
    }

    /// Waits (at most the poll interval) for logged packets. `Ok(empty)` on timeout; ENOBUFS
    /// (the kernel dropped logs because we were slow) is reported as an error the caller may
    /// count and ignore.
    pub fn recv(&mut self) -> std::io::Result<Vec<LoggedPacket>> {
        match self.recv_raw() {
            Ok(n) => Ok(parse_messages(&self.buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::netlink::align4;
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    /// A netlink message as the kernel sends an NFLOG packet.
    fn packet_message(family: u8, hw: u16, prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 100];
        let mut hdr = hw.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[2, 0]);
        body.extend(attr(NFULA_PACKET_HDR, &hdr));
        body.extend(attr(NFULA_IFINDEX_INDEV, &7u32.to_be_bytes()));
        body.extend(attr(NFULA_IFINDEX_PHYSINDEV, &9u32.to_be_bytes()));
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        body.extend(attr(NFULA_PREFIX, &p));
        body.extend(attr(NFULA_PAYLOAD, payload));
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend(body);
        msg
    }

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn parses_an_inet_tcp_log() {
        let mut buf = packet_message(
            NFPROTO_IPV4,
            ETH_P_IP,
            "veilnet:deny:ingress:x/a",
            &ipv4_tcp([10, 244, 2, 5], [10, 244, 1, 7], 40000, 80),
        );
        // A second message in the same buffer, and a non-NFLOG one that is skipped.
        let mut other = vec![0u8; NLMSG_HDRLEN];
        other[0] = NLMSG_HDRLEN as u8;
        other[4] = 3; // NLMSG_DONE
        buf.extend(other);
        buf.extend(packet_message(
            NFPROTO_IPV4,
            ETH_P_IP,
            "veilnet:allow:egress:y/web",
            &ipv4_tcp([10, 244, 1, 7], [10, 244, 3, 9], 1, 2),
        ));
        let packets = parse_messages(&buf);
        assert_eq!(packets.len(), 2);
        let p = &packets[0];
        assert_eq!(p.prefix, "veilnet:deny:ingress:x/a");
        assert_eq!(
            (p.indev, p.physindev, p.outdev, p.hook),
            (Some(7), Some(9), None, 2)
        );
        let flow = parse_flow(p).unwrap();
        assert_eq!(flow.src, "10.244.2.5".parse::<IpAddr>().unwrap());
        assert_eq!(flow.dst, "10.244.1.7".parse::<IpAddr>().unwrap());
        assert_eq!(flow.protocol, FlowProtocol::L4(Protocol::Tcp));
        assert_eq!((flow.src_port, flow.dst_port), (Some(40000), Some(80)));
        assert_eq!(packets[1].prefix, "veilnet:allow:egress:y/web");
    }

    #[test]
    fn parses_arp_ipv6_and_fragments() {
        // ARP reply: 10.244.1.9 is-at ..., to 10.244.1.1.
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 244, 1, 9]);
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 10, 244, 1, 1]);
        let p = LoggedPacket {
            family: 7,
            hw_protocol: ETH_P_ARP,
            payload: arp,
            ..Default::default()
        };
        let f = parse_flow(&p).unwrap();
        assert_eq!(f.protocol, FlowProtocol::Arp);
        assert_eq!(f.src, "10.244.1.9".parse::<IpAddr>().unwrap());
        assert_eq!(f.dst, "10.244.1.1".parse::<IpAddr>().unwrap());

        // IPv6 UDP behind a hop-by-hop header, family given by the hook (no hw header).
        let mut v6 = vec![0x60, 0, 0, 0, 0, 16, 0, 64];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
        v6.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let p = LoggedPacket {
            family: NFPROTO_IPV6,
            payload: v6,
            ..Default::default()
        };
        let f = parse_flow(&p).unwrap();
        assert_eq!(f.protocol, FlowProtocol::L4(Protocol::Udp));
        assert_eq!((f.src_port, f.dst_port), (Some(5000), Some(53)));

        // A later IPv4 fragment: addresses but no ports.
        let mut frag = ipv4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 5, 6);
        frag[6] = 0x00;
        frag[7] = 0x10;
        let p = LoggedPacket {
            family: NFPROTO_IPV4,
            payload: frag,
            ..Default::default()
        };
        let f = parse_flow(&p).unwrap();
        assert_eq!((f.src_port, f.dst_port), (None, None));
    }

    #[test]
    fn garbage_never_panics() {
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff; 3],
            vec![0xff; 64],
            vec![0; 64],
            packet_message(2, ETH_P_IP, "x", &[0x45]),
            packet_message(2, ETH_P_IPV6, "x", &[0x60, 0, 0, 0, 0, 0, 0]),
            packet_message(7, ETH_P_ARP, "x", &[0, 1, 8, 0, 6]),
        ];
        // Every truncation of a valid message.
        let valid = packet_message(2, ETH_P_IP, "veilnet:x", &ipv4_tcp([1; 4], [2; 4], 1, 2));
        for cut in 0..valid.len() {
            inputs.push(valid[..cut].to_vec());
        }
        // An attribute claiming more than there is.
        let mut lying = valid.clone();
        lying[NLMSG_HDRLEN + 4] = 0xff;
        inputs.push(lying);
        for input in &inputs {
            for p in parse_messages(input) {
                let _ = parse_flow(&p);
            }
        }
        // IPv6 with a loop of extension headers that runs off the end.
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 0, 0];
        v6.extend_from_slice(&[0; 32]);
        v6.extend_from_slice(&[0, 200]);
        let p = LoggedPacket {
            family: NFPROTO_IPV6,
            payload: v6,
            ..Default::default()
        };
        assert_eq!(parse_flow(&p), None);
    }

    #[test]
    fn subscribe_requests_are_well_formed() {
        let [bind, mode] = subscribe_messages(100);
        assert_eq!(u32_ne_at(&bind, 0).unwrap() as usize, bind.len());
        assert_eq!(u16_ne_at(&bind, 4).unwrap(), (4 << 8) | 1);
        // res_id is the group, big-endian.
        assert_eq!(&bind[NLMSG_HDRLEN + 2..NLMSG_HDRLEN + 4], &[0, 100]);
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&mode[NLMSG_HDRLEN + 4..])
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(attrs, vec![(NFULA_CFG_MODE, vec![0, 0, 0, 128, 2, 0])]);
    }
}
