//! In-memory datapath tests: two devices' states wired by a simulated network, exercising the
//! real per-packet steps (egress, ingress, drain, timers) without TUN, sockets or root.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use super::egress::{self, EgressDrop, TxBatches};
use super::ingress::{self, IngressDrop, Step};
use super::keys::{self, PublicKey, StaticSecret};
use super::rotation;
use super::state::State;
use super::*;
use std::sync::Arc;

const MARKER: &[u8] = b"VEILNET-PLAINTEXT-MARKER";

/// Two nodes and the wire between them.
struct Net {
    nodes: [State; 2],
    keys: [StaticSecret; 2],
    addrs: [SocketAddr; 2],
    /// Packets each node wrote to its TUN.
    tun_out: [Vec<Vec<u8>>; 2],
    /// Datagrams in flight: (destination node, source address, bytes).
    wire: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    /// Every datagram ever put on the wire.
    log: Vec<Vec<u8>>,
    /// When false, datagrams are recorded but not delivered.
    deliver: bool,
}

fn node_net(i: usize) -> &'static str {
    ["10.1.0.0/24", "10.2.0.0/24"][i]
}

fn peer_cfg(key: PublicKey, ep: SocketAddr, net: &str) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: ep,
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: None,
    }
}

impl Net {
    fn new() -> Net {
        let keys = [keys::generate(), keys::generate()];
        let addrs: [SocketAddr; 2] = [
            "192.0.2.1:51820".parse().unwrap(),
            "192.0.2.2:51820".parse().unwrap(),
        ];
        let nodes = [State::new(keys[0].clone()), State::new(keys[1].clone())];
        let net = Net {
            nodes,
            keys,
            addrs,
            tun_out: [Vec::new(), Vec::new()],
            wire: VecDeque::new(),
            log: Vec::new(),
            deliver: true,
        };
        for i in 0..2 {
            let j = 1 - i;
            net.nodes[i]
                .set_peers(&[peer_cfg(net.public(j), net.addrs[j], node_net(j))])
                .unwrap();
        }
        net
    }

    fn public(&self, i: usize) -> PublicKey {
        keys::public_key(&self.keys[i])
    }

    /// Queues a datagram for its node; one to an address that is no node (a test's flooder)
    /// is only logged.
    fn put_on_wire(&mut self, from: usize, to: SocketAddr, datagram: &[u8]) {
        self.log.push(datagram.to_vec());
        if let Some(dst) = self.addrs.iter().position(|a| *a == to) {
            self.wire
                .push_back((dst, self.addrs[from], datagram.to_vec()));
        }
    }

    /// Node `i` reads `packet` from its TUN.
    fn tun_read(&mut self, i: usize, packet: &[u8]) -> Result<(), EgressDrop> {
        let mut batches = TxBatches::default();
        let result =
            egress::encapsulate_segments(&self.nodes[i], std::iter::once(packet), &mut batches);
        let mut sends = Vec::new();
        for b in &batches.batches {
            egress::account_send(&self.nodes[i], &b.peer, b.data().len(), &Ok(()));
            let mut offset = 0;
            for &len in &b.lens {
                sends.push((b.to, b.data()[offset..offset + len].to_vec()));
                offset += len;
            }
        }
        for (to, d) in sends {
            self.put_on_wire(i, to, &d);
        }
        result
    }

    /// Node `i` receives one datagram; returns what ingress decided (as a summary).
    fn receive(&mut self, i: usize, from: SocketAddr, datagram: &[u8]) -> Option<IngressDrop> {
        let mut out = vec![0u8; MAX_PACKET + 64];
        let mut replies = Vec::new();
        let mut dropped = None;
        match ingress::handle(&self.nodes[i], from, datagram, &mut out) {
            Step::ToTun(p) => self.tun_out[i].push(p.to_vec()),
            Step::ToNetwork {
                to,
                datagram,
                drain,
            } => {
                replies.push((to, datagram.to_vec()));
                if let Some(peer) = drain {
                    while let Some((to, d)) = ingress::next_queued(&peer, &mut out) {
                        replies.push((to, d.to_vec()));
                    }
                }
            }
            Step::Consumed => {}
            Step::Dropped(why) => dropped = Some(why),
        }
        for (to, d) in replies {
            self.put_on_wire(i, to, &d);
        }
        dropped
    }

