//! Key rotation loses nothing (#17 §2): while pods exchange UDP requests every 10 ms and open a
//! TCP connection every 50 ms in both directions, the nodes rotate their WireGuard keys ten times
//! in turn (`veilnet.io/rotate-key`). Not one request may go unanswered within a second, not one
//! connect may time out: the old session carries the traffic until the new one is up (make
//! before break). Reports each rotation's time, from the request to both datapaths having
//! switched to the new session. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const ROTATIONS: usize = 10;
/// A request unanswered for this long is lost; a connect that takes longer timed out (a lost SYN
/// is retransmitted after one second, so a single lost SYN fails it).
const PATIENCE: Duration = Duration::from_secs(1);

/// What one prober saw.
#[derive(Debug, Default)]
struct Probed {
    what: String,
    sent: u64,
    failed: u64,
    slowest: Duration,
    /// When the first failures happened, relative to the prober's start.
    failures_at: Vec<Duration>,
}

/// Runs `attempt` every `every` inside `netns` until `stop`; counts failures (`Err`) and the
/// slowest success.
fn prober(
    netns: String,
    what: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    attempt: impl Fn() -> Result<(), String> + Send + 'static,
) -> JoinHandle<Probed> {
    std::thread::spawn(move || {
        veilnet::netns::enter_current_thread(&netns).expect("enter the pod's netns");
        let mut p = Probed {
            what,
            ..Default::default()
        };
        let start = Instant::now();
        let mut next = start;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            p.sent += 1;
            match attempt() {
                Ok(()) => p.slowest = p.slowest.max(t.elapsed()),
                Err(e) => {
                    p.failed += 1;
                    if p.failures_at.len() < 5 {
                        eprintln!("{}: {e} at {:?}", p.what, t - start);
                        p.failures_at.push(t - start);
                    }
                }
            }
            next += every;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        p
    })
}

/// A UDP request/response against agnhost's UDP server (`veilnet-agnhost NONCE MESSAGE`, answered
/// with the nonce): one datagram, and only the answer that echoes its own sequence number counts.
fn udp_attempt(to: SocketAddr) -> impl Fn() -> Result<(), String> {
    let socket = std::cell::OnceCell::new();
    let seq = std::cell::Cell::new(0u64);
    move || {
        let s: &UdpSocket = socket.get_or_init(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(to).expect("connect");
            s
        });
        seq.set(seq.get() + 1);
        let nonce = format!("rot{}", seq.get());
        s.send(format!("veilnet-agnhost {nonce} probe\n").as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer to {nonce}"));
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.recv(&mut buf) {
                Ok(n) => {
                    let answer = String::from_utf8_lossy(&buf[..n]);
                    if answer.split(' ').nth(1) == Some(nonce.as_str()) {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
    }
}

fn tcp_attempt(to: SocketAddr) -> impl Fn() -> Result<(), String> {
    move || {
        TcpStream::connect_timeout(&to, PATIENCE)
            .map(drop)
            .map_err(|e| format!("connect: {e}"))
    }
}

#[test]
fn ten_key_rotations_lose_no_request_and_time_out_no_connect() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("rot", &["--nodes", "2"]);
    for (name, node) in [("a", "node-1"), ("b", "node-2")] {
        lab.apply(&pod_manifest("default", name, node, &[], SERVE));
    }
    let ip_a = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    let ip_b = lab.wait_pod_ip("default/b", Duration::from_secs(60));
    eventually(Duration::from_secs(20), "a <-> b over wireguard", || {
        path_to(&lab, "node-1", "node-2") == "wireguard"
            && lab.connect("default/a", &format!("{ip_b}:80"), "tcp", "1s") == Some(0)
            && lab.connect("default/b", &format!("{ip_a}:80"), "tcp", "1s") == Some(0)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let (ns_a, ns_b) = (lab.pod_netns("default/a"), lab.pod_netns("default/b"));
    let to_a = |port: u16| SocketAddr::new(ip_a.parse().unwrap(), port);
    let to_b = |port: u16| SocketAddr::new(ip_b.parse().unwrap(), port);
    let probers = vec![
        prober(
            ns_a.clone(),
            "udp a->b".into(),
            Duration::from_millis(10),
            stop.clone(),
            udp_attempt(to_b(81)),
        ),
        prober(
            ns_b.clone(),
            "udp b->a".into(),
            Duration::from_millis(10),
            stop.clone(),
            udp_attempt(to_a(81)),
        ),
        prober(
            ns_a,
            "tcp a->b".into(),
            Duration::from_millis(50),
            stop.clone(),
            tcp_attempt(to_b(80)),
        ),
        prober(
            ns_b,
            "tcp b->a".into(),
            Duration::from_millis(50),
            stop.clone(),
            tcp_attempt(to_a(80)),
        ),
    ];
    // Traffic flows before the first rotation.
    std::thread::sleep(Duration::from_secs(1));

    let mut took = Vec::new();
    for round in 1..=ROTATIONS {
        let node = if round % 2 == 1 { "node-1" } else { "node-2" };
        let before = lab.annotation(node, "veilnet.io/wg-public-key");
        let switched_before = (
            rotation_switches(&lab, "node-1"),
            rotation_switches(&lab, "node-2"),
        );
        let started = Instant::now();
        lab.kubectl_ok(&[
            "annotate",
            "node",
            node,
            &format!("veilnet.io/rotate-key=round-{round}"),
            "--overwrite",
        ]);
        eventually(Duration::from_secs(15), "the new key published", || {
            lab.annotation(node, "veilnet.io/wg-public-key") != before
        });
        eventually(
            Duration::from_secs(20),
            "both datapaths on the new session",
            || {
                rotation_switches(&lab, "node-1") > switched_before.0
                    && rotation_switches(&lab, "node-2") > switched_before.1
            },
        );
        took.push(started.elapsed());
        // Let traffic run on the new session for a moment before the next rotation.
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let probed: Vec<Probed> = probers.into_iter().map(|h| h.join().unwrap()).collect();

    let mut sorted = took.clone();
    sorted.sort();
    eprintln!(
        "key rotation: {ROTATIONS} rotations, request to both switched: median {:?}, max {:?} (all: {took:?})",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    for p in &probed {
        eprintln!(
            "key rotation: {}: {} sent, {} failed, slowest answer {:?}",
            p.what, p.sent, p.failed, p.slowest
        );
    }
    for p in &probed {
        assert!(p.sent > 0, "{} never ran", p.what);
        assert_eq!(
            p.failed, 0,
            "{}: {} of {} failed across {ROTATIONS} rotations (first at {:?})",
            p.what, p.failed, p.sent, p.failures_at
        );
    }
    // The old sessions end (10 s after the last switch), and status shows no rotation.
    for node in ["node-1", "node-2"] {
        eventually(
            Duration::from_secs(30),
            &format!("{node}: the last old session retired"),
            || {
                lab.daemon_log(&format!("datapath-{node}"))
                    .contains("wireguard key rotation: old session retired")
            },
        );
        let st = node_status(&lab, node);
        assert!(
            st["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().all(|p| p.get("keyRotation").is_none())),
            "{node}: {st:#}"
        );
    }
    // The wire still carries only ciphertext.
    assert_wire(&lab, "default/a", "default/b", "encrypted");
}
