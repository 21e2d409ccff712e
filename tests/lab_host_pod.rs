//! A node's host network and the pods of other nodes (kubelets, hostNetwork pods, NodePorts, an
//! API server on a control-plane node): both directions work for every pair of modes that allows
//! pod traffic, are encrypted whenever both nodes want encryption, and are blocked — never
//! plaintext — where a strict node meets an off node. NetworkPolicy sees the node's real address.
//! The wire is checked with scripts/verify-ciphertext.sh (tcpdump on the underlay). Needs root.
//!
//! Pods reaching the lab's API server: the lab's control plane is not a node, so that path is
//! pod → non-node address (egress), which the real-control-plane and egress issues cover.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

fn two_nodes() -> Lab {
    let lab = Lab::up("hp", &["--nodes", "2"]);
    for (name, node) in [("a", "node-1"), ("b", "node-2")] {
        lab.apply(&pod_manifest(
            "default",
            name,
            node,
            &[("role", name)],
            SERVE,
        ));
    }
    for name in ["default/a", "default/b"] {
        lab.wait_pod_ip(name, Duration::from_secs(60));
    }
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(20),
    );
    lab
}

fn modes(lab: &Lab, one: &str, two: &str, path: &str) {
    set_mode(lab, "node-1", one);
    set_mode(lab, "node-2", two);
    wait_path(lab, "node-1", "node-2", path, Duration::from_secs(10));
    wait_path(lab, "node-2", "node-1", path, Duration::from_secs(10));
}

#[test]
fn host_and_remote_pods_talk_inside_the_pairs_path_in_every_mode() {
    veilnet_test_support::require_root!();
    let lab = two_nodes();
    // (node-1 mode, node-2 mode, the pair's path, what the wire must show)
    let matrix = [
        ("on", "on", "wireguard", "encrypted"),
        ("strict", "on", "wireguard", "encrypted"),
        ("off", "off", "vxlan", "plaintext"),
        ("on", "off", "vxlan", "plaintext"),
        ("strict", "off", "blocked", "blocked"),
    ];
    for (one, two, path, expect) in matrix {
        modes(&lab, one, two, path);
        for (from, to) in [
            ("node:node-1", "default/b"),
            ("default/b", "node:node-1"),
            ("default/a", "node:node-2"),
            ("node:node-2", "default/a"),
        ] {
            assert_wire(&lab, from, to, expect);
        }
        // Pod to pod keeps its path too.
        assert_wire(&lab, "default/a", "default/b", expect);
        // The path's device MTU: the TUN's (1440) or the VXLAN device's (1450), both sized for
        // a 1500-byte underlay.
        match path {
            "wireguard" => full_size_packets_cross(&lab, 1440),
            "vxlan" => full_size_packets_cross(&lab, 1450),
            _ => {}
        }
    }
}

