//! The nfnetlink socket and framing every netfilter client here shares.
//!
//! The socket is [`netlink_sys::Socket`] (`NETLINK_NETFILTER`), its receive timeout set through
//! `nix`; messages and attributes are read and written with [`netlink_packet_core`]'s checked
//! buffers. What is nfnetlink's own is the 4-byte `struct nfgenmsg` (family, version, resource id
//! big-endian) that opens every body, written by [`NfRequest`] (see the module documentation of
//! [`super`] for why the bodies are not a crate's types).
//!
//! The walkers are pure and never panic on malformed input: a message or attribute whose length
//! does not fit ends the walk.

use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NlasIterator, NLA_F_NESTED, NLA_HEADER_SIZE,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;

use super::{NetfilterError, Result};

pub use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

/// `struct nfgenmsg`: family, version, resource id (big-endian).
pub const NFGENMSG_LEN: usize = 4;
/// `NFNETLINK_V0`, the only version.
const NFNETLINK_V0: u8 = 0;

/// nfnetlink's message type: the subsystem in the high byte, its message in the low one.
pub const fn message_type(subsystem: u8, message: u8) -> u16 {
    ((subsystem as u16) << 8) | message as u16
}

/// Walks `(type, body)` netlink messages in a receive buffer; stops at the first malformed one.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let msg = NetlinkBuffer::new_checked(buf).ok()?;
        let item = (msg.message_type(), msg.payload());
        buf = buf.get(align4(msg.length() as usize)..).unwrap_or(&[]);
        Some(item)
    })
}

/// Walks `(type, value)` netlink attributes (type without the nested/byte-order flags); stops at
/// the first malformed one.
pub fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(b).map_while(|nla| {
        let nla = nla.ok()?;
        let (kind, len) = (nla.kind(), usize::from(nla.length()));
        // `new_checked` has made sure that NLA_HEADER_SIZE <= len <= the buffer's length.
        Some((kind, nla.into_inner().get(NLA_HEADER_SIZE..len)?))
    })
}

/// The errno of an `NLMSG_ERROR` body (0: an acknowledgement); `None` if it is too short.
pub fn error_code(body: &[u8]) -> Option<i32> {
    let e = ErrorBuffer::new_checked(body).ok()?;
    Some(e.code().map_or(0, |c| c.get()))
}

/// The `nfgenmsg` of a body: its family, and the attributes after it.
pub fn nfgen_body(body: &[u8]) -> Option<(u8, &[u8])> {
    Some((*body.first()?, body.get(NFGENMSG_LEN..)?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One attribute.
pub fn attr(kind: u16, value: impl Into<Vec<u8>>) -> DefaultNla {
    DefaultNla::new(kind, value.into())
}

/// A nested attribute holding `children`.
pub fn nested(kind: u16, children: &[DefaultNla]) -> DefaultNla {
    DefaultNla::new(kind | NLA_F_NESTED, emit(&children))
}

fn emit(e: &impl Emitable) -> Vec<u8> {
    let mut buf = vec![0; e.buffer_len()];
    e.emit(&mut buf);
    buf
}

/// The body of one nfnetlink request: `nfgenmsg` and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfRequest {
    pub message_type: u16,
    pub family: u8,
    pub res_id: u16,
    pub attrs: Vec<DefaultNla>,
}

impl NetlinkSerializable for NfRequest {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN + self.attrs.as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = NFNETLINK_V0;
        buffer[2..NFGENMSG_LEN].copy_from_slice(&self.res_id.to_be_bytes());
        self.attrs.as_slice().emit(&mut buffer[NFGENMSG_LEN..]);
    }
}

impl NfRequest {
    /// The whole message (`nlmsghdr` addressed to the kernel, port 0), ready to send.
    pub fn to_bytes(self, flags: u16, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(self));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }
}

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace, with one receive
/// buffer and a sequence counter.
pub struct NfSocket {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

/// Dump replies come in skbs of at most 32 KiB (more with big pages); 64 KiB never truncates.
const RECV_BUFFER: usize = 1 << 16;

impl NfSocket {
    /// Opens the socket; every [`recv`](Self::recv) waits at most `timeout` (`SO_RCVTIMEO`),
    /// so a kernel that never answers cannot hang the caller.
    pub fn open(timeout: Duration) -> Result<NfSocket> {
        let socket = Socket::new(NETLINK_NETFILTER).map_err(sock("socket"))?;
        let tv = TimeVal::new(
            timeout.as_secs() as libc::time_t,
            timeout.subsec_micros() as libc::suseconds_t,
        );
        setsockopt(&socket, ReceiveTimeout, &tv).map_err(|e| NetfilterError::Socket {
            op: "SO_RCVTIMEO",
            source: e.into(),
        })?;
        Ok(NfSocket {
            socket,
            buf: Vec::with_capacity(RECV_BUFFER),
            seq: 0,
        })
    }

