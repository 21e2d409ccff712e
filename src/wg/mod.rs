//! veilnet's userspace WireGuard datapath: boringtun's sans-IO protocol core (`noise::Tunn`) over
//! a TUN device and UDP sockets, with our own I/O on a dedicated thread. No kernel module is needed.
//!
//! Layout: [`keys`] (key files and text form), `allowed_ips` (longest-prefix table), `peers`
//! (peer state, tables, declarative diff), `state` (identity + table snapshot), `egress`
//! (TUN → UDP), `ingress` (UDP → TUN), `timers`, `tun`, `udp`, `offload` (segmentation and
//! coalescing), `stats`, and `worker`, the one thread per device that drives them all over
//! `poll` (`readiness`). The per-packet steps in `egress`/`ingress`/`timers` are synchronous
//! functions over caller-owned buffers, unit-tested without any I/O.
//!
//! Security contract: a packet from the TUN leaves only encrypted, for the peer whose allowed IPs
//! hold its destination; a decrypted packet enters the TUN only if its source is in the allowed
//! IPs of the peer that authenticated it.

mod allowed_ips;
mod egress;
#[doc(hidden)]
pub mod fuzzing;
mod ingress;
pub mod keys;
mod offload;
mod peers;
pub mod readiness;
mod rotation;
mod source_limit;
mod state;
mod stats;
mod timers;
pub mod tun;
mod udp;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use allowed_ips::AllowedIps;
pub use keys::{KeyError, PublicKey, StaticSecret};
pub use peers::{PeerChanges, PeerConfig};
pub use stats::{DeviceStats, PeerStats};
pub use tun::TunError;
pub use udp::UdpError;

use state::State;
use worker::{Datapath, DatapathThread};

/// Largest IP packet we read or write (the IPv4/IPv6 length field's limit).
pub const MAX_PACKET: usize = 65536;

// WireGuard message types (first byte; the next three are zero) and fixed sizes.
pub(crate) const MESSAGE_HANDSHAKE_INIT: u8 = 1;
pub(crate) const MESSAGE_COOKIE_REPLY: u8 = 3;
pub(crate) const MESSAGE_DATA: u8 = 4;

/// Bytes WireGuard adds to each packet on the wire, outer IPv4 + UDP included (20 + 8 + 32); an
/// IPv6 underlay adds 20 more. Subtract from the underlay MTU to get the TUN MTU.
pub const OVERHEAD_IPV4: u32 = 60;
pub const OVERHEAD_IPV6: u32 = 80;

/// The message type of a WireGuard datagram, if it has one.
pub(crate) fn message_type(datagram: &[u8]) -> Option<u8> {
    datagram.first().copied()
}

/// Consecutive I/O errors of one loop. The loops never give up (a dead loop would silently cut
/// the node off), but they back off and log the first error of a streak and then every 1000th.
#[derive(Default)]
pub(crate) struct ErrorStreak(u64);

impl ErrorStreak {
    pub(crate) fn reset(&mut self) {
        if self.0 > 0 {
            tracing::info!(errors = self.0, "I/O recovered");
            self.0 = 0;
        }
    }

    /// Logs (rate-limited) and pauses the datapath thread briefly: a descriptor that keeps
    /// failing must not turn the thread into a busy loop.
    pub(crate) fn record(&mut self, what: &str, e: &std::io::Error) {
        if self.0 % 1000 == 0 {
            tracing::warn!(error = %e, consecutive = self.0 + 1, "{what} failed");
        }
        self.0 += 1;
        let pause = if self.0 < 10 { 1 } else { 100 };
        std::thread::sleep(std::time::Duration::from_millis(pause));
    }
}

/// Configuration of a device.
#[derive(Clone)]
pub struct WgConfig {
    /// Name of the TUN interface (created if absent).
    pub tun_name: String,
    /// UDP port for both IPv4 and IPv6 (0 = pick a free one; see [`WgDevice::listen_port`]).
    pub listen_port: u16,
    pub private_key: StaticSecret,
    /// MTU of the TUN: the underlay MTU minus [`OVERHEAD_IPV4`] / [`OVERHEAD_IPV6`].
    pub mtu: u32,
    /// Firewall mark on the encrypted UDP packets, for policy routing that must not send them
    /// back into the tunnel.
    pub fwmark: Option<u32>,
    /// Make the TUN persistent (`TUNSETPERSIST`): it and the routes through it outlive this
    /// device, so a restarted agent re-attaches by name and traffic resumes after one handshake.
    /// Shutdown and drop then leave the TUN in place. Default false: the TUN vanishes with us.
    pub persistent: bool,
    /// How long the datapath thread keeps polling without sleeping after it handled packets
    /// (see `worker`). Zero sleeps at once: least CPU, longest round trips.
    pub busy_poll: Duration,
}

