//! `manifests/admission-policy.yaml` against the real kube-apiserver: in a namespace labelled
//! `veilnet.io/pod-network-security=enforce` a pod with hostNetwork, a privileged container, or a
//! container that keeps NET_RAW / NET_ADMIN is refused with a message naming the container and the
//! fix; a locked-down pod is admitted and runs; `warn` admits with a warning; an unlabelled
//! namespace and veilnet-system (even labelled) are unaffected. Needs root and the Kubernetes
//! build; skips (saying why) without it.
//!
//! Control plane: kubernetes only, because a ValidatingAdmissionPolicy is evaluated by the real
//! API server's admission chain, which the stand-in does not have.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn manifest() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/admission-policy.yaml"),
    )
    .unwrap()
}

fn namespace(lab: &Lab, name: &str, mode: Option<&str>) {
    lab.apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            .to_string(),
    );
    if let Some(mode) = mode {
        lab.kubectl_ok(&[
            "label",
            "namespace",
            name,
            &format!("veilnet.io/pod-network-security={mode}"),
            "--overwrite",
        ]);
    }
}

/// A pod whose one container drops ALL capabilities, then `edit` changes it.
fn pod(ns: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut pod: serde_json::Value = serde_json::from_str(&pod_manifest(
        ns,
        name,
        "node-1",
        &[],
        &["veilnet", "lab", "agnhost", "serve", "--tcp", "18080"],
    ))
    .unwrap();
    pod["spec"]["containers"][0]["securityContext"] =
        serde_json::json!({"capabilities": {"drop": ["ALL"]}});
    edit(&mut pod);
    pod
}

/// `kubectl create -f -` of `pod`; `dry_run`: server-side only, so nothing is stored.
fn create(lab: &Lab, pod: &serde_json::Value, dry_run: bool) -> Output {
    use std::io::Write;
    let mut args = vec![
        "lab", "kubectl", "--name", &lab.name, "--", "create", "-f", "-",
    ];
    if dry_run {
        args.push("--dry-run=server");
    }
    let mut child = veilnet()
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pod.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn refused(lab: &Lab, pod: &serde_json::Value, says: &[&str]) {
    let out = create(lab, pod, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "admitted: {pod}\n{}", text(&out));
    assert!(
        err.contains("ValidatingAdmissionPolicy 'veilnet-pod-network-security'"),
        "{err}"
    );
    for s in says {
        assert!(err.contains(s), "{s:?} not in: {err}");
    }
}

#[test]
fn the_admission_policy_refuses_risky_pods_in_enforced_namespaces_only() {
    veilnet_test_support::require_root!();
    require_kubernetes!();
    let lab = Lab::up_on(ControlPlane::Kubernetes, "adm", &["--nodes", "1"]);
    lab.apply(&manifest());
    let policy = lab.kubectl_json(&[
        "get",
        "validatingadmissionpolicy",
        "veilnet-pod-network-security",
    ]);
    namespace(&lab, "secured", Some("enforce"));
    namespace(&lab, "warned", Some("warn"));
    namespace(&lab, "open", None);
    namespace(&lab, "veilnet-system", Some("enforce"));

    let host = |ns: &str| pod(ns, "host", |p| p["spec"]["hostNetwork"] = true.into());
    // The API server compiles and type-checks a new policy before it enforces it.
    let started = Instant::now();
    loop {
        let out = create(&lab, &host("secured"), true);
        if !out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the policy never took effect: {policy}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "policy in effect after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Every expression type-checked against the Pod schema (a typo would only warn here).
    let policy = lab.kubectl_json(&[
        "get",
        "validatingadmissionpolicy",
        "veilnet-pod-network-security",
    ]);
    assert_eq!(
        policy["status"]["typeChecking"]["expressionWarnings"],
        serde_json::Value::Null,
        "{policy:#}"
    );

    refused(
        &lab,
        &host("secured"),
        &["hostNetwork is not allowed", "remove hostNetwork: true"],
    );
    refused(
        &lab,
        &pod("secured", "priv", |p| {
            p["spec"]["containers"][0]["securityContext"]["privileged"] = true.into()
        }),
        &["privileged containers are not allowed in this namespace: c;"],
    );
    // The runtime's default set keeps NET_RAW: a container that drops nothing is refused.
    refused(
        &lab,
        &pod("secured", "default-caps", |p| {
            p["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("securityContext");
        }),
        &[
            "container(s) c keep NET_RAW or NET_ADMIN",
            "drop: [\"ALL\"]",
        ],
    );
    // Dropping ALL and adding one back, in the runtime's own spelling, keeps it too.
    refused(
        &lab,
        &pod("secured", "added", |p| {
            p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                serde_json::json!(["cap_net_admin"]);
        }),
        &["container(s) c keep"],
    );
    // Only NET_RAW dropped: NET_ADMIN is not in the default set, but a named drop must cover both.
    refused(
        &lab,
        &pod("secured", "half", |p| {
            p["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] =
                serde_json::json!(["NET_RAW"]);
        }),
        &["container(s) c keep"],
    );
    // Init containers are checked too, and named.
    refused(
        &lab,
        &pod("secured", "init", |p| {
            p["spec"]["initContainers"] = serde_json::json!([{"name": "setup", "image": "veilnet/agnhost", "command": ["true"]}]);
        }),
        &["container(s) setup keep"],
    );

    // A locked-down pod is admitted, and runs.
    let good = pod("secured", "good", |p| {
        p["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] =
            serde_json::json!(["NET_RAW", "NET_ADMIN"]);
    });
    let out = create(&lab, &good, false);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_pod_ip("secured/good", Duration::from_secs(60));

    // warn: admitted, with the same message as a warning.
    let out = create(&lab, &host("warned"), true);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Warning:") && err.contains("hostNetwork is not allowed"),
        "{err}"
    );
    // Unlabelled, and veilnet's own namespace even when labelled: untouched, and silent.
    for ns in ["open", "veilnet-system"] {
        let out = create(&lab, &host(ns), true);
        assert!(out.status.success(), "{ns}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("veilnet pod-network-security"), "{ns}: {err}");
    }
}
