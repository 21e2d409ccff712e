//! The WireGuard UDP sockets: one IPv4 and (when the namespace has IPv6) one IPv6-only socket on
//! the same port, so endpoints of either family work and received addresses are never v4-mapped.
//!
//! Datagrams move in batches: sends of equal-sized datagrams to one peer use UDP GSO
//! (`UDP_SEGMENT`, one syscall per up to 64 datagrams), receives use `recvmmsg` with `UDP_GRO`, so
//! one buffer can hold many datagrams of one sender. Both fall back quietly where the kernel says
//! no: GSO is switched off at the first refused send, GRO is simply not enabled.
//!
//! Sockets get large buffers (bursts of a TCP stream must not overflow a 208 KiB default) and the
//! optional fwmark, which lets policy routing keep the encrypted traffic off the tunnel routes.

use std::io;
use std::net::UdpSocket;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    SockaddrLike, SockaddrStorage,
};

use super::readiness::write_waiting;

/// Socket buffer size requested (the FORCE variants bypass `net.core.*mem_max` as root).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Longest wait for send-buffer space before a send gives up: backpressure, bounded so that a
/// wedged socket cannot stall the datapath thread for good.
const SEND_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("creating the {family} UDP socket: {source}")]
    Socket {
        family: &'static str,
        source: io::Error,
    },
    #[error("setting {option} on the {family} UDP socket: {source}")]
    SetOption {
        option: &'static str,
        family: &'static str,
        source: io::Error,
    },
    #[error("binding UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Linux `UDP_SEGMENT` / `UDP_GRO` socket options (level `SOL_UDP`); not in libc for glibc.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send: the whole super-datagram must fit one IP packet.
const GSO_MAX_BYTES: usize = 65000;

/// Receive buffers per `recvmmsg`. With GRO each holds up to 64 KiB of same-sized datagrams.
pub(crate) const RECV_BATCH: usize = 8;
const RECV_BUFFER: usize = 65536;

/// One UDP socket and what the kernel let us enable on it.
#[derive(Debug)]
pub(crate) struct Socket {
    pub io: UdpSocket,
    /// UDP GSO works; cleared for good the first time the kernel refuses a GSO send that then
    /// goes through datagram by datagram.
    gso: AtomicBool,
    /// Received buffers may hold several datagrams (`UDP_GRO` accepted).
    pub gro: bool,
}

/// The device's sockets. Sends pick the socket of the destination's family.
#[derive(Debug)]
pub(crate) struct UdpSockets {
    pub v4: Arc<Socket>,
    pub v6: Option<Arc<Socket>>,
    pub port: u16,
}