    /// Binds to a kernel-chosen port id (needed to receive multicast such as NFLOG).
    pub fn bind(&mut self) -> Result<()> {
        self.socket.bind_auto().map(|_| ()).map_err(sock("bind"))
    }

    /// Asks for a bigger kernel receive buffer; failure only leaves the default.
    pub fn set_receive_buffer(&self, bytes: usize) {
        if let Err(e) = self.socket.set_rx_buf_sz(bytes) {
            tracing::debug!(error = %e, "netfilter socket keeps the default receive buffer");
        }
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one message to the kernel (the default peer of an unconnected netlink socket).
    pub fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        self.socket.send(msg, 0).map(|_| ())
    }

    /// Receives one datagram; `Ok(empty)` only if the kernel sent an empty one.
    pub fn recv(&mut self) -> std::io::Result<&[u8]> {
        self.buf.clear();
        self.socket.recv(&mut self.buf, 0)?;
        Ok(&self.buf)
    }
}

fn sock(op: &'static str) -> impl Fn(std::io::Error) -> NetfilterError {
    move |source| NetfilterError::Socket { op, source }
}

/// The kernel's framing written out by hand (not through the crate), for the parsers' tests.
#[cfg(test)]
pub(crate) mod testing {
    pub const NLMSG_HDRLEN: usize = 16;

    /// One message: `nlmsghdr` (port id 0) and `body`.
    pub fn raw_message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Appends one attribute (header, value, padding to 4 bytes).
    pub fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
        buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(value);
        buf.resize((buf.len() + 3) & !3, 0);
    }

    pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn requests_are_framed_as_the_kernel_reads_them() {
        let req = NfRequest {
            message_type: message_type(10, 19),
            family: 7,
            res_id: 0x0102,
            attrs: vec![attr(1, *b"abc"), nested(2, &[attr(3, 9u32.to_be_bytes())])],
        };
        let bytes = req.to_bytes(NLM_F_REQUEST | NLM_F_DUMP, 42);
        let mut body = vec![7, 0, 1, 2];
        body.extend([7, 0, 1, 0, b'a', b'b', b'c', 0]);
        body.extend([12, 0, 2, 0x80, 8, 0, 3, 0, 0, 0, 0, 9]);
        if cfg!(target_endian = "little") {
            assert_eq!(bytes, raw_message((10 << 8) | 19, 0x301, 42, &body));
        }
        // The same bytes as a hand-written attribute list.
        let mut by_hand = vec![7, 0, 1, 2];
        push_attr(&mut by_hand, 1, b"abc");
        let mut inner = Vec::new();
        push_attr(&mut inner, 3, &9u32.to_be_bytes());
        push_attr(&mut by_hand, 2 | 0x8000, &inner);
        assert_eq!(by_hand, body);
    }

    #[test]
    fn messages_and_attributes_walk_and_stop_at_garbage() {
        let mut body = vec![0u8; NFGENMSG_LEN];
        push_attr(&mut body, 1, b"abc");
        push_attr(&mut body, 2 | 0x8000, &[9; 4]);
        let mut buf = raw_message(7, NLM_F_REQUEST, 42, &body);
        buf.extend(raw_message(NLMSG_DONE, 0, 43, &[0; 4]));
        let walked: Vec<(u16, Vec<u8>)> = messages(&buf).map(|(k, b)| (k, b.to_vec())).collect();
        assert_eq!(walked.len(), 2);
        assert_eq!(walked[0], (7, body.clone()));
        assert_eq!(walked[1].0, NLMSG_DONE);
        let (family, attrs) = nfgen_body(&walked[0].1).unwrap();
        assert_eq!(family, 0);
        let attrs: Vec<(u16, Vec<u8>)> = attributes(attrs).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(attrs, vec![(1, b"abc".to_vec()), (2, vec![9; 4])]);

        // A length beyond the buffer ends the walk instead of reading past it.
        let mut lying = buf.clone();
        lying[0] = 0xff;
        assert_eq!(messages(&lying).count(), 0);
        assert_eq!(messages(&buf[..NLMSG_HDRLEN - 1]).count(), 0);
        assert_eq!(attributes(&[8, 0, 1, 0, 1]).count(), 0);
        // An attribute shorter than its own header, after a good one.
        assert_eq!(attributes(&[5, 0, 1, 0, 1, 0, 0, 0, 2, 0, 1, 0]).count(), 1);
    }

    #[test]
    fn error_codes() {
        assert_eq!(error_code(&(-2i32).to_ne_bytes()), Some(-2));
        assert_eq!(error_code(&[0; 20]), Some(0));
        assert_eq!(error_code(&[1, 2]), None);
    }
}
