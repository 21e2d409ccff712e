//! Reading the packets a ruleset logs (`log group N`) through NFLOG: a `NETLINK_NETFILTER`
//! socket subscribed to the group (subsystem `NFNL_SUBSYS_ULOG`), and a pure parser of what it
//! receives: the log prefix, the interfaces, the link-layer header and the packet from its
//! network header on. What the packet says (addresses, ports) is the caller's to read
//! (`policy::flow`).
//!
//! The parser never panics on malformed input: a truncated message or attribute ends the walk.
//! Rate limiting is the ruleset's (`limit rate`), so the reader never sees a flood.

use std::time::Duration;

use super::socket::{
    attr, attributes, error_code, message_type, messages, nfgen_body, NfRequest, NfSocket,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};
use super::{NetfilterError, Result};

const NFNL_SUBSYS_ULOG: u8 = 4;
const NFULNL_MSG_PACKET: u8 = 0;
const NFULNL_MSG_CONFIG: u8 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PACKET_HDR: u16 = 1;
/// `struct nfulnl_msg_packet_timestamp { __be64 sec; __be64 usec; }`: the packet's receive time,
/// sent only when the skb carries one (`skb->tstamp` set, i.e. receive timestamping enabled on
/// the host and not cleared on the way, as IP and bridge forwarding do).
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_IFINDEX_PHYSINDEV: u16 = 6;
const NFULA_IFINDEX_PHYSOUTDEV: u16 = 7;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_HWHEADER: u16 = 16;
/// How many bytes of each packet the kernel copies: enough for IPv6 + extension headers + ports.
const COPY_RANGE: u32 = 128;

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
    /// The kernel's timestamp of the packet (`NFULA_TIMESTAMP`), since the Unix epoch; absent
    /// when the skb has none.
    pub timestamp: Option<std::time::Duration>,
}

impl LoggedPacket {
    /// Destination and source MAC of an Ethernet frame, from its logged header.
    pub fn ether_addrs(&self) -> Option<([u8; 6], [u8; 6])> {
        let dst = self.hw_header.get(0..6)?.try_into().ok()?;
        let src = self.hw_header.get(6..12)?.try_into().ok()?;
        Some((dst, src))
    }
}

/// Parses a buffer of netlink messages, keeping the NFLOG packets.
pub fn parse_messages(buf: &[u8]) -> Vec<LoggedPacket> {
    messages(buf)
        .filter(|(kind, _)| *kind == message_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET))
        .filter_map(|(_, body)| nfgen_body(body))
        .map(|(family, attrs)| parse_packet(family, attrs))
        .collect()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `NFULA_TIMESTAMP`'s value; none when malformed or zero.
fn timestamp(v: &[u8]) -> Option<std::time::Duration> {
    let (sec, usec) = (u64_at(v, 0)?, u64_at(v, 8)?);
    (sec != 0 && usec < 1_000_000).then(|| std::time::Duration::new(sec, (usec * 1000) as u32))
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
            NFULA_TIMESTAMP => p.timestamp = timestamp(value),
            _ => {}
        }
    }
    p
}

/// One NFLOG config request: `nfgenmsg` (family unspecified, `res_id` = group) and one
/// attribute, acknowledged.
fn config_message(group: u16, seq: u32, kind: u16, value: Vec<u8>) -> Vec<u8> {
    NfRequest {
        message_type: message_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG),
        family: libc::AF_UNSPEC as u8,
        res_id: group,
        attrs: vec![attr(kind, value)],
    }
    .to_bytes(NLM_F_REQUEST | NLM_F_ACK, seq)
}

