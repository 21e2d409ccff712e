//! Pod MTU from the underlay MTU and the encapsulations a packet may take.
//!
//! A pod's packet must fit through every path it can take, so the pod MTU is the underlay MTU
//! minus the largest overhead among the encapsulations in use. Overheads are per underlay family
//! because the outer IP header is 20 bytes for IPv4 and 40 for IPv6.

use std::net::IpAddr;

/// Below this the pod network is useless for IPv6 (its minimum link MTU) and fragile for IPv4;
/// refuse rather than hand pods an MTU that silently breaks dual-stack workloads.
pub const MIN_POD_MTU: u32 = 1280;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encapsulation {
    /// outer IP + UDP 8 + VXLAN 8 + inner Ethernet 14.
    Vxlan,
    /// outer IP + UDP 8 + WireGuard type/reserved 4 + receiver 4 + counter 8 + tag 16.
    WireGuard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnderlayFamily {
    V4,
    V6,
}

impl UnderlayFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => UnderlayFamily::V4,
            IpAddr::V6(_) => UnderlayFamily::V6,
        }
    }

    fn outer_ip_header(self) -> u32 {
        match self {
            UnderlayFamily::V4 => 20,
            UnderlayFamily::V6 => 40,
        }
    }
}

impl Encapsulation {
    /// Bytes this encapsulation adds on the given underlay: VXLAN 50/70, WireGuard 60/80.
    pub fn overhead(self, underlay: UnderlayFamily) -> u32 {
        let inner = match self {
            Encapsulation::Vxlan => 8 + 8 + 14,
            Encapsulation::WireGuard => 8 + 4 + 4 + 8 + 16,
        };
        underlay.outer_ip_header() + inner
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MtuError {
    #[error("no encapsulation given: cannot compute a pod MTU")]
    NoEncapsulation,
    #[error(
        "underlay MTU {underlay_mtu} leaves {pod_mtu} for pods after {overhead} bytes of \
         {encapsulation:?} overhead, below the minimum {MIN_POD_MTU}"
    )]
    UnderlayTooSmall {
        underlay_mtu: u32,
        encapsulation: Encapsulation,
        overhead: u32,
        pod_mtu: u32,
    },
}

/// The MTU of a device that carries `encapsulation` over an underlay with `underlay_mtu`.
pub fn inner_mtu(
    underlay_mtu: u32,
    underlay: UnderlayFamily,
    encapsulation: Encapsulation,
) -> Result<u32, MtuError> {
    let overhead = encapsulation.overhead(underlay);
    let pod_mtu = underlay_mtu.saturating_sub(overhead);
    if pod_mtu < MIN_POD_MTU {
        return Err(MtuError::UnderlayTooSmall {
            underlay_mtu,
            encapsulation,
            overhead,
            pod_mtu,
        });
    }
    Ok(pod_mtu)
}

/// The pod MTU when traffic may take any of `encapsulations`: the smallest inner MTU.
pub fn pod_mtu(
    underlay_mtu: u32,
    underlay: UnderlayFamily,
    encapsulations: &[Encapsulation],
) -> Result<u32, MtuError> {
    let mut smallest: Option<u32> = None;
    for encap in encapsulations {
        let mtu = inner_mtu(underlay_mtu, underlay, *encap)?;
        smallest = Some(smallest.map_or(mtu, |s| s.min(mtu)));
    }
    smallest.ok_or(MtuError::NoEncapsulation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Encapsulation::*;
    use UnderlayFamily::*;

    #[test]
    fn overheads_match_the_wire_formats() {
        assert_eq!(Vxlan.overhead(V4), 50);
        assert_eq!(Vxlan.overhead(V6), 70);
        assert_eq!(WireGuard.overhead(V4), 60);
        assert_eq!(WireGuard.overhead(V6), 80);
    }

    #[test]
    fn vxlan_on_common_underlays() {
        assert_eq!(pod_mtu(1500, V4, &[Vxlan]).unwrap(), 1450);
        assert_eq!(pod_mtu(1500, V6, &[Vxlan]).unwrap(), 1430);
        assert_eq!(pod_mtu(9001, V4, &[Vxlan]).unwrap(), 8951);
        assert_eq!(pod_mtu(1460, V4, &[Vxlan]).unwrap(), 1410);
    }

    #[test]
    fn smallest_of_several_encapsulations_wins() {
        assert_eq!(pod_mtu(1500, V4, &[Vxlan, WireGuard]).unwrap(), 1440);
        assert_eq!(pod_mtu(1500, V6, &[WireGuard, Vxlan]).unwrap(), 1420);
        assert_eq!(pod_mtu(9000, V4, &[WireGuard]).unwrap(), 8940);
    }

    #[test]
    fn too_small_underlay_is_an_error_not_an_underflow() {
        assert_eq!(pod_mtu(1330, V4, &[Vxlan]).unwrap(), MIN_POD_MTU);
        let err = pod_mtu(1329, V4, &[Vxlan]).unwrap_err();
        assert!(
            matches!(err, MtuError::UnderlayTooSmall { pod_mtu: 1279, .. }),
            "{err}"
        );
        assert!(pod_mtu(0, V4, &[Vxlan]).is_err());
        assert!(pod_mtu(20, V6, &[WireGuard]).is_err());
        assert_eq!(pod_mtu(1500, V4, &[]), Err(MtuError::NoEncapsulation));
    }

    #[test]
    fn family_of_ip() {
        assert_eq!(UnderlayFamily::of("10.0.0.1".parse().unwrap()), V4);
        assert_eq!(UnderlayFamily::of("fd00::1".parse().unwrap()), V6);
    }
}
