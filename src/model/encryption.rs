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
//! actually applies), not its label: that way each side reacts to what the other really does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use super::annotations::{self, AnnotationError};

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
            other => Err(InvalidMode(other.to_string())),
        }
    }
}

/// This node's mode from its label, else the default. A bad label value falls back to the default
/// and is reported (the caller logs it and posts an Event).
pub fn own_mode(label: Option<&str>, default: Mode) -> (Mode, Option<InvalidMode>) {
    match label.map(str::parse::<Mode>) {
        None => (default, None),
        Some(Ok(m)) => (m, None),
        Some(Err(e)) => (default, Some(e)),
    }
}

/// A peer as its Node annotations describe it (raw strings, validated here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCrypto {
    pub name: String,
    pub mode: Option<String>,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
}

impl PeerCrypto {
    pub fn from_annotations(name: &str, anns: &BTreeMap<String, String>) -> Self {
        PeerCrypto {
            name: name.to_string(),
            mode: anns.get(annotations::ENCRYPTION_MODE).cloned(),
            public_key: anns.get(annotations::WG_PUBLIC_KEY).cloned(),
            endpoint: anns.get(annotations::WG_ENDPOINT).cloned(),
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
    #[error("the peer publishes an invalid encryption mode: {0}")]
    BadPeerMode(InvalidMode),
    #[error("the peer's WireGuard key is unusable: {0}")]
    BadKey(AnnotationError),
    #[error("the peer publishes no WireGuard key")]
    NoKey,
    #[error("the peer's WireGuard endpoint is unusable: {0}")]
    BadEndpoint(AnnotationError),
    #[error("the peer publishes no WireGuard endpoint")]
    NoEndpoint,
    #[error("the peer's WireGuard key is also claimed by {0}")]
    DuplicateKey(String),
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
    /// The peer's published mode, if valid.
    pub mode: Option<Mode>,
    pub path: Path,
}

/// The path to every peer (sorted by name). `my_key` is this node's public key: a peer claiming it
/// is refused.
pub fn plan_paths(my_mode: Mode, my_key: &[u8; 32], peers: &[PeerCrypto]) -> Vec<PeerPath> {
    // Who claims which (valid) key: a key claimed twice is refused for every claimant.
    let mut claims: BTreeMap<[u8; 32], Vec<&str>> = BTreeMap::new();
    for p in peers {
        if let Some(Ok(k)) = p
            .public_key
            .as_deref()
            .map(annotations::parse_wg_public_key)
        {
            claims.entry(k).or_default().push(&p.name);
        }
    }
    let mut out: Vec<PeerPath> = peers
        .iter()
        .map(|p| {
            let mode = p.mode.as_deref().map(str::parse::<Mode>);
            let (peer_mode, path) = match mode {
                Some(Err(e)) => (None, Path::Blocked(BlockReason::BadPeerMode(e))),
                Some(Ok(m)) => (Some(m), decide(my_mode, m, my_key, p, &claims)),
                // No published mode: a peer without encryption support.
                None => (None, decide(my_mode, Mode::Off, my_key, p, &claims)),
            };
            PeerPath {
                node: p.name.clone(),
                mode: peer_mode,
                path,
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
    claims: &BTreeMap<[u8; 32], Vec<&str>>,
) -> Path {
    match (mine.wants_encryption(), theirs.wants_encryption()) {
        (true, true) => wireguard(my_key, peer, claims),
        (false, true) if theirs == Mode::Strict => Path::Blocked(BlockReason::PeerIsStrict),
        (true, false) if mine == Mode::Strict => Path::Blocked(BlockReason::WeAreStrict),
        _ => Path::Vxlan,
    }
}

fn wireguard(my_key: &[u8; 32], peer: &PeerCrypto, claims: &BTreeMap<[u8; 32], Vec<&str>>) -> Path {
    let key = match peer
        .public_key
        .as_deref()
        .map(annotations::parse_wg_public_key)
    {
        None => return Path::Blocked(BlockReason::NoKey),
        Some(Err(e)) => return Path::Blocked(BlockReason::BadKey(e)),
        Some(Ok(k)) => k,
    };
    if &key == my_key {
        return Path::Blocked(BlockReason::DuplicateKey("this node".into()));
    }
    if let Some(other) = claims
        .get(&key)
        .and_then(|c| c.iter().find(|n| **n != peer.name))
    {
        return Path::Blocked(BlockReason::DuplicateKey((*other).to_string()));
    }
    let endpoint = match peer.endpoint.as_deref().map(annotations::parse_wg_endpoint) {
        None => return Path::Blocked(BlockReason::NoEndpoint),
        Some(Err(e)) => return Path::Blocked(BlockReason::BadEndpoint(e)),
        Some(Ok(e)) => e,
    };
    Path::Wireguard {
        public_key: key,
        endpoint,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn key(n: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    fn peer(name: &str, mode: Option<&str>, k: Option<String>, ep: Option<&str>) -> PeerCrypto {
        PeerCrypto {
            name: name.into(),
            mode: mode.map(String::from),
            public_key: k,
            endpoint: ep.map(String::from),
        }
    }

    fn good(name: &str, mode: &str, n: u8) -> PeerCrypto {
        peer(name, Some(mode), Some(key(n)), Some("172.30.0.12:51820"))
    }

    fn path_of(my: Mode, p: PeerCrypto) -> Path {
        plan_paths(my, &[9; 32], &[p]).remove(0).path
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
    fn a_peer_without_a_published_mode_does_not_encrypt() {
        assert_eq!(path_of(Mode::On, peer("b", None, None, None)), Path::Vxlan);
        assert_eq!(
            path_of(Mode::Strict, peer("b", None, None, None)),
            Path::Blocked(BlockReason::WeAreStrict)
        );
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
        let bad_mode = peer("b", Some("maybe"), Some(key(1)), Some("172.30.0.12:51820"));
        assert!(matches!(
            path_of(Mode::On, bad_mode),
            Path::Blocked(BlockReason::BadPeerMode(_))
        ));
    }

    #[test]
    fn a_key_claimed_twice_is_refused_for_both_and_ours_for_anyone() {
        let paths = plan_paths(
            Mode::On,
            &[9; 32],
            &[good("b", "on", 1), good("c", "on", 1), good("d", "on", 2)],
        );
        assert_eq!(
            paths[0].path,
            Path::Blocked(BlockReason::DuplicateKey("c".into()))
        );
        assert_eq!(
            paths[1].path,
            Path::Blocked(BlockReason::DuplicateKey("b".into()))
        );
        assert_eq!(paths[2].path.name(), "wireguard");
        let thief = good("e", "on", 9);
        assert_eq!(
            path_of(Mode::On, thief),
            Path::Blocked(BlockReason::DuplicateKey("this node".into()))
        );
    }

    #[test]
    fn own_mode_falls_back_to_the_default_on_a_bad_label() {
        assert_eq!(own_mode(None, Mode::On), (Mode::On, None));
        assert_eq!(own_mode(Some("strict"), Mode::On), (Mode::Strict, None));
        let (m, err) = own_mode(Some("stirct"), Mode::On);
        assert_eq!(m, Mode::On);
        assert!(err.is_some());
    }

    #[test]
    fn output_is_sorted_and_keeps_the_peer_mode() {
        let paths = plan_paths(
            Mode::On,
            &[9; 32],
            &[good("z", "off", 3), good("a", "strict", 4)],
        );
        assert_eq!(
            paths.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            ["a", "z"]
        );
        assert_eq!(paths[0].mode, Some(Mode::Strict));
    }
}
