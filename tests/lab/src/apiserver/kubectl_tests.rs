//! The real kubectl against the stand-in. The server listens on 127.0.0.1 inside a throwaway
//! network namespace (`veilapi-<pid>-<n>`) and kubectl runs inside the same namespace, so no
//! traffic touches the host's loopback. Needs root (for the netns) and kubectl; skips otherwise.

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use veilnet::netns;

use super::state::{ApiState, Config};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Owns the namespace and the server thread; tears both down on drop, also on test failure.
struct LabApi {
    netns: String,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl LabApi {
    fn start() -> LabApi {
        let name = format!(
            "veilapi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        netns::add(&name).unwrap();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ns = name.clone();
        let server = std::thread::spawn(move || {
            netns::enter_current_thread(&ns).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let state = ApiState::new(Config::default());
                super::serve(listener, state, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let port = port_rx.recv().unwrap();
        LabApi {
            netns: name,
            port,
            stop: Some(stop),
            server: Some(server),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, file: &str, text: &str) -> String {
        let path = self.dir.path().join(file);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path.to_string_lossy().into_owned()
    }

    /// Runs kubectl inside the namespace: (exit code, stdout, stderr).
    fn kubectl(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg("kubectl")
            .arg(format!("--server=http://127.0.0.1:{}", self.port))
            .arg(format!(
                "--cache-dir={}",
                self.dir.path().join("cache").display()
            ))
            .args(args)
            .env("KUBECONFIG", self.dir.path().join("no-kubeconfig"))
            .env("HOME", self.dir.path());
        netns::command_in(&self.netns, &mut cmd).unwrap();
        let out = cmd.output().unwrap();
        let result = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("$ kubectl {}\n{}{}", args.join(" "), result.1, result.2);
        result
    }

    /// kubectl that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.kubectl(args);
        assert_eq!(code, 0, "kubectl {args:?} failed: {err}");
        out
    }
}

impl Drop for LabApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        for pid in netns::pids(&self.netns).unwrap_or_default() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = netns::delete(&self.netns);
    }
}

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let kubectl = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !kubectl {
        eprintln!("skipped: needs root (root={root}) and kubectl (found={kubectl})");
    }
    root && kubectl
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team
---
apiVersion: v1
kind: Pod
metadata:
  name: p1
  namespace: default
  labels:
    app: web
spec:
  containers:
  - name: c
    image: busybox:1.36
    ports:
    - containerPort: 8080
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny
  namespace: team
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector: {}
"#;

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels:
    node-role.kubernetes.io/control-plane: ""
status:
  conditions:
  - type: Ready
    status: "True"
  addresses:
  - type: InternalIP
    address: 192.168.77.2
  nodeInfo:
    kubeletVersion: v1.33.0
    osImage: veilnet lab
    kernelVersion: "6.1"
    containerRuntimeVersion: veil://0.1
    architecture: amd64
    bootID: ""
    kubeProxyVersion: ""
    machineID: ""
    operatingSystem: linux
    systemUUID: ""
"#;

#[test]
fn kubectl_drives_the_lab_api() {
    if !can_run() {
        return;
    }
    let lab = LabApi::start();
    let manifests = lab.write("all.yaml", MANIFESTS);

    // apply: create, then unchanged, then configured (a strategic merge patch).
    let out = lab.ok(&["apply", "-f", &manifests]);
    assert!(out.contains("namespace/team created"), "{out}");
    assert!(out.contains("pod/p1 created"), "{out}");
    assert!(
        out.contains("networkpolicy.networking.k8s.io/deny created"),
        "{out}"
    );
    let out = lab.ok(&["apply", "-f", &manifests]);
    assert!(out.contains("pod/p1 unchanged"), "{out}");
    assert!(
        out.contains("networkpolicy.networking.k8s.io/deny unchanged"),
        "{out}"
    );
    let changed = lab.write(
        "changed.yaml",
        &MANIFESTS.replace("busybox:1.36", "busybox:1.37").replace(
            "app: web\nspec:\n  containers",
            "app: web\n    stage: two\nspec:\n  containers",
        ),
    );
    let out = lab.ok(&["apply", "-f", &changed]);
    assert!(out.contains("pod/p1 configured"), "{out}");
    let image = lab.ok(&[
        "get",
        "pod",
        "p1",
        "-o",
        "jsonpath={.spec.containers[0].image} {.metadata.labels.stage} {.metadata.generation}",
    ]);
    assert_eq!(image, "busybox:1.37 two 2");

    // get -o yaml shows the defaulted object.
    let yaml = lab.ok(&["get", "pod", "p1", "-o", "yaml"]);
    for want in [
        "name: p1",
        "restartPolicy: Always",
        "phase: Pending",
        "protocol: TCP",
        "kubectl.kubernetes.io/last-applied-configuration",
    ] {
        assert!(yaml.contains(want), "{want} missing from:\n{yaml}");
    }
    let np = lab.ok(&[
        "get",
        "netpol",
        "deny",
        "-n",
        "team",
        "-o",
        "jsonpath={.spec.policyTypes}",
    ]);
    assert_eq!(np, r#"["Ingress"]"#);

    // Tables.
    let table = lab.ok(&["get", "pods"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], &["p1", "0/1", "Pending", "0"]);
    let wide = lab.ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("NOMINATED NODE"),
        "{wide}"
    );
    let ns_table = lab.ok(&["get", "namespaces"]);
    assert!(
        ns_table
            .lines()
            .any(|l| l.starts_with("team") && l.contains("Active")),
        "{ns_table}"
    );
    let np_table = lab.ok(&["get", "networkpolicies", "-A"]);
    assert!(
        np_table.contains("POD-SELECTOR") && np_table.contains("app=web"),
        "{np_table}"
    );

    // label / annotate / selectors.
    assert!(lab
        .ok(&["label", "pod", "p1", "tier=fe"])
        .contains("pod/p1 labeled"));
    assert!(lab
        .ok(&["annotate", "pod", "p1", "note=hi"])
        .contains("pod/p1 annotated"));
    assert_eq!(
        lab.ok(&["get", "pods", "-l", "tier=fe", "-o", "name"])
            .trim(),
        "pod/p1"
    );
    assert_eq!(
        lab.ok(&["get", "pods", "-l", "tier!=fe", "-o", "name"])
            .trim(),
        ""
    );
    assert_eq!(
        lab.ok(&[
            "get",
            "pod",
            "p1",
            "-o",
            "jsonpath={.metadata.annotations.note}"
        ]),
        "hi"
    );

    // Nodes: none, then one that kubectl can wait on.
    let (_, out, err) = lab.kubectl(&["get", "nodes"]);
    assert!(
        out.is_empty() && err.contains("No resources found"),
        "{out}{err}"
    );
    let node = lab.write("node.yaml", NODE);
    lab.ok(&["apply", "-f", &node]);
    let nodes = lab.ok(&["get", "nodes"]);
    let row: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[2], row[4]),
        ("n1", "Ready", "control-plane", "v1.33.0"),
        "{nodes}"
    );
    let wide = lab.ok(&["get", "nodes", "-o", "wide"]);
    assert!(wide.contains("192.168.77.2"), "{wide}");
    assert!(lab
        .ok(&["wait", "--for=condition=Ready", "node/n1", "--timeout=20s"])
        .contains("condition met"));

    // Server-side apply: create, then a second apply that drops a key.
    let cm = lab.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n  b: \"2\"\n",
    );
    assert!(lab
        .ok(&["apply", "--server-side", "-f", &cm])
        .contains("configmap/ssa serverside-applied"));
    let cm = lab.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"3\"\n",
    );
    lab.ok(&["apply", "--server-side", "-f", &cm]);
    assert_eq!(
        lab.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data}"]),
        r#"{"a":"3"}"#
    );
    assert!(lab.ok(&["get", "cm"]).contains("DATA"));

    // delete waits for each object to vanish.
    assert!(lab
        .ok(&["delete", "pod", "p1"])
        .contains("pod \"p1\" deleted"));
    let (code, _, err) = lab.kubectl(&["get", "pod", "p1"]);
    assert_eq!(code, 1);
    assert!(err.contains("pods \"p1\" not found"), "{err}");
    assert!(lab
        .ok(&["delete", "netpol", "deny", "-n", "team"])
        .contains("deleted"));
    assert!(lab
        .ok(&["delete", "namespace", "team"])
        .contains("namespace \"team\" deleted"));
    let (code, _, err) = lab.kubectl(&["get", "namespace", "team"]);
    assert_eq!(code, 1, "{err}");
    assert!(lab
        .ok(&["delete", "node", "n1"])
        .contains("node \"n1\" deleted"));

    // A server-side validation error reaches the user with its message.
    let bad = lab.write("bad.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: c\n    image: x\n    bogus: 1\n");
    let (code, _, err) = lab.kubectl(&["apply", "-f", &bad]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown field \"spec.containers[0].bogus\""),
        "{err}"
    );
}

