//! VXLAN injection (issue: any pod could impersonate any pod by sending VXLAN to a node): a
//! crafted VXLAN datagram, sent from an ordinary UDP socket (no raw socket, no capability used),
//! carrying a frame to node-1's VTEP MAC with a forged inner source, must never reach the pod on
//! node-1 unless it comes from a VXLAN-path peer's recorded address with that peer's own source.
//! Every refusal is counted (`vxlan_rejected`) and logged once (`vxlan-rejected` flow-log line
//! naming the outer sender). Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The port the victim listens on (a socket the test opens in the victim pod's netns).
const VICTIM_PORT: u16 = 7777;

/// VXLAN (VNI 1) + Ethernet to `vtep_mac` + IPv4/UDP from `inner_src` to `inner_dst:VICTIM_PORT`
/// carrying `marker`: what the kernel's VXLAN device decapsulates and routes.
fn vxlan_datagram(
    vtep_mac: [u8; 6],
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    marker: &str,
) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    d.extend(vtep_mac);
    d.extend([0x06, 0xde, 0xad, 0xbe, 0xef, 0x01, 0x08, 0x00]);
    let udp_len = 8 + marker.len();
    let total = (20 + udp_len) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend(inner_src.octets());
    ip.extend(inner_dst.octets());
    let sum = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    d.extend(ip);
    d.extend(40001u16.to_be_bytes());
    d.extend(VICTIM_PORT.to_be_bytes());
    d.extend((udp_len as u16).to_be_bytes());
    d.extend([0, 0]); // no UDP checksum (allowed for IPv4)
    d.extend(marker.as_bytes());
    d
}

/// Sends one datagram from an ordinary UDP socket opened in `netns`.
fn send_from(netns: &str, to: SocketAddr, payload: Vec<u8>) {
    veilnet::netns::run_in(netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(&payload, to).expect("send");
    })
    .expect("enter netns");
}

struct Victim {
    netns: String,
    ip: Ipv4Addr,
    socket: UdpSocket,
}

impl Victim {
    fn new(lab: &Lab, pod: &str) -> Victim {
        let ip: Ipv4Addr = lab
            .wait_pod_ip(pod, Duration::from_secs(60))
            .parse()
            .unwrap();
        let netns = lab.pod_netns(pod);
        let socket = veilnet::netns::run_in(&netns, || {
            UdpSocket::bind(("0.0.0.0", VICTIM_PORT)).expect("bind victim socket")
        })
        .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Victim { netns, ip, socket }
    }

    /// Whether a datagram carrying `marker` arrives within `within`.
    fn received(&self, marker: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.socket.recv_from(&mut buf) {
                if buf[..n] == *marker.as_bytes() {
                    return true;
                }
            }
        }
        false
    }
}

/// A named counter of a node's wire table.
fn wire_counter(lab: &Lab, node: usize, counter: &str) -> u64 {
    let ns = lab.node_netns(node);
    let out = ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "nft",
        "list",
        "counter",
        "inet",
        "veilnet_wire",
        counter,
    ]));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out}"))
}

/// Flow-log lines of node-1 that reject VXLAN from `outer` with inner source `inner`.
fn rejection_lines(lab: &Lab, outer: &str, inner: Ipv4Addr) -> usize {
    lab.flow_log(1)
        .iter()
        .filter(|l| {
            l["verdict"] == "vxlan-rejected"
                && l["src"]["ip"] == outer
                && l["inner"]["src"] == inner.to_string()
        })
        .count()
}

struct Setup {
    lab: Lab,
    victim: Victim,
    vtep_mac: [u8; 6],
    p2: Ipv4Addr,
    p3: Ipv4Addr,
    serial: std::cell::Cell<u32>,
}

impl Setup {
    fn marker(&self, case: &str) -> String {
        self.serial.set(self.serial.get() + 1);
        format!("forged-{case}-{}", self.serial.get())
    }

