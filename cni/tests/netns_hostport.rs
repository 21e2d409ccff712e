//! Root integration tests of the `portMappings` capability (hostPort): the built `veilnet-cni`
//! against real namespaces (`veilcni-<pid>-<n>-…`, deleted on drop, and the nft table with
//! them): ADD loads the DNAT into `table ip veilnet_hostport` in the node's namespace and CHECK
//! finds it, a second ADD for the same hostPort is refused naming the holder and leaves nothing,
//! DEL and GC leave no rule; plus the ADD latency with and without a mapping.

mod common;

use std::time::{Duration, Instant};

use common::{ipam_records, require_root, standalone_conf, Call, Netns};
use serde_json::{json, Value};

fn hp_conf(state: &std::path::Path, subnet: &str, mappings: Value) -> Value {
    let mut conf = standalone_conf(state, subnet);
    conf["capabilities"] = json!({"portMappings": true});
    conf["runtimeConfig"] = json!({ "portMappings": mappings });
    conf
}

/// `nft list table ip veilnet_hostport` in the node's namespace (empty when there is none).
fn table(node: &Netns) -> String {
    let out = node.exec("nft", &["list", "table", "ip", "veilnet_hostport"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dnat_rules(node: &Netns) -> Vec<String> {
    table(node)
        .lines()
        .filter(|l| l.contains("dnat to"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn host_veths(node: &Netns) -> Vec<String> {
    node.links()
        .into_iter()
        .filter(|l| l.starts_with("veil") && l.len() == 15)
        .collect()
}

const WEB: &str = r#"[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                      {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]"#;

#[test]
fn dnat_on_add_conflict_refused_gone_after_del_and_gc() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("hpnode");
    let pod = Netns::new("hppod");
    let conf = hp_conf(
        state.path(),
        "10.253.0.0/24",
        serde_json::from_str(WEB).unwrap(),
    );
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let rules = dnat_rules(&node);
    assert_eq!(rules.len(), 2, "{}", table(&node));
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("tcp dport 8080") && r.contains(&format!("dnat to {ip}:80"))),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("udp dport 5353") && r.contains(&format!("dnat to {ip}:53"))),
        "{rules:?}"
    );
    assert!(
        table(&node).contains(&format!("{ip} . {ip}")),
        "hairpin set"
    );
    // CHECK finds the mappings in the kernel, and notices when they are gone.
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    Call::new(&node, "CHECK", &check)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();

    // Another pod asking for 8080/tcp (on a specific hostIP: it overlaps the wildcard) is refused
    // with the port and the holder, and nothing of it is left.
    let pod2 = Netns::new("hppod2");
    let conf2 = hp_conf(
        state.path(),
        "10.253.0.0/24",
        json!([{"hostPort": 8080, "containerPort": 8080, "protocol": "tcp", "hostIP": "10.253.0.1"}]),
    );
    let before_veths = host_veths(&node);
    let v = Call::new(&node, "ADD", &conf2)
        .attachment("c2", "eth0", &pod2.path_str())
        .run()
        .err(105);
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("hostPort 10.253.0.1:8080/tcp is already in use")
            && msg.contains("container c1"),
        "{v}"
    );
    assert_eq!(host_veths(&node), before_veths);
    assert!(pod2
        .ip_json(&["link", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(ipam_records(state.path(), "itest"), vec![ip.clone()]);
    assert_eq!(dnat_rules(&node), rules);
    // The same port on UDP is free.
    let udp = hp_conf(
        state.path(),
        "10.253.0.0/24",
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "udp"}]),
    );
    Call::new(&node, "ADD", &udp)
        .attachment("c2", "eth0", &pod2.path_str())
        .run()
        .ok();
    assert_eq!(dnat_rules(&node).len(), 3);

    // DEL: its rules go, the other pod's stay; the last DEL removes the table.
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    let left = dnat_rules(&node);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with("udp dport 8080"), "{left:?}");
    // CHECK of the deleted pod: its rules are missing (the veth is gone first, so any failure).
    // DEL again is fine.
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();

    // GC with c2 not valid: its mapping and the table go.
    let mut gc = standalone_conf(state.path(), "10.253.0.0/24");
    gc["cni.dev/valid-attachments"] = json!([]);
    Call::new(&node, "GC", &gc).run().ok();
    assert!(table(&node).is_empty(), "{}", table(&node));
    assert!(ipam_records(state.path(), "itest").is_empty());
}

#[test]
fn check_notices_a_missing_rule_and_bad_mappings_leave_nothing() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("hpnode");
    let pod = Netns::new("hppod");
    for (mappings, code, needle) in [
        (
            json!([{"hostPort": 0, "containerPort": 80}]),
            7,
            "hostPort 0",
        ),
        (
            json!([{"hostPort": 70000, "containerPort": 80}]),
            7,
            "hostPort 70000",
        ),
        (
            json!([{"hostPort": 8080, "containerPort": 0}]),
            7,
            "containerPort 0",
        ),
        (
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "sctp"}]),
            2,
            "SCTP",
        ),
    ] {
        let conf = hp_conf(state.path(), "10.254.0.0/24", mappings.clone());
        let v = Call::new(&node, "ADD", &conf)
            .attachment("c1", "eth0", &pod.path_str())
            .run()
            .err(code);
        assert!(v.to_string().contains(needle), "{mappings}: {v}");
        assert!(host_veths(&node).is_empty());
        assert!(ipam_records(state.path(), "itest").is_empty());
        assert!(table(&node).is_empty());
    }

    let conf = hp_conf(
        state.path(),
        "10.254.0.0/24",
        json!([{"hostPort": 9090, "containerPort": 90}]),
    );
    let result = Call::new(&node, "ADD", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    let mut check = conf.clone();
    check["prevResult"] = result;
    // Someone deletes the table: CHECK says which mapping is missing.
    node.exec("nft", &["delete", "table", "ip", "veilnet_hostport"]);
    let v = Call::new(&node, "CHECK", &check)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .err(103);
    assert!(v.to_string().contains("9090/tcp"), "{v}");
    Call::new(&node, "DEL", &conf)
        .attachment("c1", "eth0", &pod.path_str())
        .run()
        .ok();
    assert!(table(&node).is_empty());
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The ADD latency with one `portMappings` entry against none, 20 ADDs each (alternating, so both
/// see the same machine load), each in a fresh pod namespace and DELeted after. Prints median and
/// p90; asserts only that both work.
#[test]
fn add_latency_with_and_without_port_mappings() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let node = Netns::new("hpnode");
    let plain = standalone_conf(state.path(), "10.249.0.0/24");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..20 {
        for (conf, times) in [
            (
                hp_conf(
                    state.path(),
                    "10.249.0.0/24",
                    json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
                ),
                &mut with,
            ),
            (plain.clone(), &mut without),
        ] {
            let pod = Netns::new("hplat");
            let id = format!("lat{i}");
            let start = Instant::now();
            Call::new(&node, "ADD", &conf)
                .attachment(&id, "eth0", &pod.path_str())
                .run()
                .ok();
            times.push(start.elapsed());
            Call::new(&node, "DEL", &conf)
                .attachment(&id, "eth0", &pod.path_str())
                .run()
                .ok();
        }
    }
    with.sort();
    without.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "ADD latency over 20 each: with portMappings median {:.1} ms p90 {:.1} ms; without median {:.1} ms p90 {:.1} ms",
        ms(percentile(&with, 50)),
        ms(percentile(&with, 90)),
        ms(percentile(&without, 50)),
        ms(percentile(&without, 90)),
    );
    assert!(table(&node).is_empty());
}
