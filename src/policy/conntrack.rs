//! Strict mode (`policyStrictMode`): after a ruleset change, the connections the new policy would
//! not admit any more are cut by deleting their conntrack entries, so that their next packet is
//! `ct state new` again and meets the pod chains (and their default deny) like a new connection.
//!
//! Three parts:
//! - [`connections_to_cut`] (pure): which entries of a conntrack dump the compiled policy of this
//!   node denies, each evaluated as a new connection with [`CompiledPolicy::decide`], the
//!   evaluator `explain` uses — egress of the source if it is a local pod, ingress of the
//!   destination if it is one.
//! - ctnetlink framing (pure, never panics on malformed input): [`dump_request`],
//!   [`parse_dump`], [`delete_request`], on the `nfnetlink` framing of [`super::netlink`].
//! - [`ConntrackSocket`]: dump and delete over a `NETLINK_NETFILTER` socket in the calling
//!   thread's network namespace (no `conntrack` tool).
//!
//! What is evaluated is what the forward hook saw: the original source and port, and the
//! destination after DNAT (the reply tuple's source), so a connection to a Service is judged by
//! the backend pod it reached. Entries from the node's own addresses are never cut (the ruleset
//! accepts them before any policy), nor entries to them (they take the input path, which veilnet
//! does not filter). Only TCP, UDP and SCTP entries are evaluated: policies match ports, and ICMP
//! entries expire within seconds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::compile::{CompiledPolicy, Direction};
use super::explain::Decision;
use super::model::Protocol;
use super::netlink::{
    attributes, message, messages, open_socket, push_attr, set_recv_timeout, u32_ne_at,
    NFGENMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_REQUEST,
};

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("ctnetlink socket ({op}): {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("ctnetlink dump: {0}")]
    Dump(std::io::Error),
    #[error("ctnetlink dump: more than {0} entries")]
    TooMany(usize),
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;

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

fn protocol_of(proto: u8) -> Option<Protocol> {
    match proto {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Would the compiled policy of this node refuse `entry` as a new connection? (Pure.)
pub fn denies(model: &CompiledPolicy, entry: &CtEntry) -> bool {
    let t = entry.forwarded();
    let Some(protocol) = protocol_of(t.proto) else {
        return false;
    };
    if model.node_addrs.contains(&t.src) || model.node_addrs.contains(&t.dst) {
        return false;
    }
    let egress = model.decide(Direction::Egress, t.src, t.dst, protocol, t.dst_port);
    if matches!(egress, Decision::Denied { .. }) {
        return true;
    }
    let ingress = model.decide(Direction::Ingress, t.dst, t.src, protocol, t.dst_port);
    matches!(ingress, Decision::Denied { .. })
}

/// The entries of a dump that the compiled policy of this node denies (pure). Entries that
/// involve no local pod are never denied: the verdict maps, and so `decide`, know only local pods.
pub fn connections_to_cut(model: &CompiledPolicy, entries: &[CtEntry]) -> Vec<CtEntry> {
    entries
        .iter()
        .filter(|e| denies(model, e))
        .copied()
        .collect()
}

fn nested(kind: u16) -> u16 {
    kind | NLA_F_NESTED
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`, all families.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let body = [libc::AF_UNSPEC as u8, 0, 0, 0];
    message(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &body,
    )
}

fn tuple_attr(t: &CtTuple) -> Vec<u8> {
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
    if protocol_of(t.proto).is_some() {
        push_attr(&mut proto, CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
        push_attr(&mut proto, CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
    }
    let mut tuple = Vec::new();
    push_attr(&mut tuple, nested(CTA_TUPLE_IP), &ip);
    push_attr(&mut tuple, nested(CTA_TUPLE_PROTO), &proto);
    tuple
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
    let mut body = vec![family, 0, 0, 0];
    push_attr(&mut body, nested(CTA_TUPLE_ORIG), &tuple_attr(&entry.orig));
    if entry.zone != 0 {
        push_attr(&mut body, CTA_ZONE, &entry.zone.to_be_bytes());
    }
    message(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &body,
    )
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
            NLMSG_ERROR => out.error = u32_ne_at(body, 0).map(|e| e as i32),
            k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
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
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

/// What [`ConntrackSocket::cut`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Entries in the dump.
    pub examined: usize,
    /// Entries the policy denies.
    pub denied: usize,
    /// Of those, deleted now (the others were gone already or could not be deleted).
    pub cut: usize,
    pub failed: usize,
}

impl ConntrackSocket {
    /// Every receive waits at most `timeout`.
    pub fn open(timeout: Duration) -> Result<ConntrackSocket, ConntrackError> {
        let sock = |op| move |source| ConntrackError::Socket { op, source };
        let fd = open_socket().map_err(sock("socket"))?;
        set_recv_timeout(&fd, timeout).map_err(sock("SO_RCVTIMEO"))?;
        Ok(ConntrackSocket {
            fd,
            buf: vec![0; 1 << 16],
            seq: 0,
        })
    }

    fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        super::netlink::send(&self.fd, msg)
    }

    fn recv(&mut self) -> std::io::Result<usize> {
        super::netlink::recv(&self.fd, &mut self.buf)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Walks the whole conntrack table of the namespace, handing each entry to `each` as it
    /// arrives (nothing is held but one receive buffer); returns how many there were.
    pub fn dump_each(&mut self, mut each: impl FnMut(CtEntry)) -> Result<usize, ConntrackError> {
        let seq = self.next_seq();
        self.send(&dump_request(seq))
            .map_err(ConntrackError::Dump)?;
        let mut count = 0;
        loop {
            let n = self.recv().map_err(ConntrackError::Dump)?;
            let part = parse_dump(&self.buf[..n]);
            count += part.entries.len();
            part.entries.into_iter().for_each(&mut each);
            if count > MAX_ENTRIES {
                return Err(ConntrackError::TooMany(MAX_ENTRIES));
            }
            if let Some(e) = part.error.filter(|e| *e != 0) {
                return Err(ConntrackError::Dump(std::io::Error::from_raw_os_error(-e)));
            }
            if part.done || n == 0 {
                return Ok(count);
            }
        }
    }

    /// The whole conntrack table of the namespace.
    pub fn dump(&mut self) -> Result<Vec<CtEntry>, ConntrackError> {
        let mut entries = Vec::new();
        self.dump_each(|e| entries.push(e))?;
        Ok(entries)
    }

    /// Deletes one entry by its original tuple. `Ok(false)`: it was gone already (ENOENT).
    pub fn delete(&mut self, entry: &CtEntry) -> std::io::Result<bool> {
        let seq = self.next_seq();
        self.send(&delete_request(seq, entry))?;
        let n = self.recv()?;
        match parse_dump(&self.buf[..n]).error {
            Some(0) | None => Ok(true),
            Some(e) if -e == libc::ENOENT => Ok(false),
            Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
        }
    }

    /// Dumps, keeps what `model` denies ([`denies`], as [`connections_to_cut`] does), and deletes
    /// it once the dump is over.
    pub fn cut(&mut self, model: &CompiledPolicy) -> Result<CutReport, ConntrackError> {
        let mut denied = Vec::new();
        let examined = self.dump_each(|e| {
            if denies(model, &e) {
                denied.push(e);
            }
        })?;
        let mut report = CutReport {
            examined,
            denied: denied.len(),
            ..Default::default()
        };
        for e in &denied {
            match self.delete(e) {
                Ok(true) => report.cut += 1,
                Ok(false) => {}
                Err(err) => {
                    report.failed += 1;
                    tracing::debug!(entry = ?e.orig, error = %err, "cannot delete a conntrack entry");
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::compile::compile;
    use super::super::netlink::{u16_ne_at, NLMSG_HDRLEN};
    use super::super::testutil::{e2e_state, ip_of, np};
    use super::*;
    use serde_json::json;

    fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> CtEntry {
        let orig = CtTuple {
            src,
            dst,
            proto: IPPROTO_TCP,
            src_port: sport,
            dst_port: dport,
        };
        CtEntry {
            orig,
            reply: Some(CtTuple {
                src: dst,
                dst: src,
                proto: IPPROTO_TCP,
                src_port: dport,
                dst_port: sport,
            }),
            zone: 0,
        }
    }

    /// x/a (node n1) admits ingress only from x/b on TCP 80; y/a (n1) may send only to port 81.
    fn model() -> CompiledPolicy {
        let state = e2e_state(vec![
            np(
                "x",
                "a-from-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                             "ports": [{"port": 80, "protocol": "TCP"}]}],
                "policyTypes": ["Ingress"]}),
            ),
            np(
                "y",
                "a-to-81",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "egress": [{"ports": [{"port": 81}]}], "policyTypes": ["Egress"]}),
            ),
        ]);
        compile(&state, "n1", &["172.30.0.11".parse().unwrap()])
    }

    #[test]
    fn cuts_what_the_new_policy_denies_and_nothing_else() {
        let m = model();
        let (xa, xb, xc, ya, yb) = (
            ip_of("x", "a"),
            ip_of("x", "b"),
            ip_of("x", "c"),
            ip_of("y", "a"),
            ip_of("y", "b"),
        );
        let node: IpAddr = "172.30.0.11".parse().unwrap();
        let outside: IpAddr = "192.0.2.9".parse().unwrap();
        let denied = [
            tcp(xc, 40000, xa, 80), // ingress of x/a: wrong peer
            tcp(xb, 40001, xa, 81), // ingress of x/a: wrong port
            tcp(ya, 40002, yb, 80), // egress of y/a: wrong port
            tcp(ya, 40003, outside, 443),
        ];
        let kept = [
            tcp(xb, 40004, xa, 80),      // allowed
            tcp(ya, 40005, yb, 81),      // allowed egress
            tcp(node, 40006, xa, 81),    // from the node: accepted before any policy
            tcp(ya, 40007, node, 10250), // to the node: input path, unfiltered
            tcp(xb, 40008, yb, 80),      // no local pod isolated on either side (b is on n2)
            tcp(xa, 40009, outside, 53), // x/a is not isolated for egress
        ];
        let mut icmp = tcp(xc, 0, xa, 0);
        icmp.orig.proto = 1;
        let mut all: Vec<CtEntry> = denied.to_vec();
        all.extend(kept);
        all.push(icmp);
        assert_eq!(connections_to_cut(&m, &all), denied.to_vec());
        // Without policies nothing is cut.
        let open = compile(&e2e_state(vec![]), "n1", &[]);
        assert!(connections_to_cut(&open, &all).is_empty());
    }

    #[test]
    fn judges_the_destination_after_dnat() {
        let m = model();
        // x/c → a Service address, DNATed to x/a:80: denied by x/a's ingress.
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let mut e = tcp(ip_of("x", "c"), 40000, vip, 8080);
        e.reply = Some(CtTuple {
            src: ip_of("x", "a"),
            dst: ip_of("x", "c"),
            proto: IPPROTO_TCP,
            src_port: 80,
            dst_port: 40000,
        });
        assert!(denies(&m, &e));
        // x/b → the same Service: allowed.
        let mut e = tcp(ip_of("x", "b"), 40000, vip, 8080);
        e.reply.as_mut().unwrap().src = ip_of("x", "a");
        e.reply.as_mut().unwrap().src_port = 80;
        assert!(!denies(&m, &e));
        // Without a reply tuple the original destination is used.
        e.reply = None;
        assert!(!denies(&m, &e));
    }

    /// A dump reply as the kernel frames it (nested flags set, ports big-endian).
    fn entry_message(e: &CtEntry, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        push_attr(&mut body, nested(CTA_TUPLE_ORIG), &tuple_attr(&e.orig));
        if let Some(r) = &e.reply {
            push_attr(&mut body, nested(CTA_TUPLE_REPLY), &tuple_attr(r));
        }
        for (k, v) in extra {
            push_attr(&mut body, *k, v);
        }
        message(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
            2,
            1,
            &body,
        )
    }

    #[test]
    fn parses_a_dump_and_its_end() {
        let a = tcp(ip_of("x", "b"), 40000, ip_of("x", "a"), 80);
        let mut b = tcp(
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
        buf.extend(message(NLMSG_DONE, 2, 1, &0u32.to_ne_bytes()));
        assert!(parse_dump(&buf).done);
        // An error reply (ENOENT for a delete).
        let err = message(NLMSG_ERROR, 0, 1, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_dump(&err).error, Some(-libc::ENOENT));
    }

    #[test]
    fn requests_are_well_formed() {
        let dump = dump_request(9);
        assert_eq!(u32_ne_at(&dump, 0).unwrap() as usize, dump.len());
        assert_eq!(u16_ne_at(&dump, 4).unwrap(), (1 << 8) | 1);
        assert_eq!(u16_ne_at(&dump, 6).unwrap(), NLM_F_REQUEST | 0x300);
        assert_eq!(dump[NLMSG_HDRLEN], 0); // AF_UNSPEC: every family

        let e = tcp(ip_of("x", "c"), 0x9c40, ip_of("x", "a"), 80);
        let del = delete_request(10, &e);
        assert_eq!(u32_ne_at(&del, 0).unwrap() as usize, del.len());
        assert_eq!(u16_ne_at(&del, 4).unwrap(), (1 << 8) | 2);
        assert_eq!(u16_ne_at(&del, 6).unwrap(), NLM_F_REQUEST | NLM_F_ACK);
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
        back[4..6].copy_from_slice(&((1u16 << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
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
        let a = tcp(ip_of("x", "b"), 40000, ip_of("x", "a"), 80);
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
        push_attr(&mut tuple, nested(CTA_TUPLE_IP), &ip);
        push_attr(&mut body, nested(CTA_TUPLE_ORIG), &tuple);
        let msg = message((1 << 8) | IPCTNL_MSG_CT_NEW, 2, 1, &body);
        assert!(parse_dump(&msg).entries.is_empty());
    }
}
