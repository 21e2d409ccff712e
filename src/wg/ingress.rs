//! UDP → TUN: authenticate, decrypt, and check the inner source against the sender's allowed IPs.
//!
//! Peers are found without trusting anything unauthenticated: handshake initiations by
//! decrypting the initiator's static key (after the MAC1 check and rate limiter, so an attacker
//! cannot make us spend Diffie-Hellman operations for free), every other message by the receiver
//! index we handed out. A decrypted packet is written to the TUN only if its source address
//! routes back to the peer that sent it (cryptokey routing); anything else is dropped and counted.
//!
//! [`handle`] is the per-datagram step over caller-owned buffers; [`next_queued`] drains packets a
//! completed handshake released; [`Ingress::round`] is the I/O around them (batched receives in,
//! coalesced TUN writes out).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};

use super::offload::Coalescer;
use super::peers::Peer;
use super::state::State;
use super::stats::{add, bump};
use super::tun::Tun;
use super::udp::{RecvBatch, Socket, UdpSockets};
use super::{egress, message_type, MAX_PACKET, MESSAGE_DATA};

/// Size of a cookie reply message.
const COOKIE_REPLY_LEN: usize = 64;

/// What to do with one received datagram.
#[derive(Debug)]
pub(crate) enum Step<'a> {
    /// Write this decrypted IP packet to the TUN.
    ToTun(&'a [u8]),
    /// Send this datagram back. When `drain` is set, the peer may have packets queued behind the
    /// handshake that just completed: call [`next_queued`] until it returns `None`.
    ToNetwork {
        to: SocketAddr,
        datagram: &'a [u8],
        drain: Option<Arc<Peer>>,
    },
    /// Fully handled (a keepalive, a cookie).
    Consumed,
    /// Dropped; counted already.
    Dropped(IngressDrop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IngressDrop {
    /// Not a well-formed WireGuard message, or a bad MAC.
    Invalid,
    /// No current peer has that key or index.
    UnknownPeer,
    /// A handshake initiation from a source past its rate (`source_limit`).
    RateLimited,
    /// The peer's tunnel rejected it (authentication, replay, no session, …).
    Rejected,
    /// Authenticated, but the inner source is not in the peer's allowed IPs.
    NotAllowed,
    /// The caller broke [`handle`]'s contract (an output buffer too small): a bug, counted in
    /// `dropped_internal` instead of panicking on the datapath thread.
    Internal,
}

/// The smallest output buffer [`handle`] accepts: a handshake message's worth (boringtun writes
/// replies of up to 148 bytes).
pub(crate) const MIN_OUT: usize = 148;

/// Processes one datagram received from `from` (on either socket; v4-mapped addresses are
/// canonicalised). `out` must be at least as long as the datagram and at least [`MIN_OUT`]
/// bytes; a shorter one drops the datagram as [`IngressDrop::Internal`].
pub(crate) fn handle<'a>(
    state: &State,
    from: SocketAddr,
    datagram: &[u8],
    out: &'a mut [u8],
) -> Step<'a> {
    if out.len() < datagram.len().max(MIN_OUT) {
        bump(&state.counters.dropped_internal);
        tracing::debug!(
            out = out.len(),
            datagram = datagram.len(),
            "ingress output buffer too small, datagram dropped"
        );
        return Step::Dropped(IngressDrop::Internal);
    }
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let packet = match Tunn::parse_incoming_packet(datagram) {
        Ok(p) => p,
        Err(_) => {
            bump(&state.counters.rx_invalid);
            return Step::Dropped(IngressDrop::Invalid);
        }
    };
    let table = state.table();
    let peer = match packet {
        Packet::HandshakeInit(_) => {
            let id = state.identity();
            // MAC1 and load check before the expensive part. Under load this answers with a
            // cookie instead, which the initiator must echo in MAC2.
            let mut cookie = [0u8; COOKIE_REPLY_LEN];
            let init = match id
                .rate_limiter
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(Packet::HandshakeInit(init)) => init,
                Ok(_) => {
                    bump(&state.counters.rx_invalid);
                    return Step::Dropped(IngressDrop::Invalid);
                }
                Err(TunnResult::WriteToNetwork(reply)) => {
                    bump(&state.counters.cookies_sent);
                    let n = reply.len();
                    out[..n].copy_from_slice(reply);
                    return Step::ToNetwork {
                        to: from,
                        datagram: &out[..n],
                        drain: None,
                    };
                }
                Err(_) => {
                    bump(&state.counters.rx_invalid);
                    return Step::Dropped(IngressDrop::Invalid);
                }
            };
            // Under load, a source that echoes cookies from its real address passes the check
            // above at any rate, and each initiation past here costs a Diffie-Hellman: its share
            // is limited (see `source_limit`). Not otherwise: a source's share could then be
            // spent by packets forging its address.
            if id.passed_under_load() && !state.proven_initiation_allowed(from.ip()) {
                return Step::Dropped(IngressDrop::RateLimited);
            }
            let half = match parse_handshake_anon(&id.private, &id.public, &init) {
                Ok(h) => h,
                Err(e) => {
                    tracing::trace!(error = ?e, %from, "handshake initiation not for our key");
                    bump(&state.counters.rx_invalid);
                    return Step::Dropped(IngressDrop::Invalid);
                }
            };
            match table.by_key.get(&half.peer_static_public) {
                Some(p) => p.clone(),
                None => {
                    tracing::debug!(%from, "handshake initiation from an unknown public key");
                    bump(&state.counters.rx_unknown_peer);
                    return Step::Dropped(IngressDrop::UnknownPeer);
                }
            }
        }
        // A retired tunnel (see `rotation`) takes data only: a handshake it had in flight must
        // not complete, or its old key would get a new session.
        Packet::HandshakeResponse(p) => match lookup_current_index(state, &table, p.receiver_idx) {
            Some(peer) => peer,
            None => return Step::Dropped(IngressDrop::UnknownPeer),
        },
        Packet::PacketCookieReply(p) => match lookup_current_index(state, &table, p.receiver_idx) {
            Some(peer) => peer,
            None => return Step::Dropped(IngressDrop::UnknownPeer),
        },
        Packet::PacketData(p) => match lookup_index(state, &table, p.receiver_idx) {
            Some(peer) => peer,
            None => {
                stale_session_hint(state, &table, from);
                return Step::Dropped(IngressDrop::UnknownPeer);
            }
        },
    };
    let is_data = message_type(datagram) == Some(MESSAGE_DATA);
    let is_cookie = message_type(datagram) == Some(super::MESSAGE_COOKIE_REPLY);

    let result = peer.tunn().decapsulate(Some(from.ip()), datagram, out);
    let outcome = match result {
        TunnResult::Err(e) => {
            tracing::trace!(error = ?e, %from, "datagram rejected by the tunnel");
            bump(&peer.counters.rx_errors);
            Step::Dropped(IngressDrop::Rejected)
        }
        TunnResult::Done => {
            // A keepalive (authenticated) or a cookie reply (not a proof of the peer's address).
            if !is_cookie {
                authenticated(&peer, from, datagram.len());
            }
            Step::Consumed
        }
        TunnResult::WriteToNetwork(reply) => {
            // A handshake response to an initiation, a keepalive answering a response, or a
            // cookie because the second rate-limiter pass found us under load.
            if is_cookie_reply(reply) {
                bump(&state.counters.cookies_sent);
                return Step::ToNetwork {
                    to: from,
                    datagram: reply,
                    drain: None,
                };
            }
            authenticated(&peer, from, datagram.len());
            Step::ToNetwork {
                to: from,
                datagram: reply,
                drain: Some(peer),
            }
        }
        TunnResult::WriteToTunnelV4(inner, src) => {
            deliver(&table, &peer, from, datagram.len(), IpAddr::V4(src), inner)
        }
        TunnResult::WriteToTunnelV6(inner, src) => {
            deliver(&table, &peer, from, datagram.len(), IpAddr::V6(src), inner)
        }
    };
    // Only data messages may produce plaintext for the TUN; `Tunn` guarantees it, this states it.
    debug_assert!(is_data || !matches!(outcome, Step::ToTun(_)));
    outcome
}

