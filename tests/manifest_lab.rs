//! `kubectl apply -f manifests/veilnet.yaml` against the lab's API, as an operator would run it
//! on a cluster: every object is created, reads back as written, and a second apply changes
//! nothing. Needs root (the lab lives in network namespaces); the lab is torn down by a guard.
//!
//! On the stand-in (no DaemonSet controller) no agent pod is created; on
//! the real one the DaemonSet controller creates one pod per node and the lab kubelet refuses
//! them, because they mount hostPath volumes it cannot give them. Either way this proves the manifest
//! is accepted by an API server (types, validation, RBAC shapes), not that it runs: real kubelets
//! and containerd running it is the nodes issue's work.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use common::*;

fn manifest() -> String {
    format!("{}/manifests/veilnet.yaml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_install_manifest_applies_to_the_lab_api() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("man", &["--nodes", "1"]);
    let plane = lab.control_plane();
    let out = lab.kubectl_ok(&["apply", "-f", &manifest()]);
    // On the real control plane the lab has already applied the manifest's Namespace,
    // ServiceAccount and RBAC (its agents run as that ServiceAccount), so kubectl finds them
    // unchanged: proof that the lab applied exactly these objects. The stand-in's lab creates
    // only the namespace (its agents' namespace), which apply adopts.
    let rbac = match plane {
        ControlPlane::StandIn => "created",
        ControlPlane::Kubernetes => "unchanged",
    };
    assert!(
        out.contains("namespace/veilnet-system created")
            || out.contains("namespace/veilnet-system configured")
            || (plane == ControlPlane::Kubernetes
                && out.contains("namespace/veilnet-system unchanged")),
        "{out}"
    );
    for object in [
        "serviceaccount/veilnet",
        "clusterrole.rbac.authorization.k8s.io/veilnet",
        "clusterrolebinding.rbac.authorization.k8s.io/veilnet",
        "role.rbac.authorization.k8s.io/veilnet",
        "rolebinding.rbac.authorization.k8s.io/veilnet",
    ] {
        let line = format!("{object} {rbac}");
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    for line in [
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
    let mut names: Vec<&str> = roles["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    names.sort();
    // The agent's own, and the flow readers' (bound to no one by the manifest).
    assert_eq!(names, ["veilnet", "veilnet-flow-reader"], "{roles:#}");
    let bound = lab.kubectl_json(&["get", "rolebindings", "-n", "veilnet-system"]);
    assert!(
        bound["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["roleRef"]["name"] != "veilnet-flow-reader"),
        "{bound:#}"
    );
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
    // The spec is untouched (the real DaemonSet controller does write status, so the
    // resourceVersion may move there).
    let ds2 = lab.kubectl_json(&["get", "daemonset", "-n", "veilnet-system", "veilnet"]);
    assert_eq!(ds2["metadata"]["generation"], 1, "{ds2:#}");
    if plane == ControlPlane::StandIn {
        assert_eq!(
            ds2["metadata"]["resourceVersion"],
            ds["metadata"]["resourceVersion"]
        );
    } else {
        daemon_pods_are_created_and_refused_by_the_lab_kubelet(&lab);
    }
}

/// On the real control plane: each DaemonSet gets its pod on the lab's node, and the lab kubelet
/// refuses it (it mounts host volumes, which a host-process container would write to this
/// machine's own files) with a reason on the pod, never starting its containers.
fn daemon_pods_are_created_and_refused_by_the_lab_kubelet(lab: &Lab) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let pods = lab.kubectl_json(&["get", "pods", "-n", "veilnet-system"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let refused = |pod: &serde_json::Value| {
            let statuses = pod["status"]["initContainerStatuses"]
                .as_array()
                .or_else(|| pod["status"]["containerStatuses"].as_array())
                .cloned()
                .unwrap_or_default();
            statuses.first().is_some_and(|c| {
                let waiting = &c["state"]["waiting"];
                waiting["reason"] == "CreateContainerConfigError"
                    && waiting["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("mounts hostPath volumes"))
                    && c["restartCount"] == 0
            })
        };
        let owners: Vec<&str> = items
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "node-1" && refused(p))
            .filter_map(|p| p["metadata"]["ownerReferences"][0]["name"].as_str())
            .collect();
        if owners.contains(&"veilnet") && owners.contains(&"veilnet-datapath") {
            assert_eq!(
                items.len(),
                2,
                "one pod per DaemonSet on one node: {pods:#}"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the DaemonSets' pods were not created and refused in 60 s:\n{pods:#}\n{}",
            lab.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
