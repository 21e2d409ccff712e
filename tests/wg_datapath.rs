//! Root integration tests of the userspace WireGuard datapath: two "node" namespaces joined by a
//! veth underlay (192.168.77.0/24), a `WgDevice` in each (TUN + UDP opened inside the namespace),
//! pod-like addresses 10.99.1.1/24 and 10.99.2.1/24 on the TUNs. Everything lives in namespaces
//! named `veil…` that a guard deletes, also when a test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use veilnet::netns;
use veilnet::wg::{keys, PeerConfig, StaticSecret, WgConfig, WgDevice};
use veilnet_test_support::{require_root, Netns};

const WG_PORT: u16 = 51820;
const TUN: &str = "veilwg0";
const MARKER: &[u8] = b"VEILNET-PLAINTEXT-MARKER";

/// The tests here share the 2 CPUs badly (throughput) and are long; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Two node namespaces and the veth between them; deleted on drop with any process we started.
struct Underlay {
    ns: [Netns; 2],
    children: Vec<Child>,
}

impl Underlay {
    fn new() -> Underlay {
        let u = Underlay {
            ns: [Netns::new("veilwg", "a"), Netns::new("veilwg", "b")],
            children: Vec::new(),
        };
        let (a, b) = (&u.ns[0], &u.ns[1]);
        ip(
            a,
            &[
                "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", b,
            ],
        );
        ip(a, &["addr", "add", "192.168.77.1/24", "dev", "ul0"]);
        ip(b, &["addr", "add", "192.168.77.2/24", "dev", "ul1"]);
        ip(a, &["link", "set", "ul0", "up"]);
        ip(b, &["link", "set", "ul1", "up"]);
        u
    }

    fn spawn(&mut self, i: usize, program: &str, args: &[&str]) {
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        netns::command_in(&self.ns[i], &mut cmd).unwrap();
        self.children.push(cmd.spawn().unwrap());
    }
}

