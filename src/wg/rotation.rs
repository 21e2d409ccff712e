//! Make-before-break key rotation: a tunnel whose keys changed keeps carrying traffic on its last
//! session until the tunnel that replaces it has one.
//!
//! A key changes in two ways, and both leave a *retired* tunnel behind its *successor*:
//! - We rotate our own key (`State::set_private_key`): each peer gets a fresh tunnel with the new
//!   key, and the old tunnel, sessions and all, is retired behind it.
//! - A peer rotates its key: the agent replaces the old public key with the new one, which
//!   `set_peers` sees as a removal plus an addition. [`links`] pairs the two when they describe
//!   the same node (same endpoint, same allowed IPs); the removed peer's tunnel is retired behind
//!   the added one, and a handshake with the new key starts at once.
//!
//! While it lasts, the successor sends through the retired tunnel as long as it has no session
//! of its own (`PeerTable::sender`), and the retired tunnel still receives data by its index.
//! Nothing else reaches it: handshake initiations are only ever matched against current keys,
//! and handshake responses and cookies only against current tunnels, so a leaked old key wins
//! nothing new. Its timers run (they expire its sessions and time out a handshake it had in
//! flight), but of what they send only keepalives go out, never a handshake. It carries only
//! the sessions it already had, and for a bounded time ([`is_over`]): traffic keeps going to
//! the node that held the old key, which a wrong new key (a bad annotation) cannot prolong
//! beyond [`PEER_KEY_PATIENCE`].

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::peers::{normalized, KeyBytes, Peer, PeerChanges, PeerConfig};

/// How long a retired tunnel stays after its successor got a session: packets the peer sent on
/// the old session before it switched are still in flight (or queued in some buffer) for a while.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// The longest a tunnel retired by our own rotation lives: a peer that never learns our new key
/// (its agent is down) falls back to the break-then-make of a plain key change after this.
pub(crate) const OWN_KEY_PATIENCE: Duration = Duration::from_secs(120);

/// The longest a tunnel retired by a peer's new key lives without the new key answering: a peer
/// that really rotated knows its new key before anyone is told it, so it answers the first
/// handshake; this allows for two lost ones (retries come every 5 s). A wrong key (a bad
/// annotation) thus keeps the old session for this long, never more.
pub(crate) const PEER_KEY_PATIENCE: Duration = Duration::from_secs(15);

/// WireGuard's `Reject-After-Time`: no session is used longer than this after its handshake.
/// The retired tunnel's own timers expire its sessions too; this ends the retirement itself.
pub(crate) const REJECT_AFTER: Duration = Duration::from_secs(180);

/// A tunnel that was replaced, kept while its successor has no session (shared by the table
/// snapshots that hold it).
#[derive(Debug)]
pub(crate) struct Retired {
    pub peer: Arc<Peer>,
    /// `State::now_ms` when it was retired.
    pub since_ms: u64,
    /// How long it may live ([`OWN_KEY_PATIENCE`] or [`PEER_KEY_PATIENCE`]).
    pub patience: Duration,
    /// Set once the successor was seen with its own session (and the switch logged).
    pub switched: AtomicBool,
}

impl Retired {
    /// Retires `active` (what `active()` returned) at `now_ms`. When that is the tunnel
    /// `previous` had retired already (both ends rotating, or one twice), its retirement goes
    /// on: same start, the longer patience, so that neither change cuts the other's short.
    pub(crate) fn carried(
        active: Arc<Peer>,
        previous: Option<&Arc<Retired>>,
        now_ms: u64,
        patience: Duration,
    ) -> Arc<Retired> {
        match previous {
            Some(p) if Arc::ptr_eq(&p.peer, &active) => {
                Retired::new(active, p.since_ms, p.patience.max(patience))
            }
            _ => Retired::new(active, now_ms, patience),
        }
    }

    pub(crate) fn new(peer: Arc<Peer>, since_ms: u64, patience: Duration) -> Arc<Retired> {
        Arc::new(Retired {
            peer,
            since_ms,
            patience,
            switched: AtomicBool::new(false),
        })
    }
}

/// Pairs each removed peer with the added peer that replaces it: the same node under a new key,
/// recognised by the same configured endpoint and the same (normalised, non-empty) allowed IPs.
/// Returns `(removed, added)` key pairs (pure).
pub(crate) fn links(
    changes: &PeerChanges,
    old: &HashMap<KeyBytes, PeerConfig>,
    desired: &[PeerConfig],
) -> Vec<(KeyBytes, KeyBytes)> {
    let added: Vec<PeerConfig> = desired
        .iter()
        .filter(|c| changes.added.contains(&c.public_key))
        .map(normalized)
        .collect();
    let mut pairs = Vec::new();
    for removed in &changes.removed {
        let Some(before) = old.get(removed.as_bytes()).map(normalized) else {
            continue;
        };
        if before.allowed_ips.is_empty() {
            continue;
        }
        if let Some(after) = added
            .iter()
            .find(|a| a.endpoint == before.endpoint && a.allowed_ips == before.allowed_ips)
        {
            pairs.push((*removed.as_bytes(), *after.public_key.as_bytes()));
        }
    }
    pairs
}

