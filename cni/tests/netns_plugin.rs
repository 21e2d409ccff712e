//! Root integration tests: the built `veilnet-cni` binary against real network namespaces.
//! Each test makes its own "node" namespace (where the plugin runs, like a runtime's host
//! namespace) and pod namespaces, all named `veilcni-<pid>-<n>-…` and deleted on drop.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use common::{ipam_records, require_root, standalone_conf, Call, Netns};
use serde_json::{json, Value};
use veilnet_cni::{NodeState, NODE_STATE_VERSION};

fn addresses(ns: &Netns, ifname: &str) -> Vec<String> {
    ns.ip_json(&["addr", "show", "dev", ifname])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn link(ns: &Netns, ifname: &str) -> Option<Value> {
    ns.ip_json(&["link", "show", "dev", ifname])
        .as_array()
        .and_then(|a| a.first().cloned())
}

/// The MACs of the static `master` FDB entries on `dev`.
fn static_fdb(ns: &Netns, dev: &str) -> Vec<Value> {
    let out = ns.exec("bridge", &["-j", "fdb", "show", "dev", dev]);
    assert!(out.status.success(), "{out:?}");
    let entries: Value = serde_json::from_slice(&out.stdout).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["master"].is_string() && e["state"] == "static")
        .map(|e| e["mac"].clone())
        .collect()
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = prev.clone();
    conf
}

#[test]
fn add_check_del_lifecycle() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut conf = standalone_conf(state.path(), "10.250.0.0/24");
    conf["mtu"] = 1400.into();
    conf["dns"] = json!({"nameservers": ["10.96.0.10"]});

    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();

    // Result shape per spec 1.1.0.
    assert_eq!(result["cniVersion"], "1.1.0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2);
    let host_name = ifaces[0]["name"].as_str().unwrap().to_string();
    assert!(host_name.starts_with("veil") && host_name.len() == 15);
    assert!(ifaces[0].get("sandbox").is_none());
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(ifaces[1]["sandbox"], pod.path_str());
    assert_eq!(ifaces[1]["mtu"], 1400);
    assert_eq!(result["ips"][0]["address"], "10.250.0.2/24");
    assert_eq!(result["ips"][0]["gateway"], "10.250.0.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.250.0.1"}])
    );
    assert_eq!(result["dns"]["nameservers"], json!(["10.96.0.10"]));

    // Kernel state: pod side.
    let eth0 = link(&pod, "eth0").expect("eth0 in pod");
    assert_eq!(eth0["mtu"], 1400);
    assert_eq!(eth0["address"], ifaces[1]["mac"]);
    assert!(eth0["flags"].as_array().unwrap().contains(&json!("UP")));
    assert_eq!(addresses(&pod, "eth0"), vec!["10.250.0.2/24"]);
    let routes = pod.ip_json(&["route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.250.0.1");
    assert_eq!(routes[0]["dev"], "eth0");
    // Host side: the veth is on the bridge, which carries the gateway.
    let host = link(&node, &host_name).expect("host veth");
    assert_eq!(host["master"], "veilbr0");
    assert_eq!(host["mtu"], 1400);
    assert_eq!(host["address"], ifaces[0]["mac"]);
    assert_eq!(addresses(&node, "veilbr0"), vec!["10.250.0.1/24"]);
    // The port learns nothing and gets no unknown unicast; the pod's MAC is static on it.
    let port =
        &node.ip_json(&["-d", "link", "show", "dev", &host_name])[0]["linkinfo"]["info_slave_data"];
    assert_eq!(port["learning"], false, "{port}");
    assert_eq!(port["flood"], false, "{port}");
    assert_eq!(port["group_fwd_mask"], "0x4000", "{port}");
    assert_eq!(static_fdb(&node, &host_name), vec![eth0["address"].clone()]);
    let bridge =
        &node.ip_json(&["-d", "link", "show", "dev", "veilbr0"])[0]["linkinfo"]["info_data"];
    // (Debian 12's iproute2 does not show fdb_max_learned; the lab tests read it over netlink.)
    assert_eq!(bridge["no_linklocal_learn"], 1, "{bridge}");
    // Traffic flows from the pod to its gateway.
    let ping = pod.exec("ping", &["-c", "1", "-W", "2", "10.250.0.1"]);
    assert!(ping.status.success(), "{ping:?}");

    // CHECK with the ADD result.
    Call::new(&node, "CHECK", &with_prev(&conf, &result))
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    assert_eq!(ipam_records(state.path(), "itest"), vec!["10.250.0.2"]);

    // DEL removes everything; DEL again is fine.
    for _ in 0..2 {
        let out = Call::new(&node, "DEL", &with_prev(&conf, &result))
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .ok();
        assert_eq!(out, Value::Null);
        assert!(link(&pod, "eth0").is_none());
        assert!(link(&node, &host_name).is_none());
        assert!(ipam_records(state.path(), "itest").is_empty());
    }
    // The bridge stays for the next pod.
    assert!(link(&node, "veilbr0").is_some());
}

