//! Trusted DNS in the lab. The trusted server is node-1's own address (a host-network DNS pod
//! there, like node-local DNS), a rogue DNS pod runs on node-2. With `--dns-mode enforce` a
//! client pod on either node is answered by the trusted server (node-1's client through the
//! input hook, node-2's across the wire) and never by the rogue one, over UDP 53, TCP 53 or TCP
//! 853; the drop is in the flow log with the query's name and in the per-pod counters and
//! metrics; a namespace labelled `veilnet.io/dns-mode=off` is not checked. With
//! `--dns-mode monitor` both answer and the rogue query is still logged and counted. Needs root.
//!
//! Control planes: both (the DNS guard reads pods and namespace labels from the API; both
//! servers must deliver them the same).

mod common;

use std::time::Duration;

use common::*;

/// node-1's underlay address: where the trusted (host-network) DNS server listens.
const TRUSTED: &str = "172.30.0.11";

fn pod(ns: &str, name: &str, node: &str, command: &[&str]) -> String {
    pod_manifest(ns, name, node, &[], command)
}

fn namespace(lab: &Lab, name: &str, labels: serde_json::Value) {
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}})
        .to_string(),
    );
}

/// Brings up the servers and the clients: returns the rogue server's address.
fn workload(lab: &Lab) -> String {
    lab.host_dns_server("node-1", TRUSTED);
    lab.apply(&pod(
        "default",
        "rogue",
        "node-2",
        &["veilnet", "lab", "agnhost", "dns-serve"],
    ));
    lab.apply(&pod(
        "default",
        "rogue-tcp",
        "node-2",
        &["veilnet", "lab", "agnhost", "serve", "--tcp", "53,853"],
    ));
    namespace(lab, "app", serde_json::json!({}));
    namespace(
        lab,
        "free",
        serde_json::json!({"veilnet.io/dns-mode": "off"}),
    );
    for (ns, name, node) in [
        ("app", "client-1", "node-1"),
        ("app", "client-2", "node-2"),
        ("free", "client-free", "node-1"),
    ] {
        lab.apply(&pod(ns, name, node, SERVE));
    }
    for p in [
        "app/client-1",
        "app/client-2",
        "free/client-free",
        "default/rogue-tcp",
    ] {
        lab.wait_pod_ip(p, Duration::from_secs(60));
    }
    lab.wait_pod_ip("default/rogue", Duration::from_secs(60))
}

/// `dns-query NAME --server SERVER` in `pod`: (exit code, output).
fn query(lab: &Lab, pod: &str, name: &str, server: &str) -> (Option<i32>, String) {
    let out = lab.exec(
        pod,
        &[
            "veilnet",
            "lab",
            "agnhost",
            "dns-query",
            name,
            "--server",
            server,
            "--timeout",
            "1s",
        ],
    );
    (out.status.code(), text(&out))
}

fn dns_lines(lab: &Lab, node: usize, verdict: &str) -> Vec<serde_json::Value> {
    lab.flow_log(node)
        .into_iter()
        .filter(|l| l["verdict"] == verdict)
        .collect()
}

/// The node's count of `ns/pod`'s queries to `server` (`trusted`/`untrusted`) in its policy status.
fn queries(lab: &Lab, node: usize, ns: &str, pod: &str, server: &str) -> u64 {
    lab.policy_status(node)["counters"]["dns"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["namespace"] == ns && c["pod"] == pod && c["server"] == server)
        .and_then(|c| c["queries"].as_u64())
        .unwrap_or(0)
}

