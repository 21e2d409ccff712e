//! Forged ICMP errors: a pod that NetworkPolicy denies sends a raw ICMP port-unreachable quoting
//! another pod's UDP connection. Related packets are accepted only from the connection's own ends
//! (and from non-pod addresses: routers, nodes, outside), so the victim's socket never sees the
//! forged error, while a real one from the connection's peer still arrives. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;

/// ICMP destination unreachable / port unreachable quoting the UDP datagram `src → dst`.
fn port_unreachable(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut inner = vec![0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 17, 0, 0];
    inner.extend(src.ip().octets());
    inner.extend(dst.ip().octets());
    let sum = inet_checksum(&inner);
    inner[10..12].copy_from_slice(&sum.to_be_bytes());
    inner.extend(src.port().to_be_bytes());
    inner.extend(dst.port().to_be_bytes());
    inner.extend([0, 8, 0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend(inner);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    icmp
}

/// Sends `icmp` to `to` from a raw socket opened in `netns` (the kernel adds the IP header with
/// the netns's own source address: anti-spoofing holds, the attacker uses its real address).
fn send_icmp(netns: &str, to: Ipv4Addr, icmp: Vec<u8>) {
    veilnet::netns::run_in(netns, move || {
        use nix::sys::socket::{
            sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .expect("raw socket");
        let addr = SockaddrIn::from(SocketAddrV4::new(to, 0));
        sendto(fd.as_raw_fd(), &icmp, &addr, MsgFlags::empty()).expect("send icmp");
    })
    .unwrap();
}

/// A connected UDP socket in the victim pod that has talked to `server` once.
fn victim_socket(netns: &str, server: SocketAddrV4) -> UdpSocket {
    let s = veilnet::netns::run_in(netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(server).unwrap();
        s
    })
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    s
}

/// After a forged or real error: does the next receive fail with "connection refused"?
fn refused(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 512];
    matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn a_denied_pod_cannot_forge_icmp_errors_about_another_pods_connection() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("icmp", &["--nodes", "2"]);
    for (name, node, role) in [
        ("victim", "node-1", "victim"),
        ("server", "node-2", "server"),
        ("attacker", "node-2", "attacker"),
    ] {
        lab.apply(&pod_manifest(
            "default",
            name,
            node,
            &[("role", role)],
            SERVE,
        ));
    }
    let ip = |pod: &str| -> Ipv4Addr {
        lab.wait_pod_ip(pod, Duration::from_secs(60))
            .parse()
            .unwrap()
    };
    let (victim, server) = (ip("default/victim"), ip("default/server"));
    ip("default/attacker");
    let victim_ns = lab.pod_netns("default/victim");
    let attacker_ns = lab.pod_netns("default/attacker");
    // The victim accepts connections from the server only: the attacker is denied.
    lab.apply(
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
            "metadata":{"namespace":"default","name":"victim-from-server"},
            "spec":{"podSelector":{"matchLabels":{"role":"victim"}},"policyTypes":["Ingress"],
                    "ingress":[{"from":[{"podSelector":{"matchLabels":{"role":"server"}}}]}]}}"#,
    );
    eventually(Duration::from_secs(10), "the attacker is denied", || {
        probe_in(&attacker_ns, &format!("{victim}:80"), "tcp", "1s") == Some(1)
    });

    let server_addr = SocketAddrV4::new(server, 81);
    let s = victim_socket(&victim_ns, server_addr);
    s.send(b"veilnet-agnhost n1 hello\n").unwrap();
    let mut buf = [0u8; 512];
    s.recv(&mut buf).expect("the server answers");
    let local = match s.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => SocketAddrV4::new(victim, a.port()),
        other => panic!("{other}"),
    };
    // The forged error from the denied attacker never reaches the victim's socket.
    send_icmp(&attacker_ns, victim, port_unreachable(local, server_addr));
    assert!(!refused(&s), "the forged ICMP error reached the victim");

    // A real error from the connection's peer still does: the server's node answers a datagram
    // to a closed port with port-unreachable from the server's address.
    let closed = SocketAddrV4::new(server, 9);
    let s = victim_socket(&victim_ns, closed);
    s.send(b"anyone?").unwrap();
    assert!(refused(&s), "the server's genuine ICMP error was lost");
}