fn is_cookie_reply(datagram: &[u8]) -> bool {
    message_type(datagram) == Some(super::MESSAGE_COOKIE_REPLY)
}

fn lookup_index(
    state: &State,
    table: &super::peers::PeerTable,
    receiver_idx: u32,
) -> Option<Arc<Peer>> {
    let peer = table.by_index.get(&(receiver_idx >> 8)).cloned();
    if peer.is_none() {
        bump(&state.counters.rx_unknown_peer);
    }
    peer
}

/// [`lookup_index`] without the retired tunnels.
fn lookup_current_index(
    state: &State,
    table: &super::peers::PeerTable,
    receiver_idx: u32,
) -> Option<Arc<Peer>> {
    lookup_index(state, table, receiver_idx).filter(|peer| {
        let retired = table.is_retired(peer);
        if retired {
            bump(&state.counters.rx_unknown_peer);
        }
        !retired
    })
}

/// Data for a session index we do not know, from a peer's endpoint: typically we restarted and the
/// peer is still sending on the session it had with our previous incarnation. Waiting for our own
/// next packet could take long when we only receive (a TCP receiver whose peer backs off), and
/// the peer's own timer re-handshakes only after 15 s of silence.
/// - With no session, a handshake from us moves the peer to a new one at once.
/// - With a session (we initiated it, but the keepalive that confirms it to the responder was
///   lost), the peer keeps its old session current until data arrives on the new one: a keepalive
///   on ours switches it.
///
/// Unauthenticated, so it only ever sends what the next packet would anyway: at most one
/// handshake per handshake timeout (the `Tunn` refuses a second one while one is in flight) and
/// one keepalive per second of silence towards that peer.
fn stale_session_hint(state: &State, table: &super::peers::PeerTable, from: SocketAddr) {
    let Some(peer) = table.by_key.values().find(|p| p.endpoint() == from) else {
        return;
    };
    let fingerprint = super::keys::fingerprint(&peer.public_key);
    if !table.sender(peer).has_session() {
        tracing::debug!(peer = %fingerprint, "data for an unknown session, initiating a handshake");
        state.request_handshake(peer);
        return;
    }
    let now = state.now_ms();
    let last = peer.last_tx_ms.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= KEEPALIVE_HINT_MS
        && peer
            .last_tx_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::debug!(peer = %fingerprint, "data for an unknown session, confirming ours with a keepalive");
        state.request_keepalive(peer);
    }
}

