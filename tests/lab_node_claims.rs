//! What a Node-object writer can do (issue: a compromised node cut honest nodes off; an annotation
//! edit downgraded encryption). node-3 plays the compromised node: its agent (and, where its
//! status is forged, its kubelet) is stopped and its Node object is edited as its credentials
//! allow. The honest pair node-1 ↔ node-2 must lose no probe, the newcomer is refused, and the
//! logs and Events stay bounded. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

fn annotate(lab: &Lab, node: &str, kv: &str) {
    lab.kubectl_ok(&["annotate", "node", node, kv, "--overwrite"]);
}

fn three_nodes() -> Lab {
    let lab = Lab::up("nc", &["--nodes", "3"]);
    for (name, node) in [("a", "node-1"), ("b", "node-2"), ("c", "node-3")] {
        lab.apply(&pod_manifest("default", name, node, &[], SERVE));
    }
    for name in ["default/a", "default/b", "default/c"] {
        lab.wait_pod_ip(name, Duration::from_secs(60));
    }
    for (node, peer) in [("node-1", "node-2"), ("node-2", "node-1")] {
        wait_path(&lab, node, peer, "wireguard", Duration::from_secs(20));
    }
    lab
}

#[test]
fn removing_or_garbling_a_published_mode_never_downgrades_a_pair() {
    veilnet_test_support::require_root!();
    let lab = three_nodes();
    // The agent is dead: nobody repairs the annotation.
    lab.kill_daemon("agent-node-2");
    for edit in [
        "veilnet.io/encryption-mode-",
        "veilnet.io/encryption-mode=garbage",
        "veilnet.io/encryption-mode=off",
    ] {
        if edit.ends_with('-') {
            lab.kubectl_ok(&["annotate", "node", "node-2", edit]);
        } else {
            annotate(&lab, "node-2", edit);
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            path_to(&lab, "node-1", "node-2"),
            "wireguard",
            "after {edit}"
        );
        assert_wire(&lab, "default/a", "default/b", "encrypted");
    }
    // With the agent alive, a removal is repaired and never leaks either.
    lab.up_again();
    eventually(Duration::from_secs(10), "node-2 republishes on", || {
        lab.annotation("node-2", "veilnet.io/encryption-mode") == "on"
    });
    lab.kubectl_ok(&["annotate", "node", "node-2", "veilnet.io/encryption-mode-"]);
    assert_wire(&lab, "default/a", "default/b", "encrypted");
    // Off takes effect only when the label says so: an operator's decision, and an Event says it.
    set_mode(&lab, "node-2", "off");
    wait_path(&lab, "node-1", "node-2", "vxlan", Duration::from_secs(10));
    let events = lab.kubectl_ok(&["get", "events", "-A", "-o", "json"]);
    assert!(
        events.contains("VeilnetPathDowngraded"),
        "no downgrade Event:\n{events}"
    );
}

/// Probes b (node-2) from a (node-1) and back every 100 ms while `attack` runs; returns the
/// number of lost probes.
fn lost_while(lab: &Lab, attack: impl FnOnce()) -> usize {
    let a_ns = lab.pod_netns("default/a");
    let b_ns = lab.pod_netns("default/b");
    let a = format!(
        "{}:81",
        lab.wait_pod_ip("default/a", Duration::from_secs(5))
    );
    let b = format!(
        "{}:81",
        lab.wait_pod_ip("default/b", Duration::from_secs(5))
    );
    let stop = AtomicBool::new(false);
    let (sent, lost) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for (ns, target) in [(&a_ns, &b), (&b_ns, &a)] {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if probe_in(ns, target, "udp", "1s") != Some(0) {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        attack();
        // Long enough for every agent to have planned from the edit several times.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
    });
    let sent = sent.into_inner();
    assert!(sent > 10, "too few probes: {sent}");
    lost.into_inner()
}

fn log_len(lab: &Lab, node: &str) -> u64 {
    std::fs::metadata(format!(
        "/var/lib/veilnet-lab/{}/logs/agent-{node}.log",
        lab.name
    ))
    .map(|m| m.len())
    .unwrap_or(0)
}

fn events_about(lab: &Lab, node: &str) -> Vec<serde_json::Value> {
    lab.kubectl_json(&["get", "events", "-A"])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == node)
        .collect()
}

