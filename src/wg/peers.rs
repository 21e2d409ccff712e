//! The peer set: per-peer tunnel state, the lookup tables the datapath reads, and the pure
//! planning of declarative peer updates.
//!
//! The tables live in an immutable [`PeerTable`] snapshot behind an `Arc`. The datapath clones the
//! `Arc` for each packet and never holds a lock across a syscall; `set_peers` builds a new table
//! next to the old one and swaps it in. Peers whose key survives an update are the *same*
//! `Arc<Peer>` in both tables, so their `Tunn` (sessions, counters, queued packets) carries over.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use boringtun::noise::Tunn;
use ipnet::IpNet;

use super::allowed_ips::AllowedIps;
use super::keys::{self, PublicKey};
use super::rotation::Retired;
use super::stats::PeerCounters;
use super::WgError;

/// Largest local index: `Tunn` shifts the index left by 8 bits and uses the low byte for its
/// session ring, so only 24 bits are ours.
pub(crate) const MAX_INDEX: u32 = (1 << 24) - 1;

/// Desired configuration of one peer. (Serde: the agent sends it to the datapath process.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerConfig {
    #[serde(with = "keys::serde_public")]
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// Inner addresses this peer may send from and that are routed to it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when nothing else was sent; `None` or `Some(0)` disables them.
    pub persistent_keepalive: Option<u16>,
}

/// What a `set_peers` call changed, by public key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerChanges {
    /// New keys: each gets a fresh tunnel (a handshake on first use).
    #[serde(with = "keys::serde_public_list")]
    pub added: Vec<PublicKey>,
    /// Keys no longer present: their sessions are dropped.
    #[serde(with = "keys::serde_public_list")]
    pub removed: Vec<PublicKey>,
    /// Same key, different endpoint / allowed IPs / keepalive: the session is kept.
    #[serde(with = "keys::serde_public_list")]
    pub updated: Vec<PublicKey>,
    /// Number of peers left exactly as they were.
    pub unchanged: usize,
}

impl PeerChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}

/// Key bytes, used as the map key (x25519 `PublicKey` is not `Hash`).
pub(crate) type KeyBytes = [u8; 32];

/// Where encrypted packets for a peer go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoint {
    /// The last endpoint from configuration: a roamed peer is only moved back when this changes.
    pub configured: SocketAddr,
    /// The address in use (the configured one, or where the peer last sent authenticated data).
    pub current: SocketAddr,
}

