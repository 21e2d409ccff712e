//! Conntrack over ctnetlink (`NFNL_SUBSYS_CTNETLINK`): a dump of the table and the delete of one
//! entry by its original tuple, on a `NETLINK_NETFILTER` socket in the calling thread's network
//! namespace (no `conntrack` tool). Which entries to delete is the caller's judgement
//! (`policy::conntrack`, strict mode).
//!
//! The request builders and the parser are pure and never panic on malformed input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::DefaultNla;

use super::socket::{
    attr, attributes, error_code, message_type, messages, nested, NfRequest, NfSocket,
    NFGENMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use super::{NetfilterError, Result};

const NFNL_SUBSYS_CTNETLINK: u8 = 1;
const IPCTNL_MSG_CT_NEW: u8 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
const IPCTNL_MSG_CT_DELETE: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// IP protocols whose tuples carry ports (TCP, UDP, SCTP).
fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// A dump longer than this is given up (a table growing under the walk); the kernel's default
/// `nf_conntrack_max` is at most 262,144.
pub const MAX_ENTRIES: usize = 4 << 20;

/// One direction of a connection as conntrack records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports (TCP, UDP, SCTP, …); 0 when the protocol has none.
    pub src_port: u16,
    pub dst_port: u16,
}

/// One conntrack entry: the original tuple (the initiator's direction, what a delete names),
/// the reply tuple (after NAT) and the zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub orig: CtTuple,
    pub reply: Option<CtTuple>,
    pub zone: u16,
}

#[cfg(test)]
impl CtEntry {
    /// A TCP entry and its reply tuple (tests build dumps from these).
    pub(crate) fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> CtEntry {
        let tuple = |src, src_port, dst, dst_port| CtTuple {
            src,
            dst,
            proto: IPPROTO_TCP,
            src_port,
            dst_port,
        };
        CtEntry {
            orig: tuple(src, sport, dst, dport),
            reply: Some(tuple(dst, dport, src, sport)),
            zone: 0,
        }
    }
}