/// Default [`WgConfig::busy_poll`]: off. Measured on 2 cores shared by two nodes (two
/// `veilnet bench wg-node` in netns, ping and iperf3, 20 to 1000 µs tried): spinning steals the CPU
/// the other side of the round trip needs, and RTT got worse while throughput did not improve
/// beyond the noise. Worth raising only where the datapath has cores to spare.
pub const DEFAULT_BUSY_POLL: Duration = Duration::ZERO;

impl WgConfig {
    /// A configuration with the defaults: any free port, no fwmark, not persistent, the default
    /// busy-poll window.
    pub fn new(tun_name: impl Into<String>, private_key: StaticSecret, mtu: u32) -> WgConfig {
        WgConfig {
            tun_name: tun_name.into(),
            listen_port: 0,
            private_key,
            mtu,
            fwmark: None,
            persistent: false,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

impl std::fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgConfig")
            .field("tun_name", &self.tun_name)
            .field("listen_port", &self.listen_port)
            .field(
                "public_key",
                &keys::encode_public(&keys::public_key(&self.private_key)),
            )
            .field("mtu", &self.mtu)
            .field("fwmark", &self.fwmark)
            .field("persistent", &self.persistent)
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("TUN device: {0}")]
    Tun(#[from] TunError),
    #[error("UDP: {0}")]
    Udp(#[from] UdpError),
    #[error("starting the datapath thread: {0}")]
    Thread(std::io::Error),
    #[error("key: {0}")]
    Key(#[from] KeyError),
    #[error("peer {peer} appears twice in the peer list")]
    DuplicatePeer { peer: String },
    #[error("the device's own public key cannot be a peer")]
    OwnKeyAsPeer,
    #[error("allowed IP {net} is claimed by peer {first} and by peer {second}")]
    AllowedIpConflict {
        net: IpNet,
        first: String,
        second: String,
    },
    #[error("invalid peer {peer}: {reason}")]
    InvalidPeer { peer: String, reason: String },
    #[error("WireGuard protocol error: {0:?}")]
    Protocol(ProtocolError),
}

/// boringtun's protocol error, which has no `Display`/`Error` impl of its own.
#[derive(Debug)]
pub struct ProtocolError(pub boringtun::noise::errors::WireGuardError);

impl From<boringtun::noise::errors::WireGuardError> for WgError {
    fn from(e: boringtun::noise::errors::WireGuardError) -> Self {
        WgError::Protocol(ProtocolError(e))
    }
}

/// A running WireGuard device: a TUN, its UDP sockets and the thread moving packets between them.
///
/// All methods except `start`/`shutdown` are synchronous and cheap (no syscalls), so the agent can
/// call them from anywhere. Dropping the device stops it too.
pub struct WgDevice {
    state: Arc<State>,
    tun_name: String,
    port: u16,
    offloads: String,
    thread: DatapathThread,
}

impl std::fmt::Debug for WgDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDevice")
            .field("tun", &self.tun_name)
            .field("port", &self.port)
            .field("public_key", &keys::encode_public(&self.public_key()))
            .finish()
    }
}

impl WgDevice {
    /// Opens the TUN (created if absent, MTU set, up) and binds the UDP port, then starts the
    /// datapath thread. Both live in the network namespace of the calling thread: call it inside
    /// the node namespace. Starts with no peers. (Async for the callers' convenience; it does not
    /// need a runtime.)
    pub async fn start(cfg: WgConfig) -> Result<WgDevice, WgError> {
        let tun = tun::Tun::open(&cfg.tun_name, cfg.mtu, cfg.persistent)?;
        let udp = udp::UdpSockets::bind(cfg.listen_port, cfg.fwmark)?;
        let state = Arc::new(State::new(cfg.private_key));
        tracing::info!(
            tun = tun.name(),
            port = udp.port,
            mtu = cfg.mtu,
            persistent = cfg.persistent,
            offloads = format_args!("{:#x}", tun.offloads),
            udp_gro = udp.v4.gro,
            busy_poll_us = cfg.busy_poll.as_micros() as u64,
            public_key = %keys::encode_public(&state.public_key()),
            "wireguard device started"
        );
        let tun_name = tun.name().to_string();
        let port = udp.port;
        let offloads = offload_summary(tun.offloads, udp.v4.gro);
        let thread = DatapathThread::spawn(
            Datapath {
                state: state.clone(),
                tun,
                udp,
                busy_poll: cfg.busy_poll,
            },
            &tun_name,
        )
        .map_err(WgError::Thread)?;
        Ok(WgDevice {
            state,
            tun_name,
            port,
            offloads,
            thread,
        })
    }

    /// Replaces the peer set. A peer whose public key is already present keeps its session (an
    /// endpoint, allowed-IPs or keepalive change needs no handshake); a new key gets a new
    /// tunnel; keys not in `peers` are dropped with their sessions. The whole set is validated
    /// first (duplicate keys, our own key, one prefix claimed by two peers): on error nothing
    /// changes.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<PeerChanges, WgError> {
        self.state.set_peers(&peers)
    }

    /// Rotates our private key. Every session is dropped and re-established with the new key on
    /// the next packet; peers must learn the new public key (they drop our handshakes until then).
    pub fn set_private_key(&self, key: StaticSecret) {
        self.state.set_private_key(key)
    }

    /// Per-peer statistics, sorted by public key.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.state.stats()
    }