#[test]
fn older_versions_get_their_result_shape() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    for version in ["1.0.0", "0.4.0", "0.3.1"] {
        let mut conf = standalone_conf(state.path(), "10.250.1.0/24");
        conf["cniVersion"] = version.into();
        let result = Call::new(&node, "ADD", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .ok();
        assert_eq!(result["cniVersion"], version);
        assert!(result["interfaces"][1].get("mtu").is_none());
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            version.starts_with("0."),
            "{version}: {result}"
        );
        Call::new(&node, "DEL", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .ok();
    }
}

#[test]
fn check_detects_drift() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let conf = standalone_conf(state.path(), "10.250.2.0/24");
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    let check = || {
        Call::new(&node, "CHECK", &with_prev(&conf, &result))
            .attachment("c1", "eth0", &pod.path_str())
            .run()
    };
    check().ok();

    // CHECK without prevResult is a configuration error.
    Call::new(&node, "CHECK", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .err(7);

    pod.ip(&["route", "del", "default"]);
    let v = check().err(103);
    assert!(v["details"].as_str().unwrap().contains("route"), "{v}");
    pod.ip(&["route", "add", "default", "via", "10.250.2.1"]);
    check().ok();

    // The pod's port learning again, or its static FDB entry gone.
    let host_name = result["interfaces"][0]["name"].as_str().unwrap();
    node.ip(&[
        "link",
        "set",
        "dev",
        host_name,
        "type",
        "bridge_slave",
        "learning",
        "on",
    ]);
    let v = check().err(103);
    assert!(v["details"].as_str().unwrap().contains("learning"), "{v}");
    node.ip(&[
        "link",
        "set",
        "dev",
        host_name,
        "type",
        "bridge_slave",
        "learning",
        "off",
    ]);
    check().ok();
    let mac = result["interfaces"][1]["mac"].as_str().unwrap();
    let out = node.exec("bridge", &["fdb", "del", mac, "dev", host_name, "master"]);
    assert!(out.status.success(), "{out:?}");
    let v = check().err(103);
    assert!(v["details"].as_str().unwrap().contains("static FDB"), "{v}");
    let out = node.exec(
        "bridge",
        &["fdb", "add", mac, "dev", host_name, "master", "static"],
    );
    assert!(out.status.success(), "{out:?}");
    check().ok();

    pod.ip(&["addr", "del", "10.250.2.2/24", "dev", "eth0"]);
    let v = check().err(103);
    assert!(v["details"].as_str().unwrap().contains("10.250.2.2"), "{v}");

    // Gone namespace: the container is unknown.
    Call::new(&node, "CHECK", &with_prev(&conf, &result))
        .attachment("c1", "eth0", "/run/netns/veilcni-does-not-exist")
        .run()
        .err(103); // prevResult names another sandbox
    pod.delete();
    let v = check().err(3);
    assert_eq!(v["cniVersion"], "1.1.0");
}

