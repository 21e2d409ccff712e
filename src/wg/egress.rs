//! TUN → UDP: cryptokey routing of outgoing packets.
//!
//! Every packet read from the TUN is routed by its destination through the allowed-IPs table and
//! encrypted for the owning peer; there is no other way out. A packet with no owner is dropped,
//! and a packet for a peer without a session is held (bounded) by its `Tunn` while a handshake
//! runs: plaintext never reaches the network.
//!
//! [`encapsulate_segments`] is the step over the packets of one TUN read (one packet, or the
//! segments of a super-packet) into per-peer [`TxBatches`], free of I/O; [`Egress::round`] the I/O
//! around it: TUN reads (super-packets, see `offload`) in, UDP GSO batches out.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};

use super::offload::{segment, Segments, VnetHdr, VNET_HDR_LEN};
use super::peers::Peer;
use super::state::State;
use super::stats::{add, bump};
use super::tun::Tun;
use super::udp::{SendHeaders, UdpSockets};
use super::{message_type, MAX_PACKET, MESSAGE_DATA, MESSAGE_HANDSHAKE_INIT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EgressDrop {
    NotIp,
    NoPeer,
    TunnelError,
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

/// Encrypted datagrams for one peer, back to back, waiting to be sent in one batch.
#[derive(Debug)]
pub(crate) struct TxBatch {
    pub peer: Arc<Peer>,
    pub to: SocketAddr,
    /// Scratch space; bytes past `used` are stale. It keeps its length across rounds so that
    /// encrypting into it never pays for zero-filling first.
    buf: Vec<u8>,
    used: usize,
    pub lens: Vec<usize>,
}

impl TxBatch {
    /// The datagrams, back to back (split them with `lens`).
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[..self.used]
    }
}

/// The batches of one round of TUN reads, one per peer; their buffers are reused across rounds.
#[derive(Debug, Default)]
pub(crate) struct TxBatches {
    pub batches: Vec<TxBatch>,
    spare: Vec<(Vec<u8>, Vec<usize>)>,
}

impl TxBatches {
    fn for_peer(&mut self, peer: &Arc<Peer>) -> &mut TxBatch {
        let i = match self.batches.iter().position(|b| Arc::ptr_eq(&b.peer, peer)) {
            Some(i) => i,
            None => {
                let (buf, lens) = self.spare.pop().unwrap_or_default();
                self.batches.push(TxBatch {
                    peer: peer.clone(),
                    to: peer.endpoint(),
                    buf,
                    used: 0,
                    lens,
                });
                self.batches.len() - 1
            }
        };
        &mut self.batches[i]
    }

    /// Bytes waiting in all batches.
    pub(crate) fn bytes(&self) -> usize {
        self.batches.iter().map(|b| b.used).sum()
    }

    pub(crate) fn clear(&mut self) {
        for mut b in self.batches.drain(..) {
            b.lens.clear();
            self.spare.push((b.buf, b.lens));
        }
    }
}

/// Encrypts a run of IP packets that share one destination (the segments of one TUN read) for
/// the peer owning that destination, appending the datagrams to that peer's batch. The peer is
/// routed and its tunnel locked once for the whole run. A packet for a peer without a session is
/// held by its `Tunn` (bounded) and the handshake initiation it triggers joins the batch:
/// plaintext never reaches the network. Every drop is counted; the error tells the first reason.
pub(crate) fn encapsulate_segments<'a>(
    state: &State,
    packets: impl Iterator<Item = &'a [u8]> + Clone,
    batches: &mut TxBatches,
) -> Result<(), EgressDrop> {
    let count = packets.clone().count();
    let Some(first) = packets.clone().next() else {
        return Ok(());
    };
    let Some(dst) = Tunn::dst_address(first) else {
        add(&state.counters.dropped_not_ip, count);
        return Err(EgressDrop::NotIp);
    };
    let table = state.table();
    let Some(peer) = table.route(dst) else {
        add(&state.counters.dropped_no_peer, count);
        tracing::trace!(%dst, "no peer for destination, dropped");
        return Err(EgressDrop::NoPeer);
    };
    // During a key rotation, possibly the old tunnel (make before break).
    let peer = table.sender(peer).clone();
    drop(table);
    let batch = batches.for_peer(&peer);
    let mut dropped = 0;
    let mut tunn = peer.tunn();
    for packet in packets {
        // Segments of one read share the destination by construction; a plain read is one packet.
        let start = batch.used;
        let need = start + (packet.len() + 32).max(148);
        if batch.buf.len() < need {
            batch.buf.resize(need, 0);
        }
        let written = match tunn.encapsulate(packet, &mut batch.buf[start..need]) {
            TunnResult::WriteToNetwork(datagram) => {
                match message_type(datagram) {
                    Some(MESSAGE_DATA) => bump(&peer.counters.tx_packets),
                    Some(MESSAGE_HANDSHAKE_INIT) => {
                        bump(&peer.counters.no_session);
                        bump(&peer.counters.handshakes_sent);
                    }
                    _ => {}
                }
                datagram.len()
            }
            TunnResult::Done => {
                bump(&peer.counters.no_session);
                0
            }
            TunnResult::Err(e) => {
                bump(&peer.counters.tx_errors);
                tracing::debug!(error = ?e, "encapsulate failed");
                dropped += 1;
                0
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                bump(&peer.counters.tx_errors);
                dropped += 1;
                0
            }
        };
        batch.used = start + written;
        if written > 0 {
            batch.lens.push(written);
        }
    }
    if dropped > 0 {
        return Err(EgressDrop::TunnelError);
    }
    Ok(())
}

