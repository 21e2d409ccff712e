//! Root tests of the nftables enforcer in namespaces these tests create (`veilpol-*`), torn down
//! by guards also when a test fails:
//! - rendered scripts (small and big) pass `nft -c` and load, idempotently;
//! - two pods on a bridge: default deny blocks a bridged TCP connect, an allow on 80 opens 80 (with
//!   replies) while 81 stays closed, the node itself still reaches the pod, and anti-spoofing drops
//!   a forged source IP and a forged ARP reply (proved by a control run without anti-spoofing).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use veilnet::netns;
use veilnet::policy::{
    compile, enable_bridge_netfilter, parse_counters, render, render_nft, ApplyOutcome,
    ClusterState, CounterValue, NamespaceInfo, NftApplier, PodInfo, Ruleset,
};
use veilnet_test_support::Netns;

/// A namespace `veilpol-<pid>-<n>-<tag>`, deleted (with its processes) when dropped.
struct Ns(Netns);

impl Ns {
    fn new(tag: &str) -> Ns {
        Ns(Netns::new("veilpol", tag))
    }
}

fn ip_cmd(ns: &str, args: &str) -> String {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    let out = Command::new("ip").args(&full).output().unwrap();
    assert!(
        out.status.success(),
        "ip {full:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mac_of(ns: &str, dev: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ip_cmd(ns, &format!("-j link show {dev}"))).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

fn policy(v: serde_json::Value) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    serde_json::from_value(v).unwrap()
}

#[test]
fn rendered_scripts_pass_check_and_load_atomically() {
    veilnet_test_support::require_root!();
    let ns = Ns::new("load");
    let mut applier = NftApplier::new(Some(&ns.0));

    // Big: 3000 pods in 30 namespaces, 100 of them on this node, 300 policies.
    let mut state = ClusterState::default();
    for n in 0..30 {
        state.namespaces.push(NamespaceInfo {
            name: format!("ns{n}"),
            labels: [("team".to_string(), format!("t{}", n % 5))].into(),
        });
        for p in 0..100 {
            let i = n * 100 + p;
            state.pods.push(PodInfo {
                namespace: format!("ns{n}"),
                name: format!("pod{p}"),
                labels: [("app".to_string(), format!("app{}", p % 10))].into(),
                ips: vec![IpAddr::from([
                    10,
                    100 + (i / 65536) as u8,
                    (i / 256 % 256) as u8,
                    (i % 256) as u8,
                ])],
                node: format!("node{}", i % 30),
                named_ports: vec![veilnet::policy::NamedPort {
                    name: "http".into(),
                    protocol: veilnet::policy::Protocol::Tcp,
                    port: 8000 + (p % 7) as u16,
                }],
                host_veth: Some(format!("veil{i}")),
                mac: Some("0a:58:00:00:00:01".parse().unwrap()),
                ..Default::default()
            });
        }
        for k in 0..10 {
            state.policies.push(policy(json!({
                "metadata": {"namespace": format!("ns{n}"), "name": format!("p{k}")},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app{k}")}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 5)}}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app1", "app2"]}]}}, {"ipBlock": {"cidr": "192.168.0.0/16", "except": [format!("192.168.{k}.0/24")]}}],
                                 "ports": [{"port": 80}, {"port": "http"}, {"port": 9000, "endPort": 9100, "protocol": "UDP"}, {"port": 3868, "protocol": "SCTP"}]}],
                    "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]
                }
            })));
        }
    }
    let compiled = compile(
        &state,
        "node0",
        &["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
    );
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    assert_eq!(compiled.anti_spoof.len(), 100);
    let big = render_nft(&compiled);
    applier.check(&big).unwrap();
    assert_eq!(applier.apply(&big).unwrap(), ApplyOutcome::Applied);
    assert_eq!(applier.apply(&big).unwrap(), ApplyOutcome::Unchanged);

    // The reviewed golden script (IPv6 sets, SCTP, egress named ports, allow logging, the
    // fail-closed port rule) loads too.
    let golden = include_str!("../src/policy/testdata/small.nft");
    applier.check(golden).unwrap();
    assert_eq!(applier.apply(golden).unwrap(), ApplyOutcome::Applied);

    // Small: one replaces the other in one transaction; the old chains are gone.
    state.pods.truncate(5);
    state.policies.truncate(1);
    let small = render_nft(&compile(&state, "node0", &[]));
    applier.check(&small).unwrap();
    assert_eq!(applier.apply(&small).unwrap(), ApplyOutcome::Applied);
    let listed = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "list", "table", "inet", "veilnet",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("chain ing_0"), "{listed}");
    assert!(!listed.contains("chain ing_5"), "{listed}");
    let counters = applier.counters().unwrap();
    assert!(
        counters
            .iter()
            .any(|c| c.family == "inet" && c.name == "pol_0"),
        "{counters:?}"
    );
    // The netlink dump reads what nft lists.
    let listed = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-j", "list", "counters"])
        .output()
        .unwrap();
    let mut from_nft = parse_counters(&String::from_utf8_lossy(&listed.stdout)).unwrap();
    let mut from_netlink = counters.clone();
    from_nft.sort_by(|a, b| (&a.family, &a.name).cmp(&(&b.family, &b.name)));
    from_netlink.sort_by(|a, b| (&a.family, &a.name).cmp(&(&b.family, &b.name)));
    assert_eq!(from_netlink, from_nft);
    assert!(
        counters
            .iter()
            .any(|c| c.family == "bridge" && c.name == "spoofed"),
        "{counters:?}"
    );

    // A broken script is refused and leaves the loaded ruleset alone.
    let err = applier
        .apply("table inet veilnet {\n chain x {\n bogus\n }\n}\n")
        .unwrap_err();
    assert!(err.to_string().contains("nft apply failed"), "{err}");
    assert!(applier
        .counters()
        .unwrap()
        .iter()
        .any(|c| c.name == "pol_0"));
    applier.remove().unwrap();
    assert!(applier.counters().unwrap().is_empty());
}