impl UdpSockets {
    /// Binds `port` (0 = any free port; the IPv6 socket then takes the same one). Must run in the
    /// network namespace the sockets should live in.
    pub(crate) fn bind(port: u16, fwmark: Option<u32>) -> Result<UdpSockets, UdpError> {
        let v4 = open(
            AddressFamily::Inet,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            fwmark,
        )?;
        let port = v4.io.local_addr().map(|a| a.port()).unwrap_or(port);
        let v6 = match open(
            AddressFamily::Inet6,
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            fwmark,
        ) {
            Ok(s) => Some(Arc::new(s)),
            // No IPv6 in this namespace / kernel: run IPv4-only.
            Err(UdpError::Socket { source, .. }) | Err(UdpError::Bind { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                tracing::info!("IPv6 unavailable, WireGuard listens on IPv4 only");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(UdpSockets {
            v4: Arc::new(v4),
            v6,
            port,
        })
    }

    /// The socket for `to`, and `to` itself (a v4-mapped address goes out the IPv4 socket when
    /// there is no IPv6 one).
    fn route(&self, to: SocketAddr) -> io::Result<(&Socket, SocketAddr)> {
        match (to, &self.v6) {
            (SocketAddr::V4(_), _) => Ok((&self.v4, to)),
            (SocketAddr::V6(_), Some(v6)) => Ok((v6, to)),
            (SocketAddr::V6(v6), None) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => Ok((&self.v4, SocketAddr::from((v4, v6.port())))),
                None => Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
            },
        }
    }

    /// Sends one datagram (waits, bounded, for buffer space rather than dropping).
    pub(crate) fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let (socket, to) = self.route(to)?;
        socket.send_waiting(|| socket.io.send_to(datagram, to))
    }

    /// Sends the datagrams stored back to back in `buf` (lengths in `lens`) to `to`: runs of
    /// equal-sized datagrams go out as one UDP GSO send each, the rest one by one.
    pub(crate) fn send_batch(&self, to: SocketAddr, buf: &[u8], lens: &[usize]) -> io::Result<()> {
        let (socket, to) = self.route(to)?;
        let addr = SockaddrStorage::from(to);
        let mut offset = 0;
        let mut i = 0;
        while i < lens.len() {
            let run = if socket.gso.load(Ordering::Relaxed) {
                gso_run(&lens[i..])
            } else {
                1
            };
            let bytes: usize = lens[i..i + run].iter().sum();
            let data = &buf[offset..offset + bytes];
            let segment = (run > 1).then(|| lens[i] as u16);
            let sent = socket.send_waiting(|| send_segments(&socket.io, &addr, data, segment));
            match sent {
                Ok(_) => {}
                Err(e) if segment.is_some() && e.kind() != io::ErrorKind::WouldBlock => {
                    // EIO (no checksum offload on the route), EINVAL (segment above the path
                    // MTU), ENOPROTOOPT (old kernel): fall back to one send per datagram.
                    tracing::info!(error = %e, "UDP GSO refused, sending datagram by datagram");
                    socket.gso.store(false, Ordering::Relaxed);
                    let mut o = 0;
                    for &len in &lens[i..i + run] {
                        socket.send_waiting(|| socket.io.send_to(&data[o..o + len], to))?;
                        o += len;
                    }
                }
                Err(e) => return Err(e),
            }
            offset += bytes;
            i += run;
        }
        Ok(())
    }
}

/// How many datagrams from the start of `lens` one GSO send can carry: all the size of the
/// first except possibly a shorter last one, within the kernel's count and size limits.
pub(crate) fn gso_run(lens: &[usize]) -> usize {
    let Some(&size) = lens.first() else {
        return 0;
    };
    if size == 0 || size > u16::MAX as usize {
        return 1;
    }
    let mut n = 0;
    let mut bytes = 0;
    for &len in lens {
        if n == GSO_MAX_SEGMENTS || bytes + len > GSO_MAX_BYTES || len > size {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break; // a short datagram ends the run
        }
    }
    n.max(1)
}

/// One `sendmsg`, with a `UDP_SEGMENT` control message when `segment` is set.
fn send_segments(
    socket: &UdpSocket,
    to: &SockaddrStorage,
    data: &[u8],
    segment: Option<u16>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain old data; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(size) = segment {
        // SAFETY: CMSG_SPACE(2) = 24 bytes fit in `control` (32 bytes); CMSG_FIRSTHDR of a
        // msghdr whose controllen covers one header is non-null and points into `control`.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(2) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
        }
    }
    // SAFETY: `msg` describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reusable buffers for [`Socket::recv_batch`].
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 8]>,
    /// Per received buffer: bytes, sender, and the size of each datagram in it (GRO).
    pub received: Vec<(usize, SocketAddr, usize)>,
}

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        RecvBatch {
            bufs: vec![vec![0u8; RECV_BUFFER]; RECV_BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            names: vec![unsafe { std::mem::zeroed() }; RECV_BATCH],
            controls: vec![[0u64; 8]; RECV_BATCH],
            received: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl RecvBatch {
    /// The datagrams of received buffer `i`, split at the GRO segment size.
    pub(crate) fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let (len, _, segment) = self.received[i];
        self.bufs[i][..len].chunks(segment.max(1))
    }
}

impl Socket {
    /// Receives up to [`RECV_BATCH`] buffers with one `recvmmsg` if any datagram is ready
    /// (`WouldBlock` otherwise).
    pub(crate) fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        recv_mmsg(&self.io, batch)
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }

    /// Runs a non-blocking send, waiting (at most [`SEND_WAIT`] in all) for buffer space while it
    /// would block.
    fn send_waiting<T>(&self, send: impl FnMut() -> io::Result<T>) -> io::Result<()> {
        write_waiting(self.raw_fd(), SEND_WAIT, send).map(drop)
    }
}

