//! The WireGuard UDP sockets: one IPv4 and (when the namespace has IPv6) one IPv6-only socket on
//! the same port, so endpoints of either family work and received addresses are never v4-mapped.
//!
//! Sockets get large buffers (bursts of a TCP stream must not overflow a 208 KiB default) and the
//! optional fwmark, which lets policy routing keep the encrypted traffic off the tunnel routes.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};
use tokio::net::UdpSocket;

/// Socket buffer size requested (the FORCE variants bypass `net.core.*mem_max` as root).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

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

/// The device's sockets. Sends pick the socket of the destination's family.
#[derive(Debug)]
pub(crate) struct UdpSockets {
    pub v4: Arc<UdpSocket>,
    pub v6: Option<Arc<UdpSocket>>,
    pub port: u16,
}

impl UdpSockets {
    /// Binds `port` (0 = any free port; the IPv6 socket then takes the same one). Must run inside
    /// a tokio runtime and in the network namespace the sockets should live in.
    pub(crate) fn bind(port: u16, fwmark: Option<u32>) -> Result<UdpSockets, UdpError> {
        let v4 = open(
            AddressFamily::Inet,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            fwmark,
        )?;
        let port = v4.local_addr().map(|a| a.port()).unwrap_or(port);
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

    /// Sends one datagram (waits for buffer space rather than dropping).
    pub(crate) async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let socket = match (to, &self.v6) {
            (SocketAddr::V4(_), _) => &self.v4,
            (SocketAddr::V6(_), Some(v6)) => v6,
            (SocketAddr::V6(v6), None) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => return self.v4.send_to(datagram, (v4, v6.port())).await.map(drop),
                None => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
            },
        };
        socket.send_to(datagram, to).await.map(drop)
    }
}

fn open(
    family: AddressFamily,
    addr: SocketAddr,
    fwmark: Option<u32>,
) -> Result<UdpSocket, UdpError> {
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
    let std_socket = std::net::UdpSocket::from(fd);
    UdpSocket::from_std(std_socket).map_err(|source| UdpError::Socket {
        family: name,
        source,
    })
}
