//! Which device each destination leaves on, once every peer's path is known (pure).
//!
//! Three kinds of destination matter, and each follows the path of its pair (WireGuard, VXLAN,
//! blocked; see [`super::encryption`]):
//! - **a peer's pod CIDRs** (main table): over VXLAN via the peer's VTEP, or into the WireGuard
//!   TUN; a blocked peer's CIDRs get no route of their own;
//! - **the cluster CIDR** (main table): a fallback into the TUN, whose datapath drops what no peer
//!   owns, so a pod packet to a blocked, unknown or not-yet-handshaken peer is dropped, never sent
//!   in plaintext by the default route;
//! - **a peer's node address** ([`POD_TO_NODE_TABLE`], looked up only for packets *from this
//!   node's pod CIDRs*): pods reach other nodes' host networks (kubelets, hostNetwork pods, a
//!   control plane's API server) inside the pair's path, and a blocked pair's node address leads
//!   into the TUN (dropped). Host-to-host traffic and the tunnels' own UDP packets come from the
//!   node's address, never from a pod CIDR, so they keep using the underlay.
//!
//! Every main-table route carries the node's underlay address as preferred source, so traffic
//! that the node's host network sends to remote pods carries the node's real address on every
//! path: the peer's WireGuard datapath accepts it (its allowed IPs hold our node address, taken
//! from the cluster's Node record like our pod CIDRs), replies find their way back through the
//! rule above, and NetworkPolicy `ipBlock`s see the node as it is.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::encryption::{Path, PeerPath};
use super::overlay::{AcceptedPeer, RouteSpec, RuleSpec, MAIN_TABLE, POD_TO_NODE_TABLE};

/// Priority of the rule sending pod-sourced packets to [`POD_TO_NODE_TABLE`]: after the local
/// table (0), before main (32766).
pub const POD_TO_NODE_RULE_PRIORITY: u32 = 86;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingInput<'a> {
    pub underlay_ip: IpAddr,
    pub pod_cidrs: &'a [IpNet],
    pub cluster_cidr: IpNet,
    pub vxlan_dev: &'a str,
    pub wg_dev: &'a str,
    /// Validated peers (the overlay planner's output).
    pub peers: &'a [AcceptedPeer],
    /// The path of each of those peers; a peer without one carries no traffic.
    pub paths: &'a [PeerPath],
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub routes: BTreeSet<RouteSpec>,
    pub rules: BTreeSet<RuleSpec>,
}

/// The host address of `ip` as a one-address network.
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// What the peer's WireGuard datapath entry may carry, both ways: its pod CIDRs and its node
/// address (both from the cluster's records, never from the peer's claims).
pub fn wireguard_allowed_ips(peer: &AcceptedPeer) -> Vec<IpNet> {
    let mut out = peer.pod_cidrs.clone();
    out.push(host_net(peer.underlay_ip));
    out
}