/// The two requests that subscribe to `group`: bind, then copy whole packets (up to
/// [`COPY_RANGE`] bytes).
pub fn subscribe_messages(group: u16) -> [Vec<u8>; 2] {
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    [
        config_message(group, 1, NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
        config_message(group, 2, NFULA_CFG_MODE, mode),
    ]
}

/// The error code of the `NLMSG_ERROR` reply (0 is an ACK) in `buf`, if it holds one.
fn ack_errno(buf: &[u8]) -> Option<i32> {
    messages(buf)
        .find(|(kind, _)| *kind == NLMSG_ERROR)
        .and_then(|(_, body)| error_code(body))
}

/// A socket subscribed to one NFLOG group in the calling thread's network namespace.
pub struct NflogSocket {
    socket: NfSocket,
}

impl NflogSocket {
    /// Subscribes to `group`. `poll` bounds each [`recv`](Self::recv), so a reader thread can
    /// notice that it should stop.
    pub fn open(group: u16, poll: Duration) -> Result<NflogSocket> {
        let mut socket = NfSocket::open(poll)?;
        socket.bind()?;
        // A bigger receive buffer rides out bursts up to the rate limit.
        socket.set_receive_buffer(1 << 20);
        for msg in subscribe_messages(group) {
            socket
                .send(&msg)
                .map_err(|source| NetfilterError::Socket { op: "send", source })?;
            let reply = socket.recv().map_err(|source| NetfilterError::Socket {
                op: "recv ack",
                source,
            })?;
            match ack_errno(reply) {
                Some(0) | None => {}
                Some(e) => {
                    return Err(NetfilterError::Refused {
                        op: "binding the NFLOG group",
                        source: std::io::Error::from_raw_os_error(-e),
                    })
                }
            }
        }
        Ok(NflogSocket { socket })
    }

    /// Waits (at most the poll interval) for logged packets. `Ok(empty)` on timeout; ENOBUFS
    /// (the kernel dropped logs because we were slow) is reported as an error the caller may
    /// count and ignore.
    pub fn recv(&mut self) -> std::io::Result<Vec<LoggedPacket>> {
        match self.socket.recv() {
            Ok(buf) => Ok(parse_messages(buf)),
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
    use super::super::socket::testing::{
        push_attr, raw_message, u16_at as ne16, u32_at, NLMSG_HDRLEN,
    };
    use super::*;

    /// A netlink message as the kernel sends an NFLOG packet.
    pub(crate) fn packet_message(family: u8, hw: u16, prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 100];
        let mut hdr = hw.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[2, 0]);
        push_attr(&mut body, NFULA_PACKET_HDR, &hdr);
        push_attr(&mut body, NFULA_IFINDEX_INDEV, &7u32.to_be_bytes());
        push_attr(&mut body, NFULA_IFINDEX_PHYSINDEV, &9u32.to_be_bytes());
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        push_attr(&mut body, NFULA_PREFIX, &p);
        push_attr(&mut body, NFULA_PAYLOAD, payload);
        push_attr(
            &mut body,
            NFULA_HWHEADER,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 8, 0],
        );
        raw_message(u16::from(NFNL_SUBSYS_ULOG) << 8, 0, 0, &body)
    }

    #[test]
    fn parses_logged_packets_and_skips_other_messages() {
        let mut buf = packet_message(2, 0x0800, "veilnet:deny:ingress:x/a", &[0x45, 0, 0, 20]);
        // A non-NFLOG message in the same buffer is skipped.
        buf.extend(raw_message(NLMSG_DONE_TYPE, 0, 0, &[]));
        buf.extend(packet_message(10, 0, "veilnet:allow:egress:y/web", &[0x60]));
        let packets = parse_messages(&buf);
        assert_eq!(packets.len(), 2);
        let p = &packets[0];
        assert_eq!(p.prefix, "veilnet:deny:ingress:x/a");
        assert_eq!((p.family, p.hw_protocol, p.hook), (2, 0x0800, 2));
        assert_eq!(
            (p.indev, p.physindev, p.outdev, p.physoutdev),
            (Some(7), Some(9), None, None)
        );
        assert_eq!(p.payload, vec![0x45, 0, 0, 20]);
        assert_eq!(
            p.ether_addrs(),
            Some(([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]))
        );
        assert_eq!(packets[1].prefix, "veilnet:allow:egress:y/web");
        assert_eq!(packets[1].family, 10);
    }

    const NLMSG_DONE_TYPE: u16 = 3;

    #[test]
    fn reads_the_kernel_timestamp_when_present() {
        let plain = packet_message(2, 0x0800, "veilnet:x", &[0x45]);
        assert_eq!(parse_messages(&plain)[0].timestamp, None);
        // The same packet with NFULA_TIMESTAMP appended (and the length fixed up).
        let mut ts = 1_748_779_200u64.to_be_bytes().to_vec();
        ts.extend_from_slice(&123_456u64.to_be_bytes());
        let mut with = plain.clone();
        let mut tail = Vec::new();
        push_attr(&mut tail, NFULA_TIMESTAMP, &ts);
        with.extend(&tail);
        let len = with.len() as u32;
        with[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            parse_messages(&with)[0].timestamp,
            Some(std::time::Duration::new(1_748_779_200, 123_456_000))
        );
        // A zero or malformed one is no timestamp.
        assert_eq!(timestamp(&[0; 16]), None);
        assert_eq!(timestamp(&[1; 4]), None);
    }

    #[test]
    fn garbage_never_panics() {
        let valid = packet_message(2, 0x0800, "veilnet:x", &[0x45; 40]);
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0xff; 3], vec![0xff; 64], vec![0; 64]];
        // Every truncation of a valid message, with and without a matching length.
        for cut in 0..valid.len() {
            inputs.push(valid[..cut].to_vec());
            let mut t = valid[..cut].to_vec();
            if t.len() >= 4 {
                let len = t.len() as u32;
                t[..4].copy_from_slice(&len.to_ne_bytes());
            }
            inputs.push(t);
        }
        // An attribute claiming more than there is.
        let mut lying = valid.clone();
        lying[NLMSG_HDRLEN + 4] = 0xff;
        inputs.push(lying);
        for input in &inputs {
            assert!(parse_messages(input).len() <= 1);
        }
    }

    #[test]
    fn subscribe_requests_are_well_formed() {
        let [bind, mode] = subscribe_messages(100);
        assert_eq!(u32_at(&bind, 0).unwrap() as usize, bind.len());
        assert_eq!(ne16(&bind, 4).unwrap(), (4 << 8) | 1);
        assert_eq!(ne16(&bind, 6).unwrap(), NLM_F_REQUEST | NLM_F_ACK);
        // res_id is the group, big-endian.
        assert_eq!(&bind[NLMSG_HDRLEN + 2..NLMSG_HDRLEN + 4], &[0, 100]);
        let mut want = vec![0, 0, 0, 100];
        push_attr(&mut want, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        assert_eq!(&bind[NLMSG_HDRLEN..], &want[..]);
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&mode[NLMSG_HDRLEN + 4..])
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(attrs, vec![(NFULA_CFG_MODE, vec![0, 0, 0, 128, 2, 0])]);
    }

    #[test]
    fn an_ack_or_an_error_answers_a_subscription() {
        let ack = raw_message(NLMSG_ERROR, 0, 1, &[0; 20]);
        assert_eq!(ack_errno(&ack), Some(0));
        let refused = raw_message(NLMSG_ERROR, 0, 1, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_errno(&refused), Some(-libc::EPERM));
        assert_eq!(ack_errno(&packet_message(2, 0, "x", &[])), None);
    }
}
