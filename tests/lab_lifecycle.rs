//! The lab's lifecycle, as a user drives it: up, idempotent up, status, kubectl, down, down again.
//! Needs root; every lab has a unique name and is torn down by a guard, also on failure.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn up_status_down_leaves_nothing_behind() {
    veilnet_test_support::require_root!();
    let before = root_netns_snapshot();
    let lab = Lab::up("lc", &["--nodes", "3"]);

    // kubectl sees 3 Ready nodes with their underlay address as InternalIP.
    let nodes = lab.kubectl_json(&["get", "nodes"]);
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{nodes:#}");
    for (i, n) in items.iter().enumerate() {
        let ready = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "node {i} not Ready: {n:#}");
        let internal = n["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["type"] == "InternalIP")
            .unwrap()["address"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(internal.starts_with("172.30.0.1"), "{internal}");
        assert!(n["spec"]["podCIDR"]
            .as_str()
            .unwrap()
            .starts_with("10.244."));
    }

    // A second `up` with the same spec keeps the first (same API server process).
    let st1 = lab.status_json();
    // The stand-in's pid file, or kube-apiserver's on the real control plane.
    let apiserver_pid = |name: &str| {
        ["apiserver", "kube-apiserver"]
            .iter()
            .find_map(|role| {
                std::fs::read_to_string(format!("/var/lib/veilnet-lab/{name}/pids/{role}.pid")).ok()
            })
            .expect("the lab's API server has a pid file")
    };
    let pid1 = apiserver_pid(&lab.name);
    ok(veilnet().args(["lab", "up", "--name", &lab.name, "--nodes", "3"]));
    assert_eq!(pid1, apiserver_pid(&lab.name));
    // A different spec is refused instead of silently changing the lab.
    let out = veilnet()
        .args(["lab", "up", "--name", &lab.name, "--nodes", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("different configuration"),
        "{}",
        text(&out)
    );

    // status --json: the documented fields.
    assert_eq!(st1["name"], lab.name.as_str());
    assert_eq!(st1["apiReachable"], true);
    assert_eq!(st1["controlPlaneNetns"], format!("{}.cp", lab.name));
    assert_eq!(st1["underlayNetns"], format!("{}.ul", lab.name));
    assert_eq!(st1["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(st1["nodes"][0]["netns"], format!("{}.n1", lab.name));
    assert_eq!(st1["nodes"][0]["underlayIp"], "172.30.0.11");
    assert_eq!(st1["nodes"][0]["ready"], true);

    // Nodes reach each other and the control plane over the underlay only.
    let n1 = format!("{}.n1", lab.name);
    ok(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &n1,
        "ping",
        "-c1",
        "-W2",
        "172.30.0.13",
    ]));
    ok(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &n1,
        "ping",
        "-c1",
        "-W2",
        "172.30.0.1",
    ]));

    // Down removes every namespace, process and file; twice is fine.
    lab.down();
    assert!(
        lab_netns(&lab.name).is_empty(),
        "{:?}",
        lab_netns(&lab.name)
    );
    assert!(
        lab_processes(&lab.name).is_empty(),
        "{:?}",
        lab_processes(&lab.name)
    );
    assert!(!std::path::Path::new("/var/lib/veilnet-lab")
        .join(&lab.name)
        .exists());
    ok(veilnet().args(["lab", "down", "--name", &lab.name]));
    assert_eq!(before, root_netns_snapshot(), "the root namespace changed");
}

#[test]
fn down_cleans_up_a_half_finished_up() {
    veilnet_test_support::require_root!();
    let name = unique_name("half");
    // Namespaces and processes left by a crashed `up`: no lab.json, a process inside.
    for role in ["cp", "ul", "n1"] {
        ok(std::process::Command::new("ip").args(["netns", "add", &format!("{name}.{role}")]));
    }
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &format!("{name}.n1"), "sleep", "300"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ok(veilnet().args(["lab", "down", "--name", &name]));
    assert!(lab_netns(&name).is_empty());
    // The sleeper was killed by `down`.
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn pods_on_one_node_reach_each_other_with_reference_cni() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("ref", &["--nodes", "1", "--cni", "reference"]);
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: veilnet/agnhost
    command: ["veilnet", "lab", "agnhost", "serve", "--tcp", "80", "--udp", "81"]
---
apiVersion: v1
kind: Pod
metadata: {name: probe}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: veilnet/agnhost
    command: ["veilnet", "lab", "agnhost", "serve", "--tcp", "8080"]
"#,
    );
    let ip = lab.wait_pod_ip("default/server", Duration::from_secs(60));
    lab.wait_pod_ip("default/probe", Duration::from_secs(60));
    assert!(ip.starts_with("10.244.1."), "{ip}");

    let connect = |target: String, proto: &str| {
        lab.exec(
            "default/probe",
            &[
                "veilnet",
                "lab",
                "agnhost",
                "connect",
                &target,
                "--protocol",
                proto,
                "--timeout",
                "3s",
            ],
        )
    };
    let tcp = connect(format!("{ip}:80"), "tcp");
    assert!(tcp.status.success(), "tcp:\n{}\n{}", text(&tcp), lab.logs());
    let udp = connect(format!("{ip}:81"), "udp");
    assert!(udp.status.success(), "udp:\n{}", text(&udp));
    // A closed port is refused (exit 2), not answered: the probe can fail.
    let closed = connect(format!("{ip}:82"), "tcp");
    assert_eq!(closed.status.code(), Some(2), "{}", text(&closed));

    // Deleting a pod stops it and removes its namespace.
    let st = lab.status_json();
    let server_ns = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "server")
        .unwrap()["netns"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(std::path::Path::new("/run/netns").join(&server_ns).exists());
    lab.kubectl_ok(&["delete", "pod", "server", "--timeout=60s"]);
    assert!(!std::path::Path::new("/run/netns").join(&server_ns).exists());
    let after = connect(format!("{ip}:80"), "tcp");
    assert!(!after.status.success());
}