/// Two pods (A, B) on bridge `veilbr0` in a node namespace.
struct BridgeLab {
    node: Ns,
    a: Ns,
    b: Ns,
    /// A "remote" peer reached by routing through the node (as VXLAN/WireGuard traffic is).
    remote: Ns,
    a_veth: String,
    b_veth: String,
    a_mac: String,
    b_mac: String,
}

const GW: &str = "10.99.0.1";
const A_IP: &str = "10.99.0.10";
const B_IP: &str = "10.99.0.11";
const REMOTE_IP: &str = "10.98.0.2";

impl BridgeLab {
    fn new() -> BridgeLab {
        let node = Ns::new("node");
        let a = Ns::new("a");
        let b = Ns::new("b");
        let id = std::process::id() % 100_000;
        let a_veth = format!("veila{id}");
        let b_veth = format!("veilb{id}");
        ip_cmd(&node.0, "link add veilbr0 type bridge");
        ip_cmd(&node.0, &format!("addr add {GW}/24 dev veilbr0"));
        ip_cmd(&node.0, "link set veilbr0 up");
        for (veth, pod, addr) in [(&a_veth, &a, A_IP), (&b_veth, &b, B_IP)] {
            ip_cmd(
                &node.0,
                &format!("link add {veth} type veth peer name eth0 netns {}", pod.0),
            );
            ip_cmd(&node.0, &format!("link set {veth} master veilbr0 up"));
            ip_cmd(&pod.0, &format!("addr add {addr}/24 dev eth0"));
            ip_cmd(&pod.0, "link set eth0 up");
            ip_cmd(&pod.0, &format!("route add default via {GW}"));
        }
        let remote = Ns::new("r");
        ip_cmd(
            &node.0,
            &format!(
                "link add vroute type veth peer name eth0 netns {}",
                remote.0
            ),
        );
        ip_cmd(&node.0, "addr add 10.98.0.1/24 dev vroute");
        ip_cmd(&node.0, "link set vroute up");
        ip_cmd(&remote.0, &format!("addr add {REMOTE_IP}/24 dev eth0"));
        ip_cmd(&remote.0, "link set eth0 up");
        ip_cmd(&remote.0, "route add default via 10.98.0.1");
        netns::run_in(&node.0, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })
        .unwrap()
        .unwrap();
        enable_bridge_netfilter(Some(&node.0)).unwrap();
        let a_mac = mac_of(&a.0, "eth0");
        let b_mac = mac_of(&b.0, "eth0");
        BridgeLab {
            node,
            a,
            b,
            remote,
            a_veth,
            b_veth,
            a_mac,
            b_mac,
        }
    }

    fn state(&self, policies: Vec<serde_json::Value>, anti_spoof: bool) -> ClusterState {
        let pod = |name: &str, ip: &str, veth: &str, mac: &str| PodInfo {
            namespace: "t".into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            node: "n".into(),
            host_veth: anti_spoof.then(|| veth.to_string()),
            mac: Some(mac.parse().unwrap()),
            ..Default::default()
        };
        ClusterState {
            pods: vec![
                pod("a", A_IP, &self.a_veth, &self.a_mac),
                pod("b", B_IP, &self.b_veth, &self.b_mac),
            ],
            namespaces: vec![NamespaceInfo {
                name: "t".into(),
                labels: Default::default(),
            }],
            policies: policies.into_iter().map(policy).collect(),
        }
    }

    fn apply(&self, applier: &mut NftApplier, state: &ClusterState) {
        let compiled = compile(state, "n", &[GW.parse().unwrap()]);
        applier.apply_compiled(&compiled).unwrap();
    }
}

