//! Which path each node pair uses: WireGuard, plaintext VXLAN, or none at all (pure).
//!
//! A node's mode is `on`, `off` or `strict` (label `veilnet.io/encryption`, else the configured
//! default). The rules, applied identically by both nodes of a pair:
//! - both `on`/`strict` → WireGuard;
//! - otherwise plaintext VXLAN, **except** that a `strict` node never sends or accepts pod traffic
//!   in plaintext: the pair is then blocked, never downgraded;
//! - a peer that wants encryption but whose key or endpoint is unusable (malformed, or a key that
//!   another node, or this node, also claims) is blocked too: downgrading it to plaintext would let
//!   anyone who can scribble on a Node object turn encryption off for that pair.
//!
//! The peer's mode is what its agent *publishes* (`veilnet.io/encryption-mode`, the mode it
//! actually applies), so each side reacts to what the other really does — but the published
//! mode never *lowers* protection below what the cluster says for that node: its label
//! `veilnet.io/encryption`, else the cluster default. A missing, unknown or malformed published
//! mode counts as that; a published `off` only takes effect when the label (or the default)
//! says `off` too; a published `strict` is honoured (more protection). So editing the annotation
//! cannot downgrade a pair: only a writer of the Node's *labels* can (cluster admins, and the
//! node's own kubelet credentials, as for every node label), and each such downgrade raises a
//! `VeilnetPathDowngraded` Event and shows in `veilnet status` and `veilnet_peer_path`.
//!
//! Contested keys: a WireGuard key two peers publish stays with its senior holder
//! ([`Seniority`]: the peer this agent already used it for, else the Node created first); only
//! the newcomer is refused. A WireGuard endpoint must be the peer's own underlay address as the
//! cluster records it (the overlay planner checked it against `status.addresses`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use super::annotations::AnnotationError;
use super::overlay::Seniority;
use super::peer::{Claim, PeerRecord};

/// Default WireGuard UDP port (the conventional one).
pub const DEFAULT_WG_PORT: u16 = 51820;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Encrypt with every peer that also encrypts; plaintext with the others.
    On,
    /// Never encrypt (unless a peer is strict: then that pair is blocked).
    Off,
    /// Encrypt with peers that encrypt; no pod traffic at all with the others.
    Strict,
}

impl Mode {
    /// Off < On < Strict.
    fn protection(self) -> u8 {
        match self {
            Mode::Off => 0,
            Mode::On => 1,
            Mode::Strict => 2,
        }
    }

    /// The more protective of the two.
    pub fn stronger(self, other: Mode) -> Mode {
        if other.protection() > self.protection() {
            other
        } else {
            self
        }
    }

    pub fn wants_encryption(self) -> bool {
        matches!(self, Mode::On | Mode::Strict)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Off => "off",
            Mode::Strict => "strict",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid encryption mode {0:?}: use on, off or strict")]
pub struct InvalidMode(pub String);

impl FromStr for Mode {
    type Err = InvalidMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            "strict" => Ok(Mode::Strict),
            other => Err(InvalidMode(super::annotations::shown(other))),
        }
    }
}

/// This node's mode from its label, else the default. A bad label value falls back to the default
/// and is reported (the caller logs it and posts an Event).
pub fn own_mode(label: &Claim<Mode, InvalidMode>, default: Mode) -> (Mode, Option<InvalidMode>) {
    match label {
        Claim::Missing => (default, None),
        Claim::Valid(m) => (*m, None),
        Claim::Malformed(e) => (default, Some(e.clone())),
    }
}

/// A peer as the path planner sees it: its record's claims (parsed once, in
/// [`PeerRecord::parse`]) with what the overlay planner proved about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCrypto {
    pub name: String,
    /// The published mode (annotation).
    pub mode: Claim<Mode, InvalidMode>,
    /// The Node's `veilnet.io/encryption` label.
    pub label: Claim<Mode, InvalidMode>,
    pub public_key: Claim<[u8; 32]>,
    pub endpoint: Claim<SocketAddr>,
    /// The peer's underlay address as the cluster records it (the endpoint must match it).
    pub underlay_ip: Option<std::net::IpAddr>,
    /// `metadata.creationTimestamp` (Unix seconds), for [`Seniority`].
    pub created: Option<i64>,
    /// Why the VXLAN path cannot serve this peer (see `AcceptedPeer::vxlan_unusable`).
    pub vxlan_unusable: Option<String>,
}

impl PeerCrypto {
    /// The claims of `record`; `underlay_ip` and `vxlan_unusable` are the overlay planner's
    /// verdict on it (the accepted peer's recorded address, and why VXLAN cannot serve it).
    pub fn of(
        record: &PeerRecord,
        underlay_ip: Option<std::net::IpAddr>,
        vxlan_unusable: Option<String>,
    ) -> Self {
        PeerCrypto {
            name: record.name.clone(),
            mode: record.mode.clone(),
            label: record.label.clone(),
            public_key: record.public_key.clone(),
            endpoint: record.endpoint.clone(),
            underlay_ip,
            created: record.created,
            vxlan_unusable,
        }
    }

