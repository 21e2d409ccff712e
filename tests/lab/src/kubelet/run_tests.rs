//! The whole kubelet (`run_until`) against a small in-memory API server, inside a throwaway node
//! namespace (root, reference plugins): registration, node status and Lease, the pod watch with
//! its field selector, pod status, crash garbage collection, adoption across a restart, and
//! deletion.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use super::cni::{self, CniRuntime};
use super::exec_tests::{
    bridge_conflist, can_run_root_tests, current_thread_rt, NodeNs, REFERENCE_PLUGINS,
};
use super::sandbox::{self, PodKey, Sandboxes};
use super::{run_until, KubeletArgs, KubeletTiming};
use veilnet::netns;

#[derive(Default)]
struct Cluster {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    events: BTreeMap<(String, String), Value>,
}

struct Fake {
    state: Mutex<Cluster>,
    pod_events: broadcast::Sender<Value>,
}

type Shared = Arc<Fake>;

impl Fake {
    fn stamp(c: &mut Cluster, obj: &mut Value) {
        c.rv += 1;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(c.rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{}", c.rv));
        }
    }

    /// Adds or replaces a pod, as a client would, and tells the watchers.
    fn put_pod(&self, mut pod: Value) {
        let mut c = self.state.lock().unwrap();
        Self::stamp(&mut c, &mut pod);
        let key = (
            pod["metadata"]["namespace"].as_str().unwrap().to_string(),
            pod["metadata"]["name"].as_str().unwrap().to_string(),
        );
        let kind = if c.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.pods.insert(key, pod.clone());
        let _ = self.pod_events.send(json!({"type": kind, "object": pod}));
    }

    fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": format!("{what} not found")}),
        ),
    )
        .into_response()
}