/// One peer's live state. Shared by the table snapshots that contain it and by in-flight packets.
pub(crate) struct Peer {
    pub public_key: PublicKey,
    /// Our 24-bit local index: incoming messages carry it (shifted) as their receiver index.
    pub index: u32,
    /// The protocol state machine. Locked only around `encapsulate`/`decapsulate`/`update_timers`,
    /// never across I/O.
    pub tunn: Mutex<Tunn>,
    pub endpoint: Mutex<Endpoint>,
    /// Persistent keepalive interval in seconds (0 = off). Kept outside `Tunn` so it can change
    /// without a new session.
    pub keepalive_secs: AtomicU32,
    /// Milliseconds since the device epoch when anything was last sent to this peer.
    pub last_tx_ms: AtomicU64,
    /// Shared with the tunnel this one replaced when our own key rotated: the peer is the same,
    /// so its counters go on.
    pub counters: Arc<PeerCounters>,
    /// Set to have the timer loop initiate a handshake right away (see `State::request_handshake`).
    pub wants_handshake: AtomicBool,
    /// Set to have the timer loop send a keepalive on the current session right away (see
    /// `State::request_keepalive`).
    pub wants_keepalive: AtomicBool,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &keys::fingerprint(&self.public_key))
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub(crate) fn new(cfg: &PeerConfig, index: u32, tunn: Tunn) -> Peer {
        Peer {
            public_key: cfg.public_key,
            index,
            tunn: Mutex::new(tunn),
            endpoint: Mutex::new(Endpoint {
                configured: cfg.endpoint,
                current: cfg.endpoint,
            }),
            keepalive_secs: AtomicU32::new(u32::from(cfg.persistent_keepalive.unwrap_or(0))),
            last_tx_ms: AtomicU64::new(0),
            counters: Arc::default(),
            wants_handshake: AtomicBool::new(false),
            wants_keepalive: AtomicBool::new(false),
        }
    }

    /// The same peer over a new tunnel (`tunn`, under a fresh `index`), after our key rotated:
    /// endpoint (roamed or not), keepalive, transmit clock and counters carry over.
    pub(crate) fn successor(&self, index: u32, tunn: Tunn) -> Peer {
        let endpoint = *self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        Peer {
            public_key: self.public_key,
            index,
            tunn: Mutex::new(tunn),
            endpoint: Mutex::new(endpoint),
            keepalive_secs: AtomicU32::new(self.keepalive_secs.load(Ordering::Relaxed)),
            last_tx_ms: AtomicU64::new(self.last_tx_ms.load(Ordering::Relaxed)),
            counters: self.counters.clone(),
            wants_handshake: AtomicBool::new(false),
            wants_keepalive: AtomicBool::new(false),
        }
    }

    /// Whether the tunnel has a current session (`encapsulate` encrypts instead of queueing).
    pub(crate) fn has_session(&self) -> bool {
        self.session_age().is_some()
    }

    /// Time since the current session's handshake; `None` without a current session.
    pub(crate) fn session_age(&self) -> Option<std::time::Duration> {
        self.tunn().time_since_last_handshake()
    }

    /// Locks the tunnel. A poisoned lock (a panic while it was held) still holds a consistent
    /// `Tunn` as far as we can tell, and refusing all traffic forever would be worse.
    pub(crate) fn tunn(&self) -> std::sync::MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn endpoint(&self) -> SocketAddr {
        self.endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .current
    }

    /// Roaming: follow a peer that authenticated from a new address.
    pub(crate) fn roam_to(&self, addr: SocketAddr) {
        let mut ep = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if ep.current != addr {
            tracing::debug!(peer = %keys::fingerprint(&self.public_key), from = %ep.current, to = %addr, "peer roamed");
            ep.current = addr;
        }
    }

    /// Applies a configuration update to a surviving peer (the session is untouched).
    fn reconfigure(&self, cfg: &PeerConfig) {
        let mut ep = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if ep.configured != cfg.endpoint {
            ep.configured = cfg.endpoint;
            ep.current = cfg.endpoint;
        }
        self.keepalive_secs.store(
            u32::from(cfg.persistent_keepalive.unwrap_or(0)),
            Ordering::Relaxed,
        );
    }
}

/// An immutable snapshot of the peer set and its lookup tables.
#[derive(Default, Clone)]
pub(crate) struct PeerTable {
    pub by_key: HashMap<KeyBytes, Arc<Peer>>,
    /// Every tunnel's index, retired ones included: a retired tunnel still receives.
    pub by_index: HashMap<u32, Arc<Peer>>,
    pub allowed_ips: AllowedIps<Arc<Peer>>,
    /// The configuration each peer was last given, for diffing and reporting.
    pub configs: HashMap<KeyBytes, PeerConfig>,
    /// Tunnels replaced by a key change and still carrying traffic, by their successor's key
    /// (see `rotation`). Empty outside a rotation.
    pub retired: HashMap<KeyBytes, Arc<Retired>>,
}

impl PeerTable {
    /// The peer that owns `addr` by longest prefix.
    pub(crate) fn route(&self, addr: std::net::IpAddr) -> Option<&Arc<Peer>> {
        self.allowed_ips.lookup(addr)
    }

    /// Cryptokey routing on the way in: `peer` may send from `src` only if `src` routes back to
    /// that very peer, or to the peer whose retired tunnel `peer` is.
    pub(crate) fn source_allowed(&self, peer: &Peer, src: std::net::IpAddr) -> bool {
        self.route(src).is_some_and(|owner| {
            std::ptr::eq(Arc::as_ptr(owner), peer)
                || self
                    .retired
                    .get(owner.public_key.as_bytes())
                    .is_some_and(|r| std::ptr::eq(Arc::as_ptr(&r.peer), peer))
        })
    }

    /// The tunnel to encrypt for `peer` with: its own, unless it has no session yet while the
    /// tunnel it replaces still has one (make before break).
    pub(crate) fn sender<'a>(&'a self, peer: &'a Arc<Peer>) -> &'a Arc<Peer> {
        if self.retired.is_empty() {
            return peer;
        }
        match self.retired.get(peer.public_key.as_bytes()) {
            Some(r) if !peer.has_session() && r.peer.has_session() => &r.peer,
            _ => peer,
        }
    }

    /// Whether `peer` is a retired tunnel (not a current one) of this table.
    pub(crate) fn is_retired(&self, peer: &Peer) -> bool {
        self.retired
            .values()
            .any(|r| std::ptr::eq(Arc::as_ptr(&r.peer), peer))
    }