impl Drop for Underlay {
    /// Our children first (reaped, so they leave no zombies); the namespaces go after this,
    /// with anything else still inside them.
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ip(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    let out = netns::run("ip", &full).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A device running on its own runtime, whose threads were created inside the node namespace.
struct Node {
    rt: tokio::runtime::Runtime,
    dev: Option<WgDevice>,
    underlay: SocketAddr,
    net: &'static str,
}

impl Node {
    fn start(ns: &str, key: StaticSecret, underlay: &str, net: &'static str) -> Node {
        Node::start_with(ns, key, underlay, net, false)
    }

    fn start_with(
        ns: &str,
        key: StaticSecret,
        underlay: &str,
        net: &'static str,
        persistent: bool,
    ) -> Node {
        let cfg = WgConfig {
            tun_name: TUN.into(),
            listen_port: WG_PORT,
            private_key: key,
            mtu: 1500 - veilnet::wg::OVERHEAD_IPV4,
            fwmark: Some(0x5a),
            persistent,
            busy_poll: veilnet::wg::DEFAULT_BUSY_POLL,
        };
        let (rt, dev) = netns::run_in(ns, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let dev = rt.block_on(WgDevice::start(cfg));
            (rt, dev)
        })
        .unwrap();
        Node {
            rt,
            dev: Some(dev.unwrap()),
            underlay: format!("{underlay}:{WG_PORT}").parse().unwrap(),
            net,
        }
    }

    fn dev(&self) -> &WgDevice {
        self.dev.as_ref().unwrap()
    }

    fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.dev().public_key(),
            endpoint: self.underlay,
            allowed_ips: vec![self.net.parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    fn shutdown(mut self) {
        let dev = self.dev.take().unwrap();
        self.rt.block_on(dev.shutdown());
    }
}

/// Brings up the underlay, both devices, TUN addresses and routes, and peers them.
fn setup() -> (Underlay, Node, Node) {
    let u = Underlay::new();
    let a = Node::start(&u.ns[0], keys::generate(), "192.168.77.1", "10.99.1.0/24");
    let b = Node::start(&u.ns[1], keys::generate(), "192.168.77.2", "10.99.2.0/24");
    for (i, (addr, other)) in [
        ("10.99.1.1/24", "10.99.2.0/24"),
        ("10.99.2.1/24", "10.99.1.0/24"),
    ]
    .into_iter()
    .enumerate()
    {
        ip(&u.ns[i], &["addr", "add", addr, "dev", TUN]);
        ip(&u.ns[i], &["route", "add", other, "dev", TUN]);
    }
    a.dev().set_peers(vec![b.peer_config()]).unwrap();
    b.dev().set_peers(vec![a.peer_config()]).unwrap();
    (u, a, b)
}

fn ping(ns: &str, dst: &str, count: u32) -> bool {
    let mut cmd = Command::new("ping");
    cmd.args([
        "-q",
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        dst,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    netns::command_in(ns, &mut cmd).unwrap();
    cmd.status().unwrap().success()
}

/// Pings until one reply arrives or `limit` passes; returns how long it took.
fn ping_until_ok(ns: &str, dst: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ping(ns, dst, 1) {
            return Some(start.elapsed());
        }
    }
    None
}

/// What an AF_PACKET capture on the underlay saw.
#[derive(Debug, Default)]
struct Capture {
    frames: usize,
    wireguard: usize,
    /// Bytes in those frames (UDP GSO sends cross the veth as one frame of up to 64 KiB, so
    /// frames say little about volume).
    wireguard_bytes: usize,
    /// IPv4 frames that are not UDP to/from the WireGuard port, as (protocol, sport, dport).
    other_ipv4: Vec<(u8, u16, u16)>,
    /// Frames in which the plaintext marker appears.
    marker_frames: usize,
}

/// Captures every frame on `ifname` in `ns` until `stop` is set (raw AF_PACKET, no tcpdump).
///
/// Plain libc: nix can open the socket but cannot build the `sockaddr_ll` to bind it to one
/// interface (its `LinkAddr` has no public constructor), and unbound it would also see the TUN's
/// plaintext.
fn start_capture(ns: &str, ifname: &str) -> (Arc<AtomicBool>, JoinHandle<Capture>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (ns, ifname, stop2) = (ns.to_string(), ifname.to_string(), stop.clone());
    let handle = std::thread::spawn(move || {
        netns::enter_current_thread(&ns).unwrap();
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) takes no pointers; the descriptor is closed at the end.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0);
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let buf_size: libc::c_int = 32 << 20;
        // SAFETY: each option value points at a live value of the length passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &buf_size as *const _ as *const libc::c_void,
                4,
            );
        }
        ready_tx.send(()).unwrap();
        let mut cap = Capture::default();
        let mut buf = vec![0u8; 70000];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                continue;
            }
            classify(&buf[..n as usize], &mut cap);
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        cap
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    (stop, handle)
}

fn classify(frame: &[u8], cap: &mut Capture) {
    cap.frames += 1;
    if frame.windows(MARKER.len()).any(|w| w == MARKER) {
        cap.marker_frames += 1;
    }
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return; // ARP, IPv6 neighbour discovery: no payload of ours
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let ports = |p: &[u8]| {
        if p.len() >= 4 {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        } else {
            (0, 0)
        }
    };
    let (sport, dport) = ports(ip.get(ihl..).unwrap_or(&[]));
    if proto == 17 && (sport == WG_PORT || dport == WG_PORT) {
        cap.wireguard += 1;
        cap.wireguard_bytes += frame.len();
    } else {
        cap.other_ipv4.push((proto, sport, dport));
    }
}

fn pattern(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

/// Sends `len` bytes of marker pattern over TCP from node a to `dst` in node b; returns the
/// bytes the server received and verified.
fn tcp_transfer(u: &Underlay, dst: &str, len: usize) -> usize {
    let addr: SocketAddr = format!("{dst}:5001").parse().unwrap();
    let listener: TcpListener = netns::run_in(&u.ns[1], move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, pattern(got.len()), "payload corrupted in transit");
        got.len()
    });
    let stream: TcpStream = netns::run_in(&u.ns[0], move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    let mut stream = stream;
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(&pattern(len)).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    server.join().unwrap()
}

