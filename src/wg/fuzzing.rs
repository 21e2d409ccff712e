//! The datapath's receive path as a fuzz target: arbitrary datagrams on the WireGuard port.
//!
//! Two in-memory devices with a live session (no TUN, no socket), built once per process; each
//! input is split into datagrams that node B receives from A's address (and, with the same
//! bytes, from an address it has never seen). Whatever the bytes, nothing may panic, nothing may
//! reach B's TUN (no one but A can forge a data message, and the fuzzer does not hold A's keys),
//! and replies may go only to where the datagram came from.

use std::net::SocketAddr;
use std::sync::OnceLock;

use super::egress::{self, TxBatches};
use super::ingress::{self, Step};
use super::keys;
use super::peers::PeerConfig;
use super::state::State;
use super::MAX_PACKET;

struct Pair {
    b: State,
    a_addr: SocketAddr,
    stranger: SocketAddr,
}

fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (ka, kb) = (keys::generate(), keys::generate());
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().expect("literal");
        let b_addr: SocketAddr = "192.0.2.2:51820".parse().expect("literal");
        let (a, b) = (State::new(ka.clone()), State::new(kb.clone()));
        let cfg = |key, endpoint, net: &str| PeerConfig {
            public_key: keys::public_key(key),
            endpoint,
            allowed_ips: vec![net.parse().expect("literal")],
            persistent_keepalive: None,
        };
        a.set_peers(&[cfg(&kb, b_addr, "10.2.0.0/24")])
            .expect("valid peers");
        b.set_peers(&[cfg(&ka, a_addr, "10.1.0.0/24")])
            .expect("valid peers");
        // A handshake, so that B has a session and its receiver indexes are live.
        let mut batches = TxBatches::default();
        let packet = ipv4_probe();
        let _ = egress::encapsulate_segments(&a, std::iter::once(&packet[..]), &mut batches);
        let init: Vec<u8> = batches.batches[0].data().to_vec();
        let mut out = vec![0u8; MAX_PACKET + 64];
        if let Step::ToNetwork { datagram, .. } = ingress::handle(&b, a_addr, &init, &mut out) {
            let response = datagram.to_vec();
            let _ = ingress::handle(&a, b_addr, &response, &mut out);
        }
        Pair {
            b,
            a_addr,
            stranger: "198.51.100.9:4000".parse().expect("literal"),
        }
    })
}

fn ipv4_probe() -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 1, 0, 5]);
    p[16..20].copy_from_slice(&[10, 2, 0, 7]);
    p
}

/// Feeds `data` to the receive path (see the module doc); panics if an invariant breaks.
pub fn datagrams(data: &[u8]) {
    let pair = pair();
    let mut out = vec![0u8; MAX_PACKET + 64];
    // Datagrams are separated by a two-byte length, so that one input can be a sequence.
    let mut rest = data;
    while !rest.is_empty() {
        let (datagram, next) = match rest {
            [hi, lo, tail @ ..] => {
                let n = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
                tail.split_at(n)
            }
            _ => (rest, &[][..]),
        };
        rest = next;
        for from in [pair.a_addr, pair.stranger] {
            match ingress::handle(&pair.b, from, datagram, &mut out) {
                Step::ToTun(packet) => panic!(
                    "{} forged bytes reached the TUN: {packet:02x?}",
                    datagram.len()
                ),
                Step::ToNetwork { to, drain, .. } => {
                    assert_eq!(to, from, "a reply went elsewhere than the sender");
                    if let Some(peer) = drain {
                        while ingress::next_queued(&peer, &mut out).is_some() {}
                    }
                }
                Step::Consumed | Step::Dropped(_) => {}
            }
        }
    }
}
