//! Counters kept by the datapath and the snapshots handed to callers.
//!
//! Counters are relaxed atomics bumped on the packet path; they are monotonic for the lifetime of
//! a peer (a peer removed and re-added starts from zero, like the kernel's).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::keys::PublicKey;

/// Per-peer counters, updated lock-free from the datapath tasks.
#[derive(Debug, Default)]
pub(crate) struct PeerCounters {
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    pub handshakes_sent: AtomicU64,
    pub no_session: AtomicU64,
    pub dropped_not_allowed: AtomicU64,
    pub rx_errors: AtomicU64,
    pub tx_errors: AtomicU64,
}

/// Device-wide counters: events that cannot be charged to a peer.
#[derive(Debug, Default)]
pub(crate) struct DeviceCounters {
    pub dropped_no_peer: AtomicU64,
    pub dropped_not_ip: AtomicU64,
    pub rx_unknown_peer: AtomicU64,
    pub rx_invalid: AtomicU64,
    pub cookies_sent: AtomicU64,
    pub rx_rate_limited: AtomicU64,
    pub tun_write_errors: AtomicU64,
    pub dropped_internal: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A snapshot of one peer, as `wg show` would print it plus veilnet's drop counters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStats {
    #[serde(with = "super::keys::serde_public")]
    pub public_key: PublicKey,
    /// Where encrypted packets for this peer go now (the configured endpoint, or the address the
    /// peer last roamed to).
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// When the current session's handshake completed; `None` while there is no session.
    pub last_handshake: Option<SystemTime>,
    /// Age of the current session (same information as `last_handshake`, without clock jumps).
    pub last_handshake_age: Option<Duration>,
    /// UDP payload bytes received from / sent to the peer (data, handshakes and keepalives, like
    /// `wg show transfer`).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Inner IP packets delivered to the TUN / encrypted and sent.
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Handshake initiations sent.
    pub handshakes_sent: u64,
    /// Packets for this peer read while it had no session: held in the tunnel's bounded queue
    /// until the handshake completes (dropped when it is full), never sent in plaintext.
    pub dropped_no_session: u64,
    /// Authenticated packets whose inner source address is not in the peer's allowed IPs.
    pub dropped_not_allowed: u64,
    /// Datagrams attributed to this peer that failed authentication, replay or protocol checks.
    pub rx_errors: u64,
    /// Encryption or UDP send failures towards this peer.
    pub tx_errors: u64,
    /// Traffic still rides a session made under a previous key (ours or the peer's) while the
    /// one under the current keys is set up: a key rotation in progress (`last_handshake` is the
    /// current keys' session only). Absent from an older datapath's reply, hence the default.
    #[serde(default)]
    pub on_previous_key: bool,
}

/// Counters that belong to no peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStats {
    /// Packets read from the TUN whose destination matches no peer's allowed IPs.
    pub dropped_no_peer: u64,
    /// Packets read from the TUN that are not IPv4/IPv6.
    pub dropped_not_ip: u64,
    /// Datagrams for a session index or static key that no current peer has.
    pub rx_unknown_peer: u64,
    /// Datagrams that are not WireGuard messages or fail the MAC check.
    pub rx_invalid: u64,
    /// Cookie replies sent because the handshake rate limit was hit.
    pub cookies_sent: u64,
    /// Handshake initiations refused because their source sent more than its share (20 a
    /// second, a burst of 5; see `source_limit`). Absent from an older datapath's reply.
    #[serde(default)]
    pub rx_rate_limited: u64,
    pub tun_write_errors: u64,
    /// Packets dropped because an invariant of the datapath did not hold (a bug): the packet is
    /// dropped and counted here rather than stopping the datapath thread. Zero unless something
    /// is wrong. Absent from an older datapath's reply, hence the default.
    #[serde(default)]
    pub dropped_internal: u64,
}

impl PeerCounters {
    pub(crate) fn fill(&self, s: &mut PeerStats) {
        s.rx_bytes = get(&self.rx_bytes);
        s.tx_bytes = get(&self.tx_bytes);
        s.rx_packets = get(&self.rx_packets);
        s.tx_packets = get(&self.tx_packets);
        s.handshakes_sent = get(&self.handshakes_sent);
        s.dropped_no_session = get(&self.no_session);
        s.dropped_not_allowed = get(&self.dropped_not_allowed);
        s.rx_errors = get(&self.rx_errors);
        s.tx_errors = get(&self.tx_errors);
    }
}

impl DeviceCounters {
    pub(crate) fn snapshot(&self) -> DeviceStats {
        DeviceStats {
            dropped_no_peer: get(&self.dropped_no_peer),
            dropped_not_ip: get(&self.dropped_not_ip),
            rx_unknown_peer: get(&self.rx_unknown_peer),
            rx_invalid: get(&self.rx_invalid),
            cookies_sent: get(&self.cookies_sent),
            rx_rate_limited: get(&self.rx_rate_limited),
            tun_write_errors: get(&self.tun_write_errors),
            dropped_internal: get(&self.dropped_internal),
        }
    }
}