#[test]
fn wireguard_between_two_node_namespaces() {
    require_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (u, a, b) = setup();
    // The devices exist in their namespaces with the configured MTU, and nowhere else.
    let link = ip(&u.ns[0], &["link", "show", TUN]);
    assert!(link.contains("mtu 1440"), "{link}");
    assert!(!Command::new("ip")
        .args(["link", "show", TUN])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());

    // 1. Ping across the tunnel (the first packet waits for the handshake, it is not lost).
    assert!(
        ping(&u.ns[0], "10.99.2.1", 3),
        "ping through WireGuard failed"
    );

    // 2. A TCP transfer while the underlay is captured: only WireGuard UDP, no plaintext.
    let (stop, capture) = start_capture(&u.ns[1], "ul1");
    let len = 8 << 20;
    assert_eq!(tcp_transfer(&u, "10.99.2.1", len), len);
    // Positive control: a plaintext datagram with the marker on the underlay must be seen, so
    // the checks below can fail.
    // (A receiver is bound so that b answers with no ICMP error quoting the marker.)
    let receiver: UdpSocket = netns::run_in(&u.ns[1], || UdpSocket::bind("192.168.77.2:40000"))
        .unwrap()
        .unwrap();
    let control: UdpSocket = netns::run_in(&u.ns[0], || UdpSocket::bind("192.168.77.1:0"))
        .unwrap()
        .unwrap();
    control.send_to(MARKER, "192.168.77.2:40000").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    receiver.recv(&mut [0u8; 64]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let cap = capture.join().unwrap();
    eprintln!(
        "underlay capture: {} frames, {} WireGuard, other IPv4 {:?}, marker in {}",
        cap.frames,
        cap.wireguard,
        &cap.other_ipv4[..cap.other_ipv4.len().min(5)],
        cap.marker_frames
    );
    assert!(cap.wireguard_bytes > len, "capture saw too little: {cap:?}");
    assert_eq!(
        cap.marker_frames, 1,
        "only the control datagram is plaintext"
    );
    assert_eq!(
        cap.other_ipv4,
        vec![(17, control.local_addr().unwrap().port(), 40000)]
    );

    // 3. Counters reflect the traffic.
    let sa = a.dev().stats();
    assert_eq!(sa.len(), 1);
    let s = &sa[0];
    assert_eq!(s.public_key, b.dev().public_key());
    assert!(s.last_handshake.is_some());
    // Data one way (> 1000 segments), ACKs the other: how many ACKs depends on how much the
    // receiver coalesced (fewer under load), so only their presence is certain.
    assert!(s.tx_packets > 1000 && s.rx_packets > 0, "{s:?}");
    assert!(s.tx_bytes as usize > len && s.rx_bytes > 0, "{s:?}");
    assert_eq!(s.dropped_not_allowed, 0);
    assert_eq!(b.dev().stats()[0].rx_packets, s.tx_packets);

    // 4. Removing the peer stops traffic (no plaintext fallback: the packets are dropped).
    let drops = a.dev().device_stats().dropped_no_peer;
    let ch = a.dev().set_peers(vec![]).unwrap();
    assert_eq!(ch.removed.len(), 1);
    assert!(
        !ping(&u.ns[0], "10.99.2.1", 2),
        "traffic flowed without a peer"
    );
    assert!(a.dev().device_stats().dropped_no_peer >= drops + 2);

    // 5. Re-adding restores it.
    a.dev().set_peers(vec![b.peer_config()]).unwrap();
    assert!(
        ping_until_ok(&u.ns[0], "10.99.2.1", Duration::from_secs(5)).is_some(),
        "re-added peer does not pass traffic"
    );

    // 6. An endpoint-only update keeps the session (no new handshake).
    let hs = a.dev().stats()[0].handshakes_sent;
    let mut moved = b.peer_config();
    moved.persistent_keepalive = Some(25);
    let ch = a.dev().set_peers(vec![moved]).unwrap();
    assert_eq!(ch.updated.len(), 1);
    assert!(ping(&u.ns[0], "10.99.2.1", 2));
    assert_eq!(a.dev().stats()[0].handshakes_sent, hs);

    // 7. Key rotation on a; b learns the new key; traffic is back within 5 s.
    let old_a = a.dev().public_key();
    a.dev().set_private_key(keys::generate());
    assert_ne!(a.dev().public_key(), old_a);
    let t0 = Instant::now();
    let ch = b.dev().set_peers(vec![a.peer_config()]).unwrap();
    assert_eq!((ch.added.len(), ch.removed.len()), (1, 1));
    let took = ping_until_ok(&u.ns[0], "10.99.2.1", Duration::from_secs(5))
        .expect("no traffic within 5 s of the key rotation");
    eprintln!(
        "traffic restored {:?} after rotation",
        t0.elapsed().max(took)
    );

    // 8. A wrong peer key never passes traffic, in either direction. Given in place of a's
    // real key (same endpoint and ranges: it looks like a rotation), it gets no session while
    // the old one carries on for a bounded time (see `wg::rotation`); given afresh, nothing.
    let mut wrong = a.peer_config();
    wrong.public_key = keys::public_key(&keys::generate());
    b.dev().set_peers(vec![wrong.clone()]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let st = &b.dev().stats()[0];
    assert!(st.on_previous_key, "the old session carries on: {st:?}");
    assert!(
        st.last_handshake.is_none(),
        "a session with the wrong key: {st:?}"
    );
    b.dev().set_peers(vec![]).unwrap();
    let unknown_before = b.dev().device_stats().rx_unknown_peer;
    b.dev().set_peers(vec![wrong]).unwrap();
    assert!(!b.dev().stats()[0].on_previous_key);
    assert!(
        !ping(&u.ns[0], "10.99.2.1", 3),
        "a→b passed with a wrong key"
    );
    assert!(
        !ping(&u.ns[1], "10.99.1.1", 3),
        "b→a passed with a wrong key"
    );
    assert!(b.dev().device_stats().rx_unknown_peer > unknown_before);
    assert!(b.dev().stats()[0].last_handshake.is_none());

    // 9. Shutdown removes the TUN.
    a.shutdown();
    b.shutdown();
    let still = Command::new("ip")
        .args(["-n", &u.ns[0], "link", "show", TUN])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!still.success(), "TUN survived shutdown");
}

/// Single-stream TCP throughput through the tunnel next to the plain veth (iperf3). Prints the
/// numbers; asserts only that the tunnel carries a sane rate. A measurement, not a test: speed is
/// benchmarked by scripts/bench.sh; run this one by hand with `--ignored`.
#[test]
#[ignore = "a measurement: use scripts/bench.sh"]
fn throughput_single_tcp_stream() {
    require_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (mut u, a, b) = setup();
    u.spawn(1, "iperf3", &["-s", "-p", "5201"]);
    let run = |dst: &str| -> f64 {
        for _ in 0..50 {
            let mut cmd = Command::new("iperf3");
            cmd.args(["-c", dst, "-p", "5201", "-t", "3", "-J"]);
            netns::command_in(&u.ns[0], &mut cmd).unwrap();
            let out = cmd.output().unwrap();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                return v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(100)); // server not listening yet
        }
        panic!("iperf3 to {dst} never succeeded");
    };
    let wg = run("10.99.2.1");
    let plain = run("192.168.77.2");
    eprintln!(
        "single TCP stream: WireGuard {:.0} Mbit/s, plain veth {:.0} Mbit/s",
        wg / 1e6,
        plain / 1e6
    );
    assert!(wg > 10e6, "tunnel throughput implausibly low: {wg} bit/s");
    a.shutdown();
    b.shutdown();
}

