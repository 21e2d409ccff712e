//! `veilnet audit --lab`: on a lab with one `hostNetwork` pod and one pod that adds `NET_RAW`
//! beside clean pods, the audit finds exactly those two (and what else is true of a fresh lab:
//! a namespace without NetworkPolicy), exits 1, and names an unencrypted node once one is
//! switched off; once all is mended it finds nothing and exits 0. Needs root.
//!
//! Control planes: both (the audit reads only API objects; both servers must hand back the
//! securityContext, hostNetwork and ports fields it judges untouched).

mod common;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use common::*;

const NS: &str = "audited";

fn audit(lab: &Lab) -> (Output, serde_json::Value) {
    let out = veilnet()
        .args(["audit", "--lab", &lab.name, "--json"])
        .output()
        .expect("spawn veilnet audit");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("audit json ({e}):\n{}", text(&out)));
    (out, json)
}

fn findings(report: &serde_json::Value) -> BTreeSet<(String, String)> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pair(kind: &str, object: &str) -> (String, String) {
    (kind.to_string(), object.to_string())
}

/// A pod in [`NS`] whose one container drops ALL capabilities, then `edit` changes it.
fn pod(name: &str, node: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut pod: serde_json::Value = serde_json::from_str(&pod_manifest(
        NS,
        name,
        node,
        &[("app", name)],
        &["veilnet", "lab", "agnhost", "serve", "--tcp", "18080"],
    ))
    .unwrap();
    pod["spec"]["containers"][0]["securityContext"] =
        serde_json::json!({"capabilities": {"drop": ["ALL"]}});
    edit(&mut pod);
    pod.to_string()
}

fn deny_all(ns: &str) -> String {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    })
    .to_string()
}

#[test]
fn audit_finds_exactly_the_risky_pods_and_the_unencrypted_node_and_nothing_once_mended() {
    let lab = Lab::up("audit", &["--nodes", "2"]);
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
            .to_string(),
    );
    lab.apply(&deny_all(NS));
    lab.apply(&pod("clean", "node-1", |_| {}));
    lab.apply(&pod("host", "node-1", |p| {
        p["spec"]["hostNetwork"] = true.into()
    }));
    lab.apply(&pod("raw", "node-2", |p| {
        p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
            serde_json::json!(["NET_RAW"]);
    }));
    lab.wait_pod_ip(&format!("{NS}/clean"), Duration::from_secs(60));

    let (out, report) = audit(&lab);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let found = findings(&report);
    let ours: BTreeSet<_> = found
        .iter()
        .filter(|(_, object)| object.contains(&format!(" {NS}/")))
        .cloned()
        .collect();
    assert_eq!(
        ours,
        BTreeSet::from([
            pair("host-network", &format!("Pod {NS}/host")),
            pair("added-capability", &format!("Pod {NS}/raw")),
        ]),
        "{report:#}"
    );
    // Anything else found must be true: namespaces that really have no NetworkPolicy.
    for (kind, object) in found.difference(&ours) {
        assert_eq!(kind, "namespace-without-policy", "{report:#}");
        let ns = object.strip_prefix("Namespace ").unwrap();
        let policies = lab.kubectl_json(&["get", "networkpolicy", "-n", ns]);
        assert_eq!(policies["items"], serde_json::json!([]), "{object}");
    }
    assert!(
        found.contains(&pair("namespace-without-policy", "Namespace default")),
        "{report:#}"
    );
    assert!(report["systemPodsSkipped"].as_u64().is_some(), "{report:#}");
    let raw = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "added-capability")
        .unwrap();
    assert!(
        raw["risk"].as_str().unwrap().contains("c adds NET_RAW"),
        "{raw}"
    );

    // The table says the same, with the fix.
    let table = veilnet()
        .args(["audit", "--lab", &lab.name])
        .output()
        .unwrap();
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(1), "{}", text(&table));
    assert!(
        table_text.contains(&format!("host-network             Pod {NS}/host")),
        "{table_text}"
    );
    assert!(
        table_text.contains("fix:  remove hostNetwork: true"),
        "{table_text}"
    );

    // An unencrypted node: found once its agent publishes the mode, naming its plaintext peer.
    set_mode(&lab, "node-2", "off");
    eventually(Duration::from_secs(30), "node-2 published off", || {
        lab.annotation("node-2", "veilnet.io/encryption-mode") == "off"
    });
    let (_, report) = audit(&lab);
    let node = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "plaintext-node")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(node["object"], "Node node-2", "{node}");
    assert!(
        node["risk"]
            .as_str()
            .unwrap()
            .contains("1 peer(s) (node-1)"),
        "{node}"
    );

    // Mended: the risky pods gone, every namespace isolated, encryption back on.
    set_mode(&lab, "node-2", "on");
    lab.kubectl_ok(&["delete", "pod", "-n", NS, "host", "raw", "--wait=false"]);
    for (_, object) in found.difference(&ours) {
        lab.apply(&deny_all(object.strip_prefix("Namespace ").unwrap()));
    }
    eventually(Duration::from_secs(60), "a clean audit", || {
        let (out, report) = audit(&lab);
        out.status.code() == Some(0) && findings(&report).is_empty()
    });
    let clean = veilnet()
        .args(["audit", "--lab", &lab.name])
        .output()
        .unwrap();
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    assert!(
        String::from_utf8_lossy(&clean.stdout).starts_with("no findings (audited 1 pod(s)"),
        "{}",
        text(&clean)
    );
}

#[test]
fn audit_of_a_lab_that_is_not_up_is_an_error_not_a_finding() {
    let out = veilnet()
        .args(["audit", "--lab", "veilnet-no-such-lab"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not up"), "{err}");
}