/// Silence towards a peer after which a stale-session hint sends it a keepalive.
const KEEPALIVE_HINT_MS: u64 = 1000;

/// Bookkeeping for a datagram that authenticated as coming from `peer`: transfer counters, and
/// roaming (the peer's endpoint follows its authenticated source address, as in WireGuard).
fn authenticated(peer: &Peer, from: SocketAddr, len: usize) {
    add(&peer.counters.rx_bytes, len);
    peer.roam_to(from);
}

fn deliver<'a>(
    table: &super::peers::PeerTable,
    peer: &Peer,
    from: SocketAddr,
    len: usize,
    src: IpAddr,
    inner: &'a mut [u8],
) -> Step<'a> {
    authenticated(peer, from, len);
    if !table.source_allowed(peer, src) {
        tracing::debug!(%src, peer = %super::keys::fingerprint(&peer.public_key), "inner source not in the peer's allowed IPs, dropped");
        bump(&peer.counters.dropped_not_allowed);
        return Step::Dropped(IngressDrop::NotAllowed);
    }
    bump(&peer.counters.rx_packets);
    Step::ToTun(inner)
}

/// After a handshake completes, the next packet the peer queued while waiting, encrypted.
pub(crate) fn next_queued<'a>(peer: &Peer, out: &'a mut [u8]) -> Option<(SocketAddr, &'a [u8])> {
    let result = peer.tunn().decapsulate(None, &[], out);
    match result {
        TunnResult::WriteToNetwork(datagram) => {
            if message_type(datagram) == Some(MESSAGE_DATA) {
                bump(&peer.counters.tx_packets);
            }
            Some((peer.endpoint(), datagram))
        }
        _ => None,
    }
}

/// The UDP → TUN direction's reusable buffers (one per socket), driven by the datapath thread.
pub(crate) struct Ingress {
    batch: RecvBatch,
    out: Vec<u8>,
    coalescer: Coalescer,
    errors: super::ErrorStreak,
}

impl Ingress {
    pub(crate) fn new() -> Ingress {
        Ingress {
            batch: RecvBatch::default(),
            out: vec![0u8; MAX_PACKET + 64],
            coalescer: Coalescer::default(),
            errors: super::ErrorStreak::default(),
        }
    }

    /// One round on `socket`: a `recvmmsg` batch (with GRO, many datagrams per buffer) if one is
    /// ready, decrypted datagram by datagram, the plaintext coalesced into TCP super-packets and
    /// written to the TUN. Handshake replies (and the packets they release) go out at once.
    /// Returns whether anything was received.
    pub(crate) fn round(
        &mut self,
        state: &State,
        tun: &Tun,
        udp: &UdpSockets,
        socket: &Socket,
    ) -> bool {
        let received = match socket.try_recv_batch(&mut self.batch) {
            Ok(n) => {
                self.errors.reset();
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                self.errors.record("receiving from the UDP socket", &e);
                return false;
            }
        };
        let Ingress {
            batch,
            out,
            coalescer,
            ..
        } = self;
        for i in 0..received {
            let from = batch.received[i].from;
            for datagram in batch.datagrams(i) {
                match handle(state, from, datagram, out) {
                    Step::ToTun(packet) => coalescer.push(packet),
                    Step::ToNetwork {
                        to,
                        datagram: reply,
                        drain,
                    } => {
                        let len = reply.len();
                        let result = udp.send_to(reply, to);
                        if let Some(peer) = drain {
                            egress::account_send(state, &peer, len, &result);
                            while let Some((to, queued)) = next_queued(&peer, out) {
                                let len = queued.len();
                                let result = udp.send_to(queued, to);
                                egress::account_send(state, &peer, len, &result);
                            }
                        }
                    }
                    Step::Consumed => {}
                    Step::Dropped(why) => tracing::trace!(?why, %from, "datagram dropped"),
                }
            }
        }
        if !coalescer.is_empty() {
            for packet in coalescer.packets() {
                if let Err(e) = tun.send(packet) {
                    bump(&state.counters.tun_write_errors);
                    tracing::debug!(error = %e, "TUN write failed");
                }
            }
            coalescer.clear();
        }
        received > 0
    }
}