/// An agent restart on one side: node a's device runs on a persistent TUN, is dropped (with its
/// runtime, as when the process exits) and a new device with the same key attaches to the same
/// TUN, whose addresses and routes stayed. A TCP stream b → a (a is the receiver, the harder case:
/// it has nothing to send that would start a handshake) must survive with a stall of at most 1 s.
#[test]
fn tcp_stream_survives_a_datapath_restart_on_a_persistent_tun() {
    require_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let u = Underlay::new();
    let key_a = keys::generate();
    let mut a = Node::start_with(
        &u.ns[0],
        key_a.clone(),
        "192.168.77.1",
        "10.99.1.0/24",
        true,
    );
    let b = Node::start(&u.ns[1], keys::generate(), "192.168.77.2", "10.99.2.0/24");
    for (i, (addr, other)) in [
        ("10.99.1.1/24", "10.99.2.0/24"),
        ("10.99.2.1/24", "10.99.1.0/24"),
    ]
    .into_iter()
    .enumerate()
    {
        ip(&u.ns[i], &["addr", "add", addr, "dev", TUN]);
        ip(&u.ns[i], &["route", "add", other, "dev", TUN]);
    }
    a.dev().set_peers(vec![b.peer_config()]).unwrap();
    b.dev().set_peers(vec![a.peer_config()]).unwrap();
    assert!(
        ping(&u.ns[1], "10.99.1.1", 2),
        "no traffic before the restart"
    );

    // Receiver in a: records when bytes arrive. Sender in b: writes until told to stop.
    let addr: SocketAddr = "10.99.1.1:5002".parse().unwrap();
    let listener: TcpListener = netns::run_in(&u.ns[0], move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = std::thread::spawn(move || -> (usize, Duration) {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut last, mut max_gap) = (0usize, Instant::now(), Duration::ZERO);
        loop {
            let n = s.read(&mut buf).expect("receiver: connection broken");
            if n == 0 {
                return (total, max_gap);
            }
            total += n;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
        }
    });
    let stream: TcpStream = netns::run_in(&u.ns[1], move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    let stop2 = stop.clone();
    let sender = std::thread::spawn(move || -> usize {
        let mut stream = stream;
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        let mut sent = 0;
        while !stop2.load(Ordering::SeqCst) {
            stream.write_all(&chunk).expect("sender: connection broken");
            sent += chunk.len();
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        sent
    });

    std::thread::sleep(Duration::from_millis(1500));
    // The restart: the old datapath is gone (runtime and all), the TUN and its routes stay.
    let restart = Instant::now();
    drop(a);
    assert!(
        ip(&u.ns[0], &["link", "show", TUN]).contains(TUN),
        "the persistent TUN vanished with its device"
    );
    assert!(ip(&u.ns[0], &["route", "show"]).contains("10.99.2.0/24"));
    a = Node::start_with(&u.ns[0], key_a, "192.168.77.1", "10.99.1.0/24", true);
    a.dev().set_peers(vec![b.peer_config()]).unwrap();
    eprintln!("restarted in {:?}", restart.elapsed());
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("sender failed");
    let (received, max_gap) = receiver.join().expect("receiver failed");
    eprintln!(
        "sent {sent} bytes, received {received}, largest gap {max_gap:?}; a: {:?}",
        a.dev().stats()
    );
    assert_eq!(sent, received);
    assert!(
        max_gap <= Duration::from_secs(1),
        "stall of {max_gap:?} across the restart"
    );
    assert!(
        a.dev().stats()[0].rx_packets > 0,
        "new device carried no traffic"
    );

    // Non-persistent again: shutdown removes the TUN it attached to.
    drop(a);
    let a = Node::start(&u.ns[0], keys::generate(), "192.168.77.1", "10.99.1.0/24");
    a.shutdown();
    assert!(!Command::new("ip")
        .args(["-n", &u.ns[0], "link", "show", TUN])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    b.shutdown();
}