    /// Delivers everything in flight, including what the deliveries cause.
    fn run(&mut self) -> Vec<IngressDrop> {
        let mut drops = Vec::new();
        while let Some((dst, from, d)) = self.wire.pop_front() {
            if !self.deliver {
                continue;
            }
            if let Some(why) = self.receive(dst, from, &d) {
                drops.push(why);
            }
        }
        drops
    }

    /// Node `i` sends the handshakes and keepalives it was asked for (what its timer loop does).
    fn send_requested(&mut self, i: usize) {
        let mut out = vec![0u8; 256];
        let mut sends = Vec::new();
        super::timers::for_each_requested(&self.nodes[i], &mut out, |peer, d| {
            sends.push((peer.endpoint(), d.to_vec()))
        });
        for (to, d) in sends {
            self.put_on_wire(i, to, &d);
        }
    }

    fn stats(&self, i: usize) -> PeerStats {
        let s = self.nodes[i].stats();
        assert_eq!(s.len(), 1);
        s.into_iter().next().unwrap()
    }
}

/// A minimal IPv4/UDP packet carrying the marker (Tunn checks version and length only).
fn ipv4(src: &str, dst: &str, payload_len: usize) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let total = 28 + payload_len.max(MARKER.len());
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[28..28 + MARKER.len()].copy_from_slice(MARKER);
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_plaintext(net: &Net) {
    for d in &net.log {
        assert!(!contains(d, MARKER), "plaintext on the wire: {d:?}");
        assert!(matches!(d[0], 1..=4), "not a WireGuard message");
    }
}

#[test]
fn handshake_then_data_both_ways() {
    let mut net = Net::new();
    let p = ipv4("10.1.0.5", "10.2.0.7", 100);
    net.tun_read(0, &p).unwrap();
    // Without a session the packet is held back; only a handshake initiation goes out.
    assert_eq!(net.log.len(), 1);
    assert_eq!(net.log[0][0], MESSAGE_HANDSHAKE_INIT);
    assert_eq!(net.stats(0).dropped_no_session, 1);
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[1], vec![p.clone()], "queued packet released");
    // B answers over the established session.
    let reply = ipv4("10.2.0.7", "10.1.0.5", 1400);
    net.tun_read(1, &reply).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[0], vec![reply]);
    assert_no_plaintext(&net);

    let a = net.stats(0);
    assert_eq!(a.public_key, net.public(1));
    assert_eq!((a.tx_packets, a.rx_packets), (1, 1));
    assert!(a.last_handshake.is_some() && a.last_handshake_age.is_some());
    assert!(a.tx_bytes > 0 && a.rx_bytes > 0);
    assert_eq!(a.handshakes_sent, 1);
    let b = net.stats(1);
    assert_eq!((b.tx_packets, b.rx_packets), (1, 1));
    assert_eq!(b.handshakes_sent, 0);
    // B learned A's address from the authenticated handshake.
    assert_eq!(b.endpoint, net.addrs[0]);
}

#[test]
fn many_queued_packets_are_all_released_after_the_handshake() {
    let mut net = Net::new();
    for n in 0..10 {
        net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 50 + n))
            .unwrap();
    }
    // One initiation, nine more packets queued behind it.
    assert_eq!(net.log.len(), 1);
    net.run();
    assert_eq!(net.tun_out[1].len(), 10);
    assert_no_plaintext(&net);
}

#[test]
fn packets_without_a_peer_are_dropped_not_sent() {
    let mut net = Net::new();
    assert_eq!(
        net.tun_read(0, &ipv4("10.1.0.5", "10.9.0.1", 10)),
        Err(EgressDrop::NoPeer)
    );
    assert_eq!(net.tun_read(0, &[0x60]), Err(EgressDrop::NotIp));
    assert_eq!(net.tun_read(0, &[]), Err(EgressDrop::NotIp));
    assert!(net.log.is_empty());
    let d = net.nodes[0].device_stats();
    assert_eq!((d.dropped_no_peer, d.dropped_not_ip), (1, 2));
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.run();
    // A (or anyone holding A's key) sends with a source that belongs to nobody / to B itself.
    for spoofed in ["10.3.0.1", "10.2.0.99"] {
        net.tun_read(0, &ipv4(spoofed, "10.2.0.7", 10)).unwrap();
        assert_eq!(net.run(), vec![IngressDrop::NotAllowed]);
    }
    assert_eq!(
        net.tun_out[1].len(),
        1,
        "only the legitimate packet arrived"
    );
    assert_eq!(net.stats(1).dropped_not_allowed, 2);
}