/// A TCP server in `ns` that answers every connection with "hi <port>".
fn serve_tcp(ns: &str, ip: &str, port: u16) {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let listener = netns::run_in(ns, move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(format!("hi {port}").as_bytes());
        }
    });
}

/// Connects from `ns` and returns the server's greeting, or None if the connection failed.
fn tcp_probe(ns: &str, ip: &str, port: u16) -> Option<String> {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        Some(buf)
    })
    .unwrap()
}

/// Sends a UDP datagram from `src` (an address of `ns`) to `dst`; true if `receiver` got it.
fn udp_probe(ns: &str, src: &str, receiver: &UdpSocket, dst: SocketAddr) -> bool {
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    let token = format!("tok-{}", rand_token());
    let t = token.clone();
    netns::run_in(ns, move || {
        let s = UdpSocket::bind(src).unwrap();
        for _ in 0..3 {
            let _ = s.send_to(t.as_bytes(), dst);
        }
    })
    .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 64];
    while let Ok((n, _)) = receiver.recv_from(&mut buf) {
        if &buf[..n] == token.as_bytes() {
            return true;
        }
    }
    false
}

fn rand_token() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst) as u64 + u64::from(std::process::id()) * 1000
}

fn parse_mac(s: &str) -> [u8; 6] {
    let m: veilnet::policy::MacAddr = s.parse().unwrap();
    m.0
}

/// From inside `ns`, sends an ARP reply on eth0 claiming `claimed_ip` is at our MAC.
fn send_forged_arp_reply(
    ns: &str,
    our_mac: &str,
    claimed_ip: [u8; 4],
    target_mac: &str,
    target_ip: [u8; 4],
) {
    let (sha, tha) = (parse_mac(our_mac), parse_mac(target_mac));
    netns::run_in(ns, move || {
        let mut frame = Vec::with_capacity(42);
        frame.extend_from_slice(&tha);
        frame.extend_from_slice(&sha);
        frame.extend_from_slice(&[0x08, 0x06]); // ARP
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]); // Ethernet/IPv4, reply
        frame.extend_from_slice(&sha);
        frame.extend_from_slice(&claimed_ip);
        frame.extend_from_slice(&tha);
        frame.extend_from_slice(&target_ip);
        // SAFETY: plain socket calls on a socket we own; the address struct is fully initialised.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ARP as u16).to_be() as i32,
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&tha);
            for _ in 0..3 {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    frame.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    })
    .unwrap();
}

/// B's neighbour entry for the gateway: its MAC, if any.
fn neigh_mac(ns: &str, ip: &str) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ip_cmd(ns, &format!("-j neigh show {ip} dev eth0"))).unwrap();
    v.get(0)
        .and_then(|e| e["lladdr"].as_str())
        .map(str::to_string)
}

