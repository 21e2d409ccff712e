//! Operating veilnet in the lab: each agent's health, readiness, metrics and status endpoint, with
//! live values. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn agents_serve_health_readiness_and_live_metrics() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("ops", &["--nodes", "2"]);
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
    let ip = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    lab.wait_pod_ip("default/b", Duration::from_secs(60));

    assert_eq!(lab.http_get(1, "127.0.0.1", 9891, "/healthz").0, 200);
    assert_eq!(lab.http_get(1, "127.0.0.1", 9891, "/readyz").0, 200);
    // Health and status are on the node's loopback only; the node's address serves metrics only.
    let refused = veilnet::netns::run_in(&lab.node_netns(1), || {
        std::net::TcpStream::connect(("172.30.0.11", 9891)).is_err()
    })
    .unwrap();
    assert!(refused, "health is served on the node's address");
    assert_eq!(lab.http_get(1, "172.30.0.11", 9892, "/readyz").0, 404);
    assert_eq!(
        lab.connect("default/b", &format!("{ip}:80"), "tcp", "3s"),
        Some(0)
    );

    let sent = r#"veilnet_wireguard_sent_bytes_total{peer="node-2"}"#;
    let mut before = 0.0;
    eventually(
        Duration::from_secs(10),
        "a WireGuard byte counter for node-2",
        || {
            let (_, body) = lab.http_get(1, "172.30.0.11", 9892, "/metrics");
            before = metric(&body, sent).unwrap_or(0.0);
            before > 0.0
        },
    );
    let (_, body) = lab.http_get(1, "172.30.0.11", 9892, "/metrics");
    for name in [
        r#"veilnet_node_info{node="node-1",mode="on"} 1"#,
        r#"veilnet_peer_path{peer="node-2",path="wireguard"} 1"#,
        "veilnet_wireguard_handshake_age_seconds{",
        "veilnet_wireguard_received_bytes_total{",
        "veilnet_ipam_addresses_used{",
        "veilnet_ipam_addresses_free{",
        "veilnet_reconcile_duration_seconds_count",
        "veilnet_reconcile_errors_total",
        r#"veilnet_connections_max{listener="health"} 32"#,
        r#"veilnet_connections_max{listener="metrics"} 64"#,
        r#"veilnet_connections_max{listener="admission"} 128"#,
        r#"veilnet_connections_rejected_total{listener="metrics"} 0"#,
    ] {
        assert!(body.contains(name), "missing {name} in:\n{body}");
    }
    assert_eq!(
        metric(&body, "veilnet_ipam_addresses_used{"),
        Some(1.0),
        "{body}"
    );

    // Bytes grow while traffic flows.
    for _ in 0..20 {
        assert_eq!(
            lab.connect("default/b", &format!("{ip}:81"), "udp", "2s"),
            Some(0)
        );
    }
    eventually(
        Duration::from_secs(10),
        "the sent-bytes counter to grow",
        || {
            let (_, body) = lab.http_get(1, "172.30.0.11", 9892, "/metrics");
            metric(&body, sent).unwrap_or(0.0) > before
        },
    );

    // The status endpoint and `veilnet status` agree on the path.
    let (code, body) = lab.http_get(2, "127.0.0.1", 9891, "/status");
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["peers"][0]["node"], "node-1");
    assert_eq!(st["peers"][0]["path"], "wireguard");
}

/// `kubectl veilnet status` (the binary linked as `kubectl-veilnet`) through a lab's kubeconfig:
/// one row per Node with what its agent published; `explain` names a missing pod.
#[test]
fn kubectl_plugin_status_reads_the_nodes_from_the_api() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("kplug", &["--nodes", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-veilnet");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_veilnet"), &plugin).unwrap();
    let kubeconfig = format!("/var/lib/veilnet-lab/{}/kubeconfig", lab.name);
    let cp = lab.control_plane_netns();
    let plugin_cmd = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &cp])
            .arg(&plugin)
            .args(["--kubeconfig", &kubeconfig])
            .args(args)
            .output()
            .unwrap()
    };
    // The agent publishes its annotations shortly after the node is Ready.
    let mut rows = serde_json::Value::Null;
    eventually(Duration::from_secs(30), "node-1's annotations", || {
        let out = plugin_cmd(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        rows = serde_json::from_slice(&out.stdout).unwrap();
        rows[0]["encryptionMode"].is_string()
    });
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["node"], "node-1");
    assert_eq!(rows[0]["underlayIp"], "172.30.0.11");
    assert_eq!(rows[0]["encryptionMode"], "on");
    assert!(rows[0]["podCidrs"].as_str().unwrap().starts_with("10.244."));
    let out = plugin_cmd(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("NODE") && table.contains("node-1"),
        "{table}"
    );
    let out = plugin_cmd(&["explain", "default/nope", "default/nope2", "80/tcp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no pod default/nope"), "{}", text(&out));
    // `kubectl veilnet doctor`: node-1's agent serves its report on the metrics port.
    let out = plugin_cmd(&["doctor", "--json"]);
    let reports: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{reports}");
    assert_eq!(reports[0]["node"], "node-1");
    let checks = reports[0]["checks"].as_array().unwrap();
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["verdict"].clone())
            .unwrap_or_else(|| panic!("no {name} in {reports}"))
    };
    for name in [
        "agent.up",
        "datapath.up",
        "cni.config",
        "nftables.inet.veilnet_wire",
    ] {
        assert_eq!(verdict(name), "OK", "{name}: {reports}");
    }
    let failed: Vec<_> = checks.iter().filter(|c| c["verdict"] == "FAIL").collect();
    assert_eq!(
        out.status.code(),
        Some(i32::from(!failed.is_empty())),
        "{failed:?}"
    );
    assert!(failed.is_empty(), "a healthy 1-node lab: {failed:?}");
    let out = plugin_cmd(&["doctor", "--node", "node-7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no Node named node-7"),
        "{}",
        text(&out)
    );
    // `veilnet lab status | head -1`: the reader left before the table came; no panic.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = veilnet()
        .args(["lab", "status", "--name", &lab.name])
        .stdout(std::process::Stdio::from(writer))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    // An agent that is gone is the finding, not an error: FAIL agent.reachable, exit status 1.
    lab.kill_daemon("agent-node-1");
    let out = plugin_cmd(&["doctor"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("FAIL  agent.reachable") && report.contains("172.30.0.11:9892/doctor"),
        "{report}"
    );
}