#[test]
fn underlay_mtu_is_configurable() {
    veilnet_test_support::require_root!();
    for mtu in ["9000", "1400"] {
        let lab = Lab::up("mtu", &["--nodes", "2", "--underlay-mtu", mtu]);
        let n1 = format!("{}.n1", lab.name);
        let link = ok(std::process::Command::new("ip").args(["-n", &n1, "link", "show", "eth0"]));
        assert!(link.contains(&format!("mtu {mtu}")), "{link}");
        // A full-size packet with DF set crosses the underlay; one byte more does not.
        let payload = mtu.parse::<u32>().unwrap() - 28;
        ok(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &n1,
            "ping",
            "-c1",
            "-W2",
            "-M",
            "do",
            "-s",
            &payload.to_string(),
            "172.30.0.12",
        ]));
        let too_big = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &n1,
                "ping",
                "-c1",
                "-W1",
                "-M",
                "do",
                "-s",
                &(payload + 1).to_string(),
                "172.30.0.12",
            ])
            .output()
            .unwrap();
        assert!(!too_big.status.success());
    }
}

#[test]
fn two_labs_coexist() {
    veilnet_test_support::require_root!();
    let a = Lab::up("a", &["--nodes", "1"]);
    let b = Lab::up("b", &["--nodes", "1"]);
    a.down();
    assert!(lab_netns(&a.name).is_empty());
    assert_eq!(b.status_json()["apiReachable"], true);
    assert_eq!(
        b.kubectl_json(&["get", "nodes"])["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn kubectl_works_on_nodes_pods_namespaces_and_networkpolicies() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("kc", &["--nodes", "1"]);
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: shop}
spec:
  podSelector: {}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - {name: c, image: veilnet/agnhost, command: ["veilnet", "lab", "agnhost", "serve", "--tcp", "80"]}
"#;
    lab.apply(manifest);
    // Applying the same file again is a no-op patch, not an error.
    lab.apply(manifest);
    lab.wait_pod_ip("shop/web", Duration::from_secs(60));

    for (kind, name, ns) in [
        ("node", "node-1", None),
        ("pod", "web", Some("shop")),
        ("namespace", "shop", None),
        ("networkpolicy", "deny-all", Some("shop")),
    ] {
        let mut base = vec![];
        if let Some(ns) = ns {
            base.extend(["-n", ns]);
        }
        let with = |args: &[&str]| -> Vec<String> {
            args.iter()
                .chain(base.iter())
                .map(|s| s.to_string())
                .collect()
        };
        let run = |args: Vec<String>| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.kubectl_ok(&refs)
        };
        run(with(&["label", kind, name, "team=blue"]));
        run(with(&["annotate", kind, name, "note=hello"]));
        let yaml = run(with(&["get", kind, name, "-o", "yaml"]));
        assert!(
            yaml.contains("team: blue") && yaml.contains("note: hello"),
            "{kind}:\n{yaml}"
        );
        let selected = run(with(&["get", kind, "-l", "team=blue", "-o", "name"]));
        assert!(selected.contains(name), "{kind}: {selected}");
        run(with(&["label", kind, name, "team-"]));
        let yaml = run(with(&["get", kind, name, "-o", "yaml"]));
        assert!(!yaml.contains("team: blue"), "{kind}: label not removed");
    }
    // The table printers: kubectl's default output for pods shows the real columns.
    let table = lab.kubectl_ok(&["get", "pods", "-n", "shop", "-o", "wide"]);
    assert!(
        table.contains("READY") && table.contains("Running") && table.contains("node-1"),
        "{table}"
    );

    // Deletes: a bound pod goes through graceful deletion (the kubelet finishes it).
    lab.kubectl_ok(&["delete", "networkpolicy", "deny-all", "-n", "shop"]);
    lab.kubectl_ok(&["delete", "pod", "web", "-n", "shop", "--timeout=60s"]);
    lab.kubectl_ok(&["delete", "namespace", "shop", "--timeout=60s"]);
    let gone = lab.kubectl(&["get", "namespace", "shop"]);
    assert!(
        !gone.status.success() && text(&gone).contains("NotFound"),
        "{}",
        text(&gone)
    );
    // A stale update is refused with 409 Conflict.
    let node = lab.kubectl_json(&["get", "node", "node-1"]);
    let mut stale = node.clone();
    stale["metadata"]["resourceVersion"] = serde_json::json!("1");
    stale["metadata"]["labels"]["x"] = serde_json::json!("y");
    let path = std::env::temp_dir().join(format!("{}-stale.json", lab.name));
    std::fs::write(&path, stale.to_string()).unwrap();
    let out = lab.kubectl(&["replace", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let said = text(&out);
    assert!(!out.status.success() && said.contains("Conflict"), "{said}");
}
