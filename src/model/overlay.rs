//! The overlay planner: from this node's settings and the cluster's view of its peers to the
//! exact set of links, addresses, routes, neighbours and FDB entries the node should have.
//!
//! The layout follows Flannel's VXLAN backend: a bridge holding each pod CIDR's gateway address,
//! one VXLAN device with learning off, and per peer one onlink route per pod CIDR via the CIDR's
//! network address, one permanent neighbour entry for that address pointing at the peer's VTEP
//! MAC, and one permanent FDB entry sending that MAC to the peer's underlay address. No multicast,
//! no L2/L3-miss upcalls: everything is static and computed here.
//!
//! Peer data comes from Node objects anyone with node-write access can edit, so every peer is
//! validated and a bad peer is *rejected with a reason* instead of producing a wrong route. Cross-
//! peer conflicts (overlapping CIDRs, shared MACs or underlay IPs) reject every party: the planner
//! cannot know which claim is the true one, and the result must not depend on input order.
//!
//! Routes carry their device name, so a later per-peer transport choice (WireGuard or VXLAN) only
//! changes which device a peer's routes name; the applier manages routes on every veilnet device.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::annotations::{self, AnnotationError, MAX_VNI};
use super::mac::{derive_bridge_mac, derive_vtep_mac, MacAddr};
use super::mtu::{self, Encapsulation, MtuError, UnderlayFamily};
use super::peer::PeerRecord;

/// Flannel's and the kernel's customary VNI for a single overlay.
pub const DEFAULT_VNI: u32 = 1;
/// The Linux kernel's historical VXLAN port (not IANA's 4789), as Flannel uses.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The pod bridge.
pub const DEFAULT_BRIDGE_NAME: &str = "veilbr0";
/// VXLAN devices are named `veilvx<vni>`; the longest VNI still fits IFNAMSIZ.
pub const VXLAN_NAME_PREFIX: &str = "veilvx";
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Smallest pod CIDRs we accept (prefix at most /30 or /126): the bridge takes the first host
/// address as gateway and the network address is the VTEP's, so a CIDR needs room for pods.
const MAX_V4_POD_PREFIX: u8 = 30;
const MAX_V6_POD_PREFIX: u8 = 126;

/// VXLAN settings of this node. Every node of a cluster must use the same VNI and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    pub bridge_name: String,
    /// `None` means `veilvx<vni>`.
    pub vxlan_name: Option<String>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            bridge_name: DEFAULT_BRIDGE_NAME.to_string(),
            vxlan_name: None,
        }
    }
}

impl VxlanConfig {
    pub fn vxlan_device_name(&self) -> String {
        self.vxlan_name
            .clone()
            .unwrap_or_else(|| format!("{VXLAN_NAME_PREFIX}{}", self.vni))
    }
}

/// This node, as its own agent knows it (trusted, already typed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfNode {
    pub name: String,
    /// The address peers reach us on; the VXLAN device's `local`.
    pub underlay_ip: IpAddr,
    /// The interface carrying `underlay_ip` (see `kernel::mtu::underlay_for`).
    pub underlay_dev: String,
    /// From `spec.podCIDRs` or the allocation record.
    pub pod_cidrs: Vec<IpNet>,
    /// `None` derives it from the node name (stable across restarts).
    pub vtep_mac: Option<MacAddr>,
}

/// Who keeps a contested value (underlay address, VTEP MAC, WireGuard key) when several peers
/// claim it: the peer this agent already used it for in its last pass, else the Node created
/// first, else the lower name. Only the others are refused, so a newcomer's claim never removes a
/// peer already in use, and nobody can pick a victim by copying its values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seniority {
    /// `false` sorts first: the incumbent.
    pub newcomer: bool,
    pub created: i64,
    pub name: String,
}

impl Seniority {
    pub fn new(incumbent: bool, created: Option<i64>, name: &str) -> Self {
        Seniority {
            newcomer: !incumbent,
            created: created.unwrap_or(i64::MAX),
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInput {
    pub node: SelfNode,
    pub vxlan: VxlanConfig,
    /// MTU of the path to the peers (see `kernel::mtu::underlay_for`).
    pub underlay_mtu: u32,
    /// Every other Node with veilnet annotations, parsed once ([`PeerRecord::parse`]).
    pub peers: Vec<PeerRecord>,
    /// The peers accepted by this agent's previous pass, by name: the bindings it already uses.
    pub incumbents: BTreeMap<String, AcceptedPeer>,
}

/// Settings every veilnet link has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkSpec {
    pub name: String,
    pub mtu: u32,
    pub mac: MacAddr,
    /// Exactly the addresses the link must carry (IPv6 link-local ones are the kernel's).
    pub addresses: BTreeSet<IpNet>,
}

/// The VXLAN device. `vni`, `port`, `local`, `underlay_dev` and `learning` are fixed at creation:
/// changing one means recreating the device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanSpec {
    pub link: LinkSpec,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub underlay_dev: String,
    pub learning: bool,
}

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// veilnet's own routing table: how this node's pods reach the *nodes* of their peers (their
/// underlay addresses), through the pair's path instead of the plain underlay. Only packets from
/// this node's pod CIDRs look it up ([`RuleSpec`]); 86 is ASCII 'V', like the route protocol.
pub const POD_TO_NODE_TABLE: u32 = 86;

/// `dst [via <via>] dev <dev> [onlink] [src <src>] table <table>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub dev: String,
    pub onlink: bool,
    /// Preferred source of locally originated packets (`src`): the node's underlay address, so a
    /// peer (and its NetworkPolicy `ipBlock`s) sees the node's real address on every path.
    pub src: Option<IpAddr>,
    pub table: u32,
}

impl RouteSpec {
    /// A route in the main table without a preferred source.
    pub fn main(dst: IpNet, via: Option<IpAddr>, dev: &str, onlink: bool) -> Self {
        RouteSpec {
            dst,
            via,
            dev: dev.to_string(),
            onlink,
            src: None,
            table: MAIN_TABLE,
        }
    }
}

/// A policy routing rule `from <src> lookup <table> priority <priority>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    pub priority: u32,
    pub src: IpNet,
    pub table: u32,
}

/// A peer that passed validation: its identity as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedPeer {
    pub name: String,
    pub underlay_ip: IpAddr,
    pub vtep_mac: MacAddr,
    pub pod_cidrs: Vec<IpNet>,
    /// Why this peer cannot use the VXLAN path (its VTEP MAC is held by another peer); a
    /// WireGuard pair does not use the MAC and is unaffected.
    pub vxlan_unusable: Option<String>,
}

/// A permanent neighbour (ARP/NDP) entry `ip lladdr mac dev dev`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighSpec {
    pub dev: String,
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// A permanent VXLAN FDB entry `mac dst dst dev dev self`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbSpec {
    pub dev: String,
    pub mac: MacAddr,
    pub dst: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPeer {
    pub node: String,
    pub reason: RejectReason,
}

