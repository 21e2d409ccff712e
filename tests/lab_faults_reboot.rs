//! A node rebooted: every process of node-1 and of its pods SIGKILLed, its network namespace and
//! its pods' destroyed (with every link, route, nft table and socket in them), its run directory
//! wiped (a reboot empties `/run`), and then the node started again, as `lab up` does, with its
//! state directory, kubelet directory and CNI configuration kept (they live on disk). The node
//! must come back as itself: the same WireGuard key (so peers need no new annotation), the same
//! pod CIDR, its pod recreated by the kubelet with an address from that CIDR, encrypted traffic
//! with the peer again. The time from power-on to traffic is printed. Needs root.
//!
//! Control planes: both (the rebooted node's kubelet and agent resume against either API server).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Pids of every process in network namespace `ns` (`ip netns pids`).
fn pids_in(ns: &str) -> Vec<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    text(&out)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The network namespace pod `ns/name` runs in now, per `lab status` (None while it has none).
fn pod_netns_now(lab: &Lab, ns_name: &str) -> Option<String> {
    lab.status_json()["pods"]
        .as_array()?
        .iter()
        .find(|p| {
            let (ns, name) = (p["namespace"].as_str(), p["name"].as_str());
            format!("{}/{}", ns.unwrap_or(""), name.unwrap_or("")) == ns_name
        })
        .and_then(|p| p["netns"].as_str())
        .map(str::to_string)
}

/// What node-1's agent published and the cluster gave it: key, pod CIDRs.
fn identity(lab: &Lab) -> (String, String, String) {
    let node = lab.kubectl_json(&["get", "node", "node-1"]);
    (
        lab.annotation("node-1", "veilnet.io/wg-public-key"),
        lab.annotation("node-1", "veilnet.io/pod-cidrs"),
        node["spec"]["podCIDR"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[test]
fn a_rebooted_node_comes_back_with_its_key_and_cidr_and_talks_again() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("reboot", &["--nodes", "2"]);
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
    let a_before = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    lab.wait_pod_ip("default/b", Duration::from_secs(60));
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(30),
    );
    assert_wire(&lab, "default/b", "default/a", "encrypted");
    let before = identity(&lab);
    assert!(!before.0.is_empty() && !before.1.is_empty(), "{before:?}");
    let a_netns = lab.pod_netns("default/a");
    assert_eq!(ipam_addresses(&lab, 1), [a_before.parse().unwrap()].into());

    // Power off: the node's daemons, its pod's processes, then every namespace of the node.
    for role in ["kubelet-node-1", "agent-node-1", "datapath-node-1"] {
        lab.kill_daemon(role);
    }
    for ns in [a_netns.as_str(), &lab.node_netns(1)] {
        for pid in pids_in(ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    eventually(Duration::from_secs(10), "node-1's processes gone", || {
        pids_in(&a_netns).is_empty() && pids_in(&lab.node_netns(1)).is_empty()
    });
    for ns in [a_netns.as_str(), &lab.node_netns(1)] {
        ok(std::process::Command::new("ip").args(["netns", "del", ns]));
    }
    let run_dir = lab.run_dir(1);
    for entry in std::fs::read_dir(&run_dir)
        .expect("node-1's run dir")
        .flatten()
    {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    // Down for a while, as a reboot is: node-2 keeps its peer (the API still lists node-1).
    std::thread::sleep(Duration::from_secs(3));

    // Power on.
    let powered_on = Instant::now();
    lab.up_again();
    let up_took = powered_on.elapsed();
    // The kubelet finds the pod's sandbox gone, tears down what is left of it (its address goes
    // back to the pool) and makes a new one.
    let mut a_after = String::new();
    eventually(
        Duration::from_secs(90),
        "pod a rerun on node-1 and reached from b",
        || {
            let Some(netns) = pod_netns_now(&lab, "default/a") else {
                return false;
            };
            // Its namespace's name follows the pod's uid: existing again means made again.
            if !std::path::Path::new("/run/netns").join(&netns).exists() {
                return false;
            }
            let pod = lab.kubectl_json(&["get", "pod", "a"]);
            let Some(ip) = pod["status"]["podIP"].as_str() else {
                return false;
            };
            a_after = ip.to_string();
            lab.connect("default/b", &format!("{a_after}:80"), "tcp", "2s") == Some(0)
        },
    );
    let to_traffic = powered_on.elapsed();
    let after = identity(&lab);
    assert_eq!(
        after, before,
        "node-1 came back as another node (key, pod CIDRs)"
    );
    let cidr: ipnet::IpNet = before.2.parse().expect("node-1's podCIDR");
    let ip: std::net::IpAddr = a_after.parse().unwrap();
    assert!(
        cidr.contains(&ip),
        "pod a's new address {ip} is outside {cidr}"
    );
    // The old sandbox's address went back to the pool: nothing leaked by the reboot.
    assert_eq!(ipam_addresses(&lab, 1), [a_after.parse().unwrap()].into());
    assert_eq!(path_to(&lab, "node-1", "node-2"), "wireguard");
    assert_wire(&lab, "default/b", "default/a", "encrypted");
    assert_wire(&lab, "default/a", "default/b", "encrypted");
    eprintln!(
        "node-1 rebooted: the same key and pod CIDR {}; `lab up` took {:.1} s; traffic from b to \
         the rerun pod a ({a_before} before, {a_after} after) {:.1} s after power-on",
        before.2,
        up_took.as_secs_f64(),
        to_traffic.as_secs_f64()
    );
    lab.down();
}
