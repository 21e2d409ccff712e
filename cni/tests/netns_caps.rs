//! Root integration tests of the CNI capabilities (`ips`, `mac`, `bandwidth`): the built
//! `veilnet-cni` against real namespaces (`veilcni-<pid>-<n>-…`, deleted on drop), each request
//! honoured, each bad one refused with its error code and nothing left behind.

mod common;

use common::{ipam_records, require_root, standalone_conf, Call, Netns};
use serde_json::{json, Value};

fn caps_conf(state: &std::path::Path, subnet: &str, runtime: Value) -> Value {
    let mut conf = standalone_conf(state, subnet);
    conf["capabilities"] = json!({"ips": true, "mac": true, "bandwidth": true});
    conf["runtimeConfig"] = runtime;
    conf
}

fn pod_eth0(pod: &Netns) -> Value {
    pod.ip_json(&["addr", "show", "dev", "eth0"])[0].clone()
}

fn root_qdisc(ns: &Netns, dev: &str) -> String {
    let out = ns.exec("tc", &["qdisc", "show", "dev", dev, "root"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing of the attachment is left: no host veth, no IPAM record of it.
fn nothing_left(node: &Netns, pod: &Netns, state: &std::path::Path, before: &[String]) {
    assert!(
        node.links()
            .iter()
            .all(|l| !(l.starts_with("veil") && l.len() == 15)),
        "{:?}",
        node.links()
    );
    assert!(pod
        .ip_json(&["link", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(ipam_records(state, "itest"), before);
}

#[test]
fn requested_ip_and_mac_are_honoured() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let conf = caps_conf(
        state.path(),
        "10.251.0.0/24",
        json!({"ips": ["10.251.0.77/24"], "mac": "c2:11:22:33:44:55"}),
    );
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    assert_eq!(result["ips"][0]["address"], "10.251.0.77/24");
    assert_eq!(result["interfaces"][1]["mac"], "c2:11:22:33:44:55");
    let eth0 = pod_eth0(&pod);
    assert_eq!(eth0["address"], "c2:11:22:33:44:55");
    assert_eq!(eth0["addr_info"][0]["local"], "10.251.0.77");
    assert_eq!(ipam_records(state.path(), "itest"), vec!["10.251.0.77"]);
    // The bridge port's static FDB entry is the requested MAC (what anti-spoofing learns too).
    let host = result["interfaces"][0]["name"].as_str().unwrap();
    let fdb = node.exec("bridge", &["fdb", "show", "dev", host]);
    assert!(
        String::from_utf8_lossy(&fdb.stdout).contains("c2:11:22:33:44:55"),
        "{fdb:?}"
    );
    // CHECK agrees.
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    Call::new(&node, "CHECK", &check)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();

    // A second pod asking for the same address: 104, nothing left of it.
    let pod2 = Netns::new("pod2");
    let v = Call::new(&node, "ADD", &conf)
        .attachment("c2", "eth0", &pod2.path_str())
        .run()
        .err(104);
    let text = v.to_string();
    assert!(text.contains("10.251.0.77") && text.contains("c1"), "{v}");
    assert!(pod2
        .ip_json(&["link", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(ipam_records(state.path(), "itest"), vec!["10.251.0.77"]);

    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    nothing_left(&node, &pod, state.path(), &[]);
}

#[test]
fn bad_requests_are_refused_and_leave_nothing() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    for (runtime, code, needle) in [
        (json!({"ips": ["10.252.1.5"]}), 7, "outside"),
        (json!({"ips": ["10.252.0.0"]}), 7, "network address"),
        (json!({"ips": ["10.252.0.1"]}), 7, "gateway"),
        (json!({"ips": ["10.252.0.255"]}), 7, "broadcast"),
        (json!({"ips": ["fd00::5"]}), 2, "IPv4"),
        (json!({"mac": "01:00:5e:00:00:01"}), 7, "multicast"),
        (json!({"mac": "00:00:00:00:00:00"}), 7, "all-zero"),
        (json!({"mac": "nope"}), 7, "hex octets"),
        (
            json!({"bandwidth": {"egressRate": 0, "egressBurst": 100000}}),
            7,
            "egressRate of 0",
        ),
        (
            json!({"bandwidth": {"ingressRate": 1000000, "ingressBurst": 40000000000u64}}),
            7,
            "4 GiB",
        ),
        // Well-formed, but smaller than one packet: refused at ADD, before anything exists.
        (
            json!({"bandwidth": {"ingressRate": 1000000, "ingressBurst": 800}}),
            7,
            "smaller than one packet",
        ),
    ] {
        let conf = caps_conf(state.path(), "10.252.0.0/24", runtime.clone());
        let v = Call::new(&node, "ADD", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .err(code);
        assert!(v.to_string().contains(needle), "{runtime}: {v}");
        nothing_left(&node, &pod, state.path(), &[]);
    }
}

#[test]
fn undeclared_capabilities_are_ignored() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut conf = standalone_conf(state.path(), "10.253.0.0/24");
    // Garbage for every capability, none declared: ignored, as the spec says.
    conf["capabilities"] = json!({"ips": false});
    conf["runtimeConfig"] = json!({"ips": ["10.253.0.99"], "mac": "bad", "bandwidth": 5});
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    assert_eq!(result["ips"][0]["address"], "10.253.0.2/24");
    let host = result["interfaces"][0]["name"].as_str().unwrap();
    assert!(!root_qdisc(&node, host).contains("tbf"));
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
}

#[test]
fn bandwidth_qdiscs_present_and_gone_after_del() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let conf = caps_conf(
        state.path(),
        "10.254.0.0/24",
        json!({"bandwidth": {"ingressRate": 20000000, "ingressBurst": 4294967295u64,
                             "egressRate": 10000000, "egressBurst": 4294967295u64}}),
    );
    for version in ["1.1.0", "1.0.0", "0.4.0", "0.3.1"] {
        let mut conf = conf.clone();
        conf["cniVersion"] = version.into();
        let result = Call::new(&node, "ADD", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .ok();
        assert_eq!(result["cniVersion"], version);
        let host = result["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let ingress = root_qdisc(&node, &host);
        assert!(
            ingress.contains("tbf") && ingress.contains("rate 20Mbit"),
            "{ingress}"
        );
        let egress = root_qdisc(&pod, "eth0");
        assert!(
            egress.contains("tbf") && egress.contains("rate 10Mbit"),
            "{egress}"
        );
        // CHECK (0.4.0 on) agrees, and names a shaping that went away.
        let mut check = conf.clone();
        check["prevResult"] = result.clone();
        if version != "0.3.1" {
            Call::new(&node, "CHECK", &check)
                .attachment("c1", "eth0", &pod.path_str())
                .run()
                .ok();
        }
        if version == "1.1.0" {
            assert!(pod
                .exec("tc", &["qdisc", "del", "dev", "eth0", "root"])
                .status
                .success());
            let err = Call::new(&node, "CHECK", &check)
                .attachment("c1", "eth0", &pod.path_str())
                .run()
                .err(103)
                .to_string();
            assert!(err.contains("egress-bandwidth is asked for"), "{err}");
        }
        Call::new(&node, "DEL", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .ok();
        // The veth (and with it both qdiscs) is gone; no ifb or other device is left.
        nothing_left(&node, &pod, state.path(), &[]);
        assert_eq!(
            node.links()
                .into_iter()
                .filter(|l| l != "lo" && l != "veilbr0")
                .count(),
            0,
            "{:?}",
            node.links()
        );
    }
}