#[test]
fn enforce_answers_only_the_trusted_server_and_logs_and_counts_the_rogue_query() {
    veilnet_test_support::require_root!();
    let lab = Lab::up(
        "dnse",
        &[
            "--nodes",
            "2",
            "--dns-mode",
            "enforce",
            "--trusted-dns",
            TRUSTED,
        ],
    );
    let rogue = workload(&lab);

    // The trusted server answers both clients: node-1's through its node's input hook,
    // node-2's across the wire.
    for client in ["app/client-1", "app/client-2"] {
        let (code, out) = query(&lab, client, "svc.example", TRUSTED);
        assert_eq!(code, Some(0), "{client}: {out}");
        assert!(out.contains("rcode=NOERROR"), "{client}: {out}");
    }
    // The rogue one answers nobody under enforce, over UDP, TCP and DNS over TLS's port.
    for client in ["app/client-1", "app/client-2"] {
        let (code, out) = query(&lab, client, "exfil.rogue.example", &rogue);
        assert_eq!(code, Some(1), "{client} reached the rogue server: {out}");
        for port in ["53", "853"] {
            let netns = lab.pod_netns(client);
            let target = format!("{rogue}:{port}");
            assert_eq!(
                probe_in(&netns, &target, "tcp", "1s"),
                Some(1),
                "{client} → {target}/tcp"
            );
        }
    }
    // A namespace that opted out is not checked.
    let (code, out) = query(&lab, "free/client-free", "free.example", &rogue);
    assert_eq!(code, Some(0), "{out}");

    // Logged, with the query, on the client's node.
    eventually(Duration::from_secs(10), "the drop in the flow log", || {
        dns_lines(&lab, 1, "dns-untrusted").iter().any(|l| {
            l["reason"] == "drop"
                && l["pod"] == "app/client-1"
                && l["dst"]["ip"] == rogue.as_str()
                && l["dns"]["qname"] == "exfil.rogue.example"
                && l["dns"]["qtype"] == "A"
        })
    });
    let lines = dns_lines(&lab, 1, "dns-untrusted");
    assert!(
        !lines.iter().any(|l| l["pod"] == "free/client-free"),
        "{lines:#?}"
    );
    // Counted per pod: one UDP query and two TCP connections (each SYN, and its retries, counts).
    eventually(Duration::from_secs(15), "the counters", || {
        queries(&lab, 1, "app", "client-1", "untrusted") >= 3
            && queries(&lab, 1, "app", "client-1", "trusted") >= 1
            && queries(&lab, 2, "app", "client-2", "untrusted") >= 3
    });
    assert_eq!(queries(&lab, 1, "free", "client-free", "untrusted"), 0);
    let (_, body) = lab.http_get(1, TRUSTED, 9892, "/metrics");
    let untrusted = metric(
        &body,
        "veilnet_dns_queries_total{namespace=\"app\",pod=\"client-1\",server=\"untrusted\"}",
    );
    assert!(untrusted.is_some_and(|v| v >= 3.0), "{body}");
    let flow_lines = lab.flow_log(1);
    let samples: Vec<_> = flow_lines
        .iter()
        .filter(|l| l["verdict"] == "dns" && l["dns"]["qname"] == "svc.example")
        .collect();
    assert!(!samples.is_empty(), "no trusted query sampled");
}

#[test]
fn monitor_lets_the_rogue_server_answer_and_still_logs_and_counts_it() {
    veilnet_test_support::require_root!();
    let lab = Lab::up(
        "dnsm",
        &[
            "--nodes",
            "2",
            "--dns-mode",
            "monitor",
            "--trusted-dns",
            TRUSTED,
        ],
    );
    let rogue = workload(&lab);
    let (code, out) = query(&lab, "app/client-1", "svc.example", TRUSTED);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = query(&lab, "app/client-1", "seen.rogue.example", &rogue);
    assert_eq!(code, Some(0), "monitor must not drop: {out}");
    eventually(
        Duration::from_secs(10),
        "the rogue query in the flow log",
        || {
            dns_lines(&lab, 1, "dns-untrusted")
                .iter()
                .any(|l| l["reason"] == "monitor" && l["dns"]["qname"] == "seen.rogue.example")
        },
    );
    eventually(Duration::from_secs(15), "the untrusted counter", || {
        queries(&lab, 1, "app", "client-1", "untrusted") >= 1
    });
}
