//! Every Node annotation and label key veilnet reads or writes, and validating parsers for their
//! values.
//!
//! All keys live under [`PREFIX`]. A node publishes its own values; its peers treat them as
//! untrusted input, so each parser here returns a typed error instead of trusting the string.
//! Pod CIDRs used for routing come from `spec.podCIDRs` (or veilnet's allocation record), never
//! from [`POD_CIDRS`], which is informational only.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use ipnet::IpNet;

use super::mac::MacAddr;

/// Common prefix of every veilnet annotation and label key.
pub const PREFIX: &str = "veilnet.io/";

/// Annotation: the node's VTEP MAC (`aa:bb:cc:dd:ee:ff`), the inner destination MAC peers put on
/// VXLAN frames for this node. Written by the node's agent.
pub const VTEP_MAC: &str = "veilnet.io/vtep-mac";

/// Annotation: the underlay address peers send encapsulated traffic to (VXLAN remote, and later
/// the default WireGuard endpoint host). Written by the node's agent.
pub const UNDERLAY_IP: &str = "veilnet.io/underlay-ip";

/// Annotation: comma-separated pod CIDRs the node believes it owns. Informational (debugging,
/// `kubectl describe`); routing never uses it, because any node could claim any range here.
pub const POD_CIDRS: &str = "veilnet.io/pod-cidrs";

/// Annotation: the VXLAN VNI the node's VTEP uses (decimal). Peers with a different VNI cannot
/// exchange frames, so a mismatch is rejected loudly instead of blackholing traffic.
pub const VXLAN_VNI: &str = "veilnet.io/vxlan-vni";

/// Annotation (WireGuard, later): the node's Curve25519 public key, standard base64 (44 chars).
pub const WG_PUBLIC_KEY: &str = "veilnet.io/wg-public-key";

/// Annotation (WireGuard, later): `ip:port` (IPv6 as `[ip]:port`) where the node's WireGuard
/// listens.
pub const WG_ENDPOINT: &str = "veilnet.io/wg-endpoint";

/// Label (WireGuard, later): the operator's per-node encryption switch. A label rather than an
/// annotation so it can be selected on (`kubectl get nodes -l veilnet.io/encryption=...`).
pub const ENCRYPTION_LABEL: &str = "veilnet.io/encryption";

/// Annotation (WireGuard, later): the encryption mode the node's agent actually runs, as it
/// reports it back (may differ from the label while a change is rolling out).
pub const ENCRYPTION_MODE: &str = "veilnet.io/encryption-mode";

/// Key rotation trigger (set by an operator): when its value changes, the node's agent generates
/// a new WireGuard key, e.g. `kubectl annotate node N veilnet.io/rotate-key=$(date +%s) --overwrite`.
pub const ROTATE_KEY: &str = "veilnet.io/rotate-key";

/// Every annotation key veilnet writes on its own Node (what a cleanup must remove).
pub const OWNED_ANNOTATIONS: &[&str] = &[
    VTEP_MAC,
    UNDERLAY_IP,
    POD_CIDRS,
    VXLAN_VNI,
    WG_PUBLIC_KEY,
    WG_ENDPOINT,
    ENCRYPTION_MODE,
];

/// Largest VNI: the VXLAN header has 24 bits for it.
pub const MAX_VNI: u32 = 0x00ff_ffff;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {key} is missing")]
    Missing { key: String },
    #[error("invalid MAC address {value:?}: {reason}")]
    InvalidMac { value: String, reason: &'static str },
    #[error("invalid IP address {value:?}: {reason}")]
    InvalidIp { value: String, reason: &'static str },
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: String },
    #[error("invalid VXLAN VNI {value:?}: must be an integer in 1..={MAX_VNI}")]
    InvalidVni { value: String },
    #[error("invalid WireGuard public key {value:?}: {reason}")]
    InvalidWgKey { value: String, reason: &'static str },
    #[error("invalid WireGuard endpoint {value:?}: {reason}")]
    InvalidEndpoint { value: String, reason: &'static str },
}

pub type Result<T> = std::result::Result<T, AnnotationError>;

/// At most this many characters of a bad value go into errors, logs and Events: anyone who can
/// write a Node can make its values as long as the API allows, and repeat them.
pub const SHOWN_VALUE_CHARS: usize = 64;

/// A value as errors show it: cut to [`SHOWN_VALUE_CHARS`] characters, with its full length.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_VALUE_CHARS) {
        None => value.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// The value of `key`, or [`AnnotationError::Missing`].
pub fn required<'a>(annotations: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str> {
    annotations
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| AnnotationError::Missing {
            key: key.to_string(),
        })
}

