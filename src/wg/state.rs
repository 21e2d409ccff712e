//! The datapath's shared state, free of I/O: our identity, the peer table snapshot and the
//! device counters. The I/O tasks and the control API both work on one `Arc<State>`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;

use super::keys::{self, PublicKey, StaticSecret};
use super::peers::{self, Peer, PeerChanges, PeerConfig, PeerTable};
use super::readiness::Waker;
use super::rotation::{self, Retired};
use super::source_limit::SourceLimiter;
use super::stats::{bump, DeviceCounters, DeviceStats, PeerStats};
use super::WgError;

/// Handshake messages per second the device accepts before it demands cookies (WireGuard's
/// DoS defence). Handshake initiations pass the shared limiter twice (once before we spend a
/// Diffie-Hellman on finding the peer, once inside `Tunn::decapsulate`), hence the factor 2.
const HANDSHAKES_PER_SECOND: u64 = 100;
pub(crate) const RATE_LIMIT: u64 = 2 * HANDSHAKES_PER_SECOND;

/// Our static identity and the rate limiter keyed by it (the MAC1/cookie keys derive from our
/// public key, so both change together on rotation).
pub(crate) struct Identity {
    pub private: StaticSecret,
    pub public: PublicKey,
    pub rate_limiter: Arc<RateLimiter>,
    /// Initiations that passed `rate_limiter`'s MAC1 check from our own call this second.
    /// boringtun counts those and more (its second pass inside `Tunn`, handshake responses) and
    /// both are reset together, so once this reaches [`RATE_LIMIT`] `rate_limiter` is under load
    /// too, and an initiation it passed carried a valid MAC2: its source address is proven.
    initiations: AtomicU64,
}

impl Identity {
    fn new(private: StaticSecret) -> Identity {
        let public = keys::public_key(&private);
        Identity {
            rate_limiter: Arc::new(RateLimiter::new(&public, RATE_LIMIT)),
            private,
            public,
            initiations: AtomicU64::new(0),
        }
    }

    /// Counts an initiation `rate_limiter` passed; true when the device was under load for it.
    pub(crate) fn passed_under_load(&self) -> bool {
        self.initiations.fetch_add(1, Ordering::Relaxed) >= RATE_LIMIT
    }

    /// The second's reset of both load counts (from the tick).
    pub(crate) fn reset_load(&self) {
        self.rate_limiter.reset_count();
        self.initiations.store(0, Ordering::Relaxed);
    }
}

pub(crate) struct State {
    identity: RwLock<Arc<Identity>>,
    table: RwLock<Arc<PeerTable>>,
    /// Serialises the writers (`set_peers`, `set_private_key`) and holds the index allocator.
    writer: Mutex<u32>,
    pub counters: DeviceCounters,
    /// Reference point for the per-peer millisecond clocks.
    pub epoch: Instant,
    /// Set when some peer's `Peer::wants_handshake` or `Peer::wants_keepalive` is: the datapath
    /// thread sends those on its next turn rather than at the next timer tick.
    pub sends_wanted: AtomicBool,
    /// Wakes the datapath thread out of `poll` (set once the thread exists).
    pub waker: OnceLock<Arc<Waker>>,
    /// `now_ms` at the datapath thread's last loop turn (it turns at least every timer tick):
    /// how a liveness probe tells a stuck thread from an idle one.
    pub last_turn_ms: AtomicU64,
    /// Initiations each source may still send (see `source_limit`); taken by the datapath
    /// thread only, after a valid MAC1, and expired by its tick.
    source_limit: Mutex<SourceLimiter>,
}

impl State {
    pub(crate) fn new(private: StaticSecret) -> State {
        State {
            identity: RwLock::new(Arc::new(Identity::new(private))),
            table: RwLock::new(Arc::new(PeerTable::default())),
            // Start at a random index so that a restarted device does not reuse the previous
            // run's indexes, which peers may still be sending to.
            writer: Mutex::new(rand::random::<u32>() & peers::MAX_INDEX),
            counters: DeviceCounters::default(),
            epoch: Instant::now(),
            sends_wanted: AtomicBool::new(false),
            waker: OnceLock::new(),
            last_turn_ms: AtomicU64::new(0),
            source_limit: Mutex::new(SourceLimiter::default()),
        }
    }