/// Seeds B's neighbour table with the real gateway MAC (stale, so a later reply may override it)
/// and waits out the kernel's locktime, then sends A's forged reply. Returns B's entry after.
fn arp_poison_attempt(lab: &BridgeLab) -> Option<String> {
    let gw_mac = mac_of(&lab.node.0, "veilbr0");
    ip_cmd(
        &lab.b.0,
        &format!("neigh replace {GW} lladdr {gw_mac} nud stale dev eth0"),
    );
    std::thread::sleep(Duration::from_millis(1200));
    send_forged_arp_reply(
        &lab.a.0,
        &lab.a_mac,
        [10, 99, 0, 1],
        &lab.b_mac,
        [10, 99, 0, 11],
    );
    std::thread::sleep(Duration::from_millis(300));
    neigh_mac(&lab.b.0, GW)
}

#[test]
fn bridged_pods_are_filtered_and_cannot_spoof() {
    veilnet_test_support::require_root!();
    let lab = BridgeLab::new();
    let mut applier = NftApplier::new(Some(&lab.node.0));
    serve_tcp(&lab.b.0, B_IP, 80);
    serve_tcp(&lab.b.0, B_IP, 81);
    let b_udp = netns::run_in(&lab.b.0, || UdpSocket::bind(format!("{B_IP}:80")))
        .unwrap()
        .unwrap();
    let b_udp_addr: SocketAddr = format!("{B_IP}:80").parse().unwrap();

    // No policy: everything flows, bridged.
    lab.apply(&mut applier, &lab.state(vec![], true));
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 80).as_deref(), Some("hi 80"));
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 81).as_deref(), Some("hi 81"));
    assert_eq!(
        tcp_probe(&lab.remote.0, B_IP, 80).as_deref(),
        Some("hi 80"),
        "routed"
    );

    // Default deny ingress in t: the bridged connect to B fails, but the node itself (kubelet
    // probes) still reaches B.
    let deny = json!({"metadata": {"namespace": "t", "name": "deny"}, "spec": {"podSelector": {}, "ingress": []}});
    lab.apply(&mut applier, &lab.state(vec![deny.clone()], true));
    assert_eq!(
        tcp_probe(&lab.a.0, B_IP, 80),
        None,
        "default deny must block bridged TCP"
    );
    assert_eq!(
        tcp_probe(&lab.remote.0, B_IP, 80),
        None,
        "default deny must block routed TCP"
    );
    assert_eq!(
        tcp_probe(&lab.node.0, B_IP, 80).as_deref(),
        Some("hi 80"),
        "node traffic allowed"
    );

    // Allow TCP+UDP 80 to b: 80 opens (the greeting proves replies flow), 81 stays closed, and
    // the reverse direction (b → a, isolated too) stays closed.
    let allow80 = json!({"metadata": {"namespace": "t", "name": "allow-80"}, "spec": {
        "podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}]}]}});
    lab.apply(
        &mut applier,
        &lab.state(vec![deny.clone(), allow80.clone()], true),
    );
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 80).as_deref(), Some("hi 80"));
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 81), None);
    assert_eq!(
        tcp_probe(&lab.remote.0, B_IP, 80).as_deref(),
        Some("hi 80"),
        "routed allow"
    );
    assert_eq!(tcp_probe(&lab.remote.0, B_IP, 81), None, "routed deny");
    serve_tcp(&lab.a.0, A_IP, 80);
    assert_eq!(tcp_probe(&lab.b.0, A_IP, 80), None);
    let pol = |applier: &NftApplier, name: &str| {
        applier
            .counters()
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.packets)
            .unwrap_or(0)
    };
    let allow_counter = render(
        &compile(
            &lab.state(vec![deny.clone(), allow80.clone()], true),
            "n",
            &[],
        ),
        None,
    )
    .policy_counters()
    .find(|(_, p)| p.name == "allow-80")
    .unwrap()
    .0
    .to_string();
    assert!(
        pol(&applier, &allow_counter) >= 1,
        "allow counted: {:?}",
        applier.counters().unwrap()
    );
    assert!(pol(&applier, "deny_ingress") >= 1);

    // Anti-spoofing. The policy allows UDP 80 from anyone, so only anti-spoofing can stop a
    // forged source. Control: a genuine datagram arrives.
    assert!(
        udp_probe(&lab.a.0, A_IP, &b_udp, b_udp_addr),
        "genuine UDP must arrive"
    );
    ip_cmd(&lab.a.0, "addr add 10.99.0.50/24 dev eth0");
    // Control without anti-spoofing (no host veths in the model): the forged source gets through,
    // and so does a forged ARP reply. This proves the checks below can fail.
    lab.apply(
        &mut applier,
        &lab.state(vec![deny.clone(), allow80.clone()], false),
    );
    assert!(
        udp_probe(&lab.a.0, "10.99.0.50", &b_udp, b_udp_addr),
        "control: spoof passes unguarded"
    );
    assert_eq!(
        arp_poison_attempt(&lab).as_deref(),
        Some(lab.a_mac.as_str()),
        "control: ARP poisoned"
    );

    lab.apply(&mut applier, &lab.state(vec![deny, allow80], true));
    let spoofed_before = pol(&applier, "spoofed");
    assert!(
        !udp_probe(&lab.a.0, "10.99.0.50", &b_udp, b_udp_addr),
        "forged source IP must be dropped"
    );
    let poisoned = arp_poison_attempt(&lab);
    assert_ne!(
        poisoned.as_deref(),
        Some(lab.a_mac.as_str()),
        "forged ARP reply must be dropped"
    );
    assert!(
        pol(&applier, "spoofed") > spoofed_before,
        "spoof drops counted"
    );
    // The genuine pod still works through its guard.
    assert!(udp_probe(&lab.a.0, A_IP, &b_udp, b_udp_addr));
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 80).as_deref(), Some("hi 80"));
}

