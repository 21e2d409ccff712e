//! Network anomaly alerts in the lab. A pod on node-1 probes 50 denied destinations (10 pods × 5
//! ports behind a default-deny policy, all on node-2): node-2, which drops them, raises exactly
//! one `scan` alert about the scanner (a Warning Event `VeilnetNetworkAnomaly` on the pod, a line
//! in its `alerts.jsonl`, `veilnet_alerts_total{kind="scan"}`), and a second sweep within the
//! repeat interval raises none. A pod sending 100 queries with 40-character random labels through
//! the trusted resolver raises one `dns-tunnel` alert on its own node. A pod that tries five
//! denied destinations and a few ordinary names raises nothing. Needs root.
//!
//! Control planes: both (alerts become Events through the API, and a stand-in that accepts what
//! the real API server refuses would hide a broken Event).

mod common;

use std::time::Duration;

use common::*;

/// node-1's underlay address: the trusted (host-network) DNS server.
const TRUSTED: &str = "172.30.0.11";
const TARGETS: usize = 10;
const PORTS: [u16; 5] = [80, 81, 82, 83, 84];

fn namespace(lab: &Lab, name: &str) {
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            .to_string(),
    );
}

/// The alert Events in `ns` (reason VeilnetNetworkAnomaly).
fn alert_events(lab: &Lab, ns: &str) -> Vec<serde_json::Value> {
    let list = lab.kubectl_json(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "reason=VeilnetNetworkAnomaly",
        "-o",
        "json",
    ]);
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The lines of node `node`'s alerts.jsonl.
fn alert_lines(lab: &Lab, node: usize) -> Vec<serde_json::Value> {
    std::fs::read_to_string(lab.run_dir(node).join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("alerts.jsonl line {l}: {e}")))
        .collect()
}

fn alerts_metric(lab: &Lab, node: usize, kind: &str) -> f64 {
    let ip = format!("172.30.0.{}", 10 + node);
    let (_, body) = lab.http_get(node, &ip, 9892, "/metrics");
    metric(&body, &format!("veilnet_alerts_total{{kind=\"{kind}\"}}"))
        .unwrap_or_else(|| panic!("no veilnet_alerts_total{{kind={kind}}} on node-{node}:\n{body}"))
}

/// node-2's deny lines with `pod` as their source.
fn denies_from(lab: &Lab, pod: &str) -> usize {
    lab.flow_log(2)
        .iter()
        .filter(|l| l["verdict"] == "deny" && l["src"]["pod"] == pod)
        .count()
}

fn sweep(netns: &str, targets: &[String]) {
    for ip in targets {
        for port in PORTS {
            let code = probe_in(netns, &format!("{ip}:{port}"), "tcp", "300ms");
            assert_eq!(code, Some(1), "{ip}:{port} must be denied (dropped)");
        }
    }
}