    /// Counters not attributable to a peer (e.g. packets to destinations with no peer).
    pub fn device_stats(&self) -> DeviceStats {
        self.state.device_stats()
    }

    pub fn public_key(&self) -> PublicKey {
        self.state.public_key()
    }

    /// The UDP port actually bound.
    pub fn listen_port(&self) -> u16 {
        self.port
    }

    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// How long ago the datapath thread last went round its loop. It goes round at least every
    /// timer tick (a fraction of a second) even when idle, so seconds mean it is stuck.
    pub fn datapath_turn_age(&self) -> Duration {
        let now = self.state.now_ms();
        let last = self
            .state
            .last_turn_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis(now.saturating_sub(last))
    }

    /// The offloads in effect, e.g. `tun:csum,tso4,tso6 udp:gso,gro` (for status output).
    pub fn offload_summary(&self) -> &str {
        &self.offloads
    }

    /// Stops the datapath thread and waits for it; the port is released, and the TUN
    /// disappears (unless it is persistent: then it stays, with its addresses and routes, for the
    /// next start).
    pub async fn shutdown(self) {
        let WgDevice {
            tun_name: name,
            mut thread,
            ..
        } = self;
        // Joining takes at most one turn of the thread's loop; keep it off the async threads.
        let joined = tokio::task::spawn_blocking(move || thread.stop()).await;
        if joined.is_err() {
            tracing::warn!(tun = %name, "waiting for the datapath thread failed");
        }
        tracing::info!(tun = %name, "wireguard device stopped");
    }
}

/// Names the TUN offloads the kernel accepted and whether UDP GRO is on. (UDP GSO is tried on
/// every send and only turned off after the kernel refuses it, so it is listed as intended.)
fn offload_summary(tun_offloads: libc::c_uint, udp_gro: bool) -> String {
    let names: Vec<&str> = [
        (libc::TUN_F_CSUM, "csum"),
        (libc::TUN_F_TSO4, "tso4"),
        (libc::TUN_F_TSO6, "tso6"),
        (libc::TUN_F_TSO_ECN, "ecn"),
        (libc::TUN_F_USO4, "uso4"),
        (libc::TUN_F_USO6, "uso6"),
    ]
    .into_iter()
    .filter(|(bit, _)| tun_offloads & bit != 0)
    .map(|(_, name)| name)
    .collect();
    let tun = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    };
    format!("tun:{tun} udp:gso{}", if udp_gro { ",gro" } else { "" })
}

#[cfg(test)]
mod tests;