    /// Adds `peer` (a current tunnel) with its normalised configuration: routed by its allowed
    /// IPs, found by its key and its index.
    pub(crate) fn insert(&mut self, peer: Arc<Peer>, cfg: PeerConfig) {
        for net in &cfg.allowed_ips {
            self.allowed_ips.insert(*net, peer.clone());
        }
        let key = *peer.public_key.as_bytes();
        self.by_index.insert(peer.index, peer.clone());
        self.by_key.insert(key, peer);
        self.configs.insert(key, cfg);
    }

    /// Retires `retired` behind the peer keyed `successor`: it keeps receiving by its index.
    pub(crate) fn retire(&mut self, successor: KeyBytes, retired: Arc<Retired>) {
        self.by_index
            .insert(retired.peer.index, retired.peer.clone());
        if let Some(previous) = self.retired.insert(successor, retired) {
            self.by_index.remove(&previous.peer.index);
        }
    }

    /// Ends the retirement behind `successor`, if any.
    pub(crate) fn unretire(&mut self, successor: &KeyBytes) {
        if let Some(r) = self.retired.remove(successor) {
            self.by_index.remove(&r.peer.index);
        }
    }
}

/// Checks a desired peer list and computes what changes relative to `current` (pure).
pub(crate) fn plan(
    current: &HashMap<KeyBytes, PeerConfig>,
    desired: &[PeerConfig],
    own_key: &PublicKey,
) -> Result<PeerChanges, WgError> {
    let mut seen: HashSet<KeyBytes> = HashSet::new();
    let mut prefix_owner: HashMap<IpNet, KeyBytes> = HashMap::new();
    let mut changes = PeerChanges::default();
    for cfg in desired {
        let key = *cfg.public_key.as_bytes();
        if key == *own_key.as_bytes() {
            return Err(WgError::OwnKeyAsPeer);
        }
        if key == [0u8; 32] {
            return Err(WgError::InvalidPeer {
                peer: keys::encode_public(&cfg.public_key),
                reason: "all-zero public key".into(),
            });
        }
        if !seen.insert(key) {
            return Err(WgError::DuplicatePeer {
                peer: keys::encode_public(&cfg.public_key),
            });
        }
        for net in &cfg.allowed_ips {
            let net = net.trunc();
            if let Some(other) = prefix_owner.insert(net, key) {
                if other != key {
                    return Err(WgError::AllowedIpConflict {
                        net,
                        first: keys::encode_public(&PublicKey::from(other)),
                        second: keys::encode_public(&cfg.public_key),
                    });
                }
            }
        }
        match current.get(&key) {
            None => changes.added.push(cfg.public_key),
            Some(old) if normalized(old) == normalized(cfg) => changes.unchanged += 1,
            Some(_) => changes.updated.push(cfg.public_key),
        }
    }
    for (key, old) in current {
        if !seen.contains(key) {
            changes.removed.push(old.public_key);
        }
    }
    changes
        .removed
        .sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(changes)
}

/// A config with its allowed IPs truncated, sorted and deduplicated, so that reordering or
/// spelling a prefix with host bits set does not count as a change.
pub(crate) fn normalized(cfg: &PeerConfig) -> PeerConfig {
    let mut allowed: Vec<IpNet> = cfg.allowed_ips.iter().map(IpNet::trunc).collect();
    allowed.sort();
    allowed.dedup();
    PeerConfig {
        allowed_ips: allowed,
        persistent_keepalive: cfg.persistent_keepalive.filter(|&k| k != 0),
        ..cfg.clone()
    }
}

/// Builds the table for `desired`, reusing the `Arc<Peer>` of every key present in `old` and
/// creating the others with `new_peer(cfg, index)`. Indexes are unique within the new table and
/// never collide with `old` either, so a straggling packet for a removed peer cannot be taken
/// for a new peer's session. The retired tunnels of surviving keys carry over.
pub(crate) fn build_table(
    old: &PeerTable,
    desired: &[PeerConfig],
    next_index: &mut u32,
    mut new_peer: impl FnMut(&PeerConfig, u32) -> Peer,
) -> PeerTable {
    let mut table = PeerTable::default();
    for cfg in desired {
        let cfg = normalized(cfg);
        let key = *cfg.public_key.as_bytes();
        let peer = match old.by_key.get(&key) {
            Some(existing) => {
                existing.reconfigure(&cfg);
                existing.clone()
            }
            None => {
                let index = allocate_index(next_index, |i| {
                    old.by_index.contains_key(&i) || table.by_index.contains_key(&i)
                });
                Arc::new(new_peer(&cfg, index))
            }
        };
        if let Some(r) = old.retired.get(&key) {
            // It sends for the peer still: to where the peer is now.
            r.peer.reconfigure(&cfg);
            table.retire(key, r.clone());
        }
        table.insert(peer, cfg);
    }
    table
}

