//! `veilnet observe`: the flows of every node merged, with the deciding policy, the node pair
//! and whether the pair's path was encrypted. A client on node-1 reaches a server on node-2 that
//! a policy admits it to, an unlabelled pod is denied; `observe --json` shows both with
//! `encrypted: true` (WireGuard), and after both nodes are toggled to `off`, a new connection's
//! line says `path: vxlan, encrypted: false`. The flows endpoint answers the nodes' host network
//! but closes every connection from a pod (own node and remote), counted in
//! `veilnet_connections_refused_total{listener="flows"}`. On the real control plane, the same
//! lines come through the API server's node proxy with the lab's admin credentials, and a service
//! account without RBAC is refused. Needs root.
//!
//! Control planes: both (the `--lab` reader and the endpoint on each; the API server's proxy,
//! which the stand-in does not implement, on the real one).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

const SERVER_NS: &str = "web";
const CLIENT_NS: &str = "app";

fn namespace(lab: &Lab, name: &str) {
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            .to_string(),
    );
}

/// `veilnet observe --lab NAME ARGS`: (exit status, stdout, stderr).
fn observe(lab: &Lab, args: &[&str]) -> (Option<i32>, String, String) {
    let out = veilnet()
        .args(["observe", "--lab", &lab.name])
        .args(args)
        .output()
        .expect("spawn veilnet observe");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn observe_json(lab: &Lab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let (code, out, err) = observe(lab, &full);
    assert_eq!(code, Some(0), "observe {args:?}: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Sends a request to the flows port from inside `netns`: what came back (empty when the
/// connection was closed unanswered).
fn ask_flows(netns: &str, ip: &str) -> String {
    let ip = ip.to_string();
    veilnet::netns::run_in(netns, move || {
        let addr = format!("{ip}:9893").parse().unwrap();
        let mut s = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => return format!("connect: {e}"),
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(
            s,
            "GET /flows HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        );
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    })
    .expect("run in the namespace")
}

fn refused_metric(lab: &Lab, node: usize) -> f64 {
    let ip = format!("172.30.0.{}", 10 + node);
    let (_, body) = lab.http_get(node, &ip, 9892, "/metrics");
    metric(
        &body,
        "veilnet_connections_refused_total{listener=\"flows\"}",
    )
    .unwrap_or_else(|| panic!("no flows refusal counter on node-{node}:\n{body}"))
}

/// The lines of `pod` (ns/name) as destination with verdict `verdict`.
fn lines_to(lines: &[serde_json::Value], verdict: &str, from_pod: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["verdict"] == verdict && l["src"]["pod"] == from_pod)
        .cloned()
        .collect()
}

#[test]
fn observe_merges_the_flows_with_policy_pair_and_encryption_and_pods_cannot_read_them() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("obsv", &["--nodes", "2", "--flow-log-allowed"]);
    namespace(&lab, SERVER_NS);
    namespace(&lab, CLIENT_NS);
    lab.apply(
        &serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-clients", "namespace": SERVER_NS},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {},
                    "podSelector": {"matchLabels": {"role": "client"}}}]}]}})
        .to_string(),
    );
    lab.apply(&pod_manifest(SERVER_NS, "server", "node-2", &[], SERVE));
    lab.apply(&pod_manifest(
        CLIENT_NS,
        "client",
        "node-1",
        &[("role", "client")],
        SERVE,
    ));
    lab.apply(&pod_manifest(CLIENT_NS, "intruder", "node-1", &[], SERVE));
    let server = lab.wait_pod_ip("web/server", Duration::from_secs(90));
    lab.wait_pod_ip("app/client", Duration::from_secs(60));
    lab.wait_pod_ip("app/intruder", Duration::from_secs(60));
    wait_path(
        &lab,
        "node-2",
        "node-1",
        "wireguard",
        Duration::from_secs(30),
    );

    let target = format!("{server}:80");
    assert_eq!(lab.connect("app/client", &target, "tcp", "2s"), Some(0));
    assert_eq!(lab.connect("app/intruder", &target, "tcp", "1s"), Some(1));

    // The allowed connection and the denied one, from the merged log, by the deciding policy.
    let mut lines = Vec::new();
    eventually(Duration::from_secs(15), "both flows in observe", || {
        lines = observe_json(&lab, &["--namespace", SERVER_NS]);
        !lines_to(&lines, "allow", "client").is_empty()
            && !lines_to(&lines, "deny", "intruder").is_empty()
    });
    for (verdict, from, policy) in [
        ("allow", "client", "web/allow-clients"),
        ("deny", "intruder", "default deny"),
    ] {
        let l = &lines_to(&lines, verdict, from)[0];
        assert_eq!(l["policy"], policy, "{l:#}");
        assert_eq!(l["node"], "node-2", "{l:#}");
        assert_eq!(l["dst"]["pod"], "server", "{l:#}");
        assert_eq!(l["nodes"]["src"], "node-1", "{l:#}");
        assert_eq!(l["nodes"]["dst"], "node-2", "{l:#}");
        assert_eq!(l["path"], "wireguard", "{l:#}");
        assert_eq!(l["encrypted"], true, "{l:#}");
    }
    // Filters: by pod, by policy, by encryption; oldest first.
    let denied = observe_json(&lab, &["--pod", "app/intruder", "--verdict", "deny"]);
    assert!(
        !denied.is_empty() && denied.iter().all(|l| l["src"]["pod"] == "intruder"),
        "{denied:#?}"
    );
    let by_policy = observe_json(&lab, &["--policy", "web/allow-clients"]);
    assert!(
        !by_policy.is_empty() && by_policy.iter().all(|l| l["policy"] == "web/allow-clients"),
        "{by_policy:#?}"
    );
    assert!(
        observe_json(&lab, &["--namespace", SERVER_NS, "--encrypted", "false"])
            .iter()
            .all(|l| l["path"] != "wireguard"),
        "nothing that crossed over WireGuard is listed as unencrypted"
    );
    let times: Vec<String> = lines
        .iter()
        .map(|l| l["time"].as_str().unwrap().to_string())
        .collect();
    let parsed: Vec<jiff::Timestamp> = times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // The table names the pair's path.
    let (code, table, err) = observe(&lab, &["--pod", "web/server"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.starts_with("TIME"), "{table}");
    assert!(
        table.contains("app/client") && table.contains("wireguard (encrypted)"),
        "{table}"
    );
    // Bad filters: a clear error, exit status 2.
    for (args, says) in [
        (vec!["--verdict", "maybe"], "--verdict"),
        (vec!["--since", "yesterday"], "--since"),
        (vec!["--pod", "server"], "--pod"),
    ] {
        let (code, _, err) = observe(&lab, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // Who may read the flows: the nodes' host network (own and remote), never a pod.
    let (code, body) = lab.http_get(2, "172.30.0.12", 9893, "/flows");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"intruder\""), "{body}");
    let (code, body) = lab.http_get(1, "172.30.0.12", 9893, "/flows");
    assert_eq!(code, 200, "a remote node's host reads it: {body}");
    let before = refused_metric(&lab, 2);
    for pod in ["app/client", "web/server"] {
        let got = ask_flows(&lab.pod_netns(pod), "172.30.0.12");
        assert!(
            !got.contains("HTTP/") && !got.contains("intruder"),
            "{pod} read node-2's flows: {got}"
        );
    }
    let got = ask_flows(&lab.pod_netns("app/client"), "172.30.0.11");
    assert!(
        !got.contains("HTTP/"),
        "the client read its own node's flows: {got}"
    );
    assert!(refused_metric(&lab, 2) >= before + 2.0);
    assert!(refused_metric(&lab, 1) >= 1.0);

    if lab.control_plane() == ControlPlane::Kubernetes {
        through_the_api_server(&lab);
    }

    // Toggle the pair to plaintext: new lines say so.
    let toggled = jiff::Timestamp::now();
    set_mode(&lab, "node-1", "off");
    set_mode(&lab, "node-2", "off");
    wait_path(&lab, "node-2", "node-1", "vxlan", Duration::from_secs(30));
    // The agent hands its new plan to the flow log after the pass that applied it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.connect("app/client", &target, "tcp", "2s"), Some(0));
    let since = toggled.to_string();
    let mut plain = Vec::new();
    eventually(Duration::from_secs(15), "the plaintext flow", || {
        plain = observe_json(
            &lab,
            &[
                "--pod",
                "web/server",
                "--verdict",
                "allow",
                "--since",
                &since,
            ],
        );
        plain.iter().any(|l| l["path"] == "vxlan")
    });
    let l = plain.iter().find(|l| l["path"] == "vxlan").unwrap();
    assert_eq!(l["encrypted"], false, "{l:#}");
    assert_eq!(l["policy"], "web/allow-clients", "{l:#}");
    let unencrypted = observe_json(&lab, &["--encrypted", "false", "--since", &since]);
    assert!(
        unencrypted.iter().any(|u| u == l),
        "--encrypted false lists it: {unencrypted:#?}"
    );
    lab.down();
}

