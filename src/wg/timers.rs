//! The periodic tick: WireGuard's timers (handshake retries, rekeying, keepalives, session
//! expiry) for every peer, our persistent keepalives, the end of key-rotation grace periods, and
//! the handshake rate limiters' reset.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

use super::egress;
use super::peers::Peer;
use super::state::State;
use super::stats::bump;
use super::udp::UdpSockets;
use super::{message_type, MESSAGE_DATA, MESSAGE_HANDSHAKE_INIT};

/// How often timers run; WireGuard's timer granularity is coarser than this.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Runs one peer's timers; returns a datagram to send, if any (`out` ≥ 148 bytes). `sender` is
/// the tunnel that carries the peer's traffic (`PeerTable::sender`): `peer` itself, or during a
/// key rotation the one it replaces, which gets the persistent keepalives (its own timers are
/// [`tick_retired`]'s).
pub(crate) fn tick_peer<'a>(
    peer: &Peer,
    sender: &Peer,
    now_ms: u64,
    out: &'a mut [u8],
) -> Option<(SocketAddr, &'a [u8])> {
    let mut tunn = peer.tunn();
    // Both `update_timers` and the keepalive write into `out`, so the first result is kept as a
    // range (a borrowed slice could not be returned conditionally and `out` reused after).
    let base = out.as_ptr() as usize;
    let timer_packet = match tunn.update_timers(out) {
        TunnResult::WriteToNetwork(d) => {
            let start = d.as_ptr() as usize - base;
            Some(start..start + d.len())
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => {
            // Reported every tick while idle after expiry; the next packet re-initiates.
            None
        }
        TunnResult::Err(e) => {
            tracing::debug!(error = ?e, "timer update failed");
            None
        }
        _ => None,
    };
    if let Some(range) = timer_packet {
        drop(tunn);
        let datagram = &out[range];
        if message_type(datagram) == Some(MESSAGE_HANDSHAKE_INIT) {
            bump(&peer.counters.handshakes_sent);
        }
        return Some((peer.endpoint(), datagram));
    }
    // Persistent keepalive: keep NAT/conntrack state warm when we have been quiet. With no
    // session this queues the (empty) keepalive and starts a handshake, which is the point.
    let every_ms = u64::from(peer.keepalive_secs.load(Ordering::Relaxed)) * 1000;
    let last = sender.last_tx_ms.load(Ordering::Relaxed);
    if every_ms == 0 || now_ms.saturating_sub(last) < every_ms {
        return None;
    }
    // Count it as sent now, so a failed send does not retry every tick.
    sender.last_tx_ms.store(now_ms, Ordering::Relaxed);
    if !std::ptr::eq(peer, sender) {
        drop(tunn);
        tunn = sender.tunn();
    }
    keepalive(sender, &mut tunn, out).map(|datagram| (sender.endpoint(), datagram))
}

/// Runs a retired tunnel's timers (see `rotation`): they expire its sessions one by one and time
/// out a handshake it had in flight. Only a keepalive they produce is returned; a handshake
/// initiation is dropped, since a retired key must not get a new session.
pub(crate) fn tick_retired<'a>(peer: &Peer, out: &'a mut [u8]) -> Option<(SocketAddr, &'a [u8])> {
    let len = match peer.tunn().update_timers(out) {
        TunnResult::WriteToNetwork(d) if message_type(d) == Some(MESSAGE_DATA) => d.len(),
        _ => return None,
    };
    Some((peer.endpoint(), &out[..len]))
}

/// An empty data packet on the current session. With no session this queues it and returns the
/// handshake initiation it starts instead (counted as one), which serves the same end.
fn keepalive<'a>(peer: &Peer, tunn: &mut Tunn, out: &'a mut [u8]) -> Option<&'a [u8]> {
    match tunn.encapsulate(&[], out) {
        TunnResult::WriteToNetwork(datagram) => {
            if message_type(datagram) == Some(MESSAGE_HANDSHAKE_INIT) {
                bump(&peer.counters.handshakes_sent);
            }
            Some(datagram)
        }
        _ => None,
    }
}

/// Sends the handshakes and keepalives asked for with `State::request_handshake` and
/// `State::request_keepalive` (a keepalive goes on the session that carries the traffic, see
/// `PeerTable::sender`).
pub(crate) fn send_requested(state: &State, udp: &UdpSockets, out: &mut [u8]) {
    for_each_requested(state, out, |peer, datagram| {
        let result = udp.send_to(datagram, peer.endpoint());
        egress::account_send(state, peer, datagram.len(), &result);
    });
}

/// The datagrams of the requested handshakes and keepalives, each passed to `send` (`out` ≥ 148
/// bytes). Apart from the socket, what [`send_requested`] does.
pub(crate) fn for_each_requested(
    state: &State,
    out: &mut [u8],
    mut send: impl FnMut(&Peer, &[u8]),
) {
    if !state.sends_wanted.swap(false, Ordering::Acquire) {
        return;
    }
    let table = state.table();
    for peer in table.by_key.values() {
        // Each `let` drops the `Tunn` guard at its end: `send` does I/O, never under the lock.
        if peer.wants_handshake.swap(false, Ordering::Relaxed) {
            let len = match peer.tunn().format_handshake_initiation(out, false) {
                TunnResult::WriteToNetwork(d) => Some(d.len()),
                _ => None, // one is in flight already
            };
            if let Some(len) = len {
                bump(&peer.counters.handshakes_sent);
                send(peer, &out[..len]);
            }
        }
        if peer.wants_keepalive.swap(false, Ordering::Relaxed) {
            let sender = table.sender(peer);
            let datagram = keepalive(sender, &mut sender.tunn(), out);
            if let Some(datagram) = datagram {
                send(sender, datagram);
            }
        }
    }
}

/// The timer wheel of the datapath thread: every [`TICK`], each peer's timers; every second,
/// the rate limiter reset.
pub(crate) struct Timers {
    out: Vec<u8>,
    next_tick: Instant,
    last_reset_ms: u64,
}

impl Timers {
    pub(crate) fn new(now: Instant) -> Timers {
        Timers {
            out: vec![0u8; 256],
            next_tick: now + TICK,
            last_reset_ms: 0,
        }
    }

    /// When [`Timers::run_due`] next has work.
    pub(crate) fn next_due(&self) -> Instant {
        self.next_tick
    }

    /// Sends requested handshakes, and runs the tick if it is due.
    pub(crate) fn run_due(&mut self, state: &State, udp: &UdpSockets, now: Instant) {
        send_requested(state, udp, &mut self.out);
        if now < self.next_tick {
            return;
        }
        // A late tick is not repeated to catch up; the next one is a full TICK away.
        self.next_tick = now + TICK;
        let now_ms = state.now_ms();
        if now_ms.saturating_sub(self.last_reset_ms) >= 1000 {
            // Shared limiters are not reset by the tunnels themselves.
            state.identity().reset_load();
            state.expire_sources();
            self.last_reset_ms = now_ms;
        }
        state.end_retirements(now_ms);
        let table = state.table();
        for peer in table.by_key.values() {
            let sender = table.sender(peer);
            if let Some((to, datagram)) = tick_peer(peer, sender, now_ms, &mut self.out) {
                let len = datagram.len();
                let result = udp.send_to(datagram, to);
                egress::account_send(state, peer, len, &result);
            }
        }
        for retired in table.retired.values() {
            if let Some((to, datagram)) = tick_retired(&retired.peer, &mut self.out) {
                let len = datagram.len();
                let result = udp.send_to(datagram, to);
                egress::account_send(state, &retired.peer, len, &result);
            }
        }
    }
}
