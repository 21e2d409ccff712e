//! Ethernet MAC addresses, and the stable VTEP/bridge MACs derived from a node's name.
//!
//! Peers program our VTEP MAC into their neighbour and FDB tables, so it must survive agent
//! restarts; deriving it from a stable seed (the node name or a persisted value) means the VXLAN
//! device never needs to be recreated or re-addressed just because the agent came back.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("MAC address {input:?} is not six colon-separated hex octets")]
    Malformed { input: String },
}

/// A 48-bit Ethernet address, displayed as lowercase `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Group (multicast/broadcast) addresses have the I/G bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Locally administered addresses have the U/L bit set; they can never clash with a vendor's.
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// True for an address usable as a device's own address: unicast and not all-zero.
    pub fn is_usable_unicast(&self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }

    /// Builds a MAC from a netlink attribute; `None` unless it is exactly six bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<MacAddr> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || MacError::Malformed {
            input: s.to_string(),
        };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in octets.iter_mut() {
            let part = parts.next().ok_or_else(malformed)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(malformed());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| malformed())?;
        }
        if parts.next().is_some() {
            return Err(malformed());
        }
        Ok(MacAddr(octets))
    }
}

/// FNV-1a, 64 bit. Chosen because its output is fixed by its specification: unlike std's
/// `DefaultHasher` it cannot change between Rust releases, which would silently change every
/// node's VTEP MAC on upgrade.
fn fnv1a64(data: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    data.iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// A locally administered unicast MAC derived only from `seed` (a node name or a persisted
/// per-node value). Same seed, same MAC, on every run and every version.
pub fn derive_mac(seed: &str) -> MacAddr {
    let h = fnv1a64(seed.as_bytes()).to_be_bytes();
    // Clear the multicast bit, set the locally-administered bit.
    let first = (h[0] & 0xfe) | 0x02;
    MacAddr([first, h[1], h[2], h[3], h[4], h[5]])
}

/// The VTEP MAC a node publishes and programs on its VXLAN device.
pub fn derive_vtep_mac(node_name: &str) -> MacAddr {
    derive_mac(&format!("veilnet/vtep/{node_name}"))
}

/// The pod bridge's MAC. Pinned because a Linux bridge otherwise takes the lowest MAC of its
/// ports, so the pods' gateway MAC would change whenever a pod comes or goes.
pub fn derive_bridge_mac(node_name: &str) -> MacAddr {
    derive_mac(&format!("veilnet/bridge/{node_name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_lowercase() {
        let mac: MacAddr = "0A:1b:2C:3d:4E:5f".parse().unwrap();
        assert_eq!(mac.0, [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
        assert_eq!(mac.to_string(), "0a:1b:2c:3d:4e:5f");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:00",
            "0a-1b-2c-3d-4e-5f",
            "0a:1b:2c:3d:4e:5g",
            "a:1b:2c:3d:4e:5f0",
            "+a:1b:2c:3d:4e:5f",
            " 0a:1b:2c:3d:4e:5f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn classifies_addresses() {
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!("ff:ff:ff:ff:ff:ff"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(MacAddr::ZERO.is_zero());
        assert!(!MacAddr::ZERO.is_usable_unicast());
        assert!("02:00:00:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_usable_unicast());
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        // Pinned value: a change here would re-MAC every node in a running cluster.
        assert_eq!(derive_mac("node-a"), derive_mac("node-a"));
        assert_eq!(derive_mac("").to_string(), "ca:f2:9c:e4:84:22");
        let names = ["node-a", "node-b", "node-c", "worker-1", "worker-10"];
        let macs: std::collections::BTreeSet<_> =
            names.iter().map(|n| derive_vtep_mac(n)).collect();
        assert_eq!(macs.len(), names.len());
        for n in names {
            for mac in [derive_vtep_mac(n), derive_bridge_mac(n)] {
                assert!(mac.is_locally_administered(), "{mac}");
                assert!(mac.is_usable_unicast(), "{mac}");
            }
            assert_ne!(derive_vtep_mac(n), derive_bridge_mac(n));
        }
    }

    #[test]
    fn from_slice_requires_six_bytes() {
        assert_eq!(
            MacAddr::from_slice(&[1, 2, 3, 4, 5, 6]),
            Some(MacAddr([1, 2, 3, 4, 5, 6]))
        );
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
    }
}