#[test]
fn updating_a_peer_without_key_change_keeps_the_session() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.run();
    let before = net.stats(0).handshakes_sent;
    // B gets a wider allowed range and keepalive for A; A sees B's endpoint unchanged.
    let mut cfg = peer_cfg(net.public(0), net.addrs[0], "10.1.0.0/16");
    cfg.persistent_keepalive = Some(25);
    let ch = net.nodes[1].set_peers(&[cfg]).unwrap();
    assert_eq!(ch.updated, vec![net.public(0)]);
    // Source 10.1.200.1 is now allowed, and no new handshake happened.
    net.tun_read(0, &ipv4("10.1.200.1", "10.2.0.7", 10))
        .unwrap();
    assert_eq!(net.log.last().unwrap()[0], MESSAGE_DATA);
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[1].len(), 2);
    assert_eq!(net.stats(0).handshakes_sent, before);
    assert_eq!(net.stats(1).persistent_keepalive, Some(25));
    // Setting the same list again is a no-op.
    let mut cfg = peer_cfg(net.public(0), net.addrs[0], "10.1.0.0/16");
    cfg.persistent_keepalive = Some(25);
    let ch = net.nodes[1].set_peers(&[cfg]).unwrap();
    assert!(ch.is_empty());
    assert_eq!(ch.unchanged, 1);
}

#[test]
fn removed_peer_gets_nothing_and_readding_works() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.run();
    let ch = net.nodes[0].set_peers(&[]).unwrap();
    assert_eq!(ch.removed, vec![net.public(1)]);
    assert_eq!(
        net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)),
        Err(EgressDrop::NoPeer)
    );
    // B still has a session and sends; A no longer knows the index.
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert_eq!(net.run(), vec![IngressDrop::UnknownPeer]);
    assert!(net.tun_out[0].is_empty());
    // Re-adding creates a fresh tunnel; traffic flows again after a new handshake.
    let (pb, ab) = (net.public(1), net.addrs[1]);
    net.nodes[0]
        .set_peers(&[peer_cfg(pb, ab, node_net(1))])
        .unwrap();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    assert_eq!(net.log.last().unwrap()[0], MESSAGE_HANDSHAKE_INIT);
    net.run();
    assert_eq!(net.tun_out[1].len(), 2);
}

impl Net {
    /// Node `i` rotates its private key.
    fn rotate(&mut self, i: usize) {
        let new_key = keys::generate();
        self.nodes[i].set_private_key(new_key.clone());
        self.keys[i] = new_key;
        assert_eq!(self.nodes[i].public_key(), self.public(i));
    }

    /// Node `i` is told the other node's current key (what its agent does on the annotation).
    fn learn_key(&mut self, i: usize) -> PeerChanges {
        let j = 1 - i;
        self.nodes[i]
            .set_peers(&[peer_cfg(self.public(j), self.addrs[j], node_net(j))])
            .unwrap()
    }

    /// One packet each way, both left on the wire; returns how many were sent.
    fn both_ways(&mut self) -> usize {
        self.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
        self.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
        2
    }

    fn delivered(&self) -> usize {
        self.tun_out[0].len() + self.tun_out[1].len()
    }

    /// Whether node `i`'s current tunnel to the other node has its own session.
    fn has_own_session(&self, i: usize) -> bool {
        let table = self.nodes[i].table();
        table.by_key.values().next().unwrap().has_session()
    }

    fn retired(&self, i: usize) -> usize {
        self.nodes[i].table().retired.len()
    }
}

/// The receiver index a data message is addressed to (our local index << 8 | session).
fn receiver_index(datagram: &[u8]) -> u32 {
    u32::from_le_bytes(datagram[4..8].try_into().unwrap())
}

