//! One typed record per Node: what the cluster records for it and what its agent publishes, each
//! value parsed exactly once, when the snapshot is taken (pure).
//!
//! The planners never see a raw annotation. A record keeps apart
//! - the **cluster's records** (pod CIDRs from `spec.podCIDRs` or veilnet's allocation record, the
//!   addresses in `status.addresses`, `metadata.creationTimestamp`), already typed, and
//! - the node's **claims** (its annotations and its `veilnet.io/encryption` label): each one is
//!   [`Claim::Missing`], [`Claim::Malformed`] (with why) or [`Claim::Valid`].
//!
//! A malformed or missing overlay annotation (underlay address, VTEP MAC, VNI) rejects the peer
//! right here: [`PeerRecord::malformed`] holds the reason, which the overlay planner reports as the
//! peer's [`RejectReason`] (Event, `veilnet status`). The values that did parse stay in the record,
//! so a half-published peer still takes part in the conflict checks (its cluster-assigned CIDR
//! still blocks an overlapping claim). The WireGuard key and endpoint are claims of the *path*,
//! not of the peer: a bad one blocks the encrypted path (see [`super::encryption`]), so they are
//! kept as claims instead of rejecting the peer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::annotations::{self, AnnotationError};
use super::encryption::{InvalidMode, Mode};
use super::mac::MacAddr;
use super::overlay::RejectReason;

/// A value a Node publishes about itself, parsed once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Claim<T, E = AnnotationError> {
    #[default]
    Missing,
    Malformed(E),
    Valid(T),
}

impl<T, E> Claim<T, E> {
    /// Parses `raw` (absent → [`Claim::Missing`]).
    pub fn parse(raw: Option<&str>, parse: impl FnOnce(&str) -> Result<T, E>) -> Self {
        match raw.map(parse) {
            None => Claim::Missing,
            Some(Ok(v)) => Claim::Valid(v),
            Some(Err(e)) => Claim::Malformed(e),
        }
    }

    pub fn valid(&self) -> Option<&T> {
        match self {
            Claim::Valid(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, Claim::Missing)
    }
}

/// What the cluster itself records for a Node (never the node's own claims).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `spec.podCIDR(s)`, else veilnet's allocation record.
    pub pod_cidrs: Vec<IpNet>,
    /// `status.addresses` (InternalIP and ExternalIP): the published underlay address must be one.
    pub node_addresses: Vec<IpAddr>,
    /// `metadata.creationTimestamp` (Unix seconds), for [`super::overlay::Seniority`].
    pub created: Option<i64>,
}

/// One Node as every planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    pub node_addresses: Vec<IpAddr>,
    pub created: Option<i64>,
    /// [`annotations::UNDERLAY_IP`], when it parsed.
    pub underlay_ip: Option<IpAddr>,
    /// [`annotations::VTEP_MAC`], when it parsed.
    pub vtep_mac: Option<MacAddr>,
    /// [`annotations::VXLAN_VNI`]; absent means "same as ours".
    pub vxlan_vni: Option<u32>,
    /// The first missing or malformed overlay annotation, in the order underlay address, VTEP
    /// MAC, VNI: the peer is rejected for it.
    pub malformed: Option<RejectReason>,
    /// The Node's [`annotations::ENCRYPTION_LABEL`] (set by whoever may write its labels).
    pub label: Claim<Mode, InvalidMode>,
    /// [`annotations::ENCRYPTION_MODE`]: the mode its agent says it applies.
    pub mode: Claim<Mode, InvalidMode>,
    pub public_key: Claim<[u8; 32]>,
    pub endpoint: Claim<SocketAddr>,
}

impl PeerRecord {
    /// Parses a Node's annotations and labels next to the cluster's facts about it.
    pub fn parse(
        name: &str,
        anns: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
        facts: NodeFacts,
    ) -> PeerRecord {
        let get = |key: &str| anns.get(key).map(String::as_str);
        let underlay = Claim::parse(
            get(annotations::UNDERLAY_IP),
            annotations::parse_underlay_ip,
        );
        let mac = Claim::parse(get(annotations::VTEP_MAC), annotations::parse_vtep_mac);
        let vni = Claim::parse(get(annotations::VXLAN_VNI), annotations::parse_vni);
        let malformed = match (&underlay, &mac, &vni) {
            (Claim::Missing, ..) => Some(RejectReason::MissingUnderlayIp),
            (Claim::Malformed(e), ..) => Some(RejectReason::InvalidUnderlayIp(e.clone())),
            (_, Claim::Missing, _) => Some(RejectReason::MissingVtepMac),
            (_, Claim::Malformed(e), _) => Some(RejectReason::InvalidVtepMac(e.clone())),
            (.., Claim::Malformed(e)) => Some(RejectReason::InvalidVni(e.clone())),
            _ => None,
        };
        PeerRecord {
            name: name.to_string(),
            pod_cidrs: facts.pod_cidrs,
            node_addresses: facts.node_addresses,
            created: facts.created,
            underlay_ip: underlay.valid().copied(),
            vtep_mac: mac.valid().copied(),
            vxlan_vni: vni.valid().copied(),
            malformed,
            label: Claim::parse(
                labels
                    .get(annotations::ENCRYPTION_LABEL)
                    .map(String::as_str),
                str::parse,
            ),
            mode: Claim::parse(get(annotations::ENCRYPTION_MODE), str::parse),
            public_key: Claim::parse(
                get(annotations::WG_PUBLIC_KEY),
                annotations::parse_wg_public_key,
            ),
            endpoint: Claim::parse(
                get(annotations::WG_ENDPOINT),
                annotations::parse_wg_endpoint,
            ),
        }
    }