    /// The mode this node acts on for the peer: the published one, never below what its label
    /// (else `default`) says. Also whether a published downgrade was refused.
    pub fn effective_mode(&self, default: Mode) -> (Mode, bool) {
        let intended = self.label.valid().copied().unwrap_or(default);
        match self.mode.valid() {
            Some(&published) => {
                let effective = published.stronger(intended);
                (effective, effective != published)
            }
            // Missing or malformed: what the cluster says for that node.
            None => (intended, false),
        }
    }
}

/// Why a pair carries no pod traffic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockReason {
    #[error("this node is strict and the peer does not encrypt")]
    WeAreStrict,
    #[error("the peer is strict and this node does not encrypt")]
    PeerIsStrict,
    #[error("the peer's WireGuard key is unusable: {0}")]
    BadKey(AnnotationError),
    #[error("the peer publishes no WireGuard key")]
    NoKey,
    #[error("the peer's WireGuard endpoint is unusable: {0}")]
    BadEndpoint(AnnotationError),
    #[error("the peer publishes no WireGuard endpoint")]
    NoEndpoint,
    #[error("the peer's WireGuard key is held by {0}")]
    DuplicateKey(String),
    #[error("the peer's WireGuard endpoint {endpoint} is not its underlay address {underlay}")]
    EndpointNotOwn {
        endpoint: SocketAddr,
        underlay: std::net::IpAddr,
    },
    #[error("the pair would be VXLAN, but {0}")]
    VxlanUnusable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    Wireguard {
        public_key: [u8; 32],
        endpoint: SocketAddr,
    },
    Vxlan,
    Blocked(BlockReason),
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Wireguard { .. } => "wireguard",
            Path::Vxlan => "vxlan",
            Path::Blocked(_) => "blocked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    pub node: String,
    /// The peer's mode as this node acts on it (see [`PeerCrypto::effective_mode`]).
    pub mode: Option<Mode>,
    pub path: Path,
    /// The peer published a weaker mode than its label (or the default) allows: refused.
    pub refused_downgrade: bool,
}

impl PeerPath {
    /// The paths by peer name, for planners that look one up per peer (a linear search each
    /// was nodes² per pass at 1,000 nodes).
    pub fn by_node(paths: &[PeerPath]) -> std::collections::HashMap<&str, &PeerPath> {
        paths.iter().map(|p| (p.node.as_str(), p)).collect()
    }
}

