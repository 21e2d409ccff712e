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
//!
//! Nothing on the packet path allocates. Sends are nix's (`sendmmsg` over headers preallocated
//! once, [`SendHeaders`]: nix's `sendmsg` would allocate its control buffer on every GSO send).
//! Receives call `recvmmsg(2)` directly, see [`recv_mmsg`] for why.

use std::io::{self, IoSlice};
use std::net::UdpSocket;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    bind, sendmmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags,
    MultiHeaders, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
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
    /// equal-sized datagrams go out as one UDP GSO send each (through `headers`), the rest one by
    /// one.
    pub(crate) fn send_batch(
        &self,
        headers: &mut SendHeaders,
        to: SocketAddr,
        buf: &[u8],
        lens: &[usize],
    ) -> io::Result<()> {
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
            let sent = socket.send_waiting(|| match segment {
                Some(size) => send_segments(&socket.io, headers, addr, data, size),
                None => socket.io.send_to(data, to),
            });
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

/// Preallocated headers for GSO sends (one message with a `UDP_SEGMENT` control message),
/// reused by one sending thread.
#[derive(Debug)]
pub(crate) struct SendHeaders(MultiHeaders<SockaddrStorage>);

impl Default for SendHeaders {
    fn default() -> SendHeaders {
        SendHeaders(MultiHeaders::preallocate(1, Some(nix::cmsg_space!(u16))))
    }
}

/// One UDP GSO send: `data` leaves as datagrams of `segment` bytes (the last may be shorter).
fn send_segments(
    socket: &UdpSocket,
    headers: &mut SendHeaders,
    to: SockaddrStorage,
    data: &[u8],
    segment: u16,
) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let cmsgs = [ControlMessage::UdpGsoSegments(&segment)];
    // One message: success means it was sent whole (a datagram socket never sends part of
    // one). The results are not iterated: for sends nix would read never-written addresses.
    sendmmsg(
        socket.as_raw_fd(),
        &mut headers.0,
        [&iov],
        [Some(to)],
        cmsgs,
        MsgFlags::empty(),
    )?;
    Ok(data.len())
}

/// One receive buffer's worth of datagrams from one sender.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    /// Which buffer of the batch holds them.
    slot: usize,
    pub len: usize,
    pub from: SocketAddr,
    /// The size of each datagram in the buffer (GRO), the last may be shorter.
    pub segment: usize,
}

/// Reusable buffers for [`Socket::try_recv_batch`].
pub(crate) struct RecvBatch {
    bufs: [Vec<u8>; RECV_BATCH],
    names: [SockaddrStorage; RECV_BATCH],
    controls: [Control; RECV_BATCH],
    pub received: Vec<Received>,
}

/// Room for the control messages of one receive (the `UDP_GRO` one, 24 bytes), aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        let unspecified = SockaddrStorage::from(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        RecvBatch {
            bufs: std::array::from_fn(|_| vec![0u8; RECV_BUFFER]),
            names: [unspecified; RECV_BATCH],
            controls: [Control([0; 64]); RECV_BATCH],
            received: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl RecvBatch {
    /// The datagrams of received buffer `i`, split at the GRO segment size.
    pub(crate) fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let r = self.received[i];
        let buf = &self.bufs[r.slot];
        buf[..r.len.min(buf.len())].chunks(r.segment.max(1))
    }
}

impl Socket {
    /// Receives up to [`RECV_BATCH`] buffers with one `recvmmsg` if any datagram is ready
    /// (`WouldBlock` otherwise).
    pub(crate) fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        recv_mmsg(&self.io, batch)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.io.as_fd()
    }

    /// Runs a non-blocking send, waiting (at most [`SEND_WAIT`] in all) for buffer space while it
    /// would block.
    fn send_waiting<T>(&self, send: impl FnMut() -> io::Result<T>) -> io::Result<()> {
        write_waiting(self.fd(), SEND_WAIT, send).map(drop)
    }
}

/// One `recvmmsg(2)` into the batch's buffers.
///
/// Not nix's `recvmmsg`: its reusable `MultiHeaders` keep the control-buffer length the kernel
/// wrote back, so once a buffer receives a datagram without a `UDP_GRO` message its control
/// space stays zero, and every later GRO buffer in that slot would come back truncated and be
/// taken for one datagram (nix-rust/nix#2813, open). Fresh headers per call would allocate per
/// call; these are rebuilt on the stack, pointing into the batch's preallocated buffers.
fn recv_mmsg(socket: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
    let RecvBatch {
        bufs,
        names,
        controls,
        received,
    } = b;
    received.clear();
    let mut iovs: [libc::iovec; RECV_BATCH] = std::array::from_fn(|i| libc::iovec {
        iov_base: bufs[i].as_mut_ptr().cast(),
        iov_len: bufs[i].len(),
    });
    // SAFETY: `mmsghdr` is plain old data (integers and raw pointers), for which all-zero is a
    // valid value; every pointer that matters is set below.
    let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for (i, h) in hdrs.iter_mut().enumerate() {
        h.msg_hdr.msg_name = (&mut names[i] as *mut SockaddrStorage).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<SockaddrStorage>() as libc::socklen_t;
        h.msg_hdr.msg_iov = &mut iovs[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = controls[i].0.as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = controls[i].0.len() as _;
    }
    // SAFETY: `hdrs` holds RECV_BATCH headers whose name, iovec and control pointers point into
    // `names`, `iovs`/`bufs` and `controls`, each exclusively borrowed for this call and as long
    // as its recorded length; the socket is non-blocking, so no timeout is passed.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            RECV_BATCH as libc::c_uint,
            0,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for (slot, h) in hdrs.iter().enumerate().take(n as usize) {
        let len = h.msg_len as usize;
        // The kernel wrote the sender's address into `names[slot]`, a sockaddr_storage-sized
        // union that nix reads by its family.
        let Some(from) = socket_addr(&names[slot]) else {
            continue;
        };
        let mut segment = len;
        // SAFETY: the kernel wrote well-formed control messages into `controls[slot]` and set
        // `msg_controllen` to their length; CMSG_FIRSTHDR/CMSG_NXTHDR stay within that length
        // and return null past it, and CMSG_DATA of a `UDP_GRO` message holds an int.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&h.msg_hdr, cmsg);
            }
        }
        received.push(Received {
            slot,
            len,
            from,
            segment,
        });
    }
    Ok(received.len())
}

/// A received socket address as a `SocketAddr` (None for a family we do not use).
fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
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
    let gro = setsockopt(&fd, sockopt::UdpGroSegment, &true).is_ok();
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