impl CtEntry {
    /// The connection as the forward hook saw its first packet: original source and port,
    /// destination and port after DNAT.
    pub fn forwarded(&self) -> CtTuple {
        let mut t = self.orig;
        if let Some(r) = &self.reply {
            t.dst = r.src;
            t.dst_port = r.src_port;
        }
        t
    }
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`, all families.
pub fn dump_request(seq: u32) -> Vec<u8> {
    NfRequest {
        message_type: message_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET),
        family: libc::AF_UNSPEC as u8,
        res_id: 0,
        attrs: Vec::new(),
    }
    .to_bytes(NLM_F_REQUEST | NLM_F_DUMP, seq)
}

/// `CTA_TUPLE_IP` and `CTA_TUPLE_PROTO` of one direction.
fn tuple_attrs(t: &CtTuple) -> Vec<DefaultNla> {
    let ip = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => vec![
            attr(CTA_IP_V4_SRC, s.octets()),
            attr(CTA_IP_V4_DST, d.octets()),
        ],
        (s, d) => vec![
            attr(CTA_IP_V6_SRC, v6(s).octets()),
            attr(CTA_IP_V6_DST, v6(d).octets()),
        ],
    };
    let mut proto = vec![attr(CTA_PROTO_NUM, [t.proto])];
    if has_ports(t.proto) {
        proto.push(attr(CTA_PROTO_SRC_PORT, t.src_port.to_be_bytes()));
        proto.push(attr(CTA_PROTO_DST_PORT, t.dst_port.to_be_bytes()));
    }
    vec![nested(CTA_TUPLE_IP, &ip), nested(CTA_TUPLE_PROTO, &proto)]
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// `IPCTNL_MSG_CT_DELETE` of the entry with this original tuple (and zone), acknowledged.
pub fn delete_request(seq: u32, entry: &CtEntry) -> Vec<u8> {
    let family = match entry.orig.src {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    } as u8;
    let mut attrs = vec![nested(CTA_TUPLE_ORIG, &tuple_attrs(&entry.orig))];
    if entry.zone != 0 {
        attrs.push(attr(CTA_ZONE, entry.zone.to_be_bytes()));
    }
    NfRequest {
        message_type: message_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE),
        family,
        res_id: 0,
        attrs,
    }
    .to_bytes(NLM_F_REQUEST | NLM_F_ACK, seq)
}

fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn parse_tuple(b: &[u8]) -> Option<CtTuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut src_port, mut dst_port) = (0, 0);
    for (kind, value) in attributes(b) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in attributes(value) {
                    let v4 = || -> Option<IpAddr> {
                        let o: [u8; 4] = v.get(..4)?.try_into().ok()?;
                        Some(IpAddr::V4(Ipv4Addr::from(o)))
                    };
                    let v6 = || -> Option<IpAddr> {
                        let o: [u8; 16] = v.get(..16)?.try_into().ok()?;
                        Some(IpAddr::V6(Ipv6Addr::from(o)))
                    };
                    match k {
                        CTA_IP_V4_SRC => src = v4(),
                        CTA_IP_V4_DST => dst = v4(),
                        CTA_IP_V6_SRC => src = v6(),
                        CTA_IP_V6_DST => dst = v6(),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attributes(value) {
                    match k {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = be16(v)?,
                        CTA_PROTO_DST_PORT => dst_port = be16(v)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(CtTuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        src_port,
        dst_port,
    })
}

fn parse_entry(attrs: &[u8]) -> Option<CtEntry> {
    let (mut orig, mut reply, mut zone) = (None, None, 0);
    for (kind, value) in attributes(attrs) {
        match kind {
            CTA_TUPLE_ORIG => orig = parse_tuple(value),
            CTA_TUPLE_REPLY => reply = parse_tuple(value),
            CTA_ZONE => zone = be16(value).unwrap_or(0),
            _ => {}
        }
    }
    Some(CtEntry {
        orig: orig?,
        reply,
        zone,
    })
}

/// What one receive buffer of a dump held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DumpPart {
    pub entries: Vec<CtEntry>,
    /// `NLMSG_DONE` seen: the dump is complete.
    pub done: bool,
    /// An `NLMSG_ERROR` with this (negative) errno; 0 is an ACK.
    pub error: Option<i32>,
}

/// Parses one receive buffer of a dump (or of acks). Entries without a readable original tuple
/// are skipped; a truncated message ends the walk.
pub fn parse_dump(buf: &[u8]) -> DumpPart {
    let mut out = DumpPart::default();
    for (kind, body) in messages(buf) {
        match kind {
            NLMSG_DONE => out.done = true,
            NLMSG_ERROR => out.error = error_code(body),
            k if k == message_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW) => {
                if let Some(e) = body.get(NFGENMSG_LEN..).and_then(parse_entry) {
                    out.entries.push(e);
                }
            }
            _ => {}
        }
    }
    out
}

/// A ctnetlink socket in the calling thread's network namespace.
pub struct ConntrackSocket {
    socket: NfSocket,
}

impl ConntrackSocket {
    /// Every receive waits at most `timeout`.
    pub fn open(timeout: Duration) -> Result<ConntrackSocket> {
        Ok(ConntrackSocket {
            socket: NfSocket::open(timeout)?,
        })
    }

    /// Walks the whole conntrack table of the namespace, handing each entry to `each` as it
    /// arrives (nothing is held but one receive buffer); returns how many there were.
    pub fn dump_each(&mut self, mut each: impl FnMut(CtEntry)) -> Result<usize> {
        let io = |op| move |source| NetfilterError::Socket { op, source };
        let seq = self.socket.next_seq();
        self.socket
            .send(&dump_request(seq))
            .map_err(io("send dump"))?;
        let mut count = 0;
        loop {
            let buf = self.socket.recv().map_err(io("recv dump"))?;
            let end = buf.is_empty();
            let part = parse_dump(buf);
            count += part.entries.len();
            part.entries.into_iter().for_each(&mut each);
            if count > MAX_ENTRIES {
                return Err(NetfilterError::TooMany(MAX_ENTRIES));
            }
            if let Some(e) = part.error.filter(|e| *e != 0) {
                return Err(NetfilterError::Refused {
                    op: "conntrack dump",
                    source: std::io::Error::from_raw_os_error(-e),
                });
            }
            if part.done || end {
                return Ok(count);
            }
        }
    }

    /// The whole conntrack table of the namespace.
    pub fn dump(&mut self) -> Result<Vec<CtEntry>> {
        let mut entries = Vec::new();
        self.dump_each(|e| entries.push(e))?;
        Ok(entries)
    }

    /// Deletes one entry by its original tuple. `Ok(false)`: it was gone already (ENOENT).
    pub fn delete(&mut self, entry: &CtEntry) -> std::io::Result<bool> {
        let seq = self.socket.next_seq();
        self.socket.send(&delete_request(seq, entry))?;
        let buf = self.socket.recv()?;
        match parse_dump(buf).error {
            Some(0) | None => Ok(true),
            Some(e) if -e == libc::ENOENT => Ok(false),
            Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::socket::testing::{push_attr, raw_message, u16_at, u32_at, NLMSG_HDRLEN};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Hand-written attribute bytes of one tuple, as the kernel frames them.
    fn tuple_bytes(t: &CtTuple) -> Vec<u8> {
        let mut ip = Vec::new();
        match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
                push_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                push_attr(&mut ip, CTA_IP_V6_SRC, &v6(s).octets());
                push_attr(&mut ip, CTA_IP_V6_DST, &v6(d).octets());
            }
        }
        let mut proto = Vec::new();
        push_attr(&mut proto, CTA_PROTO_NUM, &[t.proto]);
        push_attr(&mut proto, CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
        push_attr(&mut proto, CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
        let mut tuple = Vec::new();
        push_attr(&mut tuple, CTA_TUPLE_IP | 0x8000, &ip);
        push_attr(&mut tuple, CTA_TUPLE_PROTO | 0x8000, &proto);
        tuple
    }

    /// A dump reply as the kernel frames it (nested flags set, ports big-endian).
    fn entry_message(e: &CtEntry, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        push_attr(&mut body, CTA_TUPLE_ORIG | 0x8000, &tuple_bytes(&e.orig));
        if let Some(r) = &e.reply {
            push_attr(&mut body, CTA_TUPLE_REPLY | 0x8000, &tuple_bytes(r));
        }
        for (k, v) in extra {
            push_attr(&mut body, *k, v);
        }
        raw_message((1 << 8) | u16::from(IPCTNL_MSG_CT_NEW), 2, 1, &body)
    }

    #[test]
    fn parses_a_dump_and_its_end() {
        let a = CtEntry::tcp(ip("10.244.0.11"), 40000, ip("10.244.0.10"), 80);
        let mut b = CtEntry::tcp(
            "fd00::1".parse().unwrap(),
            5000,
            "fd00::2".parse().unwrap(),
            53,
        );
        b.orig.proto = IPPROTO_UDP;
        b.reply.as_mut().unwrap().proto = IPPROTO_UDP;
        b.zone = 7;
        let mut buf = entry_message(&a, &[(3, 0x188u32.to_be_bytes().to_vec())]);
        buf.extend(entry_message(
            &b,
            &[(CTA_ZONE, 7u16.to_be_bytes().to_vec())],
        ));
        let part = parse_dump(&buf);
        assert_eq!(part.entries, vec![a, b]);
        assert!(!part.done);
        buf.extend(raw_message(NLMSG_DONE, 2, 1, &0u32.to_ne_bytes()));
        assert!(parse_dump(&buf).done);
        // An error reply (ENOENT for a delete).
        let err = raw_message(NLMSG_ERROR, 0, 1, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_dump(&err).error, Some(-libc::ENOENT));
    }

    #[test]
    fn requests_are_well_formed() {
        let dump = dump_request(9);
        assert_eq!(u32_at(&dump, 0).unwrap() as usize, dump.len());
        assert_eq!(u16_at(&dump, 4).unwrap(), (1 << 8) | 1);
        assert_eq!(u16_at(&dump, 6).unwrap(), NLM_F_REQUEST | 0x300);
        assert_eq!(dump[NLMSG_HDRLEN], 0); // AF_UNSPEC: every family

        let e = CtEntry::tcp(ip("10.244.0.12"), 0x9c40, ip("10.244.0.10"), 80);
        let del = delete_request(10, &e);
        assert_eq!(u32_at(&del, 0).unwrap() as usize, del.len());
        assert_eq!(u16_at(&del, 4).unwrap(), (1 << 8) | 2);
        assert_eq!(u16_at(&del, 6).unwrap(), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(del[NLMSG_HDRLEN], libc::AF_INET as u8);
        // The exact attribute bytes: ORIG{IP{src,dst}, PROTO{num,sport,dport}}, nested flags on.
        let attrs = &del[NLMSG_HDRLEN + NFGENMSG_LEN..];
        let mut want: Vec<u8> = vec![52, 0, 0x01, 0x80];
        want.extend([20, 0, 0x01, 0x80]);
        want.extend([8, 0, 1, 0, 10, 244, 0, 12]);
        want.extend([8, 0, 2, 0, 10, 244, 0, 10]);
        want.extend([28, 0, 0x02, 0x80]);
        want.extend([5, 0, 1, 0, 6, 0, 0, 0]);
        want.extend([6, 0, 2, 0, 0x9c, 0x40, 0, 0]);
        want.extend([6, 0, 3, 0, 0, 80, 0, 0]);
        if cfg!(target_endian = "little") {
            assert_eq!(attrs, &want[..]);
        }
        // What a delete names parses back to the same tuple.
        let mut back = del.clone();
        back[4..6]
            .copy_from_slice(&message_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW).to_ne_bytes());
        let part = parse_dump(&back);
        assert_eq!(part.entries.len(), 1);
        assert_eq!(part.entries[0].orig, e.orig);
        // A zone travels with the delete.
        let zoned = CtEntry { zone: 3, ..e };
        let del = delete_request(11, &zoned);
        assert!(del.ends_with(&[6, 0, 18, 0, 0, 3, 0, 0]));
    }

    #[test]
    fn garbage_never_panics() {
        let a = CtEntry::tcp(ip("10.244.0.11"), 40000, ip("10.244.0.10"), 80);
        let valid = entry_message(&a, &[]);
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0xff; 3], vec![0xff; 64], vec![0; 64]];
        for cut in 0..valid.len() {
            let mut t = valid[..cut].to_vec();
            // Keep the message length consistent with the cut, so the attribute walk sees it.
            if t.len() >= 4 {
                let len = t.len() as u32;
                t[..4].copy_from_slice(&len.to_ne_bytes());
            }
            inputs.push(t);
        }
        for at in NLMSG_HDRLEN..valid.len() {
            let mut lying = valid.clone();
            lying[at] = 0xff;
            inputs.push(lying);
        }
        for input in &inputs {
            let part = parse_dump(input);
            assert!(part.entries.len() <= 1);
        }
        // A tuple missing its protocol is no entry.
        let mut body = vec![2u8, 0, 0, 0];
        let mut ip = Vec::new();
        push_attr(&mut ip, CTA_IP_V4_SRC, &[1, 2, 3, 4]);
        push_attr(&mut ip, CTA_IP_V4_DST, &[1, 2, 3, 5]);
        let mut tuple = Vec::new();
        push_attr(&mut tuple, CTA_TUPLE_IP | 0x8000, &ip);
        push_attr(&mut body, CTA_TUPLE_ORIG | 0x8000, &tuple);
        let msg = raw_message((1 << 8) | u16::from(IPCTNL_MSG_CT_NEW), 2, 1, &body);
        assert!(parse_dump(&msg).entries.is_empty());
    }
}
