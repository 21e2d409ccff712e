//! The nfnetlink wire format the two netfilter readers share (`nflog`: logged packets,
//! `counters`: the nf_tables counter dump): message and attribute framing, and the socket. The
//! framing is pure and never panics on malformed input: a truncated message or attribute ends the
//! walk.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub(super) const NETLINK_NETFILTER: libc::c_int = 12;
pub(super) const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, resource id (big-endian).
pub(super) const NFGENMSG_LEN: usize = 4;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
/// Attribute type bits without the nested/byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub(super) fn u16_ne_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn u32_ne_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks `(type, body)` netlink messages in a receive buffer; stops at the first malformed one.
pub(super) fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32_ne_at(buf, 0)? as usize;
        let kind = u16_ne_at(buf, 4)?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let body = &buf[NLMSG_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some((kind, body))
    })
}

/// Walks `(type, value)` netlink attributes; stops at the first malformed one.
pub(super) fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_ne_at(b, 0)?);
        let kind = u16_ne_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

/// Appends one attribute (header, value, padding to 4 bytes).
pub(super) fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

/// One request: `nlmsghdr` (port id 0, the kernel) followed by `body`.
pub(super) fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
pub(super) fn open_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Bounds every `recv` on `fd` by `timeout` (`SO_RCVTIMEO`): a kernel that never answers must
/// not hang the reader.
/// Sends one message to the kernel on a netfilter socket (unbound or bound, never connected
/// elsewhere: the kernel is the default peer).
pub(super) fn send(fd: &OwnedFd, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: send(2) of a buffer we own, on a socket we own.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram into `buf`; returns its length.
pub(super) fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recv(2) into our buffer, bounded by its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

pub(super) fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt(2) with a timeval of the right size.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip_and_stop_at_garbage() {
        let mut body = vec![0u8; NFGENMSG_LEN];
        push_attr(&mut body, 1, b"abc");
        push_attr(&mut body, 2 | 0x8000, &[9; 4]);
        let mut buf = message(7, NLM_F_REQUEST, 42, &body);
        buf.extend(message(NLMSG_DONE, 0, 43, &[0; 4]));
        let walked: Vec<(u16, Vec<u8>)> = messages(&buf).map(|(k, b)| (k, b.to_vec())).collect();
        assert_eq!(walked.len(), 2);
        assert_eq!(walked[0], (7, body.clone()));
        assert_eq!(walked[1].0, NLMSG_DONE);
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&walked[0].1[NFGENMSG_LEN..])
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(attrs, vec![(1, b"abc".to_vec()), (2, vec![9; 4])]);

        // A length beyond the buffer ends the walk instead of reading past it.
        let mut lying = buf.clone();
        lying[0] = 0xff;
        assert_eq!(messages(&lying).count(), 0);
        assert_eq!(messages(&buf[..NLMSG_HDRLEN - 1]).count(), 0);
        assert_eq!(attributes(&[8, 0, 1, 0, 1]).count(), 0);
    }
}