/// The path to every peer (sorted by name). `my_key` is this node's public key: a peer claiming it
/// is refused. `default` is the cluster's default mode; `key_bindings` the keys this agent's last
/// pass used, by peer (the incumbents of [`Seniority`]).
pub fn plan_paths(
    my_mode: Mode,
    default: Mode,
    my_key: &[u8; 32],
    peers: &[PeerCrypto],
    key_bindings: &BTreeMap<String, [u8; 32]>,
) -> Vec<PeerPath> {
    // Who holds which (valid) key: the senior claimant.
    let mut holder: BTreeMap<[u8; 32], (Seniority, &str)> = BTreeMap::new();
    for p in peers {
        if let Claim::Valid(k) = p.public_key {
            let seniority =
                Seniority::new(key_bindings.get(&p.name) == Some(&k), p.created, &p.name);
            let senior = holder.get(&k).is_none_or(|(s, _)| seniority < *s);
            if senior {
                holder.insert(k, (seniority, &p.name));
            }
        }
    }
    let mut out: Vec<PeerPath> = peers
        .iter()
        .map(|p| {
            let (mode, refused_downgrade) = p.effective_mode(default);
            PeerPath {
                node: p.name.clone(),
                mode: Some(mode),
                path: decide(my_mode, mode, my_key, p, &holder),
                refused_downgrade,
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

fn decide(
    mine: Mode,
    theirs: Mode,
    my_key: &[u8; 32],
    peer: &PeerCrypto,
    holder: &BTreeMap<[u8; 32], (Seniority, &str)>,
) -> Path {
    match (mine.wants_encryption(), theirs.wants_encryption()) {
        (true, true) => wireguard(my_key, peer, holder),
        (false, true) if theirs == Mode::Strict => Path::Blocked(BlockReason::PeerIsStrict),
        (true, false) if mine == Mode::Strict => Path::Blocked(BlockReason::WeAreStrict),
        _ => match &peer.vxlan_unusable {
            Some(why) => Path::Blocked(BlockReason::VxlanUnusable(why.clone())),
            None => Path::Vxlan,
        },
    }
}

fn wireguard(
    my_key: &[u8; 32],
    peer: &PeerCrypto,
    holder: &BTreeMap<[u8; 32], (Seniority, &str)>,
) -> Path {
    let key = match &peer.public_key {
        Claim::Missing => return Path::Blocked(BlockReason::NoKey),
        Claim::Malformed(e) => return Path::Blocked(BlockReason::BadKey(e.clone())),
        Claim::Valid(k) => *k,
    };
    if &key == my_key {
        return Path::Blocked(BlockReason::DuplicateKey("this node".into()));
    }
    if let Some((_, name)) = holder.get(&key).filter(|(_, name)| *name != peer.name) {
        return Path::Blocked(BlockReason::DuplicateKey((*name).to_string()));
    }
    let endpoint = match &peer.endpoint {
        Claim::Missing => return Path::Blocked(BlockReason::NoEndpoint),
        Claim::Malformed(e) => return Path::Blocked(BlockReason::BadEndpoint(e.clone())),
        Claim::Valid(e) => *e,
    };
    match peer.underlay_ip {
        Some(underlay) if underlay == endpoint.ip() => Path::Wireguard {
            public_key: key,
            endpoint,
        },
        Some(underlay) => Path::Blocked(BlockReason::EndpointNotOwn { endpoint, underlay }),
        // Only peers the overlay accepted (with a recorded address) are planned.
        None => Path::Blocked(BlockReason::NoEndpoint),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;
    use crate::model::annotations;

    fn key(n: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    /// A mode as a Node would publish it (or label it).
    fn m(raw: Option<&str>) -> Claim<Mode, InvalidMode> {
        Claim::parse(raw, str::parse)
    }

    fn peer(name: &str, mode: Option<&str>, k: Option<String>, ep: Option<&str>) -> PeerCrypto {
        PeerCrypto {
            name: name.into(),
            mode: m(mode),
            // The operator's label agrees with what the peer publishes, unless a test says not.
            label: m(mode),
            public_key: Claim::parse(k.as_deref(), annotations::parse_wg_public_key),
            endpoint: Claim::parse(ep, annotations::parse_wg_endpoint),
            underlay_ip: Some("172.30.0.12".parse().unwrap()),
            ..Default::default()
        }
    }

    fn good(name: &str, mode: &str, n: u8) -> PeerCrypto {
        peer(name, Some(mode), Some(key(n)), Some("172.30.0.12:51820"))
    }

    fn plan(my: Mode, peers: &[PeerCrypto]) -> Vec<PeerPath> {
        plan_paths(my, Mode::On, &[9; 32], peers, &BTreeMap::new())
    }

    fn path_of(my: Mode, p: PeerCrypto) -> Path {
        plan(my, &[p]).remove(0).path
    }

    #[test]
    fn the_pair_matrix() {
        use Mode::*;
        // (mine, theirs) → path name
        let expect = [
            (On, "on", "wireguard"),
            (On, "strict", "wireguard"),
            (On, "off", "vxlan"),
            (Strict, "on", "wireguard"),
            (Strict, "strict", "wireguard"),
            (Strict, "off", "blocked"),
            (Off, "on", "vxlan"),
            (Off, "off", "vxlan"),
            (Off, "strict", "blocked"),
        ];
        for (mine, theirs, want) in expect {
            assert_eq!(
                path_of(mine, good("b", theirs, 1)).name(),
                want,
                "{mine} vs {theirs}"
            );
        }
    }

    #[test]
    fn a_published_mode_never_lowers_what_the_label_or_the_default_says() {
        let mut p = good("b", "on", 1);
        // Annotation removed, or garbage: the label (on) decides, the pair stays encrypted.
        p.mode = Claim::Missing;
        assert_eq!(path_of(Mode::On, p.clone()).name(), "wireguard");
        p.mode = m(Some("garbage"));
        assert_eq!(path_of(Mode::On, p.clone()).name(), "wireguard");
        // Published off against a label that says on: refused, still WireGuard.
        p.mode = m(Some("off"));
        let planned = plan(Mode::On, &[p.clone()]).remove(0);
        assert_eq!(planned.path.name(), "wireguard");
        assert!(planned.refused_downgrade);
        assert_eq!(planned.mode, Some(Mode::On));
        // No label: the cluster default (on) decides the same way.
        p.label = Claim::Missing;
        assert_eq!(path_of(Mode::On, p.clone()).name(), "wireguard");
        // Off takes effect once the label says off as well.
        p.label = m(Some("off"));
        let planned = plan(Mode::On, &[p.clone()]).remove(0);
        assert_eq!(
            (planned.path.name(), planned.refused_downgrade),
            ("vxlan", false)
        );
        // A published strict is more protection: honoured whatever the label.
        p.mode = m(Some("strict"));
        assert_eq!(
            path_of(Mode::Off, p.clone()),
            Path::Blocked(BlockReason::PeerIsStrict)
        );
        // An old peer that publishes nothing, on a cluster whose default is on: no key, blocked,
        // never plaintext.
        let mut old = peer("c", None, None, None);
        old.label = Claim::Missing;
        assert_eq!(path_of(Mode::On, old), Path::Blocked(BlockReason::NoKey));
    }

    #[test]
    fn unusable_keys_and_endpoints_block_instead_of_downgrading() {
        let bad_b64 = peer(
            "b",
            Some("on"),
            Some("not base64!".into()),
            Some("172.30.0.12:51820"),
        );
        assert!(matches!(
            path_of(Mode::On, bad_b64),
            Path::Blocked(BlockReason::BadKey(_))
        ));
        let short = peer(
            "b",
            Some("on"),
            Some(base64::engine::general_purpose::STANDARD.encode([1u8; 16])),
            Some("172.30.0.12:51820"),
        );
        assert!(matches!(
            path_of(Mode::On, short),
            Path::Blocked(BlockReason::BadKey(_))
        ));
        assert_eq!(
            path_of(Mode::On, peer("b", Some("on"), None, None)),
            Path::Blocked(BlockReason::NoKey)
        );
        let garbage_ep = peer("b", Some("on"), Some(key(1)), Some("garbage"));
        assert!(matches!(
            path_of(Mode::On, garbage_ep),
            Path::Blocked(BlockReason::BadEndpoint(_))
        ));
        let port0 = peer("b", Some("on"), Some(key(1)), Some("172.30.0.12:0"));
        assert!(matches!(
            path_of(Mode::On, port0),
            Path::Blocked(BlockReason::BadEndpoint(_))
        ));
        // An endpoint elsewhere than the peer's recorded underlay address (the API server, a
        // broadcast address): refused.
        for elsewhere in ["172.30.0.1:6443", "172.30.0.255:51820"] {
            let p = peer("b", Some("on"), Some(key(1)), Some(elsewhere));
            assert!(
                matches!(
                    path_of(Mode::On, p),
                    Path::Blocked(BlockReason::EndpointNotOwn { .. })
                ),
                "{elsewhere}"
            );
        }
    }

    #[test]
    fn a_contested_key_stays_with_its_senior_holder() {
        // No history: the Node created first holds it, the newcomer is refused.
        let mut b = good("b", "on", 1);
        let mut c = good("c", "on", 1);
        b.created = Some(200);
        c.created = Some(100);
        let paths = plan(Mode::On, &[b.clone(), c.clone(), good("d", "on", 2)]);
        assert_eq!(
            paths[0].path,
            Path::Blocked(BlockReason::DuplicateKey("c".into()))
        );
        assert_eq!(paths[1].path.name(), "wireguard");
        assert_eq!(paths[2].path.name(), "wireguard");
        // The key this agent already uses for b: b keeps it, whatever the creation times.
        let bindings = BTreeMap::from([("b".to_string(), [1u8; 32])]);
        let paths = plan_paths(Mode::On, Mode::On, &[9; 32], &[b, c], &bindings);
        assert_eq!(paths[0].path.name(), "wireguard");
        assert_eq!(
            paths[1].path,
            Path::Blocked(BlockReason::DuplicateKey("b".into()))
        );
        // Our own key is never a peer's.
        let thief = good("e", "on", 9);
        assert_eq!(
            path_of(Mode::On, thief),
            Path::Blocked(BlockReason::DuplicateKey("this node".into()))
        );
    }

    #[test]
    fn a_peer_whose_vtep_mac_is_held_elsewhere_keeps_wireguard_but_gets_no_vxlan() {
        let mut p = good("b", "on", 1);
        p.vxlan_unusable = Some("its VTEP MAC is held by node c".into());
        assert_eq!(path_of(Mode::On, p.clone()).name(), "wireguard");
        assert!(matches!(
            path_of(Mode::Off, p),
            Path::Blocked(BlockReason::VxlanUnusable(_))
        ));
    }

    #[test]
    fn own_mode_falls_back_to_the_default_on_a_bad_label() {
        assert_eq!(own_mode(&Claim::Missing, Mode::On), (Mode::On, None));
        assert_eq!(own_mode(&m(Some("strict")), Mode::On), (Mode::Strict, None));
        let (mode, err) = own_mode(&m(Some("stirct")), Mode::On);
        assert_eq!(mode, Mode::On);
        assert!(err.is_some());
    }

    #[test]
    fn output_is_sorted_and_keeps_the_peer_mode() {
        let paths = plan(Mode::On, &[good("z", "off", 3), good("a", "strict", 4)]);
        assert_eq!(
            paths.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            ["a", "z"]
        );
        assert_eq!(paths[0].mode, Some(Mode::Strict));
    }
}