/// A VTEP MAC: six hex octets, unicast and not all-zero (a group or zero MAC in a peer's FDB
/// would flood or drop every frame for that peer).
pub fn parse_vtep_mac(value: &str) -> Result<MacAddr> {
    let mac: MacAddr = value
        .trim()
        .parse()
        .map_err(|_| AnnotationError::InvalidMac {
            value: shown(value),
            reason: "expected six colon-separated hex octets",
        })?;
    if mac.is_multicast() {
        return Err(AnnotationError::InvalidMac {
            value: shown(value),
            reason: "multicast/broadcast address",
        });
    }
    if mac.is_zero() {
        return Err(AnnotationError::InvalidMac {
            value: shown(value),
            reason: "all-zero address",
        });
    }
    Ok(mac)
}

/// An underlay address: a plain unicast IP that can actually be sent to.
pub fn parse_underlay_ip(value: &str) -> Result<IpAddr> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| AnnotationError::InvalidIp {
            value: shown(value),
            reason: "not an IPv4 or IPv6 address",
        })?;
    let reason = if ip.is_unspecified() {
        Some("unspecified address")
    } else if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_multicast() {
        Some("multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("broadcast address")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(AnnotationError::InvalidIp {
            value: shown(value),
            reason,
        }),
        None => Ok(ip),
    }
}

/// A CIDR in canonical form: host bits must be zero (`10.244.1.0/24`, not `10.244.1.7/24`), so
/// that two spellings of one range can never look like two ranges.
pub fn parse_cidr(value: &str) -> Result<IpNet> {
    let trimmed = value.trim();
    let net: IpNet = trimmed.parse().map_err(|_| AnnotationError::InvalidCidr {
        value: shown(value),
        reason: "expected ADDRESS/PREFIX".to_string(),
    })?;
    if net.trunc() != net {
        return Err(AnnotationError::InvalidCidr {
            value: shown(value),
            reason: format!("host bits set (did you mean {}?)", net.trunc()),
        });
    }
    Ok(net)
}

/// A comma-separated list of canonical CIDRs (the [`POD_CIDRS`] format). Empty items are errors.
pub fn parse_cidr_list(value: &str) -> Result<Vec<IpNet>> {
    value.split(',').map(parse_cidr).collect()
}

/// The [`POD_CIDRS`] value for `cidrs`.
pub fn format_cidr_list(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A VNI in 1..=2^24-1 (0 is reserved by convention; larger values do not fit the header).
pub fn parse_vni(value: &str) -> Result<u32> {
    match value.trim().parse::<u32>() {
        Ok(vni) if (1..=MAX_VNI).contains(&vni) => Ok(vni),
        _ => Err(AnnotationError::InvalidVni {
            value: shown(value),
        }),
    }
}

/// A WireGuard public key: standard base64 of exactly 32 bytes, not all-zero (a zero key is the
/// conventional "no key" marker and can never complete a handshake).
pub fn parse_wg_public_key(value: &str) -> Result<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| AnnotationError::InvalidWgKey {
            value: shown(value),
            reason: "not standard base64",
        })?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| AnnotationError::InvalidWgKey {
            value: shown(value),
            reason: "not 32 bytes",
        })?;
    if key == [0; 32] {
        return Err(AnnotationError::InvalidWgKey {
            value: shown(value),
            reason: "all-zero key",
        });
    }
    Ok(key)
}