/// What the real server serves and a new user tries first: `kubectl apply -f` of a `kind: List`
/// (kubectl validates it against `/openapi/v2`) and `kubectl auth can-i` (a
/// SelfSubjectAccessReview, sent as protobuf). The stand-in allows everything and says so.
#[test]
fn kubectl_applies_a_list_and_answers_auth_can_i() {
    if !can_run() {
        return;
    }
    let api = LabApi::start();
    let list = api.write(
        "list.json",
        r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "one", "namespace": "default"}, "data": {"k": "1"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "two", "namespace": "default"}, "data": {"k": "2"}}
        ]}"#,
    );
    let out = api.ok(&["apply", "-f", &list]);
    assert!(
        out.contains("configmap/one created") && out.contains("configmap/two created"),
        "{out}"
    );
    assert_eq!(
        api.ok(&["get", "configmap", "two", "-o", "jsonpath={.data.k}"]),
        "2"
    );
    // Each item still gets the server's strict field validation.
    let bad = api.write(
        "bad.json",
        r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "three", "namespace": "default"}, "bogus": 1}
        ]}"#,
    );
    let (code, _, err) = api.kubectl(&["apply", "-f", &bad]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown field \"bogus\""), "{err}");

    let (code, out, err) = api.kubectl(&["auth", "can-i", "create", "pods", "-n", "default"]);
    assert_eq!((code, out.trim()), (0, "yes"), "{err}");
    let (code, out, err) = api.kubectl(&["auth", "can-i", "get", "/healthz"]);
    assert_eq!((code, out.trim()), (0, "yes"), "{err}");
    let rules = api.ok(&["auth", "can-i", "--list", "-n", "default"]);
    assert!(rules.contains("*.*"), "{rules}");
    let review = api.write(
        "review.json",
        r#"{"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": "get", "resource": "secrets"}}}"#,
    );
    let created: serde_json::Value =
        serde_json::from_str(&api.ok(&["create", "-f", &review, "-o", "json"])).unwrap();
    assert_eq!(created["status"]["allowed"], true, "{created}");
    assert_eq!(created["status"]["reason"], super::authorization::REASON);
}