/// `nft -j list table FAMILY veilnet` in `ns`, normalised so that two kernels holding the same
/// ruleset compare equal however they got there: handles dropped, set and map elements sorted,
/// objects sorted, rules kept in their order per chain.
fn listed_table(ns: &str, family: &str) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-j", "list", "table", family, "veilnet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut objects = Vec::new();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        if kind == "metainfo" {
            continue;
        }
        let mut body = body.clone();
        let obj = body.as_object_mut().unwrap();
        obj.remove("handle");
        if let Some(serde_json::Value::Array(elems)) = obj.get_mut("elem") {
            elems.sort_by_key(|e| e.to_string());
        }
        if kind == "rule" {
            let chain = obj["chain"].as_str().unwrap().to_string();
            rules.entry(chain).or_default().push(body.to_string());
        } else {
            objects.push(format!("{kind} {body}"));
        }
    }
    objects.sort();
    (objects, rules)
}

/// 4 namespaces of 24 pods over 3 nodes (node0 holds 32), and policies of every shape: pod and
/// namespace selectors, expressions, named ports both ways, ipBlock with except, IPv6.
fn mixed_cluster() -> ClusterState {
    let mut state = ClusterState::default();
    for n in 0..4 {
        state.namespaces.push(NamespaceInfo {
            name: format!("ns{n}"),
            labels: [("team".to_string(), format!("t{}", n % 2))].into(),
        });
        for p in 0..24 {
            let i = n * 24 + p;
            let mut ips = vec![IpAddr::from([10, 100, n as u8, 10 + p as u8])];
            if p % 5 == 0 {
                ips.push(format!("fd00::{n}:{p}").parse().unwrap());
            }
            state.pods.push(PodInfo {
                namespace: format!("ns{n}"),
                name: format!("pod{p}"),
                labels: [
                    ("app".to_string(), format!("app{}", p % 4)),
                    ("tier".to_string(), format!("t{}", p % 3)),
                ]
                .into(),
                ips,
                node: format!("node{}", i % 3),
                named_ports: vec![veilnet::policy::NamedPort {
                    name: "http".into(),
                    protocol: veilnet::policy::Protocol::Tcp,
                    port: 8000 + (p % 3) as u16,
                }],
                host_veth: Some(format!("veil{i}")),
                mac: Some(format!("0a:58:00:00:00:{i:02x}").parse().unwrap()),
                ..Default::default()
            });
        }
        for k in 0..4 {
            state.policies.push(policy(json!({
                "metadata": {"namespace": format!("ns{n}"), "name": format!("p{k}")},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app{k}")}},
                    "ingress": [{"from": [
                        {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 2)}},
                         "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}},
                        {"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % 4)}}},
                        {"ipBlock": {"cidr": "192.168.0.0/16", "except": [format!("192.168.{k}.0/24")]}}],
                        "ports": [{"port": 80}, {"port": "http"}, {"port": 9000, "endPort": 9100, "protocol": "UDP"}]}],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": "t2"}}, "namespaceSelector": {}}],
                                "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]
                }
            })));
        }
    }
    state
}