/// Why a peer got no routes. The first fault found (in a fixed order) is reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("node has an empty name")]
    EmptyName,
    #[error("peer has this node's own name")]
    OwnName,
    #[error("node name appears more than once")]
    DuplicateName,
    #[error("missing annotation {key}", key = annotations::UNDERLAY_IP)]
    MissingUnderlayIp,
    #[error("bad annotation {key}: {0}", key = annotations::UNDERLAY_IP)]
    InvalidUnderlayIp(AnnotationError),
    #[error("underlay address {peer} is not in the same family as ours ({ours})")]
    UnderlayFamilyMismatch { peer: IpAddr, ours: IpAddr },
    #[error("underlay address {ip} is this node's own")]
    UnderlayIpIsOurs { ip: IpAddr },
    #[error("underlay address {ip} is not one of the addresses the cluster records for the Node (status.addresses: {recorded})")]
    UnderlayIpNotRecorded { ip: IpAddr, recorded: String },
    #[error("missing annotation {key}", key = annotations::VTEP_MAC)]
    MissingVtepMac,
    #[error("bad annotation {key}: {0}", key = annotations::VTEP_MAC)]
    InvalidVtepMac(AnnotationError),
    #[error("VTEP MAC {mac} is this node's own")]
    VtepMacIsOurs { mac: MacAddr },
    #[error("bad annotation {key}: {0}", key = annotations::VXLAN_VNI)]
    InvalidVni(AnnotationError),
    #[error("VXLAN VNI {peer} differs from ours ({ours})")]
    VniMismatch { peer: u32, ours: u32 },
    #[error("no pod CIDR assigned")]
    NoPodCidr,
    #[error("pod CIDR {cidr} has host bits set")]
    PodCidrNotCanonical { cidr: IpNet },
    #[error("pod CIDR {cidr} is too small to route (longest prefix /{MAX_V4_POD_PREFIX} or /{MAX_V6_POD_PREFIX})")]
    PodCidrTooSmall { cidr: IpNet },
    #[error("pod CIDR {cidr} overlaps this node's pod CIDR {ours}")]
    OverlapsOurPodCidr { cidr: IpNet, ours: IpNet },
    #[error("pod CIDR {cidr} overlaps {other_cidr} of node {other_node}")]
    OverlapsPeer {
        cidr: IpNet,
        other_node: String,
        other_cidr: IpNet,
    },
    #[error("pod CIDR {cidr} contains the underlay address {ip} (tunnel traffic would loop)")]
    ContainsUnderlayIp { cidr: IpNet, ip: IpAddr },
    #[error("underlay address {ip} is held by node {other_node}")]
    DuplicateUnderlayIp { ip: IpAddr, other_node: String },
}

/// Problems with this node's own settings: nothing can be planned until they are fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("node {node} has no pod CIDR")]
    NoPodCidr { node: String },
    #[error("own pod CIDR {cidr} has host bits set")]
    PodCidrNotCanonical { cidr: IpNet },
    #[error("own pod CIDR {cidr} is too small (longest prefix /{MAX_V4_POD_PREFIX} or /{MAX_V6_POD_PREFIX})")]
    PodCidrTooSmall { cidr: IpNet },
    #[error("own pod CIDRs {a} and {b} overlap")]
    PodCidrsOverlap { a: IpNet, b: IpNet },
    #[error("own pod CIDR {cidr} contains the underlay address {ip}")]
    PodCidrContainsUnderlay { cidr: IpNet, ip: IpAddr },
    #[error("own underlay address {ip} is not a unicast address")]
    BadUnderlayIp { ip: IpAddr },
    #[error("underlay device name is empty")]
    NoUnderlayDevice,
    #[error("own VTEP MAC {mac} is not a unicast address")]
    BadVtepMac { mac: MacAddr },
    #[error("VNI {vni} is outside 1..={MAX_VNI}")]
    BadVni { vni: u32 },
    #[error("VXLAN port 0 is not usable")]
    BadPort,
    #[error("interface name {name:?} is invalid: {reason}")]
    BadDeviceName { name: String, reason: &'static str },
    #[error("bridge and VXLAN device are both named {name:?}")]
    DeviceNameClash { name: String },
    #[error(transparent)]
    Mtu(#[from] MtuError),
}

/// Everything the node's overlay should be. Sets are ordered so diffs and logs are stable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredOverlay {
    pub bridge: LinkSpec,
    pub vxlan: VxlanSpec,
    pub routes: BTreeSet<RouteSpec>,
    /// Policy routing rules (see [`POD_TO_NODE_TABLE`]).
    pub rules: BTreeSet<RuleSpec>,
    pub neighbours: BTreeSet<NeighSpec>,
    pub fdb: BTreeSet<FdbSpec>,
    /// The MTU pods' interfaces must use (hand it to the CNI plugin).
    pub pod_mtu: u32,
    /// Peers that got routes, sorted by name.
    pub accepted: Vec<String>,
    /// The same peers with their validated data, sorted by name.
    pub peers: Vec<AcceptedPeer>,
    /// Peers that did not, sorted by name.
    pub rejected: Vec<RejectedPeer>,
    /// Devices veilnet routes over but does not create here (the WireGuard TUN, which the datapath
    /// owns): routes on them are managed like those on the bridge and VXLAN device.
    pub external_devices: BTreeSet<String>,
}

impl DesiredOverlay {
    /// Names of every device veilnet owns on this node: only routes, neighbours and FDB entries
    /// on these are ever touched by the applier.
    pub fn managed_devices(&self) -> BTreeSet<String> {
        [self.bridge.name.clone(), self.vxlan.link.name.clone()]
            .into_iter()
            .chain(self.external_devices.iter().cloned())
            .collect()
    }
}

/// Validates an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_ifname(name: &str) -> Result<(), OverlayError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("contains '/', ':', whitespace or control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(OverlayError::BadDeviceName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn max_pod_prefix(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => MAX_V4_POD_PREFIX,
        IpNet::V6(_) => MAX_V6_POD_PREFIX,
    }
}

/// The first host address of a CIDR: the pods' gateway on the bridge.
pub fn gateway_address(cidr: &IpNet) -> IpAddr {
    match cidr.network() {
        IpAddr::V4(net) => IpAddr::V4(Ipv4Addr::from(u32::from(net).wrapping_add(1))),
        IpAddr::V6(net) => IpAddr::V6(Ipv6Addr::from(u128::from(net).wrapping_add(1))),
    }
}

/// The address of a CIDR's network itself as a host route (`/32` or `/128`): what the VTEP carries
/// and what peers use as the next hop for that CIDR.
fn network_host(cidr: &IpNet) -> IpNet {
    let addr = cidr.network();
    let full = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    // A full-length prefix is always valid for its family.
    IpNet::new(addr, full).unwrap_or(*cidr)
}

fn with_prefix(addr: IpAddr, prefix: u8) -> IpNet {
    // `prefix` always comes from a CIDR of the same family, so this cannot fail; fall back to a
    // host route rather than panic if it ever did.
    IpNet::new(addr, prefix).unwrap_or_else(|_| IpNet::from(addr))
}

fn validate_self(input: &OverlayInput) -> Result<(MacAddr, u32), OverlayError> {
    let node = &input.node;
    let cfg = &input.vxlan;
    if node.pod_cidrs.is_empty() {
        return Err(OverlayError::NoPodCidr {
            node: node.name.clone(),
        });
    }
    if annotations::parse_underlay_ip(&node.underlay_ip.to_string()).is_err() {
        return Err(OverlayError::BadUnderlayIp {
            ip: node.underlay_ip,
        });
    }
    if node.underlay_dev.is_empty() {
        return Err(OverlayError::NoUnderlayDevice);
    }
    validate_ifname(&node.underlay_dev)?;
    for (i, cidr) in node.pod_cidrs.iter().enumerate() {
        if cidr.trunc() != *cidr {
            return Err(OverlayError::PodCidrNotCanonical { cidr: *cidr });
        }
        if cidr.prefix_len() > max_pod_prefix(cidr) {
            return Err(OverlayError::PodCidrTooSmall { cidr: *cidr });
        }
        if cidr.contains(&node.underlay_ip) {
            return Err(OverlayError::PodCidrContainsUnderlay {
                cidr: *cidr,
                ip: node.underlay_ip,
            });
        }
        for other in &node.pod_cidrs[i + 1..] {
            if cidr.contains(other) || other.contains(cidr) {
                return Err(OverlayError::PodCidrsOverlap {
                    a: *cidr,
                    b: *other,
                });
            }
        }
    }
    if !(1..=MAX_VNI).contains(&cfg.vni) {
        return Err(OverlayError::BadVni { vni: cfg.vni });
    }
    if cfg.port == 0 {
        return Err(OverlayError::BadPort);
    }
    let vxlan_name = cfg.vxlan_device_name();
    validate_ifname(&cfg.bridge_name)?;
    validate_ifname(&vxlan_name)?;
    if cfg.bridge_name == vxlan_name {
        return Err(OverlayError::DeviceNameClash { name: vxlan_name });
    }
    let mac = node.vtep_mac.unwrap_or_else(|| derive_vtep_mac(&node.name));
    if !mac.is_usable_unicast() {
        return Err(OverlayError::BadVtepMac { mac });
    }
    let pod_mtu = mtu::pod_mtu(
        input.underlay_mtu,
        UnderlayFamily::of(node.underlay_ip),
        &[Encapsulation::Vxlan],
    )?;
    Ok((mac, pod_mtu))
}

