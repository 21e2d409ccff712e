//! Encryption in the lab, as a user checks it: only ciphertext on the wire, live per-node toggles,
//! strict mode that never downgrades (also while the agent restarts), rogue nodes that attract
//! nothing, keys that survive restarts and rotate on demand. The wire is checked with
//! scripts/verify-ciphertext.sh (tcpdump on the underlay). Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Two serving pods, `a` on node-1 and `b` on node-2 (and `c` on node-3 with three nodes).
fn two_pods(lab: &Lab, nodes: usize) {
    for (i, name) in ["a", "b", "c"].iter().take(nodes).enumerate() {
        lab.apply(&pod_manifest(
            "default",
            name,
            &format!("node-{}", i + 1),
            &[],
            SERVE,
        ));
    }
    for name in ["a", "b", "c"].iter().take(nodes) {
        lab.wait_pod_ip(&format!("default/{name}"), Duration::from_secs(60));
    }
}

#[test]
fn encrypted_by_default_everything_works_and_the_wire_carries_only_ciphertext() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("enc", &["--nodes", "3"]);
    two_pods(&lab, 3);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        let ip = lab.wait_pod_ip(&format!("default/{to}"), Duration::from_secs(5));
        let pod = format!("default/{from}");
        assert_eq!(
            lab.connect(&pod, &format!("{ip}:80"), "tcp", "3s"),
            Some(0),
            "{from}->{to} tcp"
        );
        assert_eq!(
            lab.connect(&pod, &format!("{ip}:81"), "udp", "3s"),
            Some(0),
            "{from}->{to} udp"
        );
        let ping = lab.exec(&pod, &["ping", "-c1", "-W2", &ip]);
        assert!(ping.status.success(), "{from}->{to} ping");
    }
    assert_wire(&lab, "default/a", "default/b", "encrypted");
    assert_wire(&lab, "default/c", "default/a", "encrypted");
    // Status shows the handshake and the bytes.
    let st = node_status(&lab, "node-1");
    let peer = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "node-2")
        .unwrap()
        .clone();
    assert_eq!(peer["path"], "wireguard");
    assert!(peer["lastHandshakeSeconds"].is_u64(), "{peer}");
    assert!(peer["txBytes"].as_u64().unwrap() > 0, "{peer}");
    assert_eq!(st["matrix"]["node-2"]["node-3"], "wireguard");
}

#[test]
fn toggling_a_node_off_and_on_changes_the_path_within_five_seconds() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("tog", &["--nodes", "2"]);
    two_pods(&lab, 2);
    assert_wire(&lab, "default/a", "default/b", "encrypted");

    set_mode(&lab, "node-2", "off");
    let took = wait_path(&lab, "node-1", "node-2", "vxlan", Duration::from_secs(5));
    eprintln!("on -> off: path changed in {took:?}");
    // `veilnet status` shows the real matrix after the toggle, and the policy/pod counts.
    eventually(
        Duration::from_secs(5),
        "the matrix to show the toggle",
        || {
            let st = node_status(&lab, "node-1");
            st["matrix"]["node-1"]["node-2"] == "vxlan"
                && st["matrix"]["node-2"]["node-1"] == "vxlan"
        },
    );
    let st = node_status(&lab, "node-1");
    assert_eq!(st["policy"]["localPods"], 1, "{:#}", st["policy"]);
    let human = ok(veilnet().args(["status", "--lab", &lab.name, "--node", "node-1"]));
    assert!(
        human.contains("path matrix") && human.contains("local pods"),
        "{human}"
    );
    assert_wire(&lab, "default/a", "default/b", "plaintext");

    set_mode(&lab, "node-2", "on");
    let took = wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(5),
    );
    eprintln!("off -> on: path changed in {took:?}");
    assert_wire(&lab, "default/a", "default/b", "encrypted");
}

#[test]
fn strict_against_off_is_blocked_even_while_the_agent_restarts() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("str", &["--nodes", "2"]);
    two_pods(&lab, 2);
    set_mode(&lab, "node-1", "strict");
    set_mode(&lab, "node-2", "off");
    wait_path(&lab, "node-1", "node-2", "blocked", Duration::from_secs(5));
    wait_path(&lab, "node-2", "node-1", "blocked", Duration::from_secs(5));
    assert_wire(&lab, "default/a", "default/b", "blocked");
    assert_wire(&lab, "default/b", "default/a", "blocked");

    // With the strict node's agent gone, the kernel still refuses plaintext.
    lab.kill_daemon("agent-node-1");
    assert_wire(&lab, "default/b", "default/a", "blocked");
    assert_wire(&lab, "default/a", "default/b", "blocked");
    lab.up_again();

    // Back to encryption on both: traffic flows again, encrypted.
    set_mode(&lab, "node-2", "on");
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(10),
    );
    assert_wire(&lab, "default/a", "default/b", "encrypted");
}