    /// Sends the forged datagram from `netns` to `to` and reports whether the victim got it.
    fn inject(&self, case: &str, netns: &str, to: SocketAddr, inner_src: Ipv4Addr) -> bool {
        let marker = self.marker(case);
        send_from(
            netns,
            to,
            vxlan_datagram(self.vtep_mac, inner_src, self.victim.ip, &marker),
        );
        self.victim.received(&marker, Duration::from_millis(800))
    }

    /// An injection that must be refused: not delivered, counted, and logged exactly once with
    /// its outer source (`outer`).
    fn refused(&self, case: &str, netns: &str, to: SocketAddr, inner_src: Ipv4Addr, outer: &str) {
        let logged = rejection_lines(&self.lab, outer, inner_src);
        self.refused_while_agent_down(case, netns, to, inner_src);
        eventually(
            Duration::from_secs(5),
            &format!("{case}: one flow-log line"),
            || rejection_lines(&self.lab, outer, inner_src) == logged + 1,
        );
    }

    /// Not delivered and counted; the flow log is the agent's, so it is not checked here.
    fn refused_while_agent_down(
        &self,
        case: &str,
        netns: &str,
        to: SocketAddr,
        inner_src: Ipv4Addr,
    ) {
        let counted = wire_counter(&self.lab, 1, "vxlan_rejected");
        assert!(
            !self.inject(case, netns, to, inner_src),
            "{case}: the forged frame reached the pod on node-1"
        );
        assert!(
            wire_counter(&self.lab, 1, "vxlan_rejected") > counted,
            "{case}: the rejection was not counted"
        );
    }
}

fn node1_vxlan() -> SocketAddr {
    "172.30.0.11:8472".parse().unwrap()
}

