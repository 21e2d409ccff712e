//! Floods at a node's WireGuard port from a host on the underlay (the lab's control plane, which
//! is no node) while an encrypted iperf3 stream runs to a
//! pod on that node: invalid datagrams (random bytes, data messages for unknown sessions),
//! handshake initiations with a bad MAC1, and initiations with a valid MAC1 (anyone can read a
//! node's public key from its annotation) whose sender echoes every cookie it is sent, so that
//! its MAC2 is valid too, each paced at `FLOOD_PER_SECOND` (see there why). Each time: the datapath stays up (same pid), the stream keeps at least
//! half of its flood-free throughput (both figures from this run), the node counts what it
//! refused, and the valid-MAC flood costs it a bounded number of Diffie-Hellman operations: the
//! device's load limit, then cookies, then the per-source limit (`src/wg/source_limit.rs`). A
//! flood at a closed port of the same node is measured beside them: what the flood itself costs
//! this machine, whatever the datapath does with it. Needs root.
//!
//! Control plane: stand-in only, because the floods are datagrams on the underlay that the
//! datapath judges by itself: which API server the agents watch changes nothing about them.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blake2::digest::{consts::U16, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use common::*;

/// Datagrams a second each flood sends (`VEILNET_FLOOD_PER_SECOND` overrides). Not "as fast as
/// one thread goes": on this two-core machine the flooder, both nodes' kernels and the stream
/// share the cores, and a flood that fills the veth backlog starves the stream in the kernel
/// before any of it reaches the datapath (the closed-port flood shows that share on its own).
const FLOOD_PER_SECOND_DEFAULT: u64 = 50_000;

static FLOOD_PER_SECOND: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var("VEILNET_FLOOD_PER_SECOND")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FLOOD_PER_SECOND_DEFAULT)
});

/// node-2's WireGuard port, and a port nothing listens on there.
const TARGET: &str = "172.30.0.12:51820";
const CLOSED: &str = "172.30.0.12:51999";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    /// Datagrams to a closed port: the kernel drops them; the datapath never sees them.
    ClosedPort,
    /// Random bytes of random lengths, and data messages for session indexes nobody has.
    Invalid,
    /// Well-formed initiations whose MAC1 is wrong.
    BadMac,
    /// Initiations with a valid MAC1 for node-2's key, MAC2 from the cookies node-2 sends back.
    ValidMacEchoingCookies,
}

