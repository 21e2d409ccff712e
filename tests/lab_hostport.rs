//! hostPort end to end in the lab: the lab kubelet passes `portMappings` from the pod's
//! `containers[].ports[].hostPort` (as kubelet/containerd do), the agent's conflist declares the
//! capability, and veilnet-cni DNATs `node-ip:hostPort` to the pod in `table ip
//! veilnet_hostport`. Reached from the lab's external host (`lab up --external-host`) and the
//! control plane's namespace (both on the underlay, outside the cluster) and from another node's host
//! namespace (through the wire table's hostPort exception), TCP and UDP; hairpin from the pod
//! itself; a second pod asking for the same hostPort fails its sandbox with the holder named;
//! deleting the pods removes the rules. Needs root.
//!
//! Control planes: both (the mappings go pod spec → kubelet → plugin; which API server stores
//! the pod does not matter, but both must deliver `hostPort` untouched).

mod common;

use std::time::Duration;

use common::*;

fn pod_with_ports(name: &str, ports: serde_json::Value) -> String {
    let mut pod: serde_json::Value =
        serde_json::from_str(&pod_manifest("default", name, "node-1", &[], SERVE)).unwrap();
    pod["spec"]["containers"][0]["ports"] = ports;
    pod.to_string()
}

fn dnat_rules(lab: &Lab) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_netns(1),
            "nft",
            "list",
            "table",
            "ip",
            "veilnet_hostport",
        ])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dnat to"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn node_ip(lab: &Lab, node: &str) -> String {
    let n = lab.kubectl_json(&["get", "node", node, "-o", "json"]);
    n["status"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["type"] == "InternalIP")
        .expect("InternalIP")["address"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn host_ports_reach_the_pod_conflicts_fail_and_delete_cleans_up() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("hostport", &["--nodes", "2", "--external-host"]);
    lab.apply(&pod_with_ports(
        "web",
        serde_json::json!([
            {"containerPort": 80, "hostPort": 8080, "protocol": "TCP"},
            {"containerPort": 81, "hostPort": 8053, "protocol": "UDP"}
        ]),
    ));
    let pod_ip = lab.wait_pod_ip("default/web", Duration::from_secs(60));
    let ip1 = node_ip(&lab, "node-1");
    let rules = dnat_rules(&lab);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(rules
        .iter()
        .any(|r| r.starts_with("tcp dport 8080") && r.contains(&format!("dnat to {pod_ip}:80"))));
    assert!(rules
        .iter()
        .any(|r| r.starts_with("udp dport 8053") && r.contains(&format!("dnat to {pod_ip}:81"))));

    let tcp = format!("{ip1}:8080");
    let udp = format!("{ip1}:8053");
    let external = format!("{}.ext", lab.name);
    for (from, what) in [
        (external, "the lab's external host"),
        (lab.control_plane_netns(), "the control plane's namespace"),
        (lab.node_netns(2), "node-2's host namespace"),
        // The node itself, to its own address (the output hook).
        (lab.node_netns(1), "node-1's host namespace"),
    ] {
        for (target, proto) in [(&tcp, "tcp"), (&udp, "udp")] {
            eventually(
                Duration::from_secs(15),
                &format!("{what} reaches {target}/{proto}"),
                || probe_in(&from, target, proto, "2s") == Some(0),
            );
        }
    }
    // Hairpin: the pod reaches its own hostPort through the node's address.
    for (target, proto) in [(&tcp, "tcp"), (&udp, "udp")] {
        eventually(
            Duration::from_secs(15),
            &format!("hairpin {target}/{proto} from the pod"),
            || lab.connect("default/web", target, proto, "2s") == Some(0),
        );
    }

    // A second pod asking for 8080/tcp on the same node: its sandbox fails, naming the holder.
    lab.apply(&pod_with_ports(
        "web2",
        serde_json::json!([{"containerPort": 80, "hostPort": 8080, "protocol": "TCP"}]),
    ));
    let mut message = String::new();
    eventually(
        Duration::from_secs(30),
        "web2's FailedCreatePodSandBox event",
        || {
            let events = lab.kubectl_json(&["get", "events", "-n", "default", "-o", "json"]);
            message = events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| {
                    e["involvedObject"]["name"] == "web2" && e["reason"] == "FailedCreatePodSandBox"
                })
                .filter_map(|e| e["message"].as_str())
                .find(|m| m.contains("hostPort"))
                .unwrap_or_default()
                .to_string();
            !message.is_empty()
        },
    );
    eprintln!("web2: {message}");
    assert!(
        message.contains("hostPort 8080/tcp is already in use by pod default/web"),
        "{message}"
    );
    assert_eq!(dnat_rules(&lab), rules, "the refused pod left a rule");

    // Deleting the pods removes the rules (web2 first, or it would take the freed port).
    lab.kubectl_ok(&["delete", "pod", "web2", "--wait=true"]);
    lab.kubectl_ok(&["delete", "pod", "web", "--wait=true"]);
    eventually(Duration::from_secs(30), "no DNAT rule left", || {
        dnat_rules(&lab).is_empty()
    });
    assert_ne!(
        probe_in(&lab.control_plane_netns(), &tcp, "tcp", "1s"),
        Some(0)
    );
    lab.down();
}