fn parse(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn get_node(State(f): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    match f.state.lock().unwrap().nodes.get(&name) {
        Some(n) => axum::Json(n.clone()).into_response(),
        None => not_found("node"),
    }
}

async fn create_node(State(f): State<Shared>, body: Bytes) -> Response {
    let mut node = parse(&body);
    let mut c = f.state.lock().unwrap();
    Fake::stamp(&mut c, &mut node);
    let name = node["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.nodes.insert(name, node.clone());
    (StatusCode::CREATED, axum::Json(node)).into_response()
}

async fn patch_node_status(
    State(f): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let mut c = f.state.lock().unwrap();
    let Some(mut node) = c.nodes.get(&name).cloned() else {
        return not_found("node");
    };
    json_patch::merge(&mut node, &json!({"status": parse(&body)["status"]}));
    Fake::stamp(&mut c, &mut node);
    c.nodes.insert(name, node.clone());
    axum::Json(node).into_response()
}

async fn get_lease(
    State(f): State<Shared>,
    UrlPath((_ns, name)): UrlPath<(String, String)>,
) -> Response {
    match f.state.lock().unwrap().leases.get(&name) {
        Some(l) => axum::Json(l.clone()).into_response(),
        None => not_found("lease"),
    }
}

async fn create_lease(
    State(f): State<Shared>,
    UrlPath(_ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let mut lease = parse(&body);
    let mut c = f.state.lock().unwrap();
    Fake::stamp(&mut c, &mut lease);
    let name = lease["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.leases.insert(name, lease.clone());
    (StatusCode::CREATED, axum::Json(lease)).into_response()
}

async fn patch_lease(
    State(f): State<Shared>,
    UrlPath((_ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let mut c = f.state.lock().unwrap();
    let Some(mut lease) = c.leases.get(&name).cloned() else {
        return not_found("lease");
    };
    json_patch::merge(&mut lease, &parse(&body));
    Fake::stamp(&mut c, &mut lease);
    c.leases.insert(name, lease.clone());
    axum::Json(lease).into_response()
}

fn selected(pod: &Value, selector: &str) -> bool {
    match selector.strip_prefix("spec.nodeName=") {
        Some(node) => pod["spec"]["nodeName"] == node,
        None => true,
    }
}

async fn list_or_watch_pods(
    State(f): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let selector = q.get("fieldSelector").cloned().unwrap_or_default();
    if q.get("watch").map(String::as_str) == Some("true") {
        let rx = f.pod_events.subscribe();
        let stream = BroadcastStream::new(rx).filter_map(move |ev| {
            let ev = ev.ok()?;
            selected(&ev["object"], &selector)
                .then(|| Ok::<_, Infallible>(Bytes::from(format!("{ev}\n"))))
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let c = f.state.lock().unwrap();
    let items: Vec<Value> = c
        .pods
        .values()
        .filter(|p| selected(p, &selector))
        .cloned()
        .collect();
    axum::Json(json!({"kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": c.rv.to_string()}, "items": items}))
    .into_response()
}

async fn patch_pod_status(
    State(f): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(mut pod) = f.pod(&ns, &name) else {
        return not_found("pod");
    };
    json_patch::merge(&mut pod, &json!({"status": parse(&body)["status"]}));
    f.put_pod(pod);
    axum::Json(f.pod(&ns, &name)).into_response()
}

async fn delete_pod(
    State(f): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let options = parse(&body);
    let mut c = f.state.lock().unwrap();
    let key = (ns, name);
    let Some(pod) = c.pods.get(&key).cloned() else {
        return not_found("pod");
    };
    assert_eq!(
        options["gracePeriodSeconds"], 0,
        "final delete must be immediate"
    );
    if options["preconditions"]["uid"] != pod["metadata"]["uid"] {
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({"kind": "Status", "code": 409})),
        )
            .into_response();
    }
    c.pods.remove(&key);
    let _ = f.pod_events.send(json!({"type": "DELETED", "object": pod}));
    axum::Json(pod).into_response()
}

async fn create_event(
    State(f): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let mut ev = parse(&body);
    let mut c = f.state.lock().unwrap();
    Fake::stamp(&mut c, &mut ev);
    let name = ev["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.events.insert((ns, name), ev.clone());
    (StatusCode::CREATED, axum::Json(ev)).into_response()
}

async fn patch_event(
    State(f): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let mut c = f.state.lock().unwrap();
    let key = (ns, name);
    let Some(mut ev) = c.events.get(&key).cloned() else {
        return not_found("event");
    };
    json_patch::merge(&mut ev, &parse(&body));
    c.events.insert(key, ev.clone());
    axum::Json(ev).into_response()
}

fn router(f: Shared) -> Router {
    Router::new()
        .route("/api/v1/nodes", post(create_node))
        .route("/api/v1/nodes/{name}", get(get_node))
        .route("/api/v1/nodes/{name}/status", patch(patch_node_status))
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            post(create_lease),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(get_lease).patch(patch_lease),
        )
        .route("/api/v1/pods", get(list_or_watch_pods))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            axum::routing::delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/status",
            patch(patch_pod_status),
        )
        .route("/api/v1/namespaces/{ns}/events", post(create_event))
        .route("/api/v1/namespaces/{ns}/events/{name}", patch(patch_event))
        .with_state(f)
}

fn pod(name: &str, uid: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": "agnhost", "command": ["sleep", "300"]}]}
    })
}

fn args(tmp: &Path, pod_prefix: &str, kubeconfig: PathBuf) -> KubeletArgs {
    KubeletArgs {
        node_name: "node-1".into(),
        node_ip: "172.30.0.11".parse().unwrap(),
        kubeconfig,
        cni_conf_dir: tmp.join("net.d"),
        cni_bin_dirs: vec![PathBuf::from(REFERENCE_PLUGINS)],
        kubelet_dir: tmp.join("kubelet"),
        netns_prefix: pod_prefix.to_string(),
        max_pods: 110,
        timing: Box::new(KubeletTiming {
            node_status_period: Duration::from_secs(1),
            lease_period: Duration::from_secs(1),
            network_check_fast: Duration::from_millis(200),
            network_check_slow: Duration::from_secs(1),
            gc_period: Duration::from_secs(2),
            cni_timeout: Duration::from_secs(30),
            max_grace_period: Duration::from_secs(2),
        }),
    }
}

async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition(obj: &Value, type_: &str) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

fn container_pid(pod: &Value) -> Option<i32> {
    pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()?
        .strip_prefix("veilnet-lab://")?
        .parse()
        .ok()
}

#[test]
fn kubelet_against_an_api_server() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_path_buf();
    let ipam = tmp_path.join("ipam");
    std::fs::create_dir_all(tmp_path.join("net.d")).unwrap();
    std::fs::write(
        tmp_path.join("net.d/10-veiltest.conflist"),
        bridge_conflist(&node.bridge, &ipam, "10.250.4.0/24"),
    )
    .unwrap();
    let node_name = node.name.clone();
    let tmp_path = tmp.path().to_path_buf();
    let prefix = node.pod_prefix.clone();
    let args_for = {
        let (tmp_path, prefix) = (tmp_path.clone(), prefix.clone());
        move |kubeconfig: PathBuf| args(&tmp_path, &prefix, kubeconfig)
    };

    netns::run_in(&node_name, move || {
        current_thread_rt().block_on(async move {
            let (tx, _) = broadcast::channel(256);
            let fake = Arc::new(Fake {
                state: Mutex::new(Cluster::default()),
                pod_events: tx,
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let app = router(fake.clone());
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let kubeconfig = tmp_path.join("kubeconfig");
            std::fs::write(
                &kubeconfig,
                serde_json::to_vec(&json!({
                    "apiVersion": "v1", "kind": "Config", "current-context": "lab",
                    "clusters": [{"name": "lab", "cluster": {"server": format!("http://127.0.0.1:{port}")}}],
                    "users": [{"name": "lab", "user": {}}],
                    "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]
                }))
                .unwrap(),
            )
            .unwrap();

            fake.put_pod(pod("web-0", "11111111-aaaa-4bbb-8ccc-000000000001", "node-1"));
            fake.put_pod(pod("elsewhere", "22222222-aaaa-4bbb-8ccc-000000000002", "node-2"));

            // A crash leftover: a sandbox on disk and in the kernel whose pod the API forgot.
            let leftover = Sandboxes::new(
                CniRuntime::new(vec![PathBuf::from(REFERENCE_PLUGINS)], tmp_path.join("kubelet/cni-cache")),
                prefix.clone(),
                tmp_path.join("kubelet"),
            );
            let list = cni::load_default_config(&tmp_path.join("net.d")).unwrap();
            let ghost = PodKey {
                namespace: "default".into(),
                name: "ghost".into(),
                uid: "33333333-aaaa-4bbb-8ccc-000000000003".into(),
            };
            let ghost_record = leftover.create(&ghost, &list, Map::new()).await.unwrap();
            let ghost_lease = ipam.join("veiltest").join(ghost_record.ips[0].to_string());
            assert!(ghost_lease.exists());

            // First kubelet.
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let kubelet = tokio::spawn(run_until(args_for(kubeconfig.clone()), async {
                let _ = stop_rx.await;
            }));

            eventually("node registered and Ready", 20, || {
                let c = fake.state.lock().unwrap();
                c.nodes.get("node-1").is_some_and(|n| condition(n, "Ready")["status"] == "True")
            })
            .await;
            let n = fake.state.lock().unwrap().nodes["node-1"].clone();
            assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "node-1");
            assert_eq!(n["status"]["addresses"][0]["address"], "172.30.0.11");
            assert_eq!(n["status"]["nodeInfo"]["kubeletVersion"], super::node::KUBELET_VERSION);
            eventually("lease", 10, || {
                fake.state.lock().unwrap().leases.get("node-1").is_some_and(|l| {
                    l["spec"]["holderIdentity"] == "node-1" && l["spec"]["renewTime"].is_string()
                })
            })
            .await;

            eventually("web-0 Running with an IP", 20, || {
                fake.pod("default", "web-0").is_some_and(|p| {
                    p["status"]["phase"] == "Running"
                        && p["status"]["podIP"].as_str().is_some_and(|ip| ip.starts_with("10.250.4."))
                        && condition(&p, "Ready")["status"] == "True"
                })
            })
            .await;
            assert!(fake.pod("default", "elsewhere").unwrap()["status"].is_null());
            let pid = container_pid(&fake.pod("default", "web-0").unwrap()).unwrap();
            let web_ns = sandbox::netns_name(&prefix, "11111111-aaaa-4bbb-8ccc-000000000001");
            assert!(netns::pids(&web_ns).unwrap().contains(&pid));
            eventually("leftover collected", 10, || {
                !netns::exists(&ghost_record.netns) && !ghost_lease.exists()
            })
            .await;
            assert!(fake
                .state
                .lock()
                .unwrap()
                .events
                .values()
                .any(|e| e["reason"] == "Started" && e["involvedObject"]["name"] == "web-0"));

            // Stop: the pod keeps running.
            stop_tx.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(15), kubelet).await.unwrap().unwrap().unwrap();
            assert!(netns::exists(&web_ns));
            assert!(super::containers::process_start_ticks(pid).is_some());

            // A second kubelet adopts it: same process, no restart.
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let kubelet = tokio::spawn(run_until(args_for(kubeconfig.clone()), async {
                let _ = stop_rx.await;
            }));
            tokio::time::sleep(Duration::from_secs(3)).await;
            let p = fake.pod("default", "web-0").unwrap();
            assert_eq!(container_pid(&p), Some(pid), "{}", p["status"]);
            assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
            assert_eq!(p["status"]["phase"], "Running");

            // Delete: graceful stop, teardown, final delete by the kubelet.
            let mut deleting = p.clone();
            deleting["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
            deleting["metadata"]["deletionGracePeriodSeconds"] = json!(1);
            fake.put_pod(deleting);
            eventually("web-0 deleted by the kubelet", 20, || fake.pod("default", "web-0").is_none())
                .await;
            assert!(!netns::exists(&web_ns));
            assert!(super::containers::process_start_ticks(pid).is_none());

            stop_tx.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(15), kubelet).await.unwrap().unwrap().unwrap();
            server.abort();
        })
    })
    .unwrap();
    drop(tmp);
}