/// Whether a retirement has ended: the retired tunnel has no usable session any more, it was
/// retired longer than its `patience`, or its successor has had its own session for [`GRACE`]
/// (pure; the ages are `Tunn::time_since_last_handshake`, `None` meaning no current session).
pub(crate) fn is_over(
    retired_for: Duration,
    patience: Duration,
    retired_session_age: Option<Duration>,
    successor_session_age: Option<Duration>,
) -> bool {
    retired_for >= patience
        || retired_session_age.is_none_or(|age| age >= REJECT_AFTER)
        || successor_session_age.is_some_and(|age| age >= GRACE)
}

/// The tunnel of `peer` that carries its traffic now: `peer` itself, or when it has no session,
/// the tunnel it replaced if that one still has. `None` when neither has a session (the caller
/// has nothing to retire).
pub(crate) fn active(peer: &Arc<Peer>, retired: Option<&Arc<Retired>>) -> Option<Arc<Peer>> {
    if peer.has_session() {
        return Some(peer.clone());
    }
    retired
        .map(|r| &r.peer)
        .filter(|p| p.has_session())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::peers::tests::{cfg, key};

    #[test]
    fn a_new_key_for_the_same_endpoint_and_ranges_is_linked_to_the_old_one() {
        let (a0, a1, b, c0, c1, d0, d1) = (key(), key(), key(), key(), key(), key(), key());
        let old: HashMap<KeyBytes, PeerConfig> = [
            cfg(a0, "192.0.2.1:51820", &["10.1.0.0/24", "fd00::/64"]),
            cfg(b, "192.0.2.2:51820", &["10.2.0.0/24"]),
            cfg(c0, "192.0.2.3:51820", &["10.3.0.0/24"]),
            cfg(d0, "192.0.2.4:51820", &[]),
        ]
        .into_iter()
        .map(|c| (*c.public_key.as_bytes(), normalized(&c)))
        .collect();
        let desired = [
            // a rotated; its ranges are spelled in another order and with host bits.
            cfg(a1, "192.0.2.1:51820", &["fd00::1/64", "10.1.0.0/24"]),
            cfg(b, "192.0.2.2:51820", &["10.2.0.0/24"]),
            // c's successor sits elsewhere: a different node, no link.
            cfg(c1, "192.0.2.33:51820", &["10.3.0.0/24"]),
            // d routes nothing: nothing to prove it is the same node.
            cfg(d1, "192.0.2.4:51820", &[]),
        ];
        let changes = PeerChanges {
            added: vec![a1, c1, d1],
            removed: vec![a0, c0, d0],
            updated: vec![],
            unchanged: 1,
        };
        assert_eq!(
            links(&changes, &old, &desired),
            vec![(*a0.as_bytes(), *a1.as_bytes())]
        );
    }

    #[test]
    fn a_changed_range_is_a_different_node() {
        let (a0, a1) = (key(), key());
        let before = cfg(a0, "192.0.2.1:51820", &["10.1.0.0/24"]);
        let old = HashMap::from([(*a0.as_bytes(), before)]);
        let desired = [cfg(a1, "192.0.2.1:51820", &["10.1.0.0/23"])];
        let changes = PeerChanges {
            added: vec![a1],
            removed: vec![a0],
            ..Default::default()
        };
        assert!(links(&changes, &old, &desired).is_empty());
    }

    #[test]
    fn a_retirement_ends_on_the_first_of_its_three_limits() {
        let s = Duration::from_secs;
        let p = OWN_KEY_PATIENCE;
        // Still needed: young, the old session live, the successor without one or just up.
        assert!(!is_over(s(1), p, Some(s(30)), None));
        assert!(!is_over(s(1), p, Some(s(30)), Some(s(2))));
        // The successor has been up for the grace period.
        assert!(is_over(s(15), p, Some(s(30)), Some(GRACE)));
        // The retired tunnel lost or outlived its session.
        assert!(is_over(s(1), p, None, None));
        assert!(is_over(s(1), p, Some(REJECT_AFTER), None));
        // Bounded however the rest goes, the peer's key sooner than ours.
        assert!(is_over(OWN_KEY_PATIENCE, p, Some(s(30)), None));
        assert!(!is_over(s(14), PEER_KEY_PATIENCE, Some(s(30)), None));
        assert!(is_over(
            PEER_KEY_PATIENCE,
            PEER_KEY_PATIENCE,
            Some(s(30)),
            None
        ));
    }
}