fn pod_mut<'a>(state: &'a mut ClusterState, ns: &str, name: &str) -> &'a mut PodInfo {
    state
        .pods
        .iter_mut()
        .find(|p| p.namespace == ns && p.name == name)
        .unwrap()
}

#[test]
fn incremental_updates_leave_the_kernel_as_a_fresh_full_load_would() {
    veilnet_test_support::require_root!();
    let inc = Ns::new("inc");
    let fresh = Ns::new("fresh");
    let mut applier = NftApplier::new(Some(&inc.0));
    let node_addrs: Vec<IpAddr> = vec!["10.100.9.1".parse().unwrap()];
    let mut state = mixed_cluster();
    let banked: std::cell::RefCell<Vec<String>> = Default::default();
    let mut bank = |_: &Ruleset, values: &[CounterValue]| {
        banked
            .borrow_mut()
            .extend(values.iter().map(|c| c.name.clone()));
    };

    let first = render(&compile(&state, "node0", &node_addrs), None);
    let outcome = applier.update(first.clone(), &mut bank).unwrap();
    assert!(
        matches!(outcome, ApplyOutcome::Replaced { .. }),
        "{outcome:?}"
    );
    // Idempotent: the same ruleset again sends nothing.
    let again = render(&compile(&state, "node0", &node_addrs), applier.current());
    assert_eq!(
        applier.update(again, &mut bank).unwrap(),
        ApplyOutcome::Unchanged
    );

    type Change = Box<dyn Fn(&mut ClusterState)>;
    let changes: Vec<(&str, Change)> = vec![
        // A peer's label: pod IPs move between peer and destination sets.
        (
            "peer relabelled",
            Box::new(|s| {
                pod_mut(s, "ns1", "pod4")
                    .labels
                    .insert("tier".into(), "t2".into());
            }),
        ),
        // A local pod's label: it changes policies (chains, map elements, counters).
        (
            "local pod relabelled",
            Box::new(|s| {
                pod_mut(s, "ns0", "pod0")
                    .labels
                    .insert("app".into(), "app2".into());
            }),
        ),
        (
            "namespace relabelled",
            Box::new(|s| {
                s.namespaces[1].labels.insert("team".into(), "t0".into());
            }),
        ),
        // The last local pod of ns3 selected by p1 goes: p1's counter in ns3 is destroyed.
        (
            "policy loses its local pods",
            Box::new(|s| {
                s.pods.retain(|p| {
                    !(p.namespace == "ns3" && p.node == "node0" && p.labels["app"] == "app1")
                });
            }),
        ),
        (
            "local pod added with IPv6",
            Box::new(|s| {
                let mut p = s.pods[0].clone();
                p.name = "newcomer".into();
                p.ips = vec![
                    "10.100.0.200".parse().unwrap(),
                    "fd00::200".parse().unwrap(),
                ];
                p.host_veth = Some("veilnew".into());
                s.pods.push(p);
            }),
        ),
        (
            "policy removed",
            Box::new(|s| {
                s.policies
                    .retain(|p| p.metadata.name.as_deref() != Some("p3"));
            }),
        ),
    ];
    let mut fresh_applier = NftApplier::new(Some(&fresh.0));
    for (what, change) in &changes {
        change(&mut state);
        let next = render(&compile(&state, "node0", &node_addrs), applier.current());
        let outcome = applier.update(next.clone(), &mut bank).unwrap();
        assert!(
            matches!(outcome, ApplyOutcome::Updated { .. }),
            "{what}: {outcome:?}"
        );
        fresh_applier.apply(&next.script()).unwrap();
        let (objects, rules) = listed_table(&inc.0, "inet");
        assert!(
            objects.len() > 40 && rules.len() > 10,
            "{what}: the listing holds the ruleset"
        );
        for family in ["inet", "bridge"] {
            assert_eq!(
                listed_table(&inc.0, family),
                listed_table(&fresh.0, family),
                "{what}: {family} table differs from a fresh load"
            );
        }
    }
    let destroyed = banked.borrow().clone();
    assert!(
        !destroyed.is_empty() && destroyed.iter().all(|n| n.starts_with("pol_")),
        "destroyed policy counters are banked: {destroyed:?}"
    );

    // Someone deletes the table behind the applier's back: the delta fails, the applier falls
    // back to the full replace and says why.
    let out = Command::new("ip")
        .args([
            "netns", "exec", &inc.0, "nft", "delete", "table", "inet", "veilnet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    pod_mut(&mut state, "ns2", "pod7")
        .labels
        .insert("tier".into(), "t2".into());
    let next = render(&compile(&state, "node0", &node_addrs), applier.current());
    match applier.update(next.clone(), &mut bank).unwrap() {
        ApplyOutcome::Replaced { reason } => {
            assert!(reason.contains("incremental update failed"), "{reason}")
        }
        other => panic!("expected a full replace, got {other:?}"),
    }
    fresh_applier.apply(&next.script()).unwrap();
    assert_eq!(listed_table(&inc.0, "inet"), listed_table(&fresh.0, "inet"));
}

#[test]
fn incremental_updates_keep_counters_and_bank_the_destroyed_ones() {
    veilnet_test_support::require_root!();
    let lab = BridgeLab::new();
    let mut applier = NftApplier::new(Some(&lab.node.0));
    serve_tcp(&lab.b.0, B_IP, 80);
    serve_tcp(&lab.b.0, B_IP, 81);
    let deny = json!({"metadata": {"namespace": "t", "name": "deny"}, "spec": {"podSelector": {}, "ingress": []}});
    let allow80 = json!({"metadata": {"namespace": "t", "name": "allow-80"}, "spec": {
        "podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 80}]}]}});
    let allow81 = json!({"metadata": {"namespace": "t", "name": "allow-81"}, "spec": {
        "podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 81}]}]}});
    let mut banked: Vec<(String, u64)> = Vec::new();
    let step = |applier: &mut NftApplier,
                policies: Vec<serde_json::Value>,
                banked: &mut Vec<(String, u64)>| {
        let compiled = compile(&lab.state(policies, true), "n", &[GW.parse().unwrap()]);
        let next = render(&compiled, applier.current());
        applier
            .update(next, &mut |old, values| {
                for v in values {
                    let policy = old.counter_policy(&v.name).map(|p| p.name.clone());
                    banked.push((policy.unwrap_or_else(|| v.name.clone()), v.packets));
                }
            })
            .unwrap()
    };
    let counter_of = |applier: &NftApplier, policy: &str| {
        let name = applier
            .current()
            .unwrap()
            .policy_counters()
            .find(|(_, p)| p.name == policy)
            .map(|(n, _)| n.to_string())
            .unwrap();
        applier
            .counters()
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.packets)
    };

    step(
        &mut applier,
        vec![deny.clone(), allow80.clone()],
        &mut banked,
    );
    for _ in 0..3 {
        assert_eq!(tcp_probe(&lab.a.0, B_IP, 80).as_deref(), Some("hi 80"));
    }
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 81), None);
    let counted = counter_of(&applier, "allow-80");
    assert!(counted >= 3, "allow-80 counted {counted}");

    // A new policy for b rewrites b's chain, but allow-80's counter lives on: nothing is banked.
    let outcome = step(
        &mut applier,
        vec![deny.clone(), allow80.clone(), allow81.clone()],
        &mut banked,
    );
    assert!(
        matches!(outcome, ApplyOutcome::Updated { .. }),
        "{outcome:?}"
    );
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 81).as_deref(), Some("hi 81"));
    assert!(
        counter_of(&applier, "allow-80") >= counted,
        "kept across the update"
    );
    assert!(banked.is_empty(), "{banked:?}");

    // allow-80 goes: its counter is destroyed, and banked with its value first.
    let before = counter_of(&applier, "allow-80");
    let outcome = step(&mut applier, vec![deny, allow81], &mut banked);
    assert!(
        matches!(outcome, ApplyOutcome::Updated { .. }),
        "{outcome:?}"
    );
    assert_eq!(banked, vec![("allow-80".to_string(), before)]);
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 80), None, "80 closed again");
    assert_eq!(tcp_probe(&lab.a.0, B_IP, 81).as_deref(), Some("hi 81"));
}
