//! `veilnet bench tun-relay`: the simplest userspace datapath there is, a TUN relayed to a UDP
//! peer and back with no encryption, no batching and no timers. `scripts/bench.sh` measures its
//! ping RTT next to VXLAN and veilnet: it is the floor any userspace datapath pays on the machine
//! (two thread wakeups per node and direction), which tells how much of veilnet's RTT gap to
//! VXLAN is the userspace design itself and how much is veilnet's own work.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use veilnet::wg::readiness::wait_readable;
use veilnet::wg::tun::{Tun, TunError};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("TUN: {0}")]
    Tun(#[from] TunError),
    #[error("UDP port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("poll: {0}")]
    Poll(std::io::Error),
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// TUN interface name (created, removed on exit).
    #[arg(long)]
    pub tun: String,
    #[arg(long, default_value_t = 1420)]
    pub mtu: u32,
    /// Local UDP port.
    #[arg(long)]
    pub port: u16,
    /// Where the other relay listens.
    #[arg(long)]
    pub peer: SocketAddr,
}

/// Relays until killed. Packets go through unchanged (virtio header included: both ends
/// negotiate the same TUN offloads), one read and one write per packet.
pub fn run(args: RelayArgs) -> Result<(), RelayError> {
    let tun = Tun::open(&args.tun, args.mtu, false)?;
    let sock = UdpSocket::bind(("0.0.0.0", args.port)).map_err(|source| RelayError::Bind {
        port: args.port,
        source,
    })?;
    sock.set_nonblocking(true)
        .map_err(|source| RelayError::Bind {
            port: args.port,
            source,
        })?;
    println!("ready tun={} port={}", tun.name(), args.port);
    let fds = [tun.fd(), sock.as_fd()];
    let mut ready = [false; 2];
    let mut buf = vec![0u8; veilnet::wg::MAX_PACKET + 64];
    loop {
        wait_readable(fds, None, &mut ready).map_err(RelayError::Poll)?;
        if ready[0] {
            while let Ok(n) = tun.try_recv(&mut buf) {
                let _ = sock.send_to(&buf[..n], args.peer);
            }
        }
        if ready[1] {
            while let Ok(n) = sock.recv(&mut buf) {
                let _ = tun.send(&buf[..n]);
            }
        }
    }
}