pub fn plan_routing(input: &RoutingInput<'_>) -> Routing {
    let mut routing = Routing::default();
    let src = Some(input.underlay_ip);
    let main = |dst: IpNet, via: Option<IpAddr>, dev: &str, onlink: bool| RouteSpec {
        src,
        ..RouteSpec::main(dst, via, dev, onlink)
    };
    let to_node = |dst: IpNet, via: Option<IpAddr>, dev: &str, onlink: bool| RouteSpec {
        table: POD_TO_NODE_TABLE,
        ..RouteSpec::main(dst, via, dev, onlink)
    };
    let path_of = PeerPath::by_node(input.paths);
    for peer in input.peers {
        let Some(path) = path_of.get(peer.name.as_str()) else {
            continue;
        };
        let node = host_net(peer.underlay_ip);
        match &path.path {
            Path::Vxlan => {
                for cidr in &peer.pod_cidrs {
                    let next_hop = cidr.network();
                    routing
                        .routes
                        .insert(main(*cidr, Some(next_hop), input.vxlan_dev, true));
                }
                // Through the peer's VTEP: the neighbour entry of its pod CIDR of the node
                // address's family. Without one the node address is not reachable over VXLAN.
                let vtep = peer
                    .pod_cidrs
                    .iter()
                    .find(|c| c.addr().is_ipv4() == peer.underlay_ip.is_ipv4())
                    .map(IpNet::network);
                routing.routes.insert(match vtep {
                    Some(next_hop) => to_node(node, Some(next_hop), input.vxlan_dev, true),
                    None => to_node(node, None, input.wg_dev, false),
                });
            }
            Path::Wireguard { .. } => {
                for cidr in &peer.pod_cidrs {
                    routing
                        .routes
                        .insert(main(*cidr, None, input.wg_dev, false));
                }
                routing
                    .routes
                    .insert(to_node(node, None, input.wg_dev, false));
            }
            // Into the TUN, whose datapath has no peer for it: dropped, never plaintext.
            Path::Blocked(_) => {
                routing
                    .routes
                    .insert(to_node(node, None, input.wg_dev, false));
            }
        }
    }
    routing
        .routes
        .insert(main(input.cluster_cidr, None, input.wg_dev, false));
    routing.rules = input
        .pod_cidrs
        .iter()
        .map(|cidr| RuleSpec {
            priority: POD_TO_NODE_RULE_PRIORITY,
            src: *cidr,
            table: POD_TO_NODE_TABLE,
        })
        .collect();
    debug_assert!(routing
        .routes
        .iter()
        .all(|r| r.table == MAIN_TABLE || r.table == POD_TO_NODE_TABLE));
    routing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::encryption::{BlockReason, Mode};
    use crate::model::MacAddr;

    fn peer(name: &str, ip: &str, cidr: &str) -> AcceptedPeer {
        AcceptedPeer {
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            vtep_mac: MacAddr([0x06, 0, 0, 0, 0, 2]),
            pod_cidrs: vec![cidr.parse().unwrap()],
            vxlan_unusable: None,
        }
    }

    fn path(node: &str, path: Path) -> PeerPath {
        PeerPath {
            node: node.into(),
            mode: Some(Mode::On),
            path,
            refused_downgrade: false,
        }
    }

    fn wg() -> Path {
        Path::Wireguard {
            public_key: [1; 32],
            endpoint: "172.30.0.12:51820".parse().unwrap(),
        }
    }

    fn plan(peers: &[AcceptedPeer], paths: &[PeerPath]) -> Vec<String> {
        let own: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        let r = plan_routing(&RoutingInput {
            underlay_ip: "172.30.0.11".parse().unwrap(),
            pod_cidrs: &own,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            vxlan_dev: "veilvx1",
            wg_dev: "veilwg0",
            peers,
            paths,
        });
        assert_eq!(
            r.rules,
            BTreeSet::from([RuleSpec {
                priority: 86,
                src: own[0],
                table: 86
            }])
        );
        r.routes
            .iter()
            .map(|r| {
                format!(
                    "{} {:?} {} {} {:?} {}",
                    r.dst, r.via, r.dev, r.onlink, r.src, r.table
                )
            })
            .collect()
    }

    #[test]
    fn each_destination_follows_its_pairs_path() {
        let peers = [
            peer("b", "172.30.0.12", "10.244.2.0/24"),
            peer("c", "172.30.0.13", "10.244.3.0/24"),
            peer("d", "172.30.0.14", "10.244.4.0/24"),
        ];
        let paths = [
            path("b", wg()),
            path("c", Path::Vxlan),
            path("d", Path::Blocked(BlockReason::WeAreStrict)),
        ];
        let src = "Some(172.30.0.11)";
        assert_eq!(
            plan(&peers, &paths),
            vec![
                format!("10.244.0.0/16 None veilwg0 false {src} 254"),
                format!("10.244.2.0/24 None veilwg0 false {src} 254"),
                format!("10.244.3.0/24 Some(10.244.3.0) veilvx1 true {src} 254"),
                "172.30.0.12/32 None veilwg0 false None 86".to_string(),
                "172.30.0.13/32 Some(10.244.3.0) veilvx1 true None 86".to_string(),
                // Blocked: its pod CIDR has no route (the fallback drops it), its node address
                // goes into the TUN, which drops it too.
                "172.30.0.14/32 None veilwg0 false None 86".to_string(),
            ]
        );
    }

    #[test]
    fn a_peer_without_a_path_gets_nothing_but_the_fallback_still_stands() {
        let peers = [peer("b", "172.30.0.12", "10.244.2.0/24")];
        assert_eq!(
            plan(&peers, &[]),
            vec!["10.244.0.0/16 None veilwg0 false Some(172.30.0.11) 254".to_string()]
        );
    }

    #[test]
    fn wireguard_allows_the_pod_cidrs_and_the_node_address() {
        let p = peer("b", "172.30.0.12", "10.244.2.0/24");
        assert_eq!(
            wireguard_allowed_ips(&p),
            vec![
                "10.244.2.0/24".parse::<IpNet>().unwrap(),
                "172.30.0.12/32".parse().unwrap()
            ]
        );
    }
}