    /// Whether a handshake initiation from `from`, whose address a valid MAC2 proved, may cost
    /// us a Diffie-Hellman now (counted in `rx_rate_limited` when not).
    pub(crate) fn proven_initiation_allowed(&self, from: IpAddr) -> bool {
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        let allowed = self
            .source_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(from, now_ns);
        if !allowed {
            bump(&self.counters.rx_rate_limited);
        }
        allowed
    }

    /// Forgets the sources whose initiation budget is whole again (from the tick).
    pub(crate) fn expire_sources(&self) {
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        self.source_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(now_ns);
    }

    /// Asks the datapath to initiate a handshake with `peer` now (no-op while one is running).
    pub(crate) fn request_handshake(&self, peer: &Peer) {
        self.request(&peer.wants_handshake);
    }

    /// Asks the datapath to send `peer` a keepalive on the current session now.
    pub(crate) fn request_keepalive(&self, peer: &Peer) {
        self.request(&peer.wants_keepalive);
    }

    /// Sets one of a peer's `wants_*` flags and wakes the datapath thread to act on it.
    fn request(&self, peer_flag: &AtomicBool) {
        peer_flag.store(true, Ordering::Relaxed);
        self.sends_wanted.store(true, Ordering::Release);
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }

    /// The current peer table (a cheap `Arc` clone; the read lock is held only for the clone).
    pub(crate) fn table(&self) -> Arc<PeerTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn identity(&self) -> Arc<Identity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn public_key(&self) -> PublicKey {
        self.identity().public
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Replaces the peer set with `desired` (see `WgDevice::set_peers`).
    pub(crate) fn set_peers(&self, desired: &[PeerConfig]) -> Result<PeerChanges, WgError> {
        let mut next_index = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table();
        let id = self.identity();
        let changes = peers::plan(&old.configs, desired, &id.public)?;
        if changes.is_empty() {
            return Ok(changes);
        }
        let mut new = peers::build_table(&old, desired, &mut next_index, |cfg, index| {
            let tunn = new_tunn(&id, cfg.public_key, index);
            Peer::new(cfg, index, tunn)
        });
        // A peer that rotated its key: its old tunnel carries traffic until the new one is up.
        let now_ms = self.now_ms();
        let mut rotated = Vec::new();
        for (removed, added) in rotation::links(&changes, &old.configs, desired) {
            let Some(before) = old.by_key.get(&removed) else {
                continue;
            };
            let previous = old.retired.get(&removed);
            if let Some(active) = rotation::active(before, previous) {
                new.retire(
                    added,
                    Retired::carried(active, previous, now_ms, rotation::PEER_KEY_PATIENCE),
                );
            }
            rotated.push(added);
        }
        let new = Arc::new(new);
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        for k in &changes.added {
            let linked = rotated.contains(k.as_bytes());
            if linked {
                tracing::info!(peer = %keys::fingerprint(k), "wireguard peer rotated its key; the old session carries traffic until the new one is up");
            } else {
                tracing::info!(peer = %keys::fingerprint(k), "wireguard peer added");
            }
            // The handshake with a rotated key starts at once: the switch should not wait for
            // the old session to end. Every other peer handshakes lazily, on its first packet
            // either way (ours, or its data for a session we lost: `ingress::stale_session_hint`),
            // as kernel WireGuard does: a node joining a 1,000-node cluster, or a restarted
            // datapath, must not start 999 handshakes (and their retries to peers nobody talks to).
            if let Some(peer) = new.by_key.get(k.as_bytes()).filter(|_| linked) {
                self.request_handshake(peer);
            }
        }
        for k in &changes.removed {
            tracing::info!(peer = %keys::fingerprint(k), "wireguard peer removed");
        }
        for k in &changes.updated {
            tracing::info!(peer = %keys::fingerprint(k), "wireguard peer updated");
        }
        Ok(changes)
    }

    /// Switches to a new private key, make before break: every peer gets a new tunnel under
    /// the new key, and its old tunnel keeps carrying traffic on the session it has until the
    /// peer (told the new key by its agent) handshakes on the new one (see `rotation`).
    pub(crate) fn set_private_key(&self, private: StaticSecret) {
        let mut next_index = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let id = Arc::new(Identity::new(private));
        let old = self.table();
        let mut new = PeerTable::default();
        let now_ms = self.now_ms();
        let mut kept = 0usize;
        for (key, before) in &old.by_key {
            // `PeerTable::insert` is the only way into `by_key`, so every key has its config.
            let Some(cfg) = old.configs.get(key) else {
                continue;
            };
            let index = peers::allocate_index(&mut next_index, |i| {
                old.by_index.contains_key(&i) || new.by_index.contains_key(&i)
            });
            let peer = Arc::new(before.successor(index, new_tunn(&id, before.public_key, index)));
            new.insert(peer, cfg.clone());
            let previous = old.retired.get(key);
            if let Some(active) = rotation::active(before, previous) {
                new.retire(
                    *key,
                    Retired::carried(active, previous, now_ms, rotation::OWN_KEY_PATIENCE),
                );
                kept += 1;
            }
        }
        // Between the two swaps an initiation to the new key meets an old tunnel, fails and is
        // retried by its sender: no peer of ours knows the new key yet anyway.
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = id.clone();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        tracing::info!(
            public_key = %keys::fingerprint(&id.public),
            sessions_kept = kept,
            "wireguard private key rotated; old sessions carry traffic until peers handshake with the new key"
        );
    }

    /// Notes the peers that switched to their new session and ends the retirements that are
    /// over at `now_ms` (`rotation::is_over`). Called from the timer tick.
    pub(crate) fn end_retirements(&self, now_ms: u64) {
        if self.table().retired.is_empty() {
            return;
        }
        // The datapath thread calls this: it never waits for a writer building tunnels (a
        // rotation with thousands of peers takes a while); the next tick tries again.
        let _writer = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let old = self.table();
        let mut over = Vec::new();
        for (key, r) in &old.retired {
            let successor_age = old.by_key.get(key).and_then(|p| p.session_age());
            let retired_for = Duration::from_millis(now_ms.saturating_sub(r.since_ms));
            if let Some(age) = successor_age {
                if !r.switched.swap(true, Ordering::Relaxed) {
                    // The handshake's time, give or take a tick.
                    let after = retired_for.saturating_sub(age);
                    tracing::info!(
                        peer = %keys::fingerprint(&PublicKey::from(*key)),
                        after_ms = after.as_millis() as u64,
                        "wireguard key rotation: switched to the new session"
                    );
                }
            }
            if rotation::is_over(retired_for, r.patience, r.peer.session_age(), successor_age) {
                tracing::info!(
                    peer = %keys::fingerprint(&PublicKey::from(*key)),
                    after_ms = retired_for.as_millis() as u64,
                    switched = successor_age.is_some(),
                    "wireguard key rotation: old session retired"
                );
                over.push(*key);
            }
        }
        if over.is_empty() {
            return;
        }
        let mut new = PeerTable::clone(&old);
        for key in &over {
            new.unretire(key);
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        let table = self.table();
        let now = SystemTime::now();
        let mut out: Vec<PeerStats> = table
            .by_key
            .iter()
            .map(|(key, peer)| {
                let age: Option<Duration> = peer.session_age();
                let cfg = table.configs.get(key);
                let mut s = PeerStats {
                    public_key: peer.public_key,
                    endpoint: peer.endpoint(),
                    allowed_ips: cfg.map(|c| c.allowed_ips.clone()).unwrap_or_default(),
                    persistent_keepalive: cfg.and_then(|c| c.persistent_keepalive),
                    last_handshake: age.and_then(|a| now.checked_sub(a)),
                    last_handshake_age: age,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_packets: 0,
                    tx_packets: 0,
                    handshakes_sent: 0,
                    dropped_no_session: 0,
                    dropped_not_allowed: 0,
                    rx_errors: 0,
                    tx_errors: 0,
                    on_previous_key: !Arc::ptr_eq(table.sender(peer), peer),
                };
                peer.counters.fill(&mut s);
                s
            })
            .collect();
        out.sort_by(|a, b| a.public_key.as_bytes().cmp(b.public_key.as_bytes()));
        out
    }

    pub(crate) fn device_stats(&self) -> DeviceStats {
        self.counters.snapshot()
    }
}

/// A tunnel to `peer` under our identity `id`, with local index `index`.
fn new_tunn(id: &Identity, peer: PublicKey, index: u32) -> Tunn {
    Tunn::new(
        id.private.clone(),
        peer,
        None,
        // Persistent keepalive is driven by our timer loop (so it can change without a new
        // session); the tunnel's own is off.
        None,
        index,
        Some(id.rate_limiter.clone()),
    )
}
