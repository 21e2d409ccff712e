//! Per-source limit on handshake initiations under load, applied before any Diffie-Hellman.
//!
//! boringtun's `RateLimiter` is device-wide: past its limit it answers initiations with a cookie
//! and accepts those whose MAC2 echoes it. That stops spoofed sources (they never see the cookie)
//! but not a host that answers from its real address: it knows our public key (Node annotations
//! are readable), so it computes MAC1, echoes every cookie, and gets one X25519 operation out of
//! us per datagram, at whatever rate it can send. Linux WireGuard closes that with a token bucket
//! per source address (`ratelimiter.c`: 20 a second, a burst of 5, IPv6 per /64), charged only
//! for initiations whose MAC2 proved their address; this is the same for veilnet's datapath.
//!
//! Only proven sources are charged because anyone may forge a source address: charging every
//! initiation would let a forger spend a real peer's share and shut its handshakes out. Below
//! the device's load limit nothing is charged, and a peer initiates once per REKEY_TIMEOUT (5 s)
//! at most, so a legitimate source never comes near 20 a second even under load.

use std::collections::HashMap;
use std::net::IpAddr;

/// Initiations a second one source may keep sending (Linux WireGuard's `PACKETS_PER_SECOND`).
const PER_SECOND: u64 = 20;
/// Initiations one source may send at once after a quiet second (`PACKETS_BURSTABLE`).
const BURST: u64 = 5;
/// The cost of one initiation in the bucket's units (nanoseconds of refill).
const COST_NS: u64 = 1_000_000_000 / PER_SECOND;
const BUCKET_NS: u64 = COST_NS * BURST;
/// Sources tracked at most. A source only enters with a valid MAC2 under load, which needs its
/// real address, so filling this takes many real addresses (an IPv6 host with a /48 has them:
/// 65,536 /64s); when it is full a new source is refused until `expire` frees room, within a
/// second of each entry's last charge. Linux WireGuard's table is bounded the same way. An
/// on-path attacker replaying a peer's initiations (their MAC2 stays valid for two minutes)
/// spends that peer's share, as in Linux too.
pub(crate) const MAX_SOURCES: usize = 16_384;

/// The key a source is charged under: IPv4 addresses one by one, IPv6 by /64 (one host usually
/// holds a whole /64, so per-address buckets would be free to multiply).
fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        // As its v4-mapped form (low 64 bits set), which no /64 key (low 64 bits clear) is.
        IpAddr::V4(v4) => (0xffff << 32) | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6) >> 64 << 64,
    }
}

#[derive(Debug, Default)]
pub(crate) struct SourceLimiter {
    /// Per source: the time (ns on the caller's clock) its bucket is full again.
    full_at: HashMap<u128, u64>,
}

impl SourceLimiter {
    /// Whether an initiation from `from` at `now_ns` may be processed; charges it when it may.
    pub(crate) fn allow(&mut self, from: IpAddr, now_ns: u64) -> bool {
        let key = source_key(from);
        let full_at = match self.full_at.get(&key) {
            Some(&t) => t.max(now_ns),
            None if self.full_at.len() >= MAX_SOURCES => return false,
            None => now_ns,
        };
        // The bucket holds `full_at - now` of debt; one more initiation adds COST_NS.
        let debt = full_at - now_ns + COST_NS;
        if debt > BUCKET_NS {
            return false;
        }
        self.full_at.insert(key, now_ns + debt);
        true
    }

    /// Forgets sources whose bucket is full again (they are as if never seen).
    pub(crate) fn expire(&mut self, now_ns: u64) {
        self.full_at.retain(|_, full_at| *full_at > now_ns);
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.full_at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allowed_in(l: &mut SourceLimiter, from: IpAddr, start: u64, span: u64, every: u64) -> u64 {
        (0..span / every)
            .filter(|i| l.allow(from, start + i * every))
            .count() as u64
    }

    #[test]
    fn a_flooding_source_gets_its_burst_then_twenty_a_second() {
        let mut l = SourceLimiter::default();
        let flooder = ip("172.30.0.1");
        // 100,000 a second for ten seconds: the burst, then one per refill.
        let got = allowed_in(&mut l, flooder, SECOND, 10 * SECOND, SECOND / 100_000);
        assert!(
            (BURST + 10 * PER_SECOND - 1..=BURST + 10 * PER_SECOND).contains(&got),
            "{got}"
        );
    }

    #[test]
    fn a_peer_handshaking_every_five_seconds_is_never_refused() {
        let mut l = SourceLimiter::default();
        let peer = ip("172.30.0.12");
        let got = allowed_in(&mut l, peer, SECOND, 600 * SECOND, 5 * SECOND);
        assert_eq!(got, 120);
        // Nor a peer retrying a few times at once (a restart handshaking over a lossy wire).
        assert!((0..BURST).all(|i| l.allow(peer, 700 * SECOND + i)));
    }

    #[test]
    fn one_flooder_does_not_spend_another_sources_budget() {
        let mut l = SourceLimiter::default();
        allowed_in(&mut l, ip("172.30.0.1"), SECOND, SECOND, 1000);
        assert!(!l.allow(ip("172.30.0.1"), 2 * SECOND - 1));
        assert!(l.allow(ip("172.30.0.12"), 2 * SECOND - 1));
        // A v4-mapped address is the same source as its IPv4 form.
        assert!(!l.allow(ip("::ffff:172.30.0.1"), 2 * SECOND - 1));
    }

    #[test]
    fn ipv6_sources_are_charged_per_64() {
        let mut l = SourceLimiter::default();
        let allowed = (0..100u64)
            .filter(|i| {
                l.allow(
                    IpAddr::V6(format!("fd00:1::{i:x}").parse().unwrap()),
                    SECOND,
                )
            })
            .count() as u64;
        assert_eq!(allowed, BURST);
        assert!(l.allow(ip("fd00:2::1"), SECOND));
    }

    #[test]
    fn the_table_is_bounded_and_expires_quiet_sources() {
        let mut l = SourceLimiter::default();
        for i in 0..MAX_SOURCES as u32 {
            assert!(l.allow(IpAddr::V4(i.into()), SECOND));
        }
        assert!(
            !l.allow(ip("10.255.255.255"), SECOND),
            "a full table refuses a new source"
        );
        assert!(
            l.allow(IpAddr::V4(7u32.into()), SECOND),
            "but not a tracked one"
        );
        l.expire(SECOND + COST_NS);
        assert_eq!(l.tracked(), 1, "only the source charged twice still owes");
        l.expire(SECOND + 2 * COST_NS);
        assert_eq!(l.tracked(), 0);
        assert!(l.allow(ip("10.255.255.255"), 2 * SECOND));
    }
}