/// Next free 24-bit index after `*next`, skipping those `in_use`.
pub(crate) fn allocate_index(next: &mut u32, in_use: impl Fn(u32) -> bool) -> u32 {
    loop {
        let candidate = *next & MAX_INDEX;
        *next = candidate.wrapping_add(1) & MAX_INDEX;
        if !in_use(candidate) {
            return candidate;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wg::keys;

    pub(crate) fn key() -> PublicKey {
        keys::public_key(&keys::generate())
    }

    pub(crate) fn cfg(k: PublicKey, ep: &str, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: k,
            endpoint: ep.parse().unwrap(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn current(cfgs: &[PeerConfig]) -> HashMap<KeyBytes, PeerConfig> {
        cfgs.iter()
            .map(|c| (*c.public_key.as_bytes(), normalized(c)))
            .collect()
    }

    #[test]
    fn plan_classifies_add_update_remove_unchanged() {
        let own = key();
        let (a, b, c, d) = (key(), key(), key(), key());
        let now = current(&[
            cfg(a, "192.0.2.1:51820", &["10.244.1.0/24"]),
            cfg(b, "192.0.2.2:51820", &["10.244.2.0/24"]),
            cfg(c, "192.0.2.3:51820", &["10.244.3.0/24"]),
        ]);
        let desired = [
            // a: same config spelled differently (host bits, duplicate) -> unchanged
            cfg(a, "192.0.2.1:51820", &["10.244.1.9/24", "10.244.1.0/24"]),
            // b: endpoint moved -> updated (session kept)
            cfg(b, "192.0.2.22:51820", &["10.244.2.0/24"]),
            // d: new
            cfg(d, "192.0.2.4:51820", &["10.244.4.0/24"]),
        ];
        let ch = plan(&now, &desired, &own).unwrap();
        assert_eq!(ch.added, vec![d]);
        assert_eq!(ch.updated, vec![b]);
        assert_eq!(ch.removed, vec![c]);
        assert_eq!(ch.unchanged, 1);
        assert!(!ch.is_empty());
    }

    #[test]
    fn key_change_is_a_remove_plus_an_add() {
        let own = key();
        let (old, new) = (key(), key());
        let now = current(&[cfg(old, "192.0.2.1:51820", &["10.244.1.0/24"])]);
        let ch = plan(
            &now,
            &[cfg(new, "192.0.2.1:51820", &["10.244.1.0/24"])],
            &own,
        )
        .unwrap();
        assert_eq!(ch.added, vec![new]);
        assert_eq!(ch.removed, vec![old]);
        assert!(ch.updated.is_empty());
    }

    #[test]
    fn keepalive_and_allowed_ip_changes_are_updates() {
        let own = key();
        let a = key();
        let base = cfg(a, "192.0.2.1:51820", &["10.244.1.0/24"]);
        let now = current(std::slice::from_ref(&base));
        let mut ka = base.clone();
        ka.persistent_keepalive = Some(25);
        assert_eq!(plan(&now, &[ka], &own).unwrap().updated, vec![a]);
        // Some(0) means off, the same as None.
        let mut ka0 = base.clone();
        ka0.persistent_keepalive = Some(0);
        assert_eq!(plan(&now, &[ka0], &own).unwrap().unchanged, 1);
        let mut nets = base.clone();
        nets.allowed_ips.push("10.99.0.0/16".parse().unwrap());
        assert_eq!(plan(&now, &[nets], &own).unwrap().updated, vec![a]);
    }

    #[test]
    fn invalid_sets_are_rejected() {
        let own = key();
        let (a, b) = (key(), key());
        let empty = HashMap::new();
        let dup = [
            cfg(a, "192.0.2.1:1", &["10.0.1.0/24"]),
            cfg(a, "192.0.2.2:1", &["10.0.2.0/24"]),
        ];
        assert!(matches!(
            plan(&empty, &dup, &own),
            Err(WgError::DuplicatePeer { .. })
        ));
        let conflict = [
            cfg(a, "192.0.2.1:1", &["10.0.1.0/24"]),
            cfg(b, "192.0.2.2:1", &["10.0.1.128/24"]),
        ];
        assert!(matches!(
            plan(&empty, &conflict, &own),
            Err(WgError::AllowedIpConflict { .. })
        ));
        // Nested prefixes of different peers are fine: longest prefix wins.
        let nested = [
            cfg(a, "192.0.2.1:1", &["10.0.0.0/16"]),
            cfg(b, "192.0.2.2:1", &["10.0.1.0/24"]),
        ];
        assert_eq!(plan(&empty, &nested, &own).unwrap().added.len(), 2);
        assert!(matches!(
            plan(&empty, &[cfg(own, "192.0.2.1:1", &[])], &own),
            Err(WgError::OwnKeyAsPeer)
        ));
        assert!(matches!(
            plan(
                &empty,
                &[cfg(PublicKey::from([0u8; 32]), "192.0.2.1:1", &[])],
                &own
            ),
            Err(WgError::InvalidPeer { .. })
        ));
    }

    fn dummy_tunn(peer: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(keys::generate(), peer.public_key, None, None, index, None)
    }

    #[test]
    fn build_table_reuses_surviving_peers_and_allocates_unique_indexes() {
        let (a, b, c) = (key(), key(), key());
        let mut next = MAX_INDEX - 1; // exercise wrap-around
        let t1 = build_table(
            &PeerTable::default(),
            &[
                cfg(a, "192.0.2.1:1", &["10.0.1.0/24"]),
                cfg(b, "192.0.2.2:1", &["10.0.2.0/24"]),
            ],
            &mut next,
            |c, i| Peer::new(c, i, dummy_tunn(c, i)),
        );
        let ia = t1.by_key[a.as_bytes()].index;
        let ib = t1.by_key[b.as_bytes()].index;
        assert_ne!(ia, ib);
        assert!(ia <= MAX_INDEX && ib <= MAX_INDEX);
        // a moves endpoint, b is removed, c is added.
        let t2 = build_table(
            &t1,
            &[
                cfg(a, "192.0.2.11:1", &["10.0.1.0/24"]),
                cfg(c, "192.0.2.3:1", &["10.0.2.0/24"]),
            ],
            &mut next,
            |c, i| Peer::new(c, i, dummy_tunn(c, i)),
        );
        let pa = &t2.by_key[a.as_bytes()];
        assert!(Arc::ptr_eq(pa, &t1.by_key[a.as_bytes()]), "session kept");
        assert_eq!(pa.endpoint(), "192.0.2.11:1".parse().unwrap());
        let pc = &t2.by_key[c.as_bytes()];
        assert_ne!(pc.index, ib, "a removed peer's index is not reused at once");
        assert_ne!(pc.index, ia);
        assert!(!t2.by_key.contains_key(b.as_bytes()));
        // 10.0.2.0/24 now routes to c, and c (not a) may send from it.
        let addr = "10.0.2.7".parse().unwrap();
        assert!(Arc::ptr_eq(t2.route(addr).unwrap(), pc));
        assert!(t2.source_allowed(pc, addr));
        assert!(!t2.source_allowed(pa, addr));
        assert!(!t2.source_allowed(pa, "10.0.9.1".parse().unwrap()));
    }

    #[test]
    fn roamed_endpoint_survives_unchanged_config_but_not_a_new_one() {
        let a = key();
        let mut next = 1;
        let conf = cfg(a, "192.0.2.1:51820", &["10.0.1.0/24"]);
        let mk = |c: &PeerConfig, i| Peer::new(c, i, dummy_tunn(c, i));
        let t1 = build_table(
            &PeerTable::default(),
            std::slice::from_ref(&conf),
            &mut next,
            mk,
        );
        let roamed: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        t1.by_key[a.as_bytes()].roam_to(roamed);
        let t2 = build_table(&t1, std::slice::from_ref(&conf), &mut next, mk);
        assert_eq!(t2.by_key[a.as_bytes()].endpoint(), roamed);
        let mut moved = conf;
        moved.endpoint = "192.0.2.9:51820".parse().unwrap();
        let t3 = build_table(&t2, &[moved], &mut next, mk);
        assert_eq!(
            t3.by_key[a.as_bytes()].endpoint(),
            "192.0.2.9:51820".parse().unwrap()
        );
    }
}