#[test]
fn del_after_netns_deleted() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let conf = standalone_conf(state.path(), "10.250.3.0/24");
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    let host_name = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    pod.delete();
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    // Also without CNI_NETNS at all.
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", "")
        .run()
        .ok();
    assert!(ipam_records(state.path(), "itest").is_empty());
    assert!(link(&node, &host_name).is_none());
    // DEL of something never added is fine too.
    Call::new(&node, "DEL", &conf)
        .attachment("never-added", "eth0", "")
        .run()
        .ok();
}

#[test]
fn fifty_parallel_adds_then_dels() {
    require_root!();
    const PODS: usize = 50;
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pods: Vec<Netns> = (0..PODS).map(|i| Netns::new(&format!("p{i}"))).collect();
    let conf = standalone_conf(state.path(), "10.251.0.0/24");

    let calls: Vec<Call> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            Call::new(&node, "ADD", &conf).attachment(&format!("c{i}"), "eth0", &pod.path_str())
        })
        .collect();
    let children: Vec<_> = calls.iter().map(Call::spawn).collect();
    let results: Vec<Value> = children
        .into_iter()
        .map(|c| common::Reply::from(c.wait_with_output().unwrap()).ok())
        .collect();

    let ips: HashSet<String> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), PODS, "addresses must be distinct: {ips:?}");
    for ip in &ips {
        let addr: Ipv4Addr = ip.split('/').next().unwrap().parse().unwrap();
        assert!(
            addr.octets()[..3] == [10, 251, 0] && addr.octets()[3] >= 2 && addr.octets()[3] < 255
        );
    }
    assert_eq!(ipam_records(state.path(), "itest").len(), PODS);
    for (pod, result) in pods.iter().zip(&results) {
        assert_eq!(
            addresses(pod, "eth0"),
            vec![result["ips"][0]["address"].as_str().unwrap().to_string()]
        );
    }
    let veths = node.links().iter().filter(|l| l.len() == 15).count();
    assert_eq!(veths, PODS);

    let calls: Vec<Call> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            Call::new(&node, "DEL", &conf).attachment(&format!("c{i}"), "eth0", &pod.path_str())
        })
        .collect();
    let children: Vec<_> = calls.iter().map(Call::spawn).collect();
    for child in children {
        common::Reply::from(child.wait_with_output().unwrap()).ok();
    }
    assert!(ipam_records(state.path(), "itest").is_empty());
    let mut left = node.links();
    left.sort();
    assert_eq!(left, vec!["lo", "veilbr0"]);
    for pod in &pods {
        assert!(link(pod, "eth0").is_none());
    }
}

#[test]
fn error_codes() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let conf = standalone_conf(state.path(), "10.250.4.0/24");
    let add =
        |conf: &Value| Call::new(&node, "ADD", conf).attachment("c1", "eth0", &pod.path_str());

    let mut old = conf.clone();
    old["cniVersion"] = "0.2.0".into();
    add(&old).run().err(1);

    let mut bad = Call::new(&node, "ADD", &conf).attachment("c1", "eth0", &pod.path_str());
    bad.stdin = "{\"cniVersion\": \"1.1.0\", ".into();
    bad.run().err(6);

    let mut wrong = conf.clone();
    wrong["mtu"] = "big".into();
    let v = add(&wrong).run().err(7);
    assert!(v["msg"].as_str().unwrap().contains("mtu"), "{v}");

    let v = add(&conf).without("CNI_IFNAME").run().err(4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"), "{v}");
    add(&conf).without("CNI_COMMAND").run().err(4);

    // A missing namespace on ADD: nothing allocated, nothing created.
    Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", "/run/netns/veilcni-missing-netns")
        .run()
        .err(3);
    assert!(ipam_records(state.path(), "itest").is_empty());
    assert!(node.links().iter().all(|l| l.len() != 15));

    // ADD when the pod already has the interface.
    add(&conf).run().ok();
    add(&conf).run().err(102);
}