fn setup() -> Setup {
    let lab = Lab::up("vx", &["--nodes", "3"]);
    for (name, node) in [("victim", "node-1"), ("p2", "node-2"), ("p3", "node-3")] {
        lab.apply(&pod_manifest(
            "default",
            name,
            node,
            &[("role", name)],
            SERVE,
        ));
    }
    let victim = Victim::new(&lab, "default/victim");
    let p2 = lab
        .wait_pod_ip("default/p2", Duration::from_secs(60))
        .parse()
        .unwrap();
    let p3 = lab
        .wait_pod_ip("default/p3", Duration::from_secs(60))
        .parse()
        .unwrap();
    let node1 = lab.kubectl_json(&["get", "node", "node-1"]);
    let mac_text = node1["metadata"]["annotations"]["veilnet.io/vtep-mac"]
        .as_str()
        .expect("node-1 publishes its VTEP MAC")
        .to_string();
    let mut vtep_mac = [0u8; 6];
    for (i, part) in mac_text.split(':').enumerate() {
        vtep_mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    Setup {
        lab,
        victim,
        vtep_mac,
        p2,
        p3,
        serial: std::cell::Cell::new(0),
    }
}

#[test]
fn forged_vxlan_never_reaches_a_pod_unless_a_vxlan_peer_sends_its_own_pods_traffic() {
    veilnet_test_support::require_root!();
    let s = setup();
    let lab = &s.lab;
    let cp = lab.control_plane_netns();
    let (n2, n3) = (lab.node_netns(2), lab.node_netns(3));
    let p2_ns = lab.pod_netns("default/p2");
    let p3_ns = lab.pod_netns("default/p3");
    for peer in ["node-2", "node-3"] {
        wait_path(lab, "node-1", peer, "wireguard", Duration::from_secs(20));
    }

    // All `on`. From an ordinary UDP socket in a pod on node-3 (it reaches node-1 inside the
    // node-3 → node-1 tunnel, as pods reach every node's address).
    s.refused(
        "pod-on-node-3",
        &p3_ns,
        node1_vxlan(),
        s.p2,
        &s.p3.to_string(),
    );
    // From a host on the underlay that is not a node (the lab's control plane).
    s.refused("non-node", &cp, node1_vxlan(), s.p2, "172.30.0.1");
    // From node-2 itself, although that pair's path is WireGuard.
    s.refused(
        "node-2-on-a-wireguard-pair",
        &n2,
        node1_vxlan(),
        s.p2,
        "172.30.0.12",
    );
    // Inside WireGuard, to node-1's pod-CIDR address: arrives on the TUN.
    let gateway: SocketAddr = "10.244.1.1:8472".parse().unwrap();
    s.refused(
        "through-the-tunnel",
        &p2_ns,
        gateway,
        s.p2,
        &s.p2.to_string(),
    );
    // A pod sending to node-1's WireGuard port: never taken as a peer's (it arrives in a tunnel).
    let before = wire_counter(lab, 1, "wireguard_rejected");
    send_from(
        &p3_ns,
        "172.30.0.11:51820".parse().unwrap(),
        vec![1, 0, 0, 0],
    );
    eventually(
        Duration::from_secs(2),
        "the WireGuard port refuses a pod",
        || wire_counter(lab, 1, "wireguard_rejected") > before,
    );
    // A pod on node-1 to its own node.
    let victim_ns = s.victim.netns.clone();
    s.refused(
        "local-pod",
        &victim_ns,
        node1_vxlan(),
        s.p2,
        &s.victim.ip.to_string(),
    );

    // The rules live in the kernel: they hold while node-1's agent is down.
    lab.kill_daemon("agent-node-1");
    s.refused_while_agent_down("non-node-agent-down", &cp, node1_vxlan(), s.p2);
    lab.up_again();

    // All `off`: the pairs are VXLAN now.
    for node in ["node-1", "node-2", "node-3"] {
        set_mode(lab, node, "off");
    }
    for peer in ["node-2", "node-3"] {
        wait_path(lab, "node-1", peer, "vxlan", Duration::from_secs(10));
        wait_path(lab, peer, "node-1", "vxlan", Duration::from_secs(10));
    }
    s.refused("non-node-off", &cp, node1_vxlan(), s.p2, "172.30.0.1");
    // node-3 is a VXLAN peer, but node-2's pod is not its to claim.
    s.refused(
        "node-3-claims-node-2s-pod",
        &n3,
        node1_vxlan(),
        s.p2,
        "172.30.0.13",
    );
    // The legitimate path: node-2 sending its own pod's traffic over VXLAN.
    assert!(
        s.inject("node-2-legit", &n2, node1_vxlan(), s.p2),
        "node-2's own pod traffic over VXLAN must still be delivered"
    );

    // A NetworkPolicy that allows only p2: a forged frame claiming p2 from a non-node is not
    // delivered, while p2's real traffic over VXLAN is.
    lab.apply(
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
            "metadata":{"namespace":"default","name":"only-p2"},
            "spec":{"podSelector":{"matchLabels":{"role":"victim"}},"policyTypes":["Ingress"],
                    "ingress":[{"from":[{"podSelector":{"matchLabels":{"role":"p2"}}}]}]}}"#,
    );
    eventually(
        Duration::from_secs(10),
        "the policy isolates the victim",
        || probe_in(&p3_ns, &format!("{}:80", s.victim.ip), "tcp", "1s") == Some(1),
    );
    s.refused(
        "non-node-under-policy",
        &cp,
        node1_vxlan(),
        s.p2,
        "172.30.0.1",
    );
    assert!(s.inject("node-2-legit-under-policy", &n2, node1_vxlan(), s.p2));

    // Back `on`: node-2's VXLAN is refused again once the pair is WireGuard.
    for node in ["node-1", "node-2", "node-3"] {
        set_mode(lab, node, "on");
    }
    wait_path(
        lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(10),
    );
    s.refused(
        "node-2-after-toggle",
        &n2,
        node1_vxlan(),
        s.p2,
        "172.30.0.12",
    );
}