/// A peer on its way through validation: what parsed, and the first fault found.
struct Candidate<'a> {
    peer: &'a PeerRecord,
    underlay: Option<IpAddr>,
    mac: Option<MacAddr>,
    cidrs: Vec<IpNet>,
    reason: Option<RejectReason>,
    /// The senior peer that holds this candidate's VTEP MAC.
    mac_held_by: Option<String>,
}

impl Candidate<'_> {
    fn reject(&mut self, reason: RejectReason) {
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
    }
}

/// Checks one peer against this node. The record already carries its malformed annotations
/// ([`PeerRecord::malformed`]); the checks run in the order underlay address, VTEP MAC, VNI, pod
/// CIDRs, and the first fault is kept.
fn check_peer<'a>(
    peer: &'a PeerRecord,
    node: &SelfNode,
    our_mac: MacAddr,
    vni: u32,
) -> Candidate<'a> {
    let mut c = Candidate {
        peer,
        underlay: peer.underlay_ip,
        mac: peer.vtep_mac,
        cidrs: Vec::new(),
        reason: None,
        mac_held_by: None,
    };
    // The record's fault is the first unparsable value in the same order as the checks below,
    // so reporting it where its value is missing keeps the first fault first.
    let malformed = || peer.malformed.clone();
    match peer.underlay_ip {
        None => c.reason = malformed(),
        Some(ip) => {
            if UnderlayFamily::of(ip) != UnderlayFamily::of(node.underlay_ip) {
                c.reject(RejectReason::UnderlayFamilyMismatch {
                    peer: ip,
                    ours: node.underlay_ip,
                });
            } else if ip == node.underlay_ip {
                c.reject(RejectReason::UnderlayIpIsOurs { ip });
            } else if !peer.node_addresses.contains(&ip) {
                // The annotation is the peer's claim; the Node's status is the cluster's record.
                let recorded: Vec<String> =
                    peer.node_addresses.iter().map(IpAddr::to_string).collect();
                c.reject(RejectReason::UnderlayIpNotRecorded {
                    ip,
                    recorded: if recorded.is_empty() {
                        "none".into()
                    } else {
                        recorded.join(", ")
                    },
                });
            }
        }
    }
    match peer.vtep_mac {
        None => {
            if let Some(reason) = malformed() {
                c.reject(reason);
            }
        }
        Some(mac) if mac == our_mac => c.reject(RejectReason::VtepMacIsOurs { mac }),
        Some(_) => {}
    }
    // Underlay address and MAC parsed: what is left of the record's fault is the VNI's.
    if let Some(reason) = malformed() {
        c.reject(reason);
    }
    if let Some(peer_vni) = peer.vxlan_vni.filter(|v| *v != vni) {
        c.reject(RejectReason::VniMismatch {
            peer: peer_vni,
            ours: vni,
        });
    }
    if peer.pod_cidrs.is_empty() {
        c.reject(RejectReason::NoPodCidr);
    }
    let mut cidrs = BTreeSet::new();
    for cidr in &peer.pod_cidrs {
        if cidr.trunc() != *cidr {
            c.reject(RejectReason::PodCidrNotCanonical { cidr: *cidr });
        } else if cidr.prefix_len() > max_pod_prefix(cidr) {
            c.reject(RejectReason::PodCidrTooSmall { cidr: *cidr });
        }
        cidrs.insert(cidr.trunc());
    }
    c.cidrs = cidrs.into_iter().collect();
    c
}

/// Which side of a CIDR claim: this node or the candidate at an index.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Us,
    Peer(usize),
}

/// Finds every overlapping pair of CIDRs among ours and the candidates' and rejects, of each
/// pair, the peer overlapping ours, or else the junior of the two ([`Seniority`]: the peer that
/// held its CIDR in the previous pass, then the older Node object, then the name). So a Node
/// object claiming another's pod CIDR is refused and the holder keeps its routes: a forged
/// claim cannot cut an honest node off, and no two accepted peers ever overlap (every
/// overlapping pair loses its junior). CIDRs are nested or disjoint, so a sweep in address order
/// with a stack of the enclosing CIDRs finds every overlap in O(n log n).
fn reject_overlaps(
    candidates: &mut [Candidate<'_>],
    ours: &[IpNet],
    incumbents: &BTreeMap<String, AcceptedPeer>,
) {
    let mut claims: Vec<(IpNet, Owner)> = ours.iter().map(|c| (*c, Owner::Us)).collect();
    for (i, c) in candidates.iter().enumerate() {
        claims.extend(c.cidrs.iter().map(|cidr| (*cidr, Owner::Peer(i))));
    }
    // Larger (enclosing) CIDRs first among equal starts, so they are on the stack before their
    // subnets; ties (identical CIDRs) order ours first, then by candidate index (= name order).
    claims.sort_by(|(a, oa), (b, ob)| {
        let rank = |o: &Owner| match o {
            Owner::Us => 0,
            Owner::Peer(i) => i + 1,
        };
        (a.network(), a.prefix_len(), rank(oa)).cmp(&(b.network(), b.prefix_len(), rank(ob)))
    });
    let mut stack: Vec<(IpNet, Owner)> = Vec::new();
    let mut conflicts: Vec<(IpNet, Owner, IpNet, Owner)> = Vec::new();
    for (cidr, owner) in claims {
        while let Some((top, _)) = stack.last() {
            if top.contains(&cidr) {
                break;
            }
            stack.pop();
        }
        for (outer, outer_owner) in &stack {
            if *outer_owner != owner {
                conflicts.push((*outer, *outer_owner, cidr, owner));
            }
        }
        stack.push((cidr, owner));
    }
    let seniority = |c: &Candidate<'_>, cidr: IpNet| {
        let held = incumbents
            .get(&c.peer.name)
            .is_some_and(|b| b.pod_cidrs.contains(&cidr));
        Seniority::new(held, c.peer.created, &c.peer.name)
    };
    // Report the first conflict per peer: with ours before any peer's, then in address order.
    conflicts.sort_by_key(|(a, oa, b, ob)| (*oa != Owner::Us && *ob != Owner::Us, *a, *b));
    for (a, oa, b, ob) in conflicts {
        let (junior, junior_cidr, other, other_cidr) = match (oa, ob) {
            (Owner::Us, Owner::Peer(i)) => (i, b, Owner::Us, a),
            (Owner::Peer(i), Owner::Us) => (i, a, Owner::Us, b),
            (Owner::Peer(i), Owner::Peer(j)) => {
                if seniority(&candidates[i], a) <= seniority(&candidates[j], b) {
                    (j, b, Owner::Peer(i), a)
                } else {
                    (i, a, Owner::Peer(j), b)
                }
            }
            (Owner::Us, Owner::Us) => continue,
        };
        let reason = match other {
            Owner::Us => RejectReason::OverlapsOurPodCidr {
                cidr: junior_cidr,
                ours: other_cidr,
            },
            Owner::Peer(j) => RejectReason::OverlapsPeer {
                cidr: junior_cidr,
                other_node: candidates[j].peer.name.clone(),
                other_cidr,
            },
        };
        candidates[junior].reject(reason);
    }
}