#[test]
fn rogue_nodes_attract_none_of_a_nodes_traffic() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("rog", &["--nodes", "2"]);
    two_pods(&lab, 2);
    let key1 = lab.annotation("node-1", "veilnet.io/wg-public-key");
    assert_eq!(key1.len(), 44);
    let rogue = |name: &str, cidr: &str, anns: serde_json::Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": anns},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
        .to_string()
    };
    // Claims node-1's pod CIDR in its annotation (the cluster gave it another one).
    lab.apply(&rogue(
        "rogue-cidr",
        "10.244.70.0/24",
        serde_json::json!({
        "veilnet.io/underlay-ip": "172.30.0.71", "veilnet.io/vtep-mac": "06:00:00:00:00:71",
        "veilnet.io/pod-cidrs": "10.244.1.0/24", "veilnet.io/encryption-mode": "on",
        "veilnet.io/wg-public-key": "cm9ndWUtY2lkci1rZXktMzItYnl0ZXMtbG9uZy4uLi4=",
        "veilnet.io/wg-endpoint": "172.30.0.71:51820"}),
    ));
    // Duplicates node-1's WireGuard key.
    lab.apply(&rogue(
        "rogue-key",
        "10.244.72.0/24",
        serde_json::json!({
        "veilnet.io/underlay-ip": "172.30.0.72", "veilnet.io/vtep-mac": "06:00:00:00:00:72",
        "veilnet.io/encryption-mode": "on", "veilnet.io/wg-public-key": key1,
        "veilnet.io/wg-endpoint": "172.30.0.72:51820"}),
    ));
    // Malformed key material: never a panic, never a path.
    for (name, cidr, key, ep) in [
        (
            "rogue-b64",
            "10.244.73.0/24",
            "not base64 at all!",
            "172.30.0.73:51820",
        ),
        (
            "rogue-len",
            "10.244.74.0/24",
            "c2hvcnQ=",
            "172.30.0.74:51820",
        ),
        (
            "rogue-ep",
            "10.244.75.0/24",
            "cm9ndWUtZXAta2V5LWlzLTMyLWJ5dGVzLWxvbmcuLi4=",
            "garbage:port",
        ),
    ] {
        lab.apply(&rogue(name, cidr, serde_json::json!({
            "veilnet.io/underlay-ip": format!("172.30.0.{}", &cidr[7..9]),
            "veilnet.io/vtep-mac": format!("06:00:00:00:00:{}", &cidr[7..9]),
            "veilnet.io/encryption-mode": "on", "veilnet.io/wg-public-key": key, "veilnet.io/wg-endpoint": ep})));
    }
    // The cluster records an address for each rogue (as a kubelet would write it), so the
    // rogues get as far as the path decision.
    for (name, ip) in [
        ("rogue-cidr", "172.30.0.71"),
        ("rogue-key", "172.30.0.72"),
        ("rogue-b64", "172.30.0.73"),
        ("rogue-len", "172.30.0.74"),
        ("rogue-ep", "172.30.0.75"),
        ("rogue-unrecorded", ""),
    ] {
        if ip.is_empty() {
            continue;
        }
        record_address(&lab, name, ip);
    }
    // Publishes an underlay address the cluster does not record for it: ignored altogether.
    lab.apply(&rogue(
        "rogue-unrecorded",
        "10.244.76.0/24",
        serde_json::json!({
        "veilnet.io/underlay-ip": "172.30.0.77", "veilnet.io/vtep-mac": "06:00:00:00:00:76",
        "veilnet.io/encryption-mode": "on",
        "veilnet.io/wg-public-key": "cm9ndWUtdW5yZWNvcmRlZC1rZXktMzItYnl0ZXMuLi4=",
        "veilnet.io/wg-endpoint": "172.30.0.12:51820"}),
    ));
    wait_path(
        &lab,
        "node-2",
        "rogue-key",
        "blocked",
        Duration::from_secs(10),
    );
    // Only the newcomer is refused: node-1 (the key's senior holder) keeps its encrypted path.
    assert_eq!(path_to(&lab, "node-2", "node-1"), "wireguard");
    eventually(
        Duration::from_secs(10),
        "rogue-unrecorded is ignored",
        || {
            node_status(&lab, "node-2")["rejected"]["rogue-unrecorded"]
                .as_str()
                .is_some_and(|r| r.contains("not one of the addresses the cluster records"))
        },
    );
    for r in ["rogue-b64", "rogue-len", "rogue-ep"] {
        wait_path(&lab, "node-2", r, "blocked", Duration::from_secs(10));
    }
    // rogue-cidr is a valid peer, but only for its own CIDR: node-1's CIDR never routes to it.
    assert_eq!(path_to(&lab, "node-2", "rogue-cidr"), "wireguard");
    let route = lab.ip(2, &["route", "get", "10.244.1.2"]);
    assert!(
        !route.contains("10.244.70") && route.contains("veilwg0"),
        "{route}"
    );
    let st = node_status(&lab, "node-2");
    let rogue_cidr = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "rogue-cidr")
        .unwrap()
        .clone();
    assert_eq!(rogue_cidr["endpoint"], "172.30.0.71:51820");

    // Traffic from node-2 to node-1's pod still reaches node-1, encrypted, and no rogue.
    assert_wire(&lab, "default/b", "default/a", "encrypted");
    // Agents are alive and said why.
    assert!(lab.daemon_pid("agent-node-1").is_some() && lab.daemon_pid("agent-node-2").is_some());
    let log = std::fs::read_to_string(format!(
        "/var/lib/veilnet-lab/{}/logs/agent-node-2.log",
        lab.name
    ))
    .unwrap();
    assert!(
        log.contains("WireGuard key is held by node-1"),
        "duplicate key not explained in the log"
    );
    assert!(
        log.contains("not standard base64") && log.contains("not 32 bytes"),
        "malformed keys not explained"
    );

    // Remove the key thief: node-1 and node-2 talk again, encrypted.
    lab.kubectl_ok(&["delete", "node", "rogue-key"]);
    wait_path(
        &lab,
        "node-2",
        "node-1",
        "wireguard",
        Duration::from_secs(10),
    );
    assert_wire(&lab, "default/b", "default/a", "encrypted");
}