fn recv_mmsg(socket: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
    b.received.clear();
    let mut iovs: [libc::iovec; RECV_BATCH] = std::array::from_fn(|i| libc::iovec {
        iov_base: b.bufs[i].as_mut_ptr().cast(),
        iov_len: b.bufs[i].len(),
    });
    // SAFETY: mmsghdr is plain old data; every pointer set below stays valid during the call.
    let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for (i, h) in hdrs.iter_mut().enumerate() {
        h.msg_hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        h.msg_hdr.msg_iov = &mut iovs[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = b.controls[i].as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>() as _;
    }
    // SAFETY: `hdrs` holds RECV_BATCH initialised headers; the socket is non-blocking.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            RECV_BATCH as u32,
            0,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for h in &hdrs[..n as usize] {
        let len = h.msg_len as usize;
        let from = sockaddr_to_std(h.msg_hdr.msg_name.cast_const().cast());
        let mut segment = len;
        // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed cmsgs.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&h.msg_hdr, cmsg);
            }
        }
        if let Some(from) = from {
            b.received.push((len, from, segment));
        }
    }
    Ok(b.received.len())
}

/// A kernel-filled socket address as a `SocketAddr` (None for a family we do not use).
fn sockaddr_to_std(addr: *const libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: `addr` points at a sockaddr_storage the kernel filled; the family tells which
    // variant it holds, and both variants fit in the storage.
    unsafe {
        match i32::from((*addr).ss_family) {
            libc::AF_INET => {
                let a = &*addr.cast::<libc::sockaddr_in>();
                Some(SocketAddr::from((
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*addr.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::from((
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                )))
            }
            _ => None,
        }
    }
}

fn open(family: AddressFamily, addr: SocketAddr, fwmark: Option<u32>) -> Result<Socket, UdpError> {
    let name = if family == AddressFamily::Inet {
        "IPv4"
    } else {
        "IPv6"
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| UdpError::Socket {
        family: name,
        source: e.into(),
    })?;
    let opt_err = |option| {
        move |e: nix::Error| UdpError::SetOption {
            option,
            family: name,
            source: e.into(),
        }
    };
    if family == AddressFamily::Inet6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(opt_err("IPV6_V6ONLY"))?;
    }
    if let Some(mark) = fwmark {
        setsockopt(&fd, sockopt::Mark, &mark).map_err(opt_err("SO_MARK"))?;
    }
    // Best effort: without CAP_NET_ADMIN fall back to the capped variants.
    if setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
    }
    if setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
    let bound = match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    bound.map_err(|e| UdpError::Bind {
        addr,
        source: e.into(),
    })?;
    // Best effort: without GRO every datagram is its own receive buffer.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer.
    let gro = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    } == 0;
    // Non-blocking already (SOCK_NONBLOCK): the datapath thread polls.
    let io = UdpSocket::from(fd);
    Ok(Socket {
        io,
        gso: AtomicBool::new(true),
        gro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_runs_follow_the_kernel_rules() {
        assert_eq!(gso_run(&[]), 0);
        assert_eq!(gso_run(&[100]), 1);
        // Equal sizes, then a shorter last one that ends the run.
        assert_eq!(gso_run(&[100, 100, 100, 40, 100]), 4);
        // A longer datagram cannot join a run.
        assert_eq!(gso_run(&[100, 200]), 1);
        // Count and byte limits.
        assert_eq!(gso_run(&[10; 100]), GSO_MAX_SEGMENTS);
        assert_eq!(gso_run(&[1500; 60]), GSO_MAX_BYTES / 1500);
        assert_eq!(gso_run(&[70000, 70000]), 1);
    }
}