/// kubectl's `create` generators go through the typed client, which POSTs protobuf: the stand-in
/// answered 415 to `kubectl create namespace` until it read that encoding
/// (tests/lab/STAND-IN.md). Each object reads back as the real server stores it.
#[test]
fn kubectl_create_generators_send_protobuf() {
    if !can_run() {
        return;
    }
    let api = LabApi::start();
    assert_eq!(
        api.ok(&["create", "namespace", "cmp"]).trim(),
        "namespace/cmp created"
    );
    let (code, _, err) = api.kubectl(&["create", "namespace", "cmp"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "Error from server (AlreadyExists): namespaces \"cmp\" already exists"
    );
    let (code, _, err) = api.kubectl(&["create", "configmap", "x", "-n", "nope"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "error: failed to create configmap: namespaces \"nope\" not found"
    );
    api.ok(&[
        "create",
        "configmap",
        "cm",
        "-n",
        "cmp",
        "--from-literal=k=v",
    ]);
    assert_eq!(
        api.ok(&["get", "cm", "cm", "-n", "cmp", "-o", "jsonpath={.data}"]),
        r#"{"k":"v"}"#
    );
    api.ok(&["create", "serviceaccount", "agent", "-n", "cmp"]);
    api.ok(&[
        "create",
        "service",
        "clusterip",
        "web",
        "--tcp=80:8080",
        "-n",
        "cmp",
    ]);
    let svc: serde_json::Value =
        serde_json::from_str(&api.ok(&["get", "svc", "web", "-n", "cmp", "-o", "json"])).unwrap();
    assert_eq!(svc["spec"]["ports"][0]["port"], 80, "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080, "{svc}");
    assert_eq!(svc["spec"]["selector"]["app"], "web", "{svc}");
    api.ok(&[
        "create",
        "role",
        "reader",
        "--verb=get,list",
        "--resource=pods",
        "-n",
        "cmp",
    ]);
    api.ok(&[
        "create",
        "rolebinding",
        "reader",
        "--role=reader",
        "--serviceaccount=cmp:agent",
        "-n",
        "cmp",
    ]);
    let rb: serde_json::Value =
        serde_json::from_str(&api.ok(&["get", "rolebinding", "reader", "-n", "cmp", "-o", "json"]))
            .unwrap();
    assert_eq!(rb["roleRef"]["name"], "reader", "{rb}");
    assert_eq!(rb["subjects"][0]["name"], "agent", "{rb}");
    api.ok(&[
        "create",
        "clusterrole",
        "nodes",
        "--verb=get",
        "--resource=nodes",
    ]);
    api.ok(&[
        "create",
        "clusterrolebinding",
        "nodes",
        "--clusterrole=nodes",
        "--serviceaccount=cmp:agent",
    ]);
}