#[test]
fn a_key_rotation_loses_no_packet_in_either_direction() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    assert!(net.run().is_empty());
    let mut sent = 1 + net.both_ways();
    let old_index_at_b = receiver_index(&net.wire[0].2) >> 8;
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
    // A rotates. B does not know the new key yet: both keep using the old session.
    net.rotate(0);
    assert_eq!(net.retired(0), 1);
    sent += net.both_ways();
    assert!(
        net.log.iter().rev().take(2).all(|d| d[0] == MESSAGE_DATA),
        "data, not a handshake B could not answer"
    );
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
    // B learns A's new key: the old tunnel is kept behind the new one, which handshakes at
    // once. Traffic sent before that handshake completes still rides the old session.
    let ch = net.learn_key(1);
    assert_eq!((ch.added.len(), ch.removed.len()), (1, 1));
    assert_eq!(net.retired(1), 1);
    assert!(net.stats(0).on_previous_key && net.stats(1).on_previous_key);
    net.send_requested(1);
    assert_eq!(net.wire.back().unwrap().2[0], MESSAGE_HANDSHAKE_INIT);
    sent += net.both_ways();
    assert!(net.run().is_empty(), "nothing dropped during the switch");
    assert_eq!(net.delivered(), sent);
    // The handshake is done (B's confirming keepalive reached A): both send on the new session.
    assert!(net.has_own_session(0) && net.has_own_session(1));
    sent += net.both_ways();
    let to_b = net.log.iter().rev().nth(1).unwrap().clone();
    assert_ne!(
        receiver_index(&to_b) >> 8,
        old_index_at_b,
        "A sends to B's new tunnel"
    );
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
    assert_eq!(net.stats(0).public_key, net.public(1));
    assert!(net.stats(0).last_handshake.is_some());
    assert!(!net.stats(0).on_previous_key && !net.stats(1).on_previous_key);
    assert_no_plaintext(&net);
}

#[test]
fn a_retired_tunnel_still_receives_what_was_sent_before_the_switch() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    net.rotate(0);
    // A sends on the old session; the datagram is delayed past the whole switch.
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    let late = net.wire.pop_back().unwrap();
    net.learn_key(1);
    net.send_requested(1);
    assert!(net.run().is_empty());
    assert!(net.has_own_session(0) && net.has_own_session(1));
    net.wire.push_back(late);
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[1].len(), 2, "the late packet was accepted");
}

#[test]
fn the_old_key_gets_no_new_session_after_a_rotation() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    net.rotate(0);
    // B, not yet told, initiates to A's old key (its rekey timer would): A refuses it.
    let mut out = vec![0u8; 256];
    let peer = net.nodes[1].table().by_key.values().next().unwrap().clone();
    let init = match peer.tunn().format_handshake_initiation(&mut out, true) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    let before = net.nodes[0].device_stats().rx_invalid;
    assert_eq!(
        net.receive(0, net.addrs[1], &init),
        Some(IngressDrop::Invalid)
    );
    assert_eq!(net.nodes[0].device_stats().rx_invalid, before + 1);
    assert!(net.wire.is_empty(), "no response");
    // The old session itself still works.
    let sent = net.delivered() + net.both_ways();
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
}

#[test]
fn a_lost_handshake_with_the_new_key_leaves_traffic_on_the_old_session() {
    let mut net = Net::new();
    let mut sent = net.both_ways();
    net.run();
    net.rotate(0);
    net.learn_key(1);
    net.send_requested(1);
    net.wire.clear(); // the initiation is lost
    for _ in 0..3 {
        sent += net.both_ways();
        assert!(net.run().is_empty());
    }
    assert_eq!(net.delivered(), sent);
    assert!(!net.has_own_session(0) && !net.has_own_session(1));
}

#[test]
fn both_nodes_rotating_at_once_lose_nothing() {
    let mut net = Net::new();
    let mut sent = net.both_ways();
    net.run();
    net.rotate(0);
    net.rotate(1);
    sent += net.both_ways();
    assert!(net.run().is_empty());
    // B learns first: its initiation (from its new key to A's new one) is refused by A, which
    // does not know B's new key yet; the old session carries on.
    net.learn_key(1);
    net.send_requested(1);
    sent += net.both_ways();
    net.run();
    assert_eq!(net.delivered(), sent);
    // Then A learns: its handshake goes through and both switch.
    net.learn_key(0);
    net.send_requested(0);
    sent += net.both_ways();
    assert!(net.run().is_empty());
    assert!(net.has_own_session(0) && net.has_own_session(1));
    sent += net.both_ways();
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
    assert_no_plaintext(&net);
}

#[test]
fn a_retirement_ends_and_its_index_is_forgotten() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    net.rotate(0);
    let retired_index = net.nodes[0]
        .table()
        .retired
        .values()
        .next()
        .unwrap()
        .peer
        .index;
    // Not over yet: no session on the successor, the old one young.
    let now = net.nodes[0].now_ms();
    net.nodes[0].end_retirements(now);
    assert_eq!(net.retired(0), 1);
    // Past the longest retirement.
    let late = now + rotation::OWN_KEY_PATIENCE.as_millis() as u64;
    net.nodes[0].end_retirements(late);
    assert_eq!(net.retired(0), 0);
    assert!(!net.nodes[0].table().by_index.contains_key(&retired_index));
    // B, still on the old session, is no longer heard (break after make: B learns the key
    // and handshakes).
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert_eq!(net.run(), vec![IngressDrop::UnknownPeer]);
    net.learn_key(1);
    net.send_requested(1);
    assert!(net.run().is_empty());
    let sent = net.delivered() + net.both_ways();
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
}

