//! `kubectl apply -f manifests/veilnet.yaml` against the lab's API, as an operator would run it
//! on a cluster: every object is created, reads back as written, and a second apply changes
//! nothing. Needs root (the lab lives in network namespaces); the lab is torn down by a guard.
//!
//! The lab has no DaemonSet controller, so no agent pod is started here: this proves the
//! manifest is accepted by an API server (types, validation, RBAC shapes), not that it runs.

mod common;

use common::*;

fn manifest() -> String {
    format!("{}/manifests/veilnet.yaml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_install_manifest_applies_to_the_lab_api() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("man", &["--nodes", "1"]);
    let out = lab.kubectl_ok(&["apply", "-f", &manifest()]);
    // The lab creates veilnet-system itself (its agents' namespace), so apply adopts it.
    assert!(
        out.contains("namespace/veilnet-system created")
            || out.contains("namespace/veilnet-system configured"),
        "{out}"
    );
    for line in [
        "serviceaccount/veilnet created",
        "clusterrole.rbac.authorization.k8s.io/veilnet created",
        "clusterrolebinding.rbac.authorization.k8s.io/veilnet created",
        "role.rbac.authorization.k8s.io/veilnet created",
        "rolebinding.rbac.authorization.k8s.io/veilnet created",
        "role.rbac.authorization.k8s.io/veilnet-events created",
        "rolebinding.rbac.authorization.k8s.io/veilnet-events created",
        "configmap/veilnet-config created",
        "daemonset.apps/veilnet created",
        "daemonset.apps/veilnet-datapath created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // The DaemonSet reads back with what the manifest says, plus the server's defaults.
    let ds = lab.kubectl_json(&["get", "daemonset", "-n", "veilnet-system", "veilnet"]);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "{ds:#}");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    assert_eq!(ds["metadata"]["generation"], 1);
    let agent = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    assert_eq!(
        agent["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(agent["imagePullPolicy"], "IfNotPresent");

    // kubectl's tables for the new kinds.
    let table = lab.kubectl_ok(&["get", "daemonset", "-n", "veilnet-system"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("DESIRED") && table.contains("NODE SELECTOR"),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("veilnet ")), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("veilnet-datapath ")),
        "{table}"
    );
    let dp = lab.kubectl_json(&[
        "get",
        "daemonset",
        "-n",
        "veilnet-system",
        "veilnet-datapath",
    ]);
    assert_eq!(dp["spec"]["updateStrategy"]["type"], "OnDelete", "{dp:#}");
    let bindings = lab.kubectl_ok(&["get", "clusterrolebinding", "veilnet", "-o", "wide"]);
    assert!(bindings.contains("ClusterRole/veilnet"), "{bindings}");
    assert!(bindings.contains("veilnet-system/veilnet"), "{bindings}");
    let roles = lab.kubectl_json(&["get", "roles", "-n", "veilnet-system"]);
    assert_eq!(roles["items"].as_array().unwrap().len(), 1, "{roles:#}");
    let sa = lab.kubectl_ok(&["get", "serviceaccount", "-n", "veilnet-system"]);
    assert!(sa.contains("veilnet"), "{sa}");
    let cm = lab.kubectl_json(&["get", "configmap", "-n", "veilnet-system", "veilnet-config"]);
    assert!(cm["data"]["config.json"]
        .as_str()
        .unwrap()
        .contains("clusterCidr"));

    // Applying again is a no-op, as `kubectl apply` is on a real cluster.
    let again = lab.kubectl_ok(&["apply", "-f", &manifest()]);
    for line in again.lines() {
        assert!(
            line.ends_with(" unchanged"),
            "second apply changed something:\n{again}"
        );
    }
    let ds2 = lab.kubectl_json(&["get", "daemonset", "-n", "veilnet-system", "veilnet"]);
    assert_eq!(
        ds2["metadata"]["resourceVersion"],
        ds["metadata"]["resourceVersion"]
    );
}
