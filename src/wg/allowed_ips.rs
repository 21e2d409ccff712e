//! Longest-prefix-match table from allowed-IPs prefixes to peers ("cryptokey routing").
//!
//! One hash map per prefix length, searched from the longest length present down. A node usually
//! holds a handful of distinct lengths (a /24 or /64 per peer, maybe a /32), so a lookup costs a
//! few hash probes and never walks a tree. The same table answers both directions: egress asks
//! "which peer owns this destination", ingress asks "does the peer that sent this own the source".

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Maps prefixes to values and finds the value of the longest prefix containing an address.
#[derive(Debug, Clone)]
pub struct AllowedIps<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

#[derive(Debug, Clone)]
struct Family<K, V> {
    /// `by_len[len]` maps a masked network address of that prefix length to its value.
    by_len: Vec<HashMap<K, V>>,
    /// Lengths with at least one entry, longest first: the lookup order.
    lengths: Vec<u8>,
}

impl<K: Copy + Eq + std::hash::Hash + Mask, V> Family<K, V> {
    fn new(bits: usize) -> Self {
        Family {
            by_len: (0..=bits).map(|_| HashMap::new()).collect(),
            lengths: Vec::new(),
        }
    }

    fn insert(&mut self, addr: K, len: u8, value: V) -> Option<V> {
        let key = addr.mask(len);
        let previous = self.by_len[usize::from(len)].insert(key, value);
        if !self.lengths.contains(&len) {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        previous
    }

    fn get(&self, addr: K) -> Option<&V> {
        self.lengths
            .iter()
            .find_map(|&len| self.by_len[usize::from(len)].get(&addr.mask(len)))
    }

    fn len(&self) -> usize {
        self.by_len.iter().map(HashMap::len).sum()
    }
}

/// Network address of `self` with the low `BITS - len` bits cleared.
trait Mask: Sized {
    fn mask(self, len: u8) -> Self;
}

impl Mask for u32 {
    fn mask(self, len: u8) -> u32 {
        match len {
            0 => 0,
            l if l >= 32 => self,
            l => self & (u32::MAX << (32 - l)),
        }
    }
}

impl Mask for u128 {
    fn mask(self, len: u8) -> u128 {
        match len {
            0 => 0,
            l if l >= 128 => self,
            l => self & (u128::MAX << (128 - l)),
        }
    }
}

impl<V> Default for AllowedIps<V> {
    fn default() -> Self {
        AllowedIps {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }
}

impl<V> AllowedIps<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net` (host bits are ignored); returns the value it replaces, if the exact same prefix
    /// was already present.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => self.v4.get(u32::from(a)),
            IpAddr::V6(a) => self.v6.get(u128::from(a)),
        }
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), "wide");
        t.insert(net("10.1.0.0/16"), "mid");
        t.insert(net("10.1.2.0/24"), "narrow");
        t.insert(net("10.1.2.3/32"), "host");
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&"narrow"));
        assert_eq!(t.lookup(ip("10.1.3.4")), Some(&"mid"));
        assert_eq!(t.lookup(ip("10.200.0.1")), Some(&"wide"));
        assert_eq!(t.lookup(ip("11.0.0.1")), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn host_bits_are_ignored_and_exact_duplicates_replace() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.244.1.77/24"), 1), None);
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(&1));
        assert_eq!(t.insert(net("10.244.1.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(&2));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn default_routes_match_everything_of_their_family_only() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), "v4");
        assert_eq!(t.lookup(ip("203.0.113.9")), Some(&"v4"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        t.insert(net("::/0"), "v6");
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&"v6"));
    }

    #[test]
    fn ipv6_prefixes() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00:10:244::/48"), "cluster");
        t.insert(net("fd00:10:244:1::/64"), "node1");
        assert_eq!(t.lookup(ip("fd00:10:244:1::5")), Some(&"node1"));
        assert_eq!(t.lookup(ip("fd00:10:244:2::5")), Some(&"cluster"));
        assert_eq!(t.lookup(ip("fd00:10:245::1")), None);
        // An IPv4-mapped address is not an IPv4 address for routing purposes.
        t.insert(net("10.0.0.0/8"), "v4");
        assert_eq!(t.lookup(ip("::ffff:10.0.0.1")), None);
    }

    #[test]
    fn empty_table_finds_nothing() {
        let t: AllowedIps<u8> = AllowedIps::new();
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        assert_eq!(t.lookup(ip("::1")), None);
    }
}