#[test]
fn a_wrong_new_key_gets_no_session_and_the_old_one_ends_after_its_patience() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    // B is told a key for A that nobody holds (a bad annotation), with A's endpoint and range.
    let wrong = keys::public_key(&keys::generate());
    net.nodes[1]
        .set_peers(&[peer_cfg(wrong, net.addrs[0], node_net(0))])
        .unwrap();
    net.send_requested(1);
    assert_eq!(
        net.run(),
        vec![IngressDrop::Invalid],
        "A refuses the handshake"
    );
    // Traffic still goes to the node that holds the old key, and is reported as such.
    let sent = net.delivered() + net.both_ways();
    assert!(net.run().is_empty());
    assert_eq!(net.delivered(), sent);
    let st = net.stats(1);
    assert!(st.on_previous_key && st.last_handshake.is_none(), "{st:?}");
    // Not for longer than the patience for a peer's key.
    let now = net.nodes[1].now_ms();
    net.nodes[1].end_retirements(now + rotation::PEER_KEY_PATIENCE.as_millis() as u64 - 1000);
    assert_eq!(net.retired(1), 1);
    net.nodes[1].end_retirements(now + rotation::PEER_KEY_PATIENCE.as_millis() as u64);
    assert_eq!(net.retired(1), 0);
    assert!(!net.stats(1).on_previous_key);
    let (before, logged) = (net.delivered(), net.log.len());
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert!(
        net.log[logged..]
            .iter()
            .all(|d| d[0] == MESSAGE_HANDSHAKE_INIT),
        "no data to the old key"
    );
    net.run();
    assert_eq!(net.delivered(), before);
    assert_no_plaintext(&net);
}

#[test]
fn a_retired_tunnel_completes_no_handshake_it_had_in_flight() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    // A's tunnel to B has an initiation out (a rekey) when A is told B's new key; the holder
    // of B's old key answers it.
    let peer = net.nodes[0].table().by_key.values().next().unwrap().clone();
    let init = match peer
        .tunn()
        .format_handshake_initiation(&mut [0u8; 256], true)
    {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    net.receive(1, net.addrs[0], &init);
    let (_, _, response) = net.wire.pop_back().unwrap();
    assert_eq!(response[0], 2, "a handshake response");
    let rotated = keys::public_key(&keys::generate());
    net.nodes[0]
        .set_peers(&[peer_cfg(rotated, net.addrs[1], node_net(1))])
        .unwrap();
    net.wire.clear();
    let unknown = net.nodes[0].device_stats().rx_unknown_peer;
    assert_eq!(
        net.receive(0, net.addrs[1], &response),
        Some(IngressDrop::UnknownPeer),
        "the retired tunnel took a handshake response"
    );
    assert_eq!(net.nodes[0].device_stats().rx_unknown_peer, unknown + 1);
    assert!(net.wire.is_empty(), "nothing confirms a new session");
}

#[test]
fn a_retirement_carried_by_a_second_key_change_keeps_its_start_and_longer_patience() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    net.rotate(0);
    let first = net.nodes[0]
        .table()
        .retired
        .values()
        .next()
        .unwrap()
        .clone();
    // Then A is told B's new key too, before B knows A's: the old session still carries all.
    net.rotate(1);
    net.learn_key(0);
    let table = net.nodes[0].table();
    let carried = table.retired.values().next().unwrap();
    assert!(Arc::ptr_eq(&carried.peer, &first.peer));
    assert_eq!(carried.since_ms, first.since_ms);
    assert_eq!(carried.patience, rotation::OWN_KEY_PATIENCE);
}

#[test]
fn a_retired_tunnel_follows_its_peers_new_endpoint() {
    let mut net = Net::new();
    net.both_ways();
    net.run();
    net.rotate(0);
    let moved: SocketAddr = "192.0.2.22:51820".parse().unwrap();
    net.nodes[0]
        .set_peers(&[peer_cfg(net.public(1), moved, node_net(1))])
        .unwrap();
    let table = net.nodes[0].table();
    assert_eq!(
        table.retired.values().next().unwrap().peer.endpoint(),
        moved
    );
}