/// The same flows through the API server's node proxy, as an operator with the lab's admin
/// credentials; a service account that no RBAC rule lets proxy gets nothing.
fn through_the_api_server(lab: &Lab) {
    let paths = veilnet::lab_paths::LabPaths::new(&lab.name).unwrap();
    let kubeconfig = paths.kubeconfig();
    let run = |kubeconfig: &std::path::Path| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &paths.control_plane_netns()])
            .arg(env!("CARGO_BIN_EXE_veilnet"))
            .args([
                "observe",
                "--json",
                "--namespace",
                SERVER_NS,
                "--kubeconfig",
            ])
            .arg(kubeconfig)
            .output()
            .expect("spawn observe");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&kubeconfig);
    assert_eq!(code, Some(0), "observe through the API server: {err}");
    let (_, direct, _) = observe(lab, &["--json", "--namespace", SERVER_NS]);
    let via_api: std::collections::BTreeSet<&str> = out.lines().collect();
    let local: std::collections::BTreeSet<&str> = direct.lines().collect();
    assert!(!via_api.is_empty(), "{err}");
    // The files may have grown between the two reads: what the API gave is in the files.
    assert!(via_api.is_subset(&local), "{via_api:#?}\nvs\n{local:#?}");

    // A service account that may list nodes but not proxy to them: its token is refused the
    // proxy, node by node, with a clear message.
    lab.kubectl_ok(&["create", "serviceaccount", "nobody", "-n", CLIENT_NS]);
    lab.kubectl_ok(&[
        "create",
        "clusterrole",
        "node-lister",
        "--verb=list",
        "--resource=nodes",
    ]);
    lab.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "nobody-lists-nodes",
        "--clusterrole=node-lister",
        &format!("--serviceaccount={CLIENT_NS}:nobody"),
    ]);
    let token = lab
        .kubectl_ok(&["create", "token", "nobody", "-n", CLIENT_NS])
        .trim()
        .to_string();
    let view = lab.kubectl_json(&["config", "view", "--raw", "--minify"]);
    let cluster = &view["clusters"][0]["cluster"];
    let limited = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": cluster}],
        "users": [{"name": "nobody", "user": {"token": token}}],
        "contexts": [{"name": "nobody", "context": {"cluster": "lab", "user": "nobody"}}],
        "current-context": "nobody",
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nobody.kubeconfig");
    std::fs::write(&file, limited.to_string()).unwrap();
    let (code, out, err) = run(&file);
    assert_eq!(
        code,
        Some(1),
        "a service account without RBAC read flows: {out}\n{err}"
    );
    assert!(out.trim().is_empty(), "{out}");
    for node in ["node-1", "node-2"] {
        assert!(
            err.contains(&format!("warning: {node}: forbidden")) && err.contains("nodes/proxy"),
            "{err}"
        );
    }
}