    /// The published underlay address, if it is one the cluster records for the Node.
    pub fn recorded_underlay(&self) -> Option<IpAddr> {
        self.underlay_ip
            .filter(|ip| self.node_addresses.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anns(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(entries: &[(&str, &str)]) -> PeerRecord {
        PeerRecord::parse(
            "node-b",
            &anns(entries),
            &BTreeMap::new(),
            NodeFacts::default(),
        )
    }

    #[test]
    fn every_value_is_parsed_once_into_its_type() {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let r = PeerRecord::parse(
            "node-b",
            &anns(&[
                (annotations::UNDERLAY_IP, "192.168.50.2"),
                (annotations::VTEP_MAC, "02:00:00:00:00:0b"),
                (annotations::VXLAN_VNI, "7"),
                (annotations::ENCRYPTION_MODE, "strict"),
                (annotations::WG_PUBLIC_KEY, key.as_str()),
                (annotations::WG_ENDPOINT, "192.168.50.2:51820"),
                ("other/key", "x"),
            ]),
            &anns(&[(annotations::ENCRYPTION_LABEL, "on")]),
            NodeFacts {
                pod_cidrs: vec!["10.244.2.0/24".parse().unwrap()],
                node_addresses: vec!["192.168.50.2".parse().unwrap()],
                created: Some(5),
            },
        );
        assert_eq!(r.malformed, None);
        assert_eq!(r.underlay_ip, Some("192.168.50.2".parse().unwrap()));
        assert_eq!(r.recorded_underlay(), r.underlay_ip);
        assert_eq!(r.vtep_mac, Some("02:00:00:00:00:0b".parse().unwrap()));
        assert_eq!(r.vxlan_vni, Some(7));
        assert_eq!(r.mode, Claim::Valid(Mode::Strict));
        assert_eq!(r.label, Claim::Valid(Mode::On));
        assert_eq!(r.public_key, Claim::Valid([1; 32]));
        assert_eq!(
            r.endpoint,
            Claim::Valid("192.168.50.2:51820".parse().unwrap())
        );
        assert_eq!(r.created, Some(5));
    }

    #[test]
    fn malformed_overlay_annotations_reject_the_peer_with_the_first_fault() {
        let mac = (annotations::VTEP_MAC, "02:00:00:00:00:0b");
        let ip = (annotations::UNDERLAY_IP, "192.168.50.2");
        assert_eq!(
            parse(&[mac]).malformed,
            Some(RejectReason::MissingUnderlayIp)
        );
        assert!(matches!(
            parse(&[(annotations::UNDERLAY_IP, "300.1.1.1"), mac]).malformed,
            Some(RejectReason::InvalidUnderlayIp(_))
        ));
        assert_eq!(parse(&[ip]).malformed, Some(RejectReason::MissingVtepMac));
        for bad in ["02:00:00:00:00", "01:00:00:00:00:0f"] {
            assert!(matches!(
                parse(&[ip, (annotations::VTEP_MAC, bad)]).malformed,
                Some(RejectReason::InvalidVtepMac(_))
            ));
        }
        assert!(matches!(
            parse(&[ip, mac, (annotations::VXLAN_VNI, "zero")]).malformed,
            Some(RejectReason::InvalidVni(_))
        ));
        // Everything bad: the underlay address is reported (and names its annotation).
        let all_bad = parse(&[
            (annotations::UNDERLAY_IP, "bad"),
            (annotations::VTEP_MAC, "bad"),
            (annotations::VXLAN_VNI, "bad"),
        ]);
        let msg = all_bad.malformed.unwrap().to_string();
        assert!(msg.contains(annotations::UNDERLAY_IP), "{msg}");
        // What parsed is kept for the conflict checks.
        let half = parse(&[ip]);
        assert_eq!(half.underlay_ip, Some("192.168.50.2".parse().unwrap()));
        assert_eq!(half.recorded_underlay(), None, "not in status.addresses");
    }

    #[test]
    fn path_claims_are_kept_malformed_instead_of_rejecting() {
        let r = parse(&[
            (annotations::UNDERLAY_IP, "192.168.50.2"),
            (annotations::VTEP_MAC, "02:00:00:00:00:0b"),
            (annotations::WG_PUBLIC_KEY, "not base64!"),
            (annotations::ENCRYPTION_MODE, "garbage"),
        ]);
        assert_eq!(r.malformed, None);
        assert!(matches!(r.public_key, Claim::Malformed(_)));
        assert!(matches!(r.mode, Claim::Malformed(_)));
        assert!(r.endpoint.is_missing());
        assert!(r.label.is_missing());
    }
}