#[derive(Debug, Default)]
struct Sent {
    datagrams: u64,
    cookies_received: u64,
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn mac16(key: &[u8], msg: &[u8]) -> [u8; 16] {
    let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The datagrams a flood cycles through (the valid-MAC flood's one initiation gets its MAC2 once
/// a cookie arrives).
fn datagrams(kind: Flood, responder: &[u8; 32]) -> Vec<Vec<u8>> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    match kind {
        Flood::ClosedPort | Flood::Invalid => (0..256)
            .map(|i| {
                if i % 2 == 0 {
                    let len = 1 + (rng.next() % 1400) as usize;
                    rng.bytes(len)
                } else {
                    // A data message: type 4, a receiver index nobody holds, a counter, junk.
                    let mut d = vec![4, 0, 0, 0];
                    let len = 12 + 16 + (rng.next() % 1200) as usize;
                    d.extend(rng.bytes(len));
                    d
                }
            })
            .collect(),
        Flood::BadMac => (0..256)
            .map(|_| {
                let mut d = vec![1, 0, 0, 0];
                d.extend(rng.bytes(144));
                d
            })
            .collect(),
        Flood::ValidMacEchoingCookies => {
            let mut d = vec![1, 0, 0, 0];
            d.extend(rng.bytes(112));
            let mac1 = mac16(&hash(&[b"mac1----", responder]), &d);
            d.extend(mac1);
            d.extend([0u8; 16]);
            vec![d]
        }
    }
}

/// A cookie reply's cookie, if `reply` is one for `initiation` (XChaCha20-Poly1305 under
/// HASH("cookie--" ‖ responder's key), the initiation's MAC1 as associated data).
fn open_cookie(reply: &[u8], initiation: &[u8], responder: &[u8; 32]) -> Option<[u8; 16]> {
    if reply.len() != 64 || reply[0] != 3 {
        return None;
    }
    let cipher = XChaCha20Poly1305::new(&hash(&[b"cookie--", responder]).into());
    let cookie = cipher
        .decrypt(
            reply[8..32].into(),
            Payload {
                msg: &reply[32..64],
                aad: &initiation[116..132],
            },
        )
        .ok()?;
    cookie.try_into().ok()
}

/// Floods from the control plane's netns until `stop`; returns what was sent.
fn start_flood(
    lab: &Lab,
    kind: Flood,
    responder: [u8; 32],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Sent> {
    let netns = lab.control_plane_netns();
    std::thread::spawn(move || {
        veilnet::netns::run_in(&netns, move || {
            let to: SocketAddr = if kind == Flood::ClosedPort {
                CLOSED
            } else {
                TARGET
            }
            .parse()
            .unwrap();
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.connect(to).expect("connect");
            socket.set_nonblocking(true).expect("nonblocking");
            let mut packets = datagrams(kind, &responder);
            let mut sent = Sent::default();
            let mut reply = [0u8; 256];
            let mut i = 0usize;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // Paced: the next batch of 64 leaves when the rate says it is due.
                let due = started + Duration::from_secs_f64(i as f64 / *FLOOD_PER_SECOND as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                for _ in 0..64 {
                    // A full socket buffer (EAGAIN, ENOBUFS) or an ICMP error is the flood
                    // outrunning the wire: keep going.
                    if socket.send(&packets[i % packets.len()]).is_ok() {
                        sent.datagrams += 1;
                    }
                    i += 1;
                }
                while let Ok(n) = socket.recv(&mut reply) {
                    if kind != Flood::ValidMacEchoingCookies {
                        continue;
                    }
                    if let Some(cookie) = open_cookie(&reply[..n], &packets[0], &responder) {
                        sent.cookies_received += 1;
                        let mac2 = mac16(&cookie, &packets[0][..132]);
                        packets[0][132..].copy_from_slice(&mac2);
                    }
                }
            }
            sent
        })
        .expect("enter the control plane's netns")
    })
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the datapath runs");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// node-2's datapath counters as its agent last read them: WireGuard drops by reason, cookies.
fn counters(lab: &Lab) -> (u64, u64, u64, u64) {
    let status = node_status(lab, "node-2");
    let dp = &status["datapath"];
    assert!(
        dp["error"].is_null() && dp["drops"].is_object(),
        "node-2's agent has no datapath counters: {dp}"
    );
    let drop = |reason: &str| dp["drops"][reason].as_u64().expect("a drop counter");
    (
        drop("invalid"),
        drop("unknown_peer"),
        drop("rate_limited"),
        dp["cookieReplies"].as_u64().unwrap_or(0),
    )
}

/// The agent refreshes the datapath's counters every 2 s: wait for two refreshes.
fn settled_counters(lab: &Lab) -> (u64, u64, u64, u64) {
    std::thread::sleep(Duration::from_millis(4500));
    counters(lab)
}

struct Figure {
    kind: Flood,
    mbps: Result<f64, String>,
    sent: Sent,
    seconds: f64,
    datapath_cpu: f64,
    refused: (u64, u64, u64, u64),
}

#[test]
fn floods_at_the_wireguard_port_leave_the_stream_half_its_throughput_and_bound_the_work() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("flood", &["--nodes", "2"]);
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest(
        "default",
        "b",
        "node-2",
        &[],
        &["iperf3", "-s", "-p", "5201"],
    ));
    lab.wait_pod_ip("default/a", Duration::from_secs(60));
    let server = lab.wait_pod_ip("default/b", Duration::from_secs(60));
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(30),
    );
    let responder: [u8; 32] = {
        use base64::Engine;
        let b64 = lab.annotation("node-2", "veilnet.io/wg-public-key");
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .expect("node-2's public key")
            .try_into()
            .expect("32 bytes")
    };
    let datapath = lab
        .daemon_pid("datapath-node-2")
        .expect("node-2's datapath");

    let cpu_before = cpu_seconds(datapath);
    let started = Instant::now();
    let baseline = lab
        .try_iperf3_mbps("default/a", &server)
        .expect("the flood-free stream");
    let baseline_cpu = (cpu_seconds(datapath) - cpu_before) / started.elapsed().as_secs_f64();

    let mut figures = Vec::new();
    for kind in [
        Flood::ClosedPort,
        Flood::Invalid,
        Flood::BadMac,
        Flood::ValidMacEchoingCookies,
    ] {
        let before = settled_counters(&lab);
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_before = cpu_seconds(datapath);
        let started = Instant::now();
        let flood = start_flood(&lab, kind, responder, stop.clone());
        std::thread::sleep(Duration::from_millis(300));
        let mbps = lab.try_iperf3_mbps("default/a", &server);
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().expect("the flooder");
        let seconds = started.elapsed().as_secs_f64();
        let datapath_cpu = (cpu_seconds(datapath) - cpu_before) / seconds;
        let after = settled_counters(&lab);
        // The counters only grow while the datapath runs (its pid is checked below).
        let grew = |a: u64, b: u64| a.checked_sub(b).expect("a datapath counter went back");
        let refused = (
            grew(after.0, before.0),
            grew(after.1, before.1),
            grew(after.2, before.2),
            grew(after.3, before.3),
        );
        figures.push(Figure {
            kind,
            mbps,
            sent,
            seconds,
            datapath_cpu,
            refused,
        });
    }

    eprintln!(
        "encrypted pod → pod TCP to node-2 under floods of {} datagrams/s at its underlay \
         address (same run):\n  no flood:                {baseline:>8.1} Mbit/s, node-2's datapath \
         at {:>3.0} % of a core",
        *FLOOD_PER_SECOND,
        baseline_cpu * 100.0
    );
    for f in &figures {
        let stream = match &f.mbps {
            Ok(mbps) => format!("{mbps:>8.1} Mbit/s ({:.2} ×)", mbps / baseline),
            Err(e) => format!("stream failed: {e}"),
        };
        eprintln!(
            "  {:<24} {stream}, datapath {:>3.0} % of a core; sent {:.0}/s ({} in {:.1} s); \
             node-2 refused: invalid {}, unknown session {}, rate-limited {}; sent {} cookies, \
             the flooder opened {}",
            format!("{:?}:", f.kind),
            f.datapath_cpu * 100.0,
            f.sent.datagrams as f64 / f.seconds,
            f.sent.datagrams,
            f.seconds,
            f.refused.0,
            f.refused.1,
            f.refused.2,
            f.refused.3,
            f.sent.cookies_received,
        );
    }

    assert_eq!(
        lab.daemon_pid("datapath-node-2"),
        Some(datapath),
        "node-2's datapath did not survive the floods"
    );
    for f in &figures {
        assert!(
            f.sent.datagrams > 10_000,
            "{:?}: the flood sent little",
            f.kind
        );
        let mbps = f
            .mbps
            .as_ref()
            .unwrap_or_else(|e| panic!("{:?}: {e}", f.kind));
        assert!(
            *mbps >= 0.5 * baseline,
            "{:?}: the stream kept {mbps:.1} of {baseline:.1} Mbit/s",
            f.kind,
        );
        let (invalid, unknown, limited, cookies) = f.refused;
        match f.kind {
            Flood::ClosedPort => assert_eq!(
                invalid + unknown + limited,
                0,
                "the datapath saw the closed port's flood"
            ),
            Flood::Invalid => assert!(invalid + unknown > 0, "no invalid datagram counted"),
            Flood::BadMac => assert!(invalid > 0, "no bad MAC counted"),
            Flood::ValidMacEchoingCookies => {
                assert!(
                    f.sent.cookies_received > 0 && cookies > 0,
                    "node-2 never asked for cookies under the flood"
                );
                assert!(
                    limited > 0,
                    "the cookie-echoing flooder was never rate-limited"
                );
                // Every initiation that got as far as a Diffie-Hellman is refused as not for
                // node-2's key (`invalid`): at most the device's load limit (200 a second,
                // boringtun's count is shared) before cookies are asked for, plus the flooder's
                // per-source share of 20 a second.
                let bound = ((200.0 + 20.0) * (f.seconds + 5.0)) as u64;
                assert!(
                    invalid <= bound,
                    "{invalid} initiations cost node-2 a Diffie-Hellman in {:.1} s (bound {bound})",
                    f.seconds
                );
            }
        }
    }
    lab.down();
}
