//! Sets of IP addresses as sorted, merged, disjoint ranges, per family.
//!
//! nft interval sets refuse overlapping elements, and `ipBlock.except` needs a set difference, so
//! the compiler normalises peers itself: union of pod IPs and CIDRs, minus the excepts, merged.
//! The result renders as the fewest nft elements (single address, CIDR or `lo-hi` range) and
//! answers membership for `explain` with a binary search.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// A set of addresses of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

fn net_bounds(net: &IpNet) -> Bounds {
    match net {
        IpNet::V4(n) => Bounds::V4(u32::from(n.network()), u32::from(n.broadcast())),
        IpNet::V6(n) => Bounds::V6(u128::from(n.network()), u128::from(n.broadcast())),
    }
}

enum Bounds {
    V4(u32, u32),
    V6(u128, u128),
}

/// Sorts and merges overlapping or adjacent ranges.
fn normalize<T: Copy + Ord + num_like::Successor>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if lo <= last.1 || last.1.succ() == Some(lo) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    *ranges = out;
}

/// Removes `cut` (normalised) from `ranges` (normalised).
fn subtract<T: Copy + Ord + num_like::Successor>(ranges: &[(T, T)], cut: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges {
        let mut cur_lo = lo;
        let mut alive = true;
        for &(clo, chi) in cut {
            if !alive || chi < cur_lo {
                continue;
            }
            if clo > hi {
                break;
            }
            if clo > cur_lo {
                // `clo > cur_lo` so it has a predecessor.
                out.push((cur_lo, clo.pred().unwrap_or(clo)));
            }
            match chi.succ() {
                Some(next) if next <= hi => cur_lo = next,
                _ => alive = false,
            }
        }
        if alive {
            out.push((cur_lo, hi));
        }
    }
    out
}

fn contains<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let idx = ranges.partition_point(|&(lo, _)| lo <= x);
    idx > 0 && ranges[idx - 1].1 >= x
}

mod num_like {
    pub trait Successor: Sized {
        fn succ(self) -> Option<Self>;
        fn pred(self) -> Option<Self>;
    }
    impl Successor for u32 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
        fn pred(self) -> Option<Self> {
            self.checked_sub(1)
        }
    }
    impl Successor for u128 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
        fn pred(self) -> Option<Self> {
            self.checked_sub(1)
        }
    }
}

impl AddrSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a network without normalising; call [`AddrSet::normalize`] when done adding.
    pub fn push_net(&mut self, net: &IpNet) {
        match net_bounds(net) {
            Bounds::V4(lo, hi) => self.v4.push((lo, hi)),
            Bounds::V6(lo, hi) => self.v6.push((lo, hi)),
        }
    }

    pub fn push_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.push((u32::from(a), u32::from(a))),
            IpAddr::V6(a) => self.v6.push((u128::from(a), u128::from(a))),
        }
    }

    pub fn normalize(&mut self) {
        normalize(&mut self.v4);
        normalize(&mut self.v6);
    }

    /// `self ∪ other`, normalised.
    pub fn extend(&mut self, other: &AddrSet) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
        self.normalize();
    }

    /// `self − other`; both must be normalised.
    pub fn subtract(&self, other: &AddrSet) -> AddrSet {
        AddrSet {
            v4: subtract(&self.v4, &other.v4),
            v6: subtract(&self.v6, &other.v6),
        }
    }

    /// Membership; the set must be normalised.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => contains(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains(&self.v6, u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn has_v4(&self) -> bool {
        !self.v4.is_empty()
    }

    pub fn has_v6(&self) -> bool {
        !self.v6.is_empty()
    }

    /// nft elements of the IPv4 part: `10.0.0.1`, `10.1.0.0/16`, `10.2.0.1-10.2.0.7`.
    pub fn v4_elements(&self) -> impl Iterator<Item = String> + '_ {
        self.v4
            .iter()
            .map(|&(lo, hi)| element(lo, hi, 32, |x| Ipv4Addr::from(x).to_string(), |x| x as u128))
    }

    /// nft elements of the IPv6 part.
    pub fn v6_elements(&self) -> impl Iterator<Item = String> + '_ {
        self.v6
            .iter()
            .map(|&(lo, hi)| element(lo, hi, 128, |x| Ipv6Addr::from(x).to_string(), |x| x))
    }
}

/// Formats one range as the shortest nft element.
fn element<T: Copy + PartialEq>(
    lo: T,
    hi: T,
    bits: u32,
    show: impl Fn(T) -> String,
    wide: impl Fn(T) -> u128,
) -> String {
    if lo == hi {
        return show(lo);
    }
    let (l, h) = (wide(lo), wide(hi));
    let size = h.wrapping_sub(l).wrapping_add(1);
    // A CIDR when the range is a power-of-two block aligned on its size (the full space wraps
    // `size` to 0 for IPv6: that is ::/0).
    if size == 0 && bits == 128 {
        return format!("{}/0", show(lo));
    }
    if size.is_power_of_two() && l % size == 0 {
        let prefix = bits - size.trailing_zeros();
        return format!("{}/{}", show(lo), prefix);
    }
    format!("{}-{}", show(lo), show(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> AddrSet {
        let mut s = AddrSet::new();
        for n in nets {
            if let Ok(net) = n.parse::<IpNet>() {
                s.push_net(&net);
            } else {
                s.push_ip(n.parse().unwrap());
            }
        }
        s.normalize();
        s
    }

    fn v4(s: &AddrSet) -> Vec<String> {
        s.v4_elements().collect()
    }

    #[test]
    fn merges_overlapping_and_adjacent() {
        let s = set(&["10.0.0.0/25", "10.0.0.128/25", "10.0.0.5", "10.1.0.0/16"]);
        assert_eq!(v4(&s), vec!["10.0.0.0/24", "10.1.0.0/16"]);
    }

    #[test]
    fn except_leaves_ranges() {
        let s = set(&["10.0.0.0/24"]).subtract(&set(&["10.0.0.8/29", "10.0.0.255"]));
        assert_eq!(v4(&s), vec!["10.0.0.0/29", "10.0.0.16-10.0.0.254"]);
        assert!(s.contains("10.0.0.7".parse().unwrap()));
        assert!(!s.contains("10.0.0.8".parse().unwrap()));
        assert!(!s.contains("10.0.0.15".parse().unwrap()));
        assert!(s.contains("10.0.0.16".parse().unwrap()));
        assert!(!s.contains("10.0.0.255".parse().unwrap()));
        assert!(!s.contains("10.0.1.0".parse().unwrap()));
    }

    #[test]
    fn except_covering_everything_empties() {
        let s = set(&["10.0.0.0/24"]).subtract(&set(&["10.0.0.0/16"]));
        assert!(s.is_empty());
    }

    #[test]
    fn whole_spaces_and_edges() {
        let s = set(&["0.0.0.0/0"]).subtract(&set(&["0.0.0.0", "255.255.255.255"]));
        assert_eq!(v4(&s), vec!["0.0.0.1-255.255.255.254"]);
        let all6 = set(&["::/0"]);
        assert_eq!(all6.v6_elements().collect::<Vec<_>>(), vec!["::/0"]);
        assert_eq!(v4(&set(&["0.0.0.0/0"])), vec!["0.0.0.0/0"]);
        let s6 = set(&["fd00::/64"]).subtract(&set(&["fd00::1"]));
        assert!(s6.contains("fd00::2".parse().unwrap()));
        assert!(!s6.contains("fd00::1".parse().unwrap()));
        assert!(!s6.has_v4());
    }
}