#[test]
fn failed_add_rolls_back() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    // A default route already in the pod makes our route add fail after the veth, address and
    // IP reservation exist: all of them must be undone.
    pod.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);
    pod.ip(&["link", "set", "other0", "up"]);
    pod.ip(&["link", "set", "other1", "up"]);
    pod.ip(&["addr", "add", "192.0.2.2/24", "dev", "other0"]);
    pod.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let conf = standalone_conf(state.path(), "10.250.5.0/24");
    let v = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .err(100);
    assert!(v["details"].as_str().unwrap().contains("route"), "{v}");
    assert!(link(&pod, "eth0").is_none());
    assert!(
        node.links().iter().all(|l| l.len() != 15),
        "{:?}",
        node.links()
    );
    assert!(ipam_records(state.path(), "itest").is_empty());
}

fn node_state(ready: bool) -> NodeState {
    NodeState {
        version: NODE_STATE_VERSION,
        node_name: "n1".into(),
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        gateways: vec!["10.244.1.1".parse().unwrap()],
        bridge: "veilbr0".into(),
        mtu: 1380,
        ready,
    }
}

#[test]
fn agent_mode_status_and_add() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let run_dir = dir.path().join("run");
    let conf = json!({
        "cniVersion": "1.1.0", "name": "veilnet", "type": "veilnet-cni",
        "runDir": run_dir, "stateDir": dir.path().join("state"),
    });
    let status = || Call::new(&node, "STATUS", &conf).run();
    let add = || Call::new(&node, "ADD", &conf).attachment("c1", "eth0", &pod.path_str());

    let v = status().err(50);
    assert_eq!(v["msg"], "plugin not available");
    add().run().err(11);

    let path = NodeState::path_in(&run_dir);
    node_state(false).write_atomic(&path).unwrap();
    status().err(50);
    add().run().err(11);

    node_state(true).write_atomic(&path).unwrap();
    // The agent owns the bridge: until it exists, STATUS says no and ADD asks to retry.
    status().err(50);
    add().run().err(11);
    node.ip(&["link", "add", "veilbr0", "type", "bridge"]);
    node.ip(&["addr", "add", "10.244.1.1/24", "dev", "veilbr0"]);
    node.ip(&["link", "set", "veilbr0", "up"]);
    assert_eq!(status().ok(), Value::Null);

    let result = add().run().ok();
    assert_eq!(result["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(link(&pod, "eth0").unwrap()["mtu"], 1380);
    let ping = pod.exec("ping", &["-c", "1", "-W", "2", "10.244.1.1"]);
    assert!(ping.status.success(), "{ping:?}");
    Call::new(&node, "CHECK", &with_prev(&conf, &result))
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    // DEL needs no agent.
    std::fs::remove_file(&path).unwrap();
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    assert!(link(&pod, "eth0").is_none());
    assert!(ipam_records(&dir.path().join("state"), "veilnet").is_empty());
}

#[test]
fn standalone_status_is_ready() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let conf = standalone_conf(state.path(), "10.250.6.0/24");
    assert_eq!(Call::new(&node, "STATUS", &conf).run().ok(), Value::Null);
}

#[test]
fn gc_releases_stale_attachments() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("node");
    let pods: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("gc{i}"))).collect();
    let conf = standalone_conf(state.path(), "10.250.7.0/24");
    let results: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            Call::new(&node, "ADD", &conf)
                .attachment(&format!("c{i}"), "eth0", &pod.path_str())
                .run()
                .ok()
        })
        .collect();
    assert_eq!(ipam_records(state.path(), "itest").len(), 3);

    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    Call::new(&node, "GC", &gc_conf).run().ok();
    assert_eq!(ipam_records(state.path(), "itest"), vec!["10.250.7.3"]);
    // The stale attachments' host veths are gone as well; the valid one is untouched.
    let host = |i: usize| {
        results[i]["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(link(&node, &host(0)).is_none());
    assert!(link(&node, &host(2)).is_none());
    assert!(link(&node, &host(1)).is_some());
    assert!(link(&pods[1], "eth0").is_some());

    // GC without CNI_PATH is an environment error (the spec requires it).
    Call::new(&node, "GC", &gc_conf)
        .without("CNI_PATH")
        .run()
        .err(4);
}