#[test]
fn a_rotation_without_a_session_retires_nothing() {
    let mut net = Net::new();
    net.rotate(0);
    assert_eq!(net.retired(0), 0);
    // The first packet handshakes with the new key, which B does not know yet.
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    assert_eq!(net.log.last().unwrap()[0], MESSAGE_HANDSHAKE_INIT);
    assert_eq!(net.run(), vec![IngressDrop::UnknownPeer]);
    // Once B knows it, traffic flows (A's queued packet goes with B's handshake).
    net.learn_key(1);
    assert_eq!(
        net.retired(1),
        0,
        "B had no session with the old key either"
    );
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[0].len(), 1);
    assert_eq!(net.tun_out[1].len(), 1, "A's held packet was released");
    assert_no_plaintext(&net);
}

#[test]
fn a_wrong_peer_key_never_passes_traffic() {
    let mut net = Net::new();
    // B believes A has some other key.
    let impostor = keys::public_key(&keys::generate());
    net.nodes[1]
        .set_peers(&[peer_cfg(impostor, net.addrs[0], node_net(0))])
        .unwrap();
    for _ in 0..3 {
        net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
        net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
        net.run();
    }
    assert!(net.tun_out[0].is_empty() && net.tun_out[1].is_empty());
    assert!(net.nodes[1].device_stats().rx_unknown_peer > 0);
    assert!(net.stats(0).last_handshake.is_none());
    assert_no_plaintext(&net);
}

#[test]
fn endpoint_change_keeps_session_and_redirects_traffic() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.run();
    // B moves to a new address; A is told.
    let new_b: SocketAddr = "192.0.2.22:51820".parse().unwrap();
    net.addrs[1] = new_b;
    let ch = net.nodes[0]
        .set_peers(&[peer_cfg(net.public(1), new_b, node_net(1))])
        .unwrap();
    assert_eq!(ch.updated.len(), 1);
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    assert_eq!(net.log.last().unwrap()[0], MESSAGE_DATA, "no new handshake");
    net.run();
    assert_eq!(net.tun_out[1].len(), 2);
    assert_eq!(net.stats(0).endpoint, new_b);
}

#[test]
fn timers_send_keepalives_and_nothing_for_idle_peers() {
    let mut net = Net::new();
    let now = net.nodes[0].now_ms();
    let mut out = vec![0u8; 256];
    let peer = net.nodes[0].table().by_key.values().next().unwrap().clone();
    // Idle peer without keepalive: nothing to send.
    assert!(super::timers::tick_peer(&peer, &peer, now, &mut out).is_none());
    // With a persistent keepalive and no traffic yet, the tick starts a handshake.
    let mut cfg = peer_cfg(net.public(1), net.addrs[1], node_net(1));
    cfg.persistent_keepalive = Some(1);
    net.nodes[0].set_peers(&[cfg]).unwrap();
    let (to, d) = super::timers::tick_peer(&peer, &peer, now + 1500, &mut out).unwrap();
    assert_eq!(to, net.addrs[1]);
    assert_eq!(d[0], MESSAGE_HANDSHAKE_INIT);
    let d = d.to_vec();
    net.put_on_wire(0, to, &d);
    net.run();
    assert!(net.stats(0).last_handshake.is_some());
    // Just sent: not again within the interval.
    assert!(super::timers::tick_peer(&peer, &peer, now + 1500, &mut out).is_none());
}

/// Random bytes, well-formed-looking headers and mutated real messages into the UDP path:
/// nothing may panic and nothing may reach the TUN.
#[test]
fn garbage_into_udp_ingress_never_panics_or_leaks() {
    let mut net = Net::new();
    // Capture real messages of every kind to mutate.
    net.deliver = false;
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.deliver = true;
    let init = net.log[0].clone();
    net.receive(1, net.addrs[0], &init);
    let response = net.wire.back().unwrap().2.clone();
    net.run();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 60)).unwrap();
    let data = net.wire.back().unwrap().2.clone();
    net.run();
    let delivered_before = net.tun_out[1].len();

    let mut out = vec![0u8; MAX_PACKET + 64];
    let from = net.addrs[0];
    let mut check = |d: &[u8]| {
        let r = ingress::handle(&net.nodes[1], from, d, &mut out);
        assert!(!matches!(r, Step::ToTun(_)), "garbage reached the TUN");
        if let Step::ToNetwork { drain: Some(p), .. } = r {
            while ingress::next_queued(&p, &mut out).is_some() {}
        }
    };
    for len in [
        0usize, 1, 3, 4, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1500,
    ] {
        for _ in 0..20 {
            let mut d: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            check(&d);
            // Same bytes with every valid message type and zeroed reserved bytes.
            if len >= 4 {
                for t in 1..=4u8 {
                    d[0] = t;
                    d[1..4].fill(0);
                    check(&d);
                }
            }
        }
    }
    // Bit flips and truncations of real messages, including our real receiver index.
    for real in [&init, &response, &data] {
        for i in 0..real.len() {
            let mut d = real.clone();
            d[i] ^= 1 << (i % 8);
            check(&d);
        }
        for cut in 0..real.len() {
            check(&real[..cut]);
        }
        // Exact replays are rejected too.
        check(real);
    }
    // Oversized.
    check(&vec![4u8; MAX_PACKET]);
    assert_eq!(net.tun_out[1].len(), delivered_before);
    assert!(net.nodes[1].device_stats().rx_invalid > 0);
}