/// Rejects every peer whose CIDR covers an underlay address (ours or any peer's): the route would
/// pull the encapsulated packets for that address back into the tunnel.
fn reject_underlay_capture(candidates: &mut [Candidate<'_>], our_underlay: IpAddr) {
    let underlays: BTreeSet<IpAddr> = candidates
        .iter()
        .filter_map(|c| c.underlay)
        .chain(std::iter::once(our_underlay))
        .collect();
    for c in candidates.iter_mut() {
        let hit = c.cidrs.iter().find_map(|cidr| {
            underlays
                .range(cidr.network()..=cidr.broadcast())
                .next()
                .map(|ip| (*cidr, *ip))
        });
        if let Some((cidr, ip)) = hit {
            c.reject(RejectReason::ContainsUnderlayIp { cidr, ip });
        }
    }
}

/// For every value (VTEP MAC, underlay IP) that several candidates claim, finds the senior
/// holder ([`Seniority`]) and hands each other claimant to `refuse` with the holder's name.
fn newcomers<K: Ord + Copy>(
    candidates: &[Candidate<'_>],
    incumbents: &BTreeMap<String, AcceptedPeer>,
    key: impl Fn(&Candidate<'_>) -> Option<K>,
    held_before: impl Fn(&AcceptedPeer) -> K,
) -> Vec<(usize, K, String)> {
    let mut holders: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if let Some(k) = key(c) {
            holders.entry(k).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    for (k, idx) in holders {
        if idx.len() < 2 {
            continue;
        }
        let seniority = |i: usize| {
            let p = candidates[i].peer;
            let incumbent = incumbents.get(&p.name).is_some_and(|b| held_before(b) == k);
            Seniority::new(incumbent, p.created, &p.name)
        };
        let Some(&senior) = idx.iter().min_by_key(|&&i| seniority(i)) else {
            continue;
        };
        let holder = candidates[senior].peer.name.clone();
        out.extend(
            idx.iter()
                .filter(|&&i| i != senior)
                .map(|&i| (i, k, holder.clone())),
        );
    }
    out
}

/// The validated peers and this node's own links, neighbours and FDB entries: the whole overlay
/// except its routes, which follow each pair's path (see [`super::routing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub bridge: LinkSpec,
    pub vxlan: VxlanSpec,
    pub neighbours: BTreeSet<NeighSpec>,
    pub fdb: BTreeSet<FdbSpec>,
    /// The MTU pods' interfaces must use over VXLAN.
    pub pod_mtu: u32,
    /// Peers that passed validation, sorted by name.
    pub peers: Vec<AcceptedPeer>,
    /// Peers that did not, sorted by name.
    pub rejected: Vec<RejectedPeer>,
}

impl PeerPlan {
    /// The desired overlay with these routes and rules; routes on `external_devices` (the
    /// WireGuard TUN) are managed too.
    pub fn into_desired(
        self,
        routes: BTreeSet<RouteSpec>,
        rules: BTreeSet<RuleSpec>,
        external_devices: BTreeSet<String>,
    ) -> DesiredOverlay {
        DesiredOverlay {
            bridge: self.bridge,
            vxlan: self.vxlan,
            routes,
            rules,
            neighbours: self.neighbours,
            fdb: self.fdb,
            pod_mtu: self.pod_mtu,
            accepted: self.peers.iter().map(|p| p.name.clone()).collect(),
            peers: self.peers,
            rejected: self.rejected,
            external_devices,
        }
    }

    /// The VXLAN route of every accepted peer's pod CIDRs (a peer whose VTEP MAC is held by
    /// another gets none).
    pub fn vxlan_routes(&self) -> BTreeSet<RouteSpec> {
        self.peers
            .iter()
            .filter(|p| p.vxlan_unusable.is_none())
            .flat_map(|p| &p.pod_cidrs)
            .map(|cidr| RouteSpec {
                src: Some(self.vxlan.local),
                ..RouteSpec::main(*cidr, Some(cidr.network()), &self.vxlan.link.name, true)
            })
            .collect()
    }
}

/// Computes the node's overlay with every accepted peer on VXLAN (no WireGuard, no policy
/// routing). Fails only on this node's own settings; bad peers end up in
/// [`DesiredOverlay::rejected`].
pub fn plan_overlay(input: &OverlayInput) -> Result<DesiredOverlay, OverlayError> {
    let peers = plan_peers(input)?;
    let routes = peers.vxlan_routes();
    Ok(peers.into_desired(routes, BTreeSet::new(), BTreeSet::new()))
}

/// Validates every peer and lays out this node's links, neighbours and FDB entries. Fails only on
/// this node's own settings; bad peers end up in [`PeerPlan::rejected`].
pub fn plan_peers(input: &OverlayInput) -> Result<PeerPlan, OverlayError> {
    let (our_mac, pod_mtu) = validate_self(input)?;
    let node = &input.node;
    let cfg = &input.vxlan;
    let vxlan_name = cfg.vxlan_device_name();

    let mut name_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &input.peers {
        *name_counts.entry(p.name.as_str()).or_default() += 1;
    }
    let mut rejected = Vec::new();
    let mut candidates = Vec::new();
    for peer in &input.peers {
        let name_fault = if peer.name.is_empty() {
            Some(RejectReason::EmptyName)
        } else if peer.name == node.name {
            Some(RejectReason::OwnName)
        } else if name_counts.get(peer.name.as_str()).copied().unwrap_or(0) > 1 {
            Some(RejectReason::DuplicateName)
        } else {
            None
        };
        match name_fault {
            // Without a trustworthy identity the entry takes no part in conflict checks.
            Some(reason) => rejected.push(RejectedPeer {
                node: peer.name.clone(),
                reason,
            }),
            None => candidates.push(check_peer(peer, node, our_mac, cfg.vni)),
        }
    }
    candidates.sort_by(|a, b| a.peer.name.cmp(&b.peer.name));

    // The underlay address carries every path: a newcomer claiming a senior's is refused.
    for (i, ip, holder) in newcomers(
        &candidates,
        &input.incumbents,
        |c| c.underlay,
        |b| b.underlay_ip,
    ) {
        candidates[i].reject(RejectReason::DuplicateUnderlayIp {
            ip,
            other_node: holder,
        });
    }
    // The VTEP MAC only matters to VXLAN: the newcomer keeps its WireGuard path.
    for (i, _, holder) in newcomers(&candidates, &input.incumbents, |c| c.mac, |b| b.vtep_mac) {
        candidates[i].mac_held_by = Some(holder);
    }
    reject_overlaps(&mut candidates, &node.pod_cidrs, &input.incumbents);
    reject_underlay_capture(&mut candidates, node.underlay_ip);

    let mut neighbours = BTreeSet::new();
    let mut fdb = BTreeSet::new();
    let mut peers = Vec::new();
    for c in candidates {
        let (Some(underlay), Some(mac), None) = (c.underlay, c.mac, &c.reason) else {
            rejected.push(RejectedPeer {
                node: c.peer.name.clone(),
                // Every path that leaves underlay or mac unset records a reason; the fallback
                // only guards against a future edit breaking that.
                reason: c.reason.unwrap_or(RejectReason::MissingUnderlayIp),
            });
            continue;
        };
        let vxlan_unusable = c
            .mac_held_by
            .as_ref()
            .map(|holder| format!("its VTEP MAC {mac} is held by node {holder}"));
        for cidr in c.cidrs.iter().filter(|_| vxlan_unusable.is_none()) {
            neighbours.insert(NeighSpec {
                dev: vxlan_name.clone(),
                ip: cidr.network(),
                mac,
            });
        }
        if vxlan_unusable.is_none() {
            fdb.insert(FdbSpec {
                dev: vxlan_name.clone(),
                mac,
                dst: underlay,
            });
        }
        peers.push(AcceptedPeer {
            name: c.peer.name.clone(),
            underlay_ip: underlay,
            vtep_mac: mac,
            pod_cidrs: c.cidrs.clone(),
            vxlan_unusable,
        });
    }
    rejected.sort_by(|a, b| a.node.cmp(&b.node));

    let bridge = LinkSpec {
        name: cfg.bridge_name.clone(),
        mtu: pod_mtu,
        mac: derive_bridge_mac(&node.name),
        addresses: node
            .pod_cidrs
            .iter()
            .map(|c| with_prefix(gateway_address(c), c.prefix_len()))
            .collect(),
    };
    let vxlan = VxlanSpec {
        link: LinkSpec {
            name: vxlan_name,
            mtu: pod_mtu,
            mac: our_mac,
            addresses: node.pod_cidrs.iter().map(network_host).collect(),
        },
        vni: cfg.vni,
        port: cfg.port,
        local: node.underlay_ip,
        underlay_dev: node.underlay_dev.clone(),
        learning: false,
    };
    Ok(PeerPlan {
        bridge,
        vxlan,
        neighbours,
        fdb,
        pod_mtu,
        peers,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::peer::NodeFacts;

    /// A peer as its Node describes it: raw annotation values, parsed by [`PeerRecord::parse`]
    /// like the snapshot does, next to the cluster's records.
    #[derive(Debug, Clone)]
    struct PeerNode {
        name: String,
        underlay_ip: Option<String>,
        vtep_mac: Option<String>,
        vxlan_vni: Option<String>,
        pod_cidrs: Vec<String>,
        node_addresses: Vec<IpAddr>,
        created: Option<i64>,
    }

    impl PeerNode {
        fn record(&self) -> PeerRecord {
            let anns: BTreeMap<String, String> = [
                (annotations::UNDERLAY_IP, &self.underlay_ip),
                (annotations::VTEP_MAC, &self.vtep_mac),
                (annotations::VXLAN_VNI, &self.vxlan_vni),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.clone()?)))
            .collect();
            PeerRecord::parse(
                &self.name,
                &anns,
                &BTreeMap::new(),
                NodeFacts {
                    // Cluster-assigned CIDRs arrive typed; host bits are kept to be refused.
                    pod_cidrs: self.pod_cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                    node_addresses: self.node_addresses.clone(),
                    created: self.created,
                },
            )
        }
    }

    fn me() -> SelfNode {
        SelfNode {
            name: "node-a".into(),
            underlay_ip: "192.168.50.1".parse().unwrap(),
            underlay_dev: "eth0".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            vtep_mac: None,
        }
    }

    fn peer(name: &str, ip: &str, mac: &str, cidrs: &[&str]) -> PeerNode {
        PeerNode {
            name: name.into(),
            underlay_ip: Some(ip.into()),
            vtep_mac: Some(mac.into()),
            vxlan_vni: None,
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            // The cluster records what the peer publishes, unless a test says otherwise.
            node_addresses: ip.parse().into_iter().collect(),
            created: None,
        }
    }

    fn good_b() -> PeerNode {
        peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24"],
        )
    }

    fn good_c() -> PeerNode {
        peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.3.0/24"],
        )
    }

    fn input(peers: Vec<PeerNode>) -> OverlayInput {
        OverlayInput {
            node: me(),
            vxlan: VxlanConfig::default(),
            underlay_mtu: 1500,
            peers: peers.iter().map(PeerNode::record).collect(),
            incumbents: BTreeMap::new(),
        }
    }

    fn plan(peers: Vec<PeerNode>) -> DesiredOverlay {
        plan_overlay(&input(peers)).unwrap()
    }

    fn reason_of(d: &DesiredOverlay, node: &str) -> RejectReason {
        d.rejected
            .iter()
            .find(|r| r.node == node)
            .unwrap_or_else(|| panic!("{node} not rejected: {:?}", d.rejected))
            .reason
            .clone()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_links_follow_flannel_layout() {
        let d = plan(vec![]);
        assert_eq!(d.bridge.name, "veilbr0");
        assert_eq!(d.bridge.mtu, 1450);
        assert_eq!(d.bridge.addresses, [net("10.244.1.1/24")].into());
        assert_eq!(d.bridge.mac, derive_bridge_mac("node-a"));
        assert_eq!(d.vxlan.link.name, "veilvx1");
        assert_eq!(d.vxlan.link.mtu, 1450);
        assert_eq!(d.vxlan.link.addresses, [net("10.244.1.0/32")].into());
        assert_eq!(d.vxlan.link.mac, derive_vtep_mac("node-a"));
        assert_eq!(d.vxlan.vni, 1);
        assert_eq!(d.vxlan.port, 8472);
        assert_eq!(d.vxlan.local, ip("192.168.50.1"));
        assert_eq!(d.vxlan.underlay_dev, "eth0");
        assert!(!d.vxlan.learning);
        assert_eq!(d.pod_mtu, 1450);
        assert!(d.routes.is_empty() && d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(
            d.managed_devices(),
            ["veilbr0".to_string(), "veilvx1".to_string()].into()
        );
    }

    #[test]
    fn valid_peer_gets_route_neighbour_and_fdb() {
        let d = plan(vec![good_b()]);
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(d.accepted, vec!["node-b".to_string()]);
        assert_eq!(
            d.routes,
            [RouteSpec {
                src: Some(ip("192.168.50.1")),
                ..RouteSpec::main(
                    net("10.244.2.0/24"),
                    Some(ip("10.244.2.0")),
                    "veilvx1",
                    true
                )
            }]
            .into()
        );
        assert_eq!(
            d.neighbours,
            [NeighSpec {
                dev: "veilvx1".into(),
                ip: ip("10.244.2.0"),
                mac: mac("02:00:00:00:00:0b"),
            }]
            .into()
        );
        assert_eq!(
            d.fdb,
            [FdbSpec {
                dev: "veilvx1".into(),
                mac: mac("02:00:00:00:00:0b"),
                dst: ip("192.168.50.2"),
            }]
            .into()
        );
    }

    #[test]
    fn dual_stack_peer_gets_a_route_and_neighbour_per_cidr_but_one_fdb() {
        let mut input = input(vec![peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24", "fd00:10:244:2::/64"],
        )]);
        input.node.pod_cidrs.push(net("fd00:10:244:1::/64"));
        let d = plan_overlay(&input).unwrap();
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(d.routes.len(), 2);
        assert_eq!(d.neighbours.len(), 2);
        assert_eq!(d.fdb.len(), 1);
        assert!(d.neighbours.iter().any(|n| n.ip == ip("fd00:10:244:2::")));
        assert_eq!(
            d.bridge.addresses,
            [net("10.244.1.1/24"), net("fd00:10:244:1::1/64")].into()
        );
        assert_eq!(
            d.vxlan.link.addresses,
            [net("10.244.1.0/32"), net("fd00:10:244:1::/128")].into()
        );
    }

    #[test]
    fn peer_with_missing_or_bad_annotations_is_rejected() {
        let mut no_ip = good_b();
        no_ip.underlay_ip = None;
        let mut bad_ip = good_c();
        bad_ip.underlay_ip = Some("300.1.1.1".into());
        let mut no_mac = peer("node-d", "192.168.50.4", "x", &["10.244.4.0/24"]);
        no_mac.vtep_mac = None;
        let bad_mac = peer(
            "node-e",
            "192.168.50.5",
            "02:00:00:00:00",
            &["10.244.5.0/24"],
        );
        let mcast_mac = peer(
            "node-f",
            "192.168.50.6",
            "01:00:00:00:00:0f",
            &["10.244.6.0/24"],
        );
        let d = plan(vec![no_ip, bad_ip, no_mac, bad_mac, mcast_mac]);
        assert!(d.accepted.is_empty());
        assert!(d.routes.is_empty() && d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(reason_of(&d, "node-b"), RejectReason::MissingUnderlayIp);
        assert!(matches!(
            reason_of(&d, "node-c"),
            RejectReason::InvalidUnderlayIp(_)
        ));
        assert_eq!(reason_of(&d, "node-d"), RejectReason::MissingVtepMac);
        assert!(matches!(
            reason_of(&d, "node-e"),
            RejectReason::InvalidVtepMac(_)
        ));
        assert!(matches!(
            reason_of(&d, "node-f"),
            RejectReason::InvalidVtepMac(_)
        ));
        let names: Vec<_> = d.rejected.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(names, ["node-b", "node-c", "node-d", "node-e", "node-f"]);
    }

    #[test]
    fn peer_with_missing_or_invalid_cidrs_is_rejected() {
        // Cluster-assigned CIDRs arrive typed (an unparsable `spec.podCIDR` is no CIDR at all,
        // see `podcidr::spec_cidrs`); what is left to refuse is none, host bits, too small.
        let none = peer("node-b", "192.168.50.2", "02:00:00:00:00:0b", &[]);
        let host_bits = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.244.4.9/24"],
        );
        let tiny = peer(
            "node-f",
            "192.168.50.6",
            "02:00:00:00:00:0f",
            &["10.244.6.0/31"],
        );
        let d = plan(vec![none, host_bits, tiny, good_c_renamed()]);
        assert_eq!(reason_of(&d, "node-b"), RejectReason::NoPodCidr);
        assert_eq!(
            reason_of(&d, "node-d"),
            RejectReason::PodCidrNotCanonical {
                cidr: net("10.244.4.9/24")
            }
        );
        assert!(matches!(
            reason_of(&d, "node-f"),
            RejectReason::PodCidrTooSmall { .. }
        ));
        // The one good peer is unaffected.
        assert_eq!(d.accepted, vec!["node-z".to_string()]);
        assert!(d.routes.iter().all(|r| r.dst == net("10.244.3.0/24")));
    }

    fn good_c_renamed() -> PeerNode {
        peer(
            "node-z",
            "192.168.50.26",
            "02:00:00:00:00:1a",
            &["10.244.3.0/24"],
        )
    }

    #[test]
    fn own_name_empty_name_and_duplicate_names_are_rejected() {
        let mut own = good_b();
        own.name = "node-a".into();
        let mut empty = good_c();
        empty.name = String::new();
        let dup1 = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.244.4.0/24"],
        );
        let dup2 = peer(
            "node-d",
            "192.168.50.5",
            "02:00:00:00:00:0e",
            &["10.244.5.0/24"],
        );
        let d = plan(vec![own, empty, dup1, dup2]);
        assert!(d.accepted.is_empty());
        assert_eq!(reason_of(&d, "node-a"), RejectReason::OwnName);
        assert_eq!(reason_of(&d, ""), RejectReason::EmptyName);
        let dups: Vec<_> = d.rejected.iter().filter(|r| r.node == "node-d").collect();
        assert_eq!(dups.len(), 2);
        assert!(dups.iter().all(|r| r.reason == RejectReason::DuplicateName));
    }

    #[test]
    fn cidr_overlapping_ours_is_rejected() {
        let same = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.1.0/24"],
        );
        let wider = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.0.0/16"],
        );
        let inside = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.244.1.128/25"],
        );
        let d = plan(vec![same, wider, inside]);
        assert!(d.accepted.is_empty());
        assert!(d.routes.is_empty());
        assert_eq!(
            reason_of(&d, "node-b"),
            RejectReason::OverlapsOurPodCidr {
                cidr: net("10.244.1.0/24"),
                ours: net("10.244.1.0/24")
            }
        );
        assert_eq!(
            reason_of(&d, "node-c"),
            RejectReason::OverlapsOurPodCidr {
                cidr: net("10.244.0.0/16"),
                ours: net("10.244.1.0/24")
            }
        );
        assert!(matches!(
            reason_of(&d, "node-d"),
            RejectReason::OverlapsOurPodCidr { .. }
        ));
    }

    #[test]
    fn of_overlapping_peers_the_junior_is_rejected_in_any_order() {
        let b = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24"],
        );
        let c = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.2.0/23"],
        );
        let d_ok = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.244.4.0/24"],
        );
        // No history, no creation times: the lower name holds.
        let forward = plan(vec![b.clone(), c.clone(), d_ok.clone()]);
        let backward = plan(vec![d_ok, c, b]);
        assert_eq!(forward, backward);
        assert_eq!(forward.accepted, vec!["node-b", "node-d"]);
        assert_eq!(
            reason_of(&forward, "node-c"),
            RejectReason::OverlapsPeer {
                cidr: net("10.244.2.0/23"),
                other_node: "node-b".into(),
                other_cidr: net("10.244.2.0/24"),
            }
        );
        assert!(!forward.routes.iter().any(|r| r.dst == net("10.244.2.0/23")));
        assert!(forward.routes.iter().any(|r| r.dst == net("10.244.2.0/24")));
    }

    #[test]
    fn a_node_claiming_a_held_pod_cidr_is_refused_and_the_holder_keeps_it() {
        // The victim holds its CIDR (the previous pass accepted it); the claimant is older and
        // has the lower name, and still loses: what this agent already routes does not move.
        let mut victim = peer(
            "node-v",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24"],
        );
        victim.created = Some(2000);
        let mut claimant = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.2.0/24"],
        );
        claimant.created = Some(1000);
        let mut i = input(vec![victim.clone(), claimant.clone()]);
        i.incumbents = plan(vec![victim.clone()])
            .peers
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let d = plan_overlay(&i).unwrap();
        assert_eq!(d.accepted, vec!["node-v"]);
        assert_eq!(
            reason_of(&d, "node-c"),
            RejectReason::OverlapsPeer {
                cidr: net("10.244.2.0/24"),
                other_node: "node-v".into(),
                other_cidr: net("10.244.2.0/24"),
            }
        );
        // After an agent restart (no history) the older Node object holds.
        let d = plan(vec![victim.clone(), claimant.clone()]);
        assert_eq!(d.accepted, vec!["node-c"]);
        // A wider claim by a newer Node cuts no one off either.
        let mut wide = peer(
            "node-0",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.244.2.0/23"],
        );
        wide.created = Some(3000);
        let d = plan(vec![victim, wide]);
        assert_eq!(d.accepted, vec!["node-v"]);
        assert!(matches!(
            reason_of(&d, "node-0"),
            RejectReason::OverlapsPeer { ref other_node, .. } if other_node == "node-v"
        ));
    }

    #[test]
    fn nested_overlaps_leave_no_two_accepted_peers_overlapping() {
        // A /16 enclosing two disjoint /24s: it conflicts with both, even though the /24s don't
        // overlap each other (a naive neighbour-only sweep would miss one of them).
        let mut big = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.10.0.0/16"],
        );
        let mut s1 = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.10.1.0/24"],
        );
        let mut s2 = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["10.10.2.0/24"],
        );
        // The /16 is the senior: both /24s are refused.
        let d = plan(vec![big.clone(), s1.clone(), s2.clone()]);
        assert_eq!(d.accepted, vec!["node-b"]);
        assert_eq!(d.rejected.len(), 2);
        // The /16 is the newest: it alone is refused.
        big.created = Some(3000);
        s1.created = Some(1000);
        s2.created = Some(2000);
        let d = plan(vec![big, s1, s2]);
        assert_eq!(d.accepted, vec!["node-c", "node-d"]);
        assert!(matches!(
            reason_of(&d, "node-b"),
            RejectReason::OverlapsPeer { .. }
        ));
    }

    #[test]
    fn identical_cidrs_conflict_but_families_do_not() {
        let b = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24"],
        );
        let c = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.2.0/24"],
        );
        let v6 = peer(
            "node-d",
            "192.168.50.4",
            "02:00:00:00:00:0d",
            &["fd00::/64"],
        );
        let d = plan(vec![b, c, v6]);
        // The same CIDR twice: the junior (by name here) is refused; another family is no clash.
        assert_eq!(d.accepted, vec!["node-b", "node-d"]);
        assert!(matches!(
            reason_of(&d, "node-c"),
            RejectReason::OverlapsPeer { ref other_node, .. } if other_node == "node-b"
        ));
    }

    #[test]
    fn a_peer_repeating_its_own_cidr_is_fine() {
        let b = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["10.244.2.0/24", "10.244.2.0/24"],
        );
        let d = plan(vec![b]);
        assert_eq!(d.accepted, vec!["node-b".to_string()]);
        assert_eq!(d.routes.len(), 1);
    }

    #[test]
    fn a_rejected_peers_valid_cidr_still_blocks_a_conflicting_one() {
        // node-b has no MAC yet but its CIDR is real: node-c's overlapping claim is suspect too.
        let mut b = good_b();
        b.vtep_mac = None;
        let c = peer(
            "node-c",
            "192.168.50.3",
            "02:00:00:00:00:0c",
            &["10.244.2.0/24"],
        );
        let d = plan(vec![b, c]);
        assert!(d.accepted.is_empty());
        assert_eq!(reason_of(&d, "node-b"), RejectReason::MissingVtepMac);
        assert!(matches!(
            reason_of(&d, "node-c"),
            RejectReason::OverlapsPeer { .. }
        ));
    }

    #[test]
    fn a_contested_value_stays_with_its_senior_holder_and_only_the_newcomer_is_refused() {
        let b = good_b();
        let mut c = good_c();
        c.vtep_mac = b.vtep_mac.clone();
        let mut e = peer(
            "node-e",
            "192.168.50.9",
            "02:00:00:00:00:0e",
            &["10.244.5.0/24"],
        );
        let mut f = peer(
            "node-f",
            "192.168.50.9",
            "02:00:00:00:00:0f",
            &["10.244.6.0/24"],
        );
        let g = peer(
            "node-g",
            "192.168.50.7",
            "02:00:00:00:00:07",
            &["10.244.7.0/24"],
        );
        // No history, no creation times: the lower name holds.
        let d = plan(vec![b.clone(), c.clone(), e.clone(), f.clone(), g.clone()]);
        assert_eq!(d.accepted, vec!["node-b", "node-c", "node-e", "node-g"]);
        assert_eq!(
            reason_of(&d, "node-f"),
            RejectReason::DuplicateUnderlayIp {
                ip: ip("192.168.50.9"),
                other_node: "node-e".into()
            }
        );
        // A shared VTEP MAC costs the newcomer its VXLAN path only (no FDB, no neighbours).
        let c_peer = d.peers.iter().find(|p| p.name == "node-c").unwrap();
        assert_eq!(
            c_peer.vxlan_unusable.as_deref(),
            Some("its VTEP MAC 02:00:00:00:00:0b is held by node node-b")
        );
        assert!(d
            .peers
            .iter()
            .find(|p| p.name == "node-b")
            .unwrap()
            .vxlan_unusable
            .is_none());
        assert_eq!(
            d.fdb
                .iter()
                .filter(|e| e.mac == mac("02:00:00:00:00:0b"))
                .count(),
            1
        );
        assert!(!d.routes.iter().any(|r| r.dst == net("10.244.3.0/24")));

        // The Node created first holds, whatever the names.
        e.created = Some(2000);
        f.created = Some(1000);
        let d = plan(vec![e.clone(), f.clone(), g.clone()]);
        assert_eq!(
            reason_of(&d, "node-e"),
            RejectReason::DuplicateUnderlayIp {
                ip: ip("192.168.50.9"),
                other_node: "node-f".into()
            }
        );

        // The binding this agent already uses beats both.
        let mut i = input(vec![e.clone(), f.clone(), g]);
        let previous = plan(vec![peer(
            "node-e",
            "192.168.50.9",
            "02:00:00:00:00:0e",
            &["10.244.5.0/24"],
        )]);
        i.incumbents = previous
            .peers
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let d = plan_overlay(&i).unwrap();
        assert!(
            d.accepted.contains(&"node-e".to_string()),
            "{:?}",
            d.rejected
        );
        assert!(matches!(
            reason_of(&d, "node-f"),
            RejectReason::DuplicateUnderlayIp { ref other_node, .. } if other_node == "node-e"
        ));
    }

    #[test]
    fn our_own_mac_or_underlay_in_a_peer_is_rejected() {
        let ours = derive_vtep_mac("node-a").to_string();
        let b = peer("node-b", "192.168.50.2", &ours, &["10.244.2.0/24"]);
        let c = peer(
            "node-c",
            "192.168.50.1",
            "02:00:00:00:00:0c",
            &["10.244.3.0/24"],
        );
        let d = plan(vec![b, c]);
        assert!(matches!(
            reason_of(&d, "node-b"),
            RejectReason::VtepMacIsOurs { .. }
        ));
        assert_eq!(
            reason_of(&d, "node-c"),
            RejectReason::UnderlayIpIsOurs {
                ip: ip("192.168.50.1")
            }
        );
    }

    #[test]
    fn underlay_family_must_match() {
        let b = peer("node-b", "fd00::2", "02:00:00:00:00:0b", &["10.244.2.0/24"]);
        let d = plan(vec![b]);
        assert!(matches!(
            reason_of(&d, "node-b"),
            RejectReason::UnderlayFamilyMismatch { .. }
        ));
    }

    #[test]
    fn vni_mismatch_or_garbage_is_rejected_absent_is_fine() {
        let mut b = good_b();
        b.vxlan_vni = Some("2".into());
        let mut c = good_c();
        c.vxlan_vni = Some("zero".into());
        let mut e = peer(
            "node-e",
            "192.168.50.5",
            "02:00:00:00:00:0e",
            &["10.244.5.0/24"],
        );
        e.vxlan_vni = Some("1".into());
        let f = peer(
            "node-f",
            "192.168.50.6",
            "02:00:00:00:00:0f",
            &["10.244.6.0/24"],
        );
        let d = plan(vec![b, c, e, f]);
        assert_eq!(
            reason_of(&d, "node-b"),
            RejectReason::VniMismatch { peer: 2, ours: 1 }
        );
        assert!(matches!(
            reason_of(&d, "node-c"),
            RejectReason::InvalidVni(_)
        ));
        assert_eq!(d.accepted, vec!["node-e".to_string(), "node-f".to_string()]);
    }

    #[test]
    fn cidr_covering_an_underlay_address_is_rejected() {
        // Would route the tunnel's own packets to 192.168.50.x into the tunnel.
        let b = peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            &["192.168.50.0/24"],
        );
        let c = peer(
            "node-c",
            "10.9.0.1",
            "02:00:00:00:00:0c",
            &["10.244.3.0/24"],
        );
        let e = peer(
            "node-e",
            "192.168.50.5",
            "02:00:00:00:00:0e",
            &["10.9.0.0/16"],
        );
        let d = plan(vec![b, c, e]);
        assert_eq!(
            reason_of(&d, "node-b"),
            RejectReason::ContainsUnderlayIp {
                cidr: net("192.168.50.0/24"),
                ip: ip("192.168.50.1"),
            }
        );
        assert_eq!(
            reason_of(&d, "node-e"),
            RejectReason::ContainsUnderlayIp {
                cidr: net("10.9.0.0/16"),
                ip: ip("10.9.0.1"),
            }
        );
        assert_eq!(d.accepted, vec!["node-c".to_string()]);
    }

    #[test]
    fn first_fault_is_reported() {
        let mut b = peer("node-b", "bad", "bad", &[]);
        b.vxlan_vni = Some("bad".into());
        let d = plan(vec![b]);
        assert!(matches!(
            reason_of(&d, "node-b"),
            RejectReason::InvalidUnderlayIp(_)
        ));
        let msg = reason_of(&d, "node-b").to_string();
        assert!(msg.contains(annotations::UNDERLAY_IP), "{msg}");
    }

    #[test]
    fn output_is_independent_of_peer_order() {
        let peers = vec![
            good_b(),
            good_c(),
            peer(
                "node-d",
                "192.168.50.4",
                "02:00:00:00:00:0d",
                &["10.244.3.0/24"],
            ),
            peer(
                "node-e",
                "192.168.50.2",
                "02:00:00:00:00:0e",
                &["10.244.5.0/24"],
            ),
            peer(
                "node-f",
                "192.168.50.6",
                "02:00:00:00:00:0f",
                &["10.244.6.0/24"],
            ),
        ];
        let reference = plan(peers.clone());
        let mut rotated = peers.clone();
        for _ in 0..peers.len() {
            rotated.rotate_left(1);
            assert_eq!(plan(rotated.clone()), reference);
        }
        let mut reversed = peers;
        reversed.reverse();
        assert_eq!(plan(reversed), reference);
        // node-e's underlay address is node-b's (senior by name); node-c and node-d overlap, and
        // node-c is the senior by name.
        assert_eq!(reference.accepted, vec!["node-b", "node-c", "node-f"]);
    }

    #[test]
    fn no_accepted_route_ever_overlaps_another_or_ours() {
        // A deterministic pseudo-random mess of peers: whatever gets accepted must be sane.
        let mut peers = Vec::new();
        let mut seed: u32 = 12345;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed >> 8
        };
        for i in 0..200 {
            let third = next() % 256;
            let prefix = [20, 23, 24, 24, 24, 25][(next() % 6) as usize];
            let cidr = net(&format!("10.{}.{third}.0/{prefix}", 240 + next() % 8)).trunc();
            peers.push(peer(
                &format!("n{i}"),
                &format!("192.168.{}.{}", next() % 4, 1 + next() % 200),
                &format!("02:00:00:00:{:02x}:{:02x}", next() % 4, next() % 256),
                &[&cidr.to_string()],
            ));
        }
        let d = plan(peers);
        eprintln!(
            "accepted {} rejected {}",
            d.accepted.len(),
            d.rejected.len()
        );
        // Both outcomes must actually occur for this test to mean anything.
        assert!(d.accepted.len() > 50, "{}", d.accepted.len());
        assert!(d.rejected.len() > 10, "{}", d.rejected.len());
        assert_eq!(d.accepted.len() + d.rejected.len(), 200);
        let dsts: Vec<IpNet> = d.routes.iter().map(|r| r.dst).collect();
        for (i, a) in dsts.iter().enumerate() {
            assert!(!a.contains(&net("10.244.1.0/24")) && !net("10.244.1.0/24").contains(a));
            for b in &dsts[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
        let macs: BTreeSet<_> = d.fdb.iter().map(|f| f.mac).collect();
        let dsts: BTreeSet<_> = d.fdb.iter().map(|f| f.dst).collect();
        assert_eq!(macs.len(), d.fdb.len());
        assert_eq!(dsts.len(), d.fdb.len());
    }

    #[test]
    fn own_settings_are_validated() {
        let err = |f: &dyn Fn(&mut OverlayInput)| {
            let mut i = input(vec![]);
            f(&mut i);
            plan_overlay(&i).unwrap_err()
        };
        assert!(matches!(
            err(&|i| i.node.pod_cidrs.clear()),
            OverlayError::NoPodCidr { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.pod_cidrs = vec![net("10.244.1.5/24")]),
            OverlayError::PodCidrNotCanonical { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.pod_cidrs = vec![net("10.244.1.0/31")]),
            OverlayError::PodCidrTooSmall { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.pod_cidrs = vec![net("10.244.0.0/16"), net("10.244.1.0/24")]),
            OverlayError::PodCidrsOverlap { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.pod_cidrs = vec![net("192.168.0.0/16")]),
            OverlayError::PodCidrContainsUnderlay { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.underlay_ip = ip("0.0.0.0")),
            OverlayError::BadUnderlayIp { .. }
        ));
        assert!(matches!(
            err(&|i| i.node.underlay_dev.clear()),
            OverlayError::NoUnderlayDevice
        ));
        assert!(matches!(
            err(&|i| i.node.vtep_mac = Some(mac("01:00:00:00:00:01"))),
            OverlayError::BadVtepMac { .. }
        ));
        assert!(matches!(
            err(&|i| i.vxlan.vni = 0),
            OverlayError::BadVni { .. }
        ));
        assert!(matches!(
            err(&|i| i.vxlan.vni = MAX_VNI + 1),
            OverlayError::BadVni { .. }
        ));
        assert!(matches!(err(&|i| i.vxlan.port = 0), OverlayError::BadPort));
        assert!(matches!(
            err(&|i| i.vxlan.bridge_name = "a-very-long-bridge-name".into()),
            OverlayError::BadDeviceName { .. }
        ));
        assert!(matches!(
            err(&|i| i.vxlan.vxlan_name = Some("bad/name".into())),
            OverlayError::BadDeviceName { .. }
        ));
        assert!(matches!(
            err(&|i| i.vxlan.vxlan_name = Some("veilbr0".into())),
            OverlayError::DeviceNameClash { .. }
        ));
        assert!(matches!(
            err(&|i| i.underlay_mtu = 1300),
            OverlayError::Mtu(_)
        ));
    }

    #[test]
    fn largest_vni_name_fits_ifnamsiz_and_v6_underlay_costs_more() {
        let mut i = input(vec![]);
        i.vxlan.vni = MAX_VNI;
        let d = plan_overlay(&i).unwrap();
        assert_eq!(d.vxlan.link.name, "veilvx16777215");
        assert!(d.vxlan.link.name.len() <= MAX_IFNAME_LEN);

        let mut i = input(vec![]);
        i.node.underlay_ip = ip("fd00:50::1");
        assert_eq!(plan_overlay(&i).unwrap().pod_mtu, 1430);
    }

    #[test]
    fn explicit_vtep_mac_wins_over_derived() {
        let mut i = input(vec![]);
        i.node.vtep_mac = Some(mac("02:11:22:33:44:55"));
        assert_eq!(
            plan_overlay(&i).unwrap().vxlan.link.mac,
            mac("02:11:22:33:44:55")
        );
    }

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(gateway_address(&net("10.244.1.0/24")), ip("10.244.1.1"));
        assert_eq!(gateway_address(&net("fd00::/64")), ip("fd00::1"));
    }
}