#[test]
fn the_key_survives_restarts_and_rotation_restores_traffic_within_five_seconds() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("key", &["--nodes", "2"]);
    two_pods(&lab, 2);
    let key = lab.annotation("node-1", "veilnet.io/wg-public-key");
    let key_file = format!(
        "/var/lib/veilnet-lab/{}/nodes/node-1/state/wireguard/private.key",
        lab.name
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    lab.kill_daemon("agent-node-1");
    lab.up_again();
    let ip_a = lab.wait_pod_ip("default/a", Duration::from_secs(5));
    eventually(Duration::from_secs(10), "traffic after the restart", || {
        lab.connect("default/b", &format!("{ip_a}:80"), "tcp", "1s") == Some(0)
    });
    assert_eq!(
        lab.annotation("node-1", "veilnet.io/wg-public-key"),
        key,
        "the key changed across a restart"
    );

    // Rotation on demand.
    let started = Instant::now();
    lab.kubectl_ok(&[
        "annotate",
        "node",
        "node-1",
        "veilnet.io/rotate-key=1",
        "--overwrite",
    ]);
    eventually(Duration::from_secs(5), "a new public key", || {
        lab.annotation("node-1", "veilnet.io/wg-public-key") != key
    });
    eventually(Duration::from_secs(5), "traffic with the new key", || {
        lab.connect("default/b", &format!("{ip_a}:80"), "tcp", "1s") == Some(0)
    });
    eprintln!(
        "rotation: traffic restored {:?} after the request",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5) + Duration::from_secs(1));
    assert_wire(&lab, "default/b", "default/a", "encrypted");
    // The same request is handled once: another restart keeps the rotated key.
    let rotated = lab.annotation("node-1", "veilnet.io/wg-public-key");
    lab.kill_daemon("agent-node-1");
    lab.up_again();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lab.annotation("node-1", "veilnet.io/wg-public-key"),
        rotated
    );
}