/// A minimal IPv6 packet (next header UDP) carrying the marker.
fn ipv6(src: &str, dst: &str, payload_len: usize) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    let dst: std::net::Ipv6Addr = dst.parse().unwrap();
    let payload = payload_len.max(MARKER.len());
    let mut p = vec![0u8; 40 + payload];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..40 + MARKER.len()].copy_from_slice(MARKER);
    p
}

#[test]
fn ipv6_inner_packets_are_routed_and_source_checked() {
    let mut net = Net::new();
    for i in 0..2 {
        let j = 1 - i;
        let mut cfg = peer_cfg(net.public(j), net.addrs[j], node_net(j));
        cfg.allowed_ips
            .push(format!("fd00:99:{}::/64", j + 1).parse().unwrap());
        net.nodes[i].set_peers(&[cfg]).unwrap();
    }
    let p = ipv6("fd00:99:1::5", "fd00:99:2::7", 200);
    net.tun_read(0, &p).unwrap();
    assert!(net.run().is_empty());
    assert_eq!(net.tun_out[1], vec![p]);
    net.tun_read(0, &ipv6("fd00:99:3::5", "fd00:99:2::7", 10))
        .unwrap();
    assert_eq!(net.run(), vec![IngressDrop::NotAllowed]);
    assert_eq!(
        net.tun_read(0, &ipv6("fd00:99:1::5", "fd00:99:9::7", 10)),
        Err(EgressDrop::NoPeer)
    );
    assert_no_plaintext(&net);
}

#[test]
fn a_too_small_output_buffer_drops_the_datagram_and_counts_it() {
    let mut net = Net::new();
    // A real handshake initiation, captured off the wire.
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    let (_, from, init) = net.wire.pop_front().unwrap();
    let mut small = vec![0u8; ingress::MIN_OUT - 1];
    assert!(matches!(
        ingress::handle(&net.nodes[1], from, &init, &mut small),
        Step::Dropped(IngressDrop::Internal)
    ));
    // Shorter than the datagram, though above the minimum: dropped too.
    let data = vec![0u8; 4 * ingress::MIN_OUT];
    let mut out = vec![0u8; 2 * ingress::MIN_OUT];
    assert!(matches!(
        ingress::handle(&net.nodes[1], from, &data, &mut out),
        Step::Dropped(IngressDrop::Internal)
    ));
    assert_eq!(net.nodes[1].device_stats().dropped_internal, 2);
    // With room, the same initiation is answered: nothing else was disturbed.
    let mut out = vec![0u8; MAX_PACKET + 64];
    assert!(matches!(
        ingress::handle(&net.nodes[1], from, &init, &mut out),
        Step::ToNetwork { .. }
    ));
    assert_eq!(net.nodes[1].device_stats().dropped_internal, 2);
}