/// TUN reads per round before the batches are sent, and the bytes that end a round early.
const READS_PER_ROUND: usize = 32;
const ROUND_BYTES: usize = 512 << 10;

/// The TUN → UDP direction's reusable buffers, driven by the datapath thread.
pub(crate) struct Egress {
    packet: Vec<u8>,
    segments: Segments,
    batches: TxBatches,
    send_headers: SendHeaders,
    errors: super::ErrorStreak,
}

impl Egress {
    pub(crate) fn new() -> Egress {
        Egress {
            packet: vec![0u8; VNET_HDR_LEN + MAX_PACKET],
            segments: Segments::default(),
            batches: TxBatches::default(),
            send_headers: SendHeaders::default(),
            errors: super::ErrorStreak::default(),
        }
    }

    /// One round: reads what the TUN has ready (a read is a super-packet with offloads), each read
    /// segmented and encrypted into its peer's batch; when the TUN has nothing more (or the round
    /// is full) the batches go out, one GSO send per run of equal-sized datagrams. Returns whether
    /// anything was read.
    pub(crate) fn round(&mut self, state: &State, tun: &Tun, udp: &UdpSockets) -> bool {
        let mut read_any = false;
        for _ in 0..READS_PER_ROUND {
            if self.batches.bytes() >= ROUND_BYTES {
                break;
            }
            match tun.try_recv(&mut self.packet) {
                Ok(n) => {
                    self.errors.reset();
                    read_any = true;
                    take(
                        state,
                        &self.packet[..n],
                        &mut self.segments,
                        &mut self.batches,
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.errors.record("reading the TUN device", &e);
                    break;
                }
            }
        }
        for b in &self.batches.batches {
            let result = udp.send_batch(&mut self.send_headers, b.to, b.data(), &b.lens);
            account_send(state, &b.peer, b.used, &result);
        }
        self.batches.clear();
        read_any
    }
}

/// One TUN read: offload header off, segments out, encrypted into the batches.
fn take(state: &State, read: &[u8], segments: &mut Segments, batches: &mut TxBatches) {
    let Some(hdr) = VnetHdr::decode(read) else {
        bump(&state.counters.dropped_not_ip);
        return;
    };
    match segment(&hdr, &read[VNET_HDR_LEN..], segments) {
        Ok(()) => {
            if let Err(why) = encapsulate_segments(state, segments.iter(), batches) {
                tracing::trace!(?why, "outgoing packet dropped");
            }
        }
        Err(e) => {
            bump(&state.counters.dropped_not_ip);
            tracing::debug!(error = %e, ?hdr, "unusable packet from the TUN, dropped");
        }
    }
}
