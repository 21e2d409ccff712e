//! What a logged packet says: its addresses, protocol and ports, read from the bytes NFLOG hands
//! over ([`LoggedPacket`]): IPv4, IPv6 (past extension headers) or ARP. Pure; never panics on
//! malformed input (a payload it cannot read gives no flow).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::model::Protocol;
use crate::netfilter::nflog::LoggedPacket;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

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
    /// Where the transport header starts in the payload (none for ARP and later fragments).
    pub l4_offset: Option<usize>,
}

impl Flow {
    /// The data of a UDP datagram (after its 8-byte header), if this is one and it was logged.
    pub fn udp_data<'a>(&self, packet: &'a LoggedPacket) -> Option<&'a [u8]> {
        if self.protocol != FlowProtocol::L4(Protocol::Udp) {
            return None;
        }
        packet.payload.get(self.l4_offset? + 8..)
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
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
                l4_offset: None,
            })
        }
        ETH_P_IP if b.first()? >> 4 == 4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let src: [u8; 4] = b.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = b.get(16..20)?.try_into().ok()?;
            // Later fragments carry no transport header.
            let fragment_offset = u16_at(b, 6)? & 0x1fff;
            let l4 = (fragment_offset == 0).then_some(ihl);
            Some(with_ports(
                b,
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
                                b,
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
                b,
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                next,
                Some(at),
            ))
        }
        _ => None,
    }
}

/// `l4_offset`: where the transport header starts in `b`, if it is there to read.
fn with_ports(b: &[u8], src: IpAddr, dst: IpAddr, proto: u8, l4_offset: Option<usize>) -> Flow {
    let l4_offset = l4_offset.filter(|&at| at <= b.len());
    let l4 = l4_offset.and_then(|at| b.get(at..));
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
        l4_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reads_an_ipv4_tcp_flow() {
        let p = LoggedPacket {
            family: NFPROTO_IPV4,
            hw_protocol: ETH_P_IP,
            payload: ipv4_tcp([10, 244, 2, 5], [10, 244, 1, 7], 40000, 80),
            ..Default::default()
        };
        let flow = parse_flow(&p).unwrap();
        assert_eq!(flow.src, "10.244.2.5".parse::<IpAddr>().unwrap());
        assert_eq!(flow.dst, "10.244.1.7".parse::<IpAddr>().unwrap());
        assert_eq!(flow.protocol, FlowProtocol::L4(Protocol::Tcp));
        assert_eq!((flow.src_port, flow.dst_port), (Some(40000), Some(80)));
        assert_eq!(flow.protocol.as_str(), "TCP");
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
        let valid = ipv4_tcp([1; 4], [2; 4], 1, 2);
        let mut payloads: Vec<(u8, u16, Vec<u8>)> = vec![
            (2, ETH_P_IP, vec![0x45]),
            (10, ETH_P_IPV6, vec![0x60, 0, 0, 0, 0, 0, 0]),
            (7, ETH_P_ARP, vec![0, 1, 8, 0, 6]),
            (2, 0, vec![]),
        ];
        for cut in 0..valid.len() {
            payloads.push((2, ETH_P_IP, valid[..cut].to_vec()));
        }
        for (family, hw_protocol, payload) in payloads {
            let p = LoggedPacket {
                family,
                hw_protocol,
                payload,
                ..Default::default()
            };
            let _ = parse_flow(&p);
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
}
