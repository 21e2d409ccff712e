//! The CNI capabilities end to end in the lab: the lab kubelet passes `bandwidth` from the
//! standard `kubernetes.io/{ingress,egress}-bandwidth` annotations (as the real kubelet does)
//! and, lab only, `ips`/`mac` from `veilnet.io/lab-ips`/`veilnet.io/lab-mac`; the agent's
//! conflist declares them, and veilnet-cni honours them. Needs root.
//!
//! Control planes: both (the capabilities go kubelet → conflist → plugin; which API server
//! stores the pod does not matter, but both must deliver the annotations untouched).

mod common;

use std::time::Duration;

use common::*;

fn annotated_pod(name: &str, annotations: serde_json::Value, command: &[&str]) -> String {
    let mut pod: serde_json::Value =
        serde_json::from_str(&pod_manifest("default", name, "node-1", &[], command)).unwrap();
    pod["metadata"]["annotations"] = annotations;
    pod.to_string()
}

#[test]
fn bandwidth_ips_and_mac_are_honoured_end_to_end() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("caps", &["--nodes", "1"]);
    lab.apply(&pod_manifest(
        "default",
        "server",
        "node-1",
        &[],
        &["iperf3", "-s", "-p", "5201"],
    ));
    lab.apply(&pod_manifest("default", "free", "node-1", &[], SERVE));
    lab.apply(&annotated_pod(
        "limited",
        serde_json::json!({"kubernetes.io/egress-bandwidth": "10M"}),
        SERVE,
    ));
    let cidr = lab.kubectl_json(&["get", "node", "node-1", "-o", "json"])["spec"]["podCIDR"]
        .as_str()
        .expect("node-1 has a podCIDR")
        .to_string();
    let net: ipnet::Ipv4Net = cidr.parse().unwrap();
    let wanted = std::net::Ipv4Addr::from(u32::from(net.broadcast()) - 3);
    lab.apply(&annotated_pod(
        "static",
        serde_json::json!({"veilnet.io/lab-ips": wanted.to_string(),
                           "veilnet.io/lab-mac": "c2:11:22:33:44:55"}),
        SERVE,
    ));
    let server_ip = lab.wait_pod_ip("default/server", Duration::from_secs(60));
    let free_ip = lab.wait_pod_ip("default/free", Duration::from_secs(60));
    lab.wait_pod_ip("default/limited", Duration::from_secs(60));
    let static_ip = lab.wait_pod_ip("default/static", Duration::from_secs(60));

    // ips and mac: the pod has both, and it talks (anti-spoofing learned the requested MAC).
    assert_eq!(static_ip, wanted.to_string());
    let link = text(&lab.exec("default/static", &["ip", "-br", "link", "show", "eth0"]));
    assert!(link.contains("c2:11:22:33:44:55"), "{link}");
    for (pod, target) in [
        ("default/static", format!("{free_ip}:80")),
        ("default/free", format!("{static_ip}:80")),
    ] {
        eventually(
            Duration::from_secs(15),
            &format!("{pod} reaches {target}"),
            || lab.connect(pod, &target, "tcp", "2s") == Some(0),
        );
    }

    // bandwidth: 10 Mbit/s egress from "limited"; "free" is not limited.
    let free = lab.iperf3_mbps("default/free", &server_ip);
    let limited = lab.iperf3_mbps("default/limited", &server_ip);
    eprintln!("throughput to the server on node-1: free {free:.1} Mbit/s, limited (egress 10M) {limited:.1} Mbit/s");
    assert!(
        (7.0..=12.0).contains(&limited),
        "limited pod got {limited:.1} Mbit/s, want about 10"
    );
    assert!(
        free > 3.0 * limited,
        "free {free:.1} vs limited {limited:.1}"
    );
    lab.down();
}