/// MTUs hold on the host paths: a full-size DF packet from the host crosses, one that exceeds
/// the path device's MTU does not leave; a pod's full-size packet reaches the other host.
fn full_size_packets_cross(lab: &Lab, mtu: u32) {
    let b = lab.wait_pod_ip("default/b", Duration::from_secs(5));
    let ping = |netns: &str, to: &str, payload: u32| {
        let mut cmd = std::process::Command::new("ping");
        cmd.args([
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &payload.to_string(),
            to,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        veilnet::netns::command_in(netns, &mut cmd).unwrap();
        cmd.status().unwrap().success()
    };
    // The pod's MTU (1440) minus 20 (IPv4) and 8 (ICMP) always crosses; beyond the path device's
    // MTU nothing leaves (between the two, over VXLAN, node-2 answers "fragmentation needed"
    // for the pod's 1440-byte link: ordinary path MTU discovery).
    let node1 = lab.node_netns(1);
    let full = 1440 - 28;
    assert!(
        ping(&node1, &b, full),
        "host(node-1) → pod b: a full-size packet is lost"
    );
    assert!(
        !ping(&node1, &b, mtu - 28 + 1),
        "host(node-1) → pod b: an oversized DF packet left"
    );
    let a = lab.pod_netns("default/a");
    assert!(
        ping(&a, "172.30.0.12", 1412),
        "pod a → host(node-2): a full-size packet is lost"
    );
}

/// The node's host network probes pod b on node-2 every 50 ms while `disturb` runs; returns
/// (answered, lost).
fn probing_while(lab: &Lab, disturb: impl FnOnce()) -> (usize, usize) {
    let target = format!(
        "{}:81",
        lab.wait_pod_ip("default/b", Duration::from_secs(10))
    );
    let node1 = lab.node_netns(1);
    let stop = AtomicBool::new(false);
    let (answered, lost) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match probe_in(&node1, &target, "udp", "1s") {
                    Some(0) => answered.fetch_add(1, Ordering::Relaxed),
                    _ => lost.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        disturb();
        stop.store(true, Ordering::Relaxed);
    });
    (answered.into_inner(), lost.into_inner())
}

#[test]
fn host_traffic_to_a_remote_pod_survives_the_peers_agent_restart_and_a_key_rotation() {
    veilnet_test_support::require_root!();
    let lab = two_nodes();
    let (answered, lost) = probing_while(&lab, || {
        std::thread::sleep(Duration::from_secs(1));
        lab.kill_daemon("agent-node-2");
        std::thread::sleep(Duration::from_secs(2));
        lab.up_again();
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(answered > 10, "only {answered} probes answered");
    assert_eq!(lost, 0, "{lost} probes lost while node-2's agent restarted");

    // A key rotation on node-2: host traffic resumes within the rotation bound.
    let before = node_status(&lab, "node-2")["publicKey"].clone();
    lab.kubectl_ok(&[
        "annotate",
        "node",
        "node-2",
        "veilnet.io/rotate-key=now-1",
        "--overwrite",
    ]);
    eventually(Duration::from_secs(10), "node-2's key rotated", || {
        node_status(&lab, "node-2")["publicKey"] != before
    });
    let target = format!(
        "{}:81",
        lab.wait_pod_ip("default/b", Duration::from_secs(5))
    );
    eventually(
        Duration::from_secs(5),
        "host traffic after the rotation",
        || probe_in(&lab.node_netns(1), &target, "udp", "1s") == Some(0),
    );
}

fn ingress_policy(lab: &Lab, from: &str) {
    lab.apply(&format!(
        r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
            "metadata":{{"namespace":"default","name":"b-ingress"}},
            "spec":{{"podSelector":{{"matchLabels":{{"role":"b"}}}},"policyTypes":["Ingress"],
                    "ingress":[{from}]}}}}"#
    ));
}

#[test]
fn network_policy_sees_the_remote_nodes_real_address() {
    veilnet_test_support::require_root!();
    let lab = two_nodes();
    let b = format!(
        "{}:80",
        lab.wait_pod_ip("default/b", Duration::from_secs(5))
    );
    let (node1, node2) = (lab.node_netns(1), lab.node_netns(2));
    assert_eq!(probe_in(&node1, &b, "tcp", "2s"), Some(0));

    // Default deny ingress on b: node-1's host is denied, b's own node is still allowed.
    ingress_policy(&lab, "");
    eventually(Duration::from_secs(10), "node-1's host is denied", || {
        probe_in(&node1, &b, "tcp", "1s") == Some(1)
    });
    assert_eq!(
        probe_in(&node2, &b, "tcp", "2s"),
        Some(0),
        "traffic from a pod's own node stays allowed"
    );

    // An ipBlock with node-1's address lets it in, on the encrypted path and on VXLAN alike.
    ingress_policy(&lab, r#"{"from":[{"ipBlock":{"cidr":"172.30.0.11/32"}}]}"#);
    eventually(Duration::from_secs(10), "node-1's host is allowed", || {
        probe_in(&node1, &b, "tcp", "1s") == Some(0)
    });
    assert_ne!(
        probe_in(&lab.pod_netns("default/a"), &b, "tcp", "1s"),
        Some(0),
        "pod a is not in the ipBlock"
    );
    modes(&lab, "off", "off", "vxlan");
    assert_eq!(probe_in(&node1, &b, "tcp", "2s"), Some(0));
    assert_ne!(
        probe_in(&lab.pod_netns("default/a"), &b, "tcp", "1s"),
        Some(0)
    );
}