#[test]
fn a_peer_left_on_a_stale_session_is_moved_over_by_a_keepalive() {
    let mut net = Net::new();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    net.run();
    // A restarts (same key, no session) and handshakes again, but the keepalive and the queued
    // packet that would confirm the new session to B (the responder) are lost.
    net.nodes[0] = State::new(net.keys[0].clone());
    let (pb, ab) = (net.public(1), net.addrs[1]);
    net.nodes[0]
        .set_peers(&[peer_cfg(pb, ab, node_net(1))])
        .unwrap();
    net.tun_read(0, &ipv4("10.1.0.5", "10.2.0.7", 10)).unwrap();
    let (dst, from, init) = net.wire.pop_front().unwrap();
    assert_eq!(net.receive(dst, from, &init), None);
    let (dst, from, response) = net.wire.pop_front().unwrap();
    assert_eq!(net.receive(dst, from, &response), None);
    assert!(!net.wire.is_empty(), "A confirms with a keepalive");
    net.wire.clear();
    // After a second of A's silence B still sends on its old session, which A cannot read: A
    // answers with a keepalive on the new one, which moves B over.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert_eq!(net.run(), vec![IngressDrop::UnknownPeer]);
    net.send_requested(0);
    assert_eq!(net.wire.len(), 1, "one keepalive");
    assert_eq!(net.run(), vec![]);
    net.tun_read(1, &ipv4("10.2.0.7", "10.1.0.5", 10)).unwrap();
    assert_eq!(net.run(), vec![]);
    assert_eq!(
        net.tun_out[0].len(),
        1,
        "B's packet arrives on the new session"
    );
    assert_no_plaintext(&net);
}

/// A handshake initiation with a valid MAC1 for `responder` and nothing else valid: what anyone
/// who reads a Node's public key can make, and what costs the responder one Diffie-Hellman.
fn forged_initiation(responder: &PublicKey, sender_index: u32) -> Vec<u8> {
    use blake2::digest::{consts::U16, Mac};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let mut msg = vec![1, 0, 0, 0];
    msg.extend(sender_index.to_le_bytes());
    msg.extend((0..108).map(|i| (i as u8).wrapping_mul(37) ^ sender_index as u8));
    let key = Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(responder.as_bytes())
        .finalize();
    let mut mac = Blake2sMac::<U16>::new_from_slice(&key).unwrap();
    mac.update(&msg);
    msg.extend(mac.finalize().into_bytes());
    msg.extend([0u8; 16]);
    msg
}

#[test]
fn under_load_a_source_echoing_cookies_gets_five_initiations_then_twenty_a_second() {
    let mut net = Net::new();
    let a = net.public(0);
    let flooder: SocketAddr = "10.99.0.1:40000".parse().unwrap();
    // Below the device's load limit nothing is charged to a source: forged initiations cost a
    // DH each and are refused as not for our key, none as rate-limited.
    for i in 0..state::RATE_LIMIT as u32 {
        assert_eq!(
            net.receive(0, flooder, &forged_initiation(&a, i)),
            Some(IngressDrop::Invalid)
        );
    }
    assert_eq!(net.nodes[0].device_stats().rx_rate_limited, 0);
    // Now under load: an initiation without MAC2 gets a cookie (the flooder's too: it answers
    // from its real address), and B's tunnel takes it and puts MAC2 on its next initiations.
    let peer = net.nodes[1].table().by_key.values().next().unwrap().clone();
    let mut out = vec![0u8; 256];
    let mut initiation = || match peer.tunn().format_handshake_initiation(&mut out, true) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    let from = net.addrs[1];
    let cookies = net.nodes[0].device_stats().cookies_sent;
    let init = initiation();
    assert_eq!(net.receive(0, from, &init), None);
    assert_eq!(net.nodes[0].device_stats().cookies_sent, cookies + 1);
    assert!(net.run().is_empty(), "B takes the cookie");
    // With MAC2 its address is proven, and its share is charged: a burst of five, then none
    // until the bucket refills (20 a second).
    for i in 0..5 {
        let init = initiation();
        assert_eq!(
            net.receive(0, from, &init),
            None,
            "initiation {i} of the burst"
        );
        net.wire.clear();
    }
    let init = initiation();
    assert_eq!(net.receive(0, from, &init), Some(IngressDrop::RateLimited));
    assert_eq!(net.nodes[0].device_stats().rx_rate_limited, 1);
    // Another proven source's share is its own, and forged packets never spend anyone's: the
    // flooder, without MAC2, only gets cookies.
    let cookies = net.nodes[0].device_stats().cookies_sent;
    assert_eq!(net.receive(0, flooder, &forged_initiation(&a, 9999)), None);
    assert_eq!(net.nodes[0].device_stats().cookies_sent, cookies + 1);
    assert_eq!(net.nodes[0].device_stats().rx_rate_limited, 1);
    // One more after 50 ms, and the handshake completes.
    std::thread::sleep(Duration::from_millis(60));
    let init = initiation();
    assert_eq!(net.receive(0, from, &init), None);
    assert!(net.run().is_empty());
    assert!(net.both_ways() > 0);
    assert!(net.run().is_empty());
}