#[test]
fn a_compromised_node_cannot_cut_honest_nodes_off() {
    veilnet_test_support::require_root!();
    let lab = three_nodes();
    let key1 = lab.annotation("node-1", "veilnet.io/wg-public-key");
    let key2 = lab.annotation("node-2", "veilnet.io/wg-public-key");
    let mac2 = lab.annotation("node-2", "veilnet.io/vtep-mac");
    lab.kill_daemon("agent-node-3");

    // node-3 claims node-1's key, then node-2's: the senior holders keep theirs.
    for key in [&key1, &key2] {
        let lost = lost_while(&lab, || {
            annotate(&lab, "node-3", &format!("veilnet.io/wg-public-key={key}"))
        });
        assert_eq!(lost, 0, "honest probes lost while node-3 claimed a key");
        for node in ["node-1", "node-2"] {
            let other = if node == "node-1" { "node-2" } else { "node-1" };
            assert_eq!(path_to(&lab, node, other), "wireguard");
        }
        let holder = if key == &key1 { "node-1" } else { "node-2" };
        let watcher = if holder == "node-1" {
            "node-2"
        } else {
            "node-1"
        };
        let st = node_status(&lab, watcher);
        let n3 = st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == "node-3")
            .cloned()
            .unwrap();
        assert_eq!(n3["path"], "blocked");
        assert!(
            n3["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("held by {holder}")),
            "{n3}"
        );
    }
    let events = events_about(&lab, "node-3");
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("WireGuard key is held by node-1"))),
        "no Event names the contested key: {events:?}"
    );

    // node-3 claims node-2's VTEP MAC: a WireGuard pair does not use it; nothing changes.
    let lost = lost_while(&lab, || {
        annotate(&lab, "node-3", &format!("veilnet.io/vtep-mac={mac2}"))
    });
    assert_eq!(lost, 0, "honest probes lost over a MAC claim");

    // node-3 publishes node-2's underlay address: not an address the cluster records for it.
    let lost = lost_while(&lab, || {
        annotate(&lab, "node-3", "veilnet.io/underlay-ip=172.30.0.12")
    });
    assert_eq!(lost, 0, "honest probes lost over an underlay claim");
    eventually(Duration::from_secs(5), "node-3 is ignored", || {
        node_status(&lab, "node-1")["rejected"]["node-3"]
            .as_str()
            .is_some_and(|r| r.contains("not one of the addresses"))
    });
    // …and with its kubelet's credentials it forges its recorded address too: node-2 keeps it.
    lab.kill_daemon("kubelet-node-3");
    let lost = lost_while(&lab, || record_address(&lab, "node-3", "172.30.0.12"));
    assert_eq!(lost, 0, "honest probes lost over a forged InternalIP");
    eventually(
        Duration::from_secs(5),
        "node-3 is refused as a newcomer",
        || {
            node_status(&lab, "node-1")["rejected"]["node-3"]
                .as_str()
                .is_some_and(|r| r.contains("is held by node node-2"))
        },
    );

    // An endpoint that is not the node's own address (the API server): refused.
    record_address(&lab, "node-3", "172.30.0.13");
    annotate(&lab, "node-3", "veilnet.io/underlay-ip=172.30.0.13");
    annotate(
        &lab,
        "node-3",
        "veilnet.io/wg-public-key=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    );
    annotate(&lab, "node-3", "veilnet.io/wg-endpoint=172.30.0.1:6443");
    eventually(
        Duration::from_secs(5),
        "node-3's endpoint is refused",
        || {
            let st = node_status(&lab, "node-1");
            st["peers"].as_array().unwrap().iter().any(|p| {
                p["node"] == "node-3"
                    && p["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("not its underlay address"))
            })
        },
    );

    // A 200,000-byte value, alternated 50 times: the logs and Events stay bounded.
    let (log1, log2) = (log_len(&lab, "node-1"), log_len(&lab, "node-2"));
    let events_before = events_about(&lab, "node-3").len();
    let big = "x".repeat(200_000);
    let patch_file = std::env::temp_dir().join(format!("{}-big-annotation.json", lab.name));
    for i in 0..50 {
        let value = format!("{big}{i}");
        let patch =
            serde_json::json!({"metadata": {"annotations": {"veilnet.io/vtep-mac": value}}});
        std::fs::write(&patch_file, patch.to_string()).unwrap();
        lab.kubectl_ok(&[
            "patch",
            "node",
            "node-3",
            "--type=merge",
            "--patch-file",
            patch_file.to_str().unwrap(),
        ]);
    }
    let _ = std::fs::remove_file(&patch_file);
    std::thread::sleep(Duration::from_secs(3));
    for (node, before) in [("node-1", log1), ("node-2", log2)] {
        let grown = log_len(&lab, node) - before;
        assert!(grown < 64 * 1024, "{node}'s log grew by {grown} bytes");
    }
    let new_events = events_about(&lab, "node-3").len() - events_before;
    assert!(new_events <= 12, "{new_events} new Events about node-3");
    let lost = lost_while(&lab, || {});
    assert_eq!(lost, 0);
}

/// Creates the Node object `name` with the given spec CIDR, recorded address and annotations
/// (what its agent would publish; here the test writes them as the rogue's credentials allow).
fn apply_rogue(lab: &Lab, name: &str, cidr: &str, address: &str, anns: serde_json::Value) {
    lab.apply(
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": anns},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        })
        .to_string(),
    );
    record_address(lab, name, address);
}

/// Deletes the rogue's Node object and waits until the honest agents have forgotten it (no peer
/// entry, so no handshake retry of an earlier variant is counted against the next).
fn remove_rogue(lab: &Lab, name: &str) {
    lab.kubectl_ok(&["delete", "node", name]);
    for node in ["node-1", "node-2"] {
        eventually(
            Duration::from_secs(10),
            &format!("{node} forgets the rogue"),
            || rogue_seen_by(lab, node, name).is_empty(),
        );
    }
}

/// What a well-behaved node at `ip` would publish, with `key` as its WireGuard key.
fn rogue_annotations(ip: &str, key: &str) -> serde_json::Value {
    serde_json::json!({
        "veilnet.io/underlay-ip": ip,
        "veilnet.io/vtep-mac": "06:00:00:00:00:99",
        "veilnet.io/vxlan-vni": "1",
        "veilnet.io/encryption-mode": "on",
        "veilnet.io/wg-public-key": key,
        "veilnet.io/wg-endpoint": format!("{ip}:51820"),
    })
}

/// Whether an Event about the rogue's Node object says `what`.
fn rogue_event_says(lab: &Lab, name: &str, what: &str) -> bool {
    events_about(lab, name)
        .iter()
        .any(|e| e["message"].as_str().is_some_and(|m| m.contains(what)))
}

/// node-1's view of the rogue: `blocked: reason`, `ignored: reason`, or its path.
fn rogue_seen_by(lab: &Lab, node: &str, name: &str) -> String {
    let st = node_status(lab, node);
    if let Some(r) = st["rejected"][name].as_str() {
        return format!("ignored: {r}");
    }
    st["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == name)
        .map(|p| match p["reason"].as_str() {
            Some(r) => format!("blocked: {r}"),
            None => p["path"].as_str().unwrap_or_default().to_string(),
        })
        .unwrap_or_default()
}

/// Every claim a rogue Node object can make (another node's pod CIDR, WireGuard key or underlay
/// address, or garbage) attracts no packet: tcpdump on the rogue's own address (a secondary
/// address of node-3's underlay interface, where the honest nodes would send what it attracts)
/// counts 0 while a ↔ b probe each other, and 0 are lost; each honest agent refuses the claim
/// and an Event on the rogue's Node names it. A well-behaved rogue first proves the capture
/// sees what an accepted peer gets.
#[test]
fn no_claim_of_a_rogue_node_attracts_a_packet() {
    veilnet_test_support::require_root!();
    let lab = three_nodes();
    let rogue_ip = "172.30.0.99";
    lab.ip(
        3,
        &["addr", "add", &format!("{rogue_ip}/24"), "dev", "eth0"],
    );
    let n3 = lab.node_netns(3);
    let key_2 = lab.annotation("node-2", "veilnet.io/wg-public-key");
    let cidr_2 = lab.kubectl_json(&["get", "node", "node-2"])["spec"]["podCIDR"]
        .as_str()
        .unwrap()
        .to_string();
    let a_ns = lab.pod_netns("default/a");
    let b_ip = lab.wait_pod_ip("default/b", Duration::from_secs(5));
    let to_rogue = ["dst", "host", rogue_ip];
    // A fresh key of the rogue's own.
    let own_key = "mZ8rP1Z3bWq1d0vCk8o0i2uX9FhJ5yq6v7s8t9u0w1E=";

    // Control: a well-behaved newcomer is a peer, and what the honest nodes send it (a
    // handshake as soon as it is a peer, then traffic for its pods) reaches its address.
    let seen = tcpdump_count(&n3, &to_rogue, || {
        apply_rogue(
            &lab,
            "rogue-control",
            "10.244.99.0/24",
            rogue_ip,
            rogue_annotations(rogue_ip, own_key),
        );
        wait_path(
            &lab,
            "node-1",
            "rogue-control",
            "wireguard",
            Duration::from_secs(15),
        );
        probe_in(&a_ns, "10.244.99.5:80", "udp", "1s");
    });
    assert!(seen > 0, "the capture saw nothing sent to an accepted peer");
    eprintln!("rogue claims: control (an accepted newcomer): {seen} packets to its address");
    remove_rogue(&lab, "rogue-control");

    // (claim, Node name, spec CIDR, recorded address, annotations, what the refusal says)
    let variants: Vec<(&str, &str, String, String, serde_json::Value, &str)> = vec![
        (
            "node-2's pod CIDR",
            "rogue-cidr",
            cidr_2.clone(),
            rogue_ip.to_string(),
            rogue_annotations(rogue_ip, own_key),
            "overlaps",
        ),
        (
            "node-2's WireGuard key",
            "rogue-key",
            "10.244.98.0/24".into(),
            rogue_ip.to_string(),
            rogue_annotations(rogue_ip, &key_2),
            "held by node-2",
        ),
        (
            "node-2's underlay address",
            "rogue-underlay",
            "10.244.97.0/24".into(),
            "172.30.0.12".into(),
            rogue_annotations("172.30.0.12", own_key),
            "held by node node-2",
        ),
        (
            "garbage in every field",
            "rogue-garbage",
            "10.244.96.0/24".into(),
            rogue_ip.to_string(),
            serde_json::json!({
                "veilnet.io/underlay-ip": "172.30.0.999",
                "veilnet.io/vtep-mac": "zz:zz",
                "veilnet.io/vxlan-vni": "-1",
                "veilnet.io/encryption-mode": "sideways",
                "veilnet.io/wg-public-key": "not-a-key",
                "veilnet.io/wg-endpoint": "nowhere",
            }),
            "bad annotation",
        ),
    ];
    for (claim, name, cidr, address, anns, says) in variants {
        // The capture runs from before the claim exists: a moment of acceptance would count.
        let mut lost = 0;
        let attracted = tcpdump_count(&n3, &to_rogue, || {
            apply_rogue(&lab, name, &cidr, &address, anns);
            for node in ["node-1", "node-2"] {
                eventually(
                    Duration::from_secs(10),
                    &format!("{node} refuses the rogue claiming {claim} ({says:?})"),
                    || {
                        // node-1 names the holder; node-2 sees its own value claimed.
                        let seen = rogue_seen_by(&lab, node, name);
                        (seen.starts_with("ignored") || seen.starts_with("blocked"))
                            && (node == "node-2" || seen.contains(says))
                    },
                );
            }
            lost = lost_while(&lab, || {
                // Traffic for what is claimed: b's pods, and the rogue's own CIDR.
                for _ in 0..5 {
                    probe_in(&a_ns, &format!("{b_ip}:80"), "udp", "1s");
                    probe_in(&a_ns, &format!("{}:80", cidr_host(&cidr)), "udp", "1s");
                }
            });
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !rogue_event_says(&lab, name, says) {
            assert!(
                std::time::Instant::now() < deadline,
                "no Event on {name} says {says:?}: {:#?}",
                events_about(&lab, name)
                    .iter()
                    .map(|e| e["message"].clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "rogue claims: {claim}: node-1 sees it as {:?}, node-2 as {:?}; {attracted} packets to the rogue, {lost} honest probes lost",
            rogue_seen_by(&lab, "node-1", name),
            rogue_seen_by(&lab, "node-2", name)
        );
        assert_eq!(attracted, 0, "the rogue claiming {claim} attracted packets");
        assert_eq!(
            lost, 0,
            "honest probes lost while the rogue claimed {claim}"
        );
        remove_rogue(&lab, name);
    }
    assert_wire(&lab, "default/a", "default/b", "encrypted");
}

/// A host address inside `cidr` (its network address + 5).
fn cidr_host(cidr: &str) -> String {
    let net: ipnet::Ipv4Net = cidr.parse().unwrap();
    std::net::Ipv4Addr::from(u32::from(net.network()) + 5).to_string()
}