/// A WireGuard endpoint `ip:port` with a usable unicast IP and a non-zero port.
pub fn parse_wg_endpoint(value: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = value
        .trim()
        .parse()
        .map_err(|_| AnnotationError::InvalidEndpoint {
            value: shown(value),
            reason: "expected IP:PORT or [IPv6]:PORT",
        })?;
    if addr.port() == 0 {
        return Err(AnnotationError::InvalidEndpoint {
            value: shown(value),
            reason: "port 0",
        });
    }
    parse_underlay_ip(&addr.ip().to_string()).map_err(|_| AnnotationError::InvalidEndpoint {
        value: shown(value),
        reason: "not a unicast address",
    })?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_bad_values_are_cut_in_errors() {
        let long = "x".repeat(200_000);
        let e = parse_underlay_ip(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{}", e.len());
        assert!(e.contains("(200000 bytes)"), "{e}");
        assert_eq!(shown("short"), "short");
    }

    #[test]
    fn every_key_has_the_prefix_and_is_unique() {
        let all = [
            VTEP_MAC,
            UNDERLAY_IP,
            POD_CIDRS,
            VXLAN_VNI,
            WG_PUBLIC_KEY,
            WG_ENDPOINT,
            ENCRYPTION_LABEL,
            ENCRYPTION_MODE,
        ];
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        for key in all {
            assert!(key.starts_with(PREFIX), "{key}");
            // Kubernetes limits the name part to 63 characters.
            assert!(key.len() - PREFIX.len() <= 63, "{key}");
        }
        assert!(!OWNED_ANNOTATIONS.contains(&ENCRYPTION_LABEL));
    }

    #[test]
    fn required_reports_the_missing_key() {
        let mut map = BTreeMap::new();
        map.insert(VTEP_MAC.to_string(), "02:00:00:00:00:01".to_string());
        assert_eq!(required(&map, VTEP_MAC).unwrap(), "02:00:00:00:00:01");
        assert_eq!(
            required(&map, UNDERLAY_IP),
            Err(AnnotationError::Missing {
                key: UNDERLAY_IP.to_string()
            })
        );
    }

    #[test]
    fn vtep_mac_must_be_usable_unicast() {
        assert_eq!(
            parse_vtep_mac(" 02:AA:bb:00:00:01 ").unwrap().to_string(),
            "02:aa:bb:00:00:01"
        );
        for bad in [
            "",
            "zz:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert!(
                matches!(parse_vtep_mac(bad), Err(AnnotationError::InvalidMac { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn underlay_ip_must_be_unicast() {
        assert_eq!(
            parse_underlay_ip("192.168.1.10").unwrap().to_string(),
            "192.168.1.10"
        );
        assert_eq!(
            parse_underlay_ip("fd00::10").unwrap().to_string(),
            "fd00::10"
        );
        for bad in [
            "",
            "192.168.1",
            "192.168.1.10/24",
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "host.example",
        ] {
            assert!(
                matches!(
                    parse_underlay_ip(bad),
                    Err(AnnotationError::InvalidIp { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cidr_must_be_canonical() {
        assert_eq!(
            parse_cidr("10.244.1.0/24").unwrap().to_string(),
            "10.244.1.0/24"
        );
        assert_eq!(
            parse_cidr("fd00:10:244:1::/64").unwrap().to_string(),
            "fd00:10:244:1::/64"
        );
        let err = parse_cidr("10.244.1.7/24").unwrap_err();
        assert!(err.to_string().contains("10.244.1.0/24"), "{err}");
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.0/33",
            "10.244.1.0/",
            "fd00::/129",
            "x/24",
        ] {
            assert!(
                matches!(parse_cidr(bad), Err(AnnotationError::InvalidCidr { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cidr_list_round_trips_and_rejects_empty_items() {
        let list = parse_cidr_list("10.244.1.0/24, fd00:1::/64").unwrap();
        assert_eq!(format_cidr_list(&list), "10.244.1.0/24,fd00:1::/64");
        assert!(parse_cidr_list("").is_err());
        assert!(parse_cidr_list("10.244.1.0/24,").is_err());
        assert!(parse_cidr_list("10.244.1.0/24,10.244.2.1/24").is_err());
    }

    #[test]
    fn vni_range() {
        assert_eq!(parse_vni("1").unwrap(), 1);
        assert_eq!(parse_vni("16777215").unwrap(), MAX_VNI);
        for bad in ["0", "16777216", "-1", "", "one", "1.0"] {
            assert!(parse_vni(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wg_key_is_32_nonzero_bytes() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_wg_public_key(&key).unwrap(), [7u8; 32]);
        let zero = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert!(parse_wg_public_key(&zero).is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(parse_wg_public_key(&short).is_err());
        assert!(parse_wg_public_key("not base64!").is_err());
    }

    #[test]
    fn wg_endpoint() {
        assert_eq!(
            parse_wg_endpoint("192.168.1.10:51820").unwrap().port(),
            51820
        );
        assert!(parse_wg_endpoint("[fd00::1]:51820").is_ok());
        for bad in [
            "192.168.1.10",
            "192.168.1.10:0",
            "0.0.0.0:51820",
            "[::1]:1",
            "x:1",
        ] {
            assert!(parse_wg_endpoint(bad).is_err(), "{bad:?}");
        }
    }
}
