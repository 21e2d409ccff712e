//! TUN → UDP: cryptokey routing of outgoing packets.
//!
//! Every packet read from the TUN is routed by its destination through the allowed-IPs table and
//! encrypted for the owning peer; there is no other way out. A packet with no owner is dropped,
//! and a packet for a peer without a session is held (bounded) by its `Tunn` while a handshake
//! runs: plaintext never reaches the network.
//!
//! [`encapsulate`] is the per-packet step over caller-owned buffers, [`run`] the I/O loop around
//! it (one packet per syscall for now; batching would call the step over a vector of buffers).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};

use super::peers::Peer;
use super::state::State;
use super::stats::{add, bump};
use super::tun::Tun;
use super::udp::UdpSockets;
use super::{message_type, MAX_PACKET, MESSAGE_DATA, MESSAGE_HANDSHAKE_INIT};

/// What to do with one packet read from the TUN.
#[derive(Debug)]
pub(crate) enum Egress<'a> {
    /// Send this datagram (data, or a handshake initiation the packet triggered) to `to`.
    Send {
        to: SocketAddr,
        datagram: &'a [u8],
        peer: Arc<Peer>,
    },
    /// Held in the peer's queue until its handshake completes.
    Queued,
    /// Dropped; counted already.
    Dropped(EgressDrop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EgressDrop {
    NotIp,
    NoPeer,
    TunnelError,
}

/// Encrypts one IP packet from the TUN into `out` (which must hold `packet.len() + 32` and at
/// least 148 bytes: [`MAX_PACKET`] + 32 is always enough).
pub(crate) fn encapsulate<'a>(state: &State, packet: &[u8], out: &'a mut [u8]) -> Egress<'a> {
    let Some(dst) = Tunn::dst_address(packet) else {
        bump(&state.counters.dropped_not_ip);
        return Egress::Dropped(EgressDrop::NotIp);
    };
    let table = state.table();
    let Some(peer) = table.route(dst) else {
        bump(&state.counters.dropped_no_peer);
        tracing::trace!(%dst, "no peer for destination, dropped");
        return Egress::Dropped(EgressDrop::NoPeer);
    };
    let peer = peer.clone();
    drop(table);
    let result = peer.tunn().encapsulate(packet, out);
    match result {
        TunnResult::WriteToNetwork(datagram) => {
            match message_type(datagram) {
                Some(MESSAGE_DATA) => bump(&peer.counters.tx_packets),
                Some(MESSAGE_HANDSHAKE_INIT) => {
                    // No session yet: the packet was queued and this initiation starts one.
                    bump(&peer.counters.no_session);
                    bump(&peer.counters.handshakes_sent);
                }
                _ => {}
            }
            let to = peer.endpoint();
            Egress::Send { to, datagram, peer }
        }
        TunnResult::Done => {
            // Queued behind a handshake that is already in flight.
            bump(&peer.counters.no_session);
            Egress::Queued
        }
        TunnResult::Err(e) => {
            bump(&peer.counters.tx_errors);
            tracing::debug!(error = ?e, "encapsulate failed");
            Egress::Dropped(EgressDrop::TunnelError)
        }
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            // Not produced by encapsulate; never hand anything back to the TUN from here.
            bump(&peer.counters.tx_errors);
            Egress::Dropped(EgressDrop::TunnelError)
        }
    }
}

/// Accounts a datagram that reached (or failed to reach) the socket.
pub(crate) fn account_send(state: &State, peer: &Peer, len: usize, result: &std::io::Result<()>) {
    match result {
        Ok(()) => {
            add(&peer.counters.tx_bytes, len);
            peer.last_tx_ms.store(state.now_ms(), Ordering::Relaxed);
        }
        Err(e) => {
            bump(&peer.counters.tx_errors);
            tracing::debug!(error = %e, "udp send failed");
        }
    }
}

/// Reads the TUN until it fails; each packet is routed, encrypted and sent.
pub(crate) async fn run(state: Arc<State>, tun: Arc<Tun>, udp: Arc<UdpSockets>) {
    let mut packet = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET + 64];
    let mut errors = super::ErrorStreak::default();
    loop {
        let n = match tun.recv(&mut packet).await {
            Ok(n) => {
                errors.reset();
                n
            }
            Err(e) => {
                errors.record("reading the TUN device", &e).await;
                continue;
            }
        };
        match encapsulate(&state, &packet[..n], &mut out) {
            Egress::Send { to, datagram, peer } => {
                let result = udp.send_to(datagram, to).await;
                account_send(&state, &peer, datagram.len(), &result);
            }
            Egress::Queued => {}
            Egress::Dropped(why) => tracing::trace!(?why, "outgoing packet dropped"),
        }
    }
}