fn dns_query(lab: &Lab, pod: &str, args: &[&str]) -> String {
    let mut cmd = vec![
        "veilnet",
        "lab",
        "agnhost",
        "dns-query",
        "--server",
        TRUSTED,
        "--timeout",
        "1s",
    ];
    cmd.extend_from_slice(args);
    let out = lab.exec(pod, &cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    text(&out)
}

#[test]
fn a_scan_and_dns_tunnelling_each_raise_one_alert_and_ordinary_traffic_none() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("alrt", &["--nodes", "2", "--trusted-dns", TRUSTED]);

    lab.host_dns_server("node-1", TRUSTED);
    namespace(&lab, "targets");
    namespace(&lab, "app");
    lab.apply(
        &serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": "targets"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
        .to_string(),
    );
    let serve = [
        "veilnet",
        "lab",
        "agnhost",
        "serve",
        "--tcp",
        "80,81,82,83,84",
    ];
    for i in 0..TARGETS {
        lab.apply(&pod_manifest(
            "targets",
            &format!("t{i}"),
            "node-2",
            &[],
            &serve,
        ));
    }
    for name in ["scanner", "tunneler", "benign"] {
        lab.apply(&pod_manifest("app", name, "node-1", &[], SERVE));
    }
    let targets: Vec<String> = (0..TARGETS)
        .map(|i| lab.wait_pod_ip(&format!("targets/t{i}"), Duration::from_secs(90)))
        .collect();
    for name in ["scanner", "tunneler", "benign"] {
        lab.wait_pod_ip(&format!("app/{name}"), Duration::from_secs(60));
    }

    // Ordinary traffic first: five denied destinations and a few names are no anomaly.
    sweep(&lab.pod_netns("app/benign"), &targets[..1]);
    dns_query(&lab, "app/benign", &["svc.example", "--count", "5"]);

    // The scan: 50 denied destinations within seconds.
    sweep(&lab.pod_netns("app/scanner"), &targets);
    eventually(Duration::from_secs(20), "the scan's Event", || {
        alert_events(&lab, "app")
            .iter()
            .any(|e| e["involvedObject"]["name"] == "scanner")
    });
    let events = alert_events(&lab, "app");
    let scan: Vec<_> = events
        .iter()
        .filter(|e| e["involvedObject"]["name"] == "scanner")
        .collect();
    assert_eq!(scan.len(), 1, "{events:#?}");
    let event = scan[0];
    assert_eq!(event["type"], "Warning", "{event:#}");
    assert_eq!(event["source"]["component"], "veilnet-agent", "{event:#}");
    assert_eq!(event["involvedObject"]["kind"], "Pod", "{event:#}");
    let uid = lab.kubectl_json(&["get", "pod", "-n", "app", "scanner"])["metadata"]["uid"].clone();
    assert_eq!(event["involvedObject"]["uid"], uid, "{event:#}");
    let message = event["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("scan ")
            && message.contains("node-2")
            && message.contains("distinct destinations"),
        "{message}"
    );
    let scans = |node| {
        alert_lines(&lab, node)
            .into_iter()
            .filter(|l| l["kind"] == "scan")
            .collect::<Vec<_>>()
    };
    let lines = scans(2);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["pod"], "app/scanner", "{lines:#?}");
    assert_eq!(lines[0]["node"], "node-2", "{lines:#?}");
    assert_eq!(alerts_metric(&lab, 2, "scan"), 1.0);
    // node-1 (the scanner's node) dropped nothing, so it raised nothing: one Event in all.
    assert!(scans(1).is_empty(), "{:#?}", scans(1));

    // A second sweep within the repeat interval: denied and logged again, no second alert.
    let before = denies_from(&lab, "scanner");
    sweep(&lab.pod_netns("app/scanner"), &targets);
    eventually(
        Duration::from_secs(15),
        "the second sweep's deny lines",
        || denies_from(&lab, "scanner") >= before + 10,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(scans(2).len(), 1, "{:#?}", scans(2));
    assert_eq!(alerts_metric(&lab, 2, "scan"), 1.0);

    // Tunnelling through the trusted resolver: allowed, and still an alert.
    dns_query(
        &lab,
        "app/tunneler",
        // Paced (5 s in all), so the node's sample of trusted queries (2 a second, burst 5)
        // catches enough of them whatever its bucket held.
        &[
            "exfil.example",
            "--random-prefix",
            "40",
            "--count",
            "100",
            "--interval",
            "50ms",
        ],
    );
    let tunnel_event = || {
        alert_events(&lab, "app")
            .iter()
            .any(|e| e["involvedObject"]["name"] == "tunneler")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !tunnel_event() {
        if std::time::Instant::now() > deadline {
            let samples: Vec<_> = lab
                .flow_log(1)
                .into_iter()
                .filter(|l| l["verdict"] == "dns")
                .collect();
            panic!(
                "no dns-tunnel Event within 20 s; node-1's alerts: {:#?}\nits sampled queries: {samples:#?}\nEvents: {:#?}",
                alert_lines(&lab, 1),
                alert_events(&lab, "app")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let tunnel: Vec<_> = alert_lines(&lab, 1)
        .into_iter()
        .filter(|l| l["pod"] == "app/tunneler")
        .collect();
    assert_eq!(tunnel.len(), 1, "{tunnel:#?}");
    assert_eq!(tunnel[0]["kind"], "dns-tunnel", "{tunnel:#?}");
    assert!(
        tunnel[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains(".exfil.example")),
        "{tunnel:#?}"
    );
    assert_eq!(alerts_metric(&lab, 1, "dns-tunnel"), 1.0);

    // Nothing about the benign pod, anywhere.
    for node in [1, 2] {
        let about: Vec<_> = alert_lines(&lab, node)
            .into_iter()
            .filter(|l| l["pod"] == "app/benign")
            .collect();
        assert!(about.is_empty(), "node-{node}: {about:#?}");
    }
    let events = alert_events(&lab, "app");
    assert!(
        !events
            .iter()
            .any(|e| e["involvedObject"]["name"] == "benign"),
        "{events:#?}"
    );
    assert_eq!(events.len(), 2, "{events:#?}");
}

/// The external host (`lab up --external-host`): outside the cluster.
const EXTERNAL: &str = "172.30.0.254";
const LEARNING_SECONDS: u64 = 8;

#[test]
fn a_watched_pod_alerts_on_a_new_destination_outside_the_cluster_after_its_learning_window() {
    veilnet_test_support::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.json");
    std::fs::write(
        &config,
        serde_json::json!({"alerts": {"newDestinationLearningSeconds": LEARNING_SECONDS}})
            .to_string(),
    )
    .unwrap();
    let lab = Lab::up(
        "newd",
        &[
            "--nodes",
            "2",
            "--external-host",
            "--agent-config",
            config.to_str().unwrap(),
        ],
    );
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "watched",
            "labels": {"veilnet.io/alert-new-destinations": "true"}}})
        .to_string(),
    );
    namespace(&lab, "plain");
    lab.apply(&pod_manifest("watched", "w", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("plain", "p", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("plain", "peer", "node-2", &[], SERVE));
    lab.wait_pod_ip("watched/w", Duration::from_secs(90));
    lab.wait_pod_ip("plain/p", Duration::from_secs(60));
    let peer = lab.wait_pod_ip("plain/peer", Duration::from_secs(60));
    let outside = format!("{EXTERNAL}:8080");

    // Learning: the first connection starts the window. In-cluster traffic is never watched.
    for pod in ["watched/w", "plain/p"] {
        assert_eq!(lab.connect(pod, &outside, "tcp", "2s"), Some(0), "{pod}");
    }
    assert_eq!(
        lab.connect("watched/w", &format!("{peer}:80"), "tcp", "2s"),
        Some(0)
    );
    let egress_lines = |pod: &str| {
        lab.flow_log(1)
            .into_iter()
            .filter(|l| l["verdict"] == "egress" && l["pod"] == pod)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "w's egress line", || {
        !egress_lines("watched/w").is_empty()
    });
    let lines = egress_lines("watched/w");
    assert!(
        lines
            .iter()
            .all(|l| l["dst"]["ip"] == EXTERNAL && l["policy"] == "new-destination watch"),
        "only the outside destination is watched: {lines:#?}"
    );
    std::thread::sleep(Duration::from_secs(LEARNING_SECONDS + 1));

    // After the window: the learned destination is quiet; a new one (UDP) alerts, once.
    for pod in ["watched/w", "plain/p"] {
        assert_eq!(lab.connect(pod, &outside, "tcp", "2s"), Some(0), "{pod}");
        assert_eq!(lab.connect(pod, &outside, "udp", "2s"), Some(0), "{pod}");
    }
    eventually(Duration::from_secs(20), "the new-destination Event", || {
        alert_events(&lab, "watched")
            .iter()
            .any(|e| e["involvedObject"]["name"] == "w")
    });
    let events = alert_events(&lab, "watched");
    assert_eq!(events.len(), 1, "{events:#?}");
    let message = events[0]["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("new-destination ")
            && message.contains(&format!("{EXTERNAL}:8080/UDP"))
            && message.contains(&format!("{LEARNING_SECONDS}s learning window")),
        "{message}"
    );
    let alerts = alert_lines(&lab, 1);
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["kind"], "new-destination", "{alerts:#?}");
    assert_eq!(alerts_metric(&lab, 1, "new-destination"), 1.0);
    // The unlabelled namespace: no lines, no alert.
    assert!(egress_lines("plain/p").is_empty());
    assert!(alert_events(&lab, "plain").is_empty());
    lab.down();
}
