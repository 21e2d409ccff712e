//! Semantics tests of the whole server, in process: a `kube::Client` (or raw requests) over the
//! axum router as a tower service. No sockets, no root.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxumBody;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{json, Value};

use super::router;
use super::state::{ApiState, Config};

fn server_with(config: Config) -> (Arc<ApiState>, kube::Client) {
    let state = ApiState::new(config);
    let client = kube::Client::new(router(state.clone()), "default");
    (state, client)
}

fn server() -> kube::Client {
    server_with(Config::default()).1
}

/// A raw request: status and JSON body (Null if the body is not JSON).
async fn raw(
    client: &kube::Client,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    accept: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut b = axum::http::Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    if let Some(a) = accept {
        b = b.header("accept", a);
    }
    let req = b
        .body(kube::client::Body::from(body.as_bytes().to_vec()))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(AxumBody::new(resp.into_body()), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(client: &kube::Client, uri: &str) -> (u16, Value) {
    raw(client, "GET", uri, None, None, "").await
}

/// Reads newline-delimited watch events from a streaming response.
struct WatchReader {
    stream: futures::stream::BoxStream<'static, Result<axum::body::Bytes, axum::Error>>,
    buf: Vec<u8>,
}

impl WatchReader {
    async fn open(client: &kube::Client, uri: &str) -> WatchReader {
        let req = axum::http::Request::builder()
            .uri(uri)
            .body(kube::client::Body::empty())
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        WatchReader {
            stream: AxumBody::new(resp.into_body()).into_data_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next event, or None when the stream ends (or nothing arrives within 5 s).
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .ok()??
                .ok()?;
            self.buf.extend_from_slice(&chunk);
        }
    }

    async fn next_type(&mut self) -> (String, Value) {
        let ev = self.next().await.expect("an event");
        (
            ev["type"].as_str().unwrap().to_string(),
            ev["object"].clone(),
        )
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "c", "image": "busybox:1.36", "ports": [{ "containerPort": 80 }] }] }
    }))
    .unwrap()
}

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(
        json!({ "metadata": { "name": name, "labels": labels }, "data": { "k": "v" } }),
    )
    .unwrap()
}

#[tokio::test]
async fn builtin_namespaces_exist() {
    let client = server();
    let nss: Api<Namespace> = Api::all(client);
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(
        names,
        vec!["default", "kube-node-lease", "kube-public", "kube-system"]
    );
    let d = nss.get("default").await.unwrap();
    assert_eq!(d.status.unwrap().phase.as_deref(), Some("Active"));
    assert_eq!(
        d.metadata.labels.unwrap()["kubernetes.io/metadata.name"],
        "default"
    );
}

#[tokio::test]
async fn create_get_list_update_conflict_delete() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = cms
        .create(&PostParams::default(), &cm("c1", json!({})))
        .await
        .unwrap();
    let md = &created.metadata;
    assert!(uuid::Uuid::parse_str(md.uid.as_deref().unwrap()).is_ok());
    assert!(md.creation_timestamp.is_some());
    assert_eq!(md.namespace.as_deref(), Some("default"));
    let rv1: u64 = md.resource_version.as_deref().unwrap().parse().unwrap();

    let e = cms
        .create(&PostParams::default(), &cm("c1", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{e:?}"
    );

    let mut changed = created.clone();
    changed.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms
        .replace("c1", &PostParams::default(), &changed)
        .await
        .unwrap();
    let rv2: u64 = updated
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);
    // Stale resourceVersion: 409 Conflict.
    let e = cms
        .replace("c1", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{e:?}"
    );
    // Empty resourceVersion: unconditional.
    let mut unconditional = changed.clone();
    unconditional.metadata.resource_version = None;
    unconditional.data = Some([("k".to_string(), "v3".to_string())].into());
    assert_eq!(
        cms.replace("c1", &PostParams::default(), &unconditional)
            .await
            .unwrap()
            .data
            .unwrap()["k"],
        "v3"
    );

    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());

    let deleted = cms.delete("c1", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_right(), "configmaps answer a Status");
    let e = cms.get("c1").await.unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{e:?}"
    );
}

#[tokio::test]
async fn generate_name_and_name_validation() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut c = cm("", json!({}));
    c.metadata.name = None;
    c.metadata.generate_name = Some("gen-".into());
    let made = cms.create(&PostParams::default(), &c).await.unwrap();
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    c.metadata.generate_name = None;
    let e = cms.create(&PostParams::default(), &c).await.unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 422),
        "{e:?}"
    );
    let e = cms
        .create(&PostParams::default(), &cm("Bad_Name", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 422 && s.reason == "Invalid"),
        "{e:?}"
    );
}

#[tokio::test]
async fn namespaces_from_the_url() {
    let client = server();
    let (code, s) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        Some("application/json"),
        None,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"other"}}"#,
    )
    .await;
    assert_eq!(code, 400, "{s}");
    assert_eq!(s["kind"], "Status");
    let (code, s) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/missing/configmaps",
        Some("application/json"),
        None,
        r#"{"metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(s["message"], "namespaces \"missing\" not found");
    let (code, s) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        Some("application/json"),
        None,
        r#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!(code, 400, "{s}");
}

#[tokio::test]
async fn error_codes() {
    let client = server();
    let (code, _) = raw(
        &client,
        "PUT",
        "/api/v1/namespaces/default/configmaps",
        Some("application/json"),
        None,
        "{}",
    )
    .await;
    assert_eq!(code, 405);
    let (code, s) = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default",
        Some("text/plain"),
        None,
        "{}",
    )
    .await;
    assert_eq!(code, 415, "{s}");
    assert_eq!(s["reason"], "UnsupportedMediaType");
    let (code, _) = get(&client, "/api/v1/namespaces/default/deployments").await;
    assert_eq!(code, 404);
    let (code, _) = raw(
        &client,
        "GET",
        "/api/v1/namespaces",
        None,
        Some("application/vnd.kubernetes.protobuf"),
        "",
    )
    .await;
    assert_eq!(code, 406);
    let (code, s) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/pods",
        Some("application/json"),
        None,
        "{not json",
    )
    .await;
    assert_eq!(code, 400, "{s}");
}

#[tokio::test]
async fn pod_validation_and_field_validation() {
    let client = server();
    let (code, s) = raw(&client, "POST", "/api/v1/namespaces/default/pods", Some("application/json"), None,
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c"}]}}"#).await;
    assert_eq!(code, 422, "{s}");
    assert_eq!(
        s["details"]["causes"][0]["field"],
        "spec.containers[0].image"
    );
    let body = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"i","bogus":1}]}}"#;
    let (code, s) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/pods?fieldValidation=Strict",
        Some("application/json"),
        None,
        body,
    )
    .await;
    assert_eq!(code, 400, "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"spec.containers[0].bogus\""),
        "{s}"
    );
    // Default (Warn): accepted, with the unknown field pruned and a Warning header.
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/api/v1/namespaces/default/pods")
        .header("content-type", "application/json")
        .body(kube::client::Body::from(body.as_bytes().to_vec()))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let warning = resp
        .headers()
        .get("warning")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(warning.contains("unknown field"), "{warning}");
    let (_, p) = get(&client, "/api/v1/namespaces/default/pods/p").await;
    assert!(p["spec"]["containers"][0].get("bogus").is_none());
    let (code, s) = raw(&client, "POST", "/api/v1/namespaces/default/pods", Some("application/json"), None,
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"q"},"spec":{"containers":[{"name":"c","image":"i","ports":[{"containerPort":"x"}]}]}}"#).await;
    assert_eq!(code, 400, "{s}");
}

#[tokio::test]
async fn pod_defaults_status_subresource_and_generation() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let p = pods
        .create(&PostParams::default(), &pod("web"))
        .await
        .unwrap();
    let spec = p.spec.clone().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(spec.scheduler_name.as_deref(), Some("default-scheduler"));
    let c = &spec.containers[0];
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        c.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );
    assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));
    assert_eq!(p.metadata.generation, Some(1));

    // /status ignores spec changes but keeps status and label/annotation changes (as the real
    // server's status strategies do).
    let patch = json!({ "status": { "phase": "Running", "podIP": "10.0.0.5" }, "metadata": { "labels": { "s": "t" } }, "spec": { "restartPolicy": "Never" } });
    let s = pods
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(s.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(s.metadata.labels.as_ref().unwrap()["s"], "t");
    assert_eq!(
        s.spec.as_ref().unwrap().restart_policy.as_deref(),
        Some("Always")
    );
    // The main resource ignores status.
    let patch = json!({ "status": { "phase": "Failed" }, "metadata": { "labels": { "x": "y" } } });
    let m = pods
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(m.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(m.metadata.labels.as_ref().unwrap()["x"], "y");
    assert_eq!(
        m.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );
    // A spec change (image) bumps the generation; other spec changes are forbidden.
    let patch = json!({ "spec": { "containers": [{ "name": "c", "image": "busybox:1.37" }] } });
    let g = pods
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    assert_eq!(g.metadata.generation, Some(2));
    let patch = json!({ "spec": { "nodeName": "n1" } });
    let e = pods
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 422),
        "{e:?}"
    );
}

#[tokio::test]
async fn binding_assigns_a_node_once() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("b"))
        .await
        .unwrap();
    let binding = r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"b"},"target":{"kind":"Node","name":"n1"}}"#;
    let (code, _) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/pods/b/binding",
        Some("application/json"),
        None,
        binding,
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(
        pods.get("b")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("n1")
    );
    let (code, _) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/pods/b/binding",
        Some("application/json"),
        None,
        binding,
    )
    .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn three_patch_types() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let pp = PatchParams::default();
    let m = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({ "metadata": { "labels": { "app": null, "tier": "fe" } } })),
        )
        .await
        .unwrap();
    assert_eq!(
        m.metadata.labels.unwrap(),
        [("tier".to_string(), "fe".to_string())].into()
    );
    let s = pods
        .patch(
            "p",
            &pp,
            &Patch::Strategic(json!({ "metadata": { "finalizers": ["a/b"] },
        "spec": { "containers": [{ "name": "c", "image": "busybox:2" }] } })),
        )
        .await
        .unwrap();
    assert_eq!(
        s.spec.unwrap().containers[0].ports.as_ref().unwrap().len(),
        1,
        "merged by name, ports kept"
    );
    // kube-rs links its own json-patch version: let inference pick its type.
    let ops = serde_json::from_value(json!([
        { "op": "remove", "path": "/metadata/finalizers" },
        { "op": "add", "path": "/metadata/annotations", "value": { "a": "1" } }
    ]))
    .unwrap();
    let j = pods.patch("p", &pp, &Patch::Json::<()>(ops)).await.unwrap();
    assert!(j.metadata.finalizers.is_none());
    assert_eq!(j.metadata.annotations.unwrap()["a"], "1");
    // A patch that sets a stale resourceVersion conflicts.
    let e = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({ "metadata": { "resourceVersion": "1" } })),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409),
        "{e:?}"
    );
    let e = pods
        .patch("missing", &pp, &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 404),
        "{e:?}"
    );
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_releases() {
    let client = server();
    let nodes: Api<Node> = Api::all(client);
    let pp = PatchParams::apply("veilnet-agent");
    let first = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n1", "annotations": { "a": "1", "b": "2" } } });
    let n = nodes.patch("n1", &pp, &Patch::Apply(&first)).await.unwrap();
    assert_eq!(n.metadata.annotations.as_ref().unwrap().len(), 2);
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { "other": "x" } } })),
        )
        .await
        .unwrap();
    let second = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n1", "annotations": { "a": "3" } } });
    let n = nodes
        .patch("n1", &pp, &Patch::Apply(&second))
        .await
        .unwrap();
    let ann = n.metadata.annotations.unwrap();
    assert_eq!(ann.get("a").map(String::as_str), Some("3"));
    assert!(!ann.contains_key("b"), "left out of the apply: removed");
    assert_eq!(ann.get("other").map(String::as_str), Some("x"));
    let mf = n.metadata.managed_fields.unwrap();
    assert_eq!(mf[0].manager.as_deref(), Some("veilnet-agent"));
    let e = nodes
        .patch("n1", &PatchParams::default(), &Patch::Apply(&second))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 400),
        "fieldManager is required: {e:?}"
    );
}

#[tokio::test]
async fn node_status_patch_leaves_spec() {
    let client = server();
    let nodes: Api<Node> = Api::all(client);
    let n: Node = serde_json::from_value(
        json!({ "metadata": { "name": "n1" }, "spec": { "podCIDR": "10.1.0.0/24" },
        "status": { "addresses": [{ "type": "InternalIP", "address": "192.168.0.2" }] } }),
    )
    .unwrap();
    let created = nodes.create(&PostParams::default(), &n).await.unwrap();
    assert_eq!(
        created
            .status
            .as_ref()
            .unwrap()
            .addresses
            .as_ref()
            .unwrap()
            .len(),
        1,
        "nodes keep their status on create"
    );
    let patch = json!({ "spec": { "podCIDR": "10.9.0.0/24" }, "status": { "conditions": [{ "type": "Ready", "status": "True" }] } });
    let s = nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    assert_eq!(s.spec.unwrap().pod_cidr.as_deref(), Some("10.1.0.0/24"));
    let status = s.status.unwrap();
    assert_eq!(status.conditions.unwrap()[0].type_, "Ready");
    assert_eq!(status.addresses.unwrap().len(), 1);
}

#[tokio::test]
async fn graceful_pod_deletion() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let mut p = pod("bound");
    p.spec.as_mut().unwrap().node_name = Some("n1".into());
    pods.create(&PostParams::default(), &p).await.unwrap();
    let first = pods
        .delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    let pending = first.left().expect("the pod comes back");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(pending.metadata.deletion_grace_period_seconds, Some(30));
    assert!(
        pods.get("bound").await.is_ok(),
        "stays until the kubelet confirms"
    );
    let done = pods
        .delete(
            "bound",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(done.is_left(), "pods return the deleted object");
    assert!(pods.get("bound").await.is_err());
    // Unbound pods go at once.
    pods.create(&PostParams::default(), &pod("free"))
        .await
        .unwrap();
    pods.delete("free", &DeleteParams::default()).await.unwrap();
    assert!(pods.get("free").await.is_err());
}

#[tokio::test]
async fn finalizers_and_preconditions() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut c = cm("f", json!({}));
    c.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    let created = cms.create(&PostParams::default(), &c).await.unwrap();
    let e = cms
        .delete(
            "f",
            &DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some("nope".into()),
                    resource_version: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409),
        "{e:?}"
    );
    cms.delete(
        "f",
        &DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: created.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let held = cms.get("f").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    let e = cms
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": ["example.com/hold", "x/y"] } })),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 422),
        "no new finalizers while deleting: {e:?}"
    );
    cms.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    )
    .await
    .unwrap();
    assert!(cms.get("f").await.is_err());
}

#[tokio::test]
async fn namespace_deletion_drains_contents() {
    let client = server();
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "team" } })).unwrap();
    let created = nss.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(
        created.spec.unwrap().finalizers.unwrap(),
        vec!["kubernetes"]
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team");
    let mut p = pod("bound");
    p.spec.as_mut().unwrap().node_name = Some("n1".into());
    pods.create(&PostParams::default(), &p).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    cms.create(&PostParams::default(), &cm("c", json!({})))
        .await
        .unwrap();

    let out = nss.delete("team", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        out.left().unwrap().status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    assert!(cms.get("c").await.is_err());
    assert!(pods
        .get("bound")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    let e = cms
        .create(&PostParams::default(), &cm("new", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 403),
        "{e:?}"
    );
    // The kubelet's final delete empties the namespace, which then disappears.
    pods.delete(
        "bound",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(nss.get("team").await.is_err());
}

#[tokio::test]
async fn selectors_and_cluster_wide_lists() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for (n, tier) in [("a", "fe"), ("b", "be"), ("c", "fe")] {
        cms.create(
            &PostParams::default(),
            &cm(n, json!({ "tier": tier, "app": "x" })),
        )
        .await
        .unwrap();
    }
    let ks: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    ks.create(&PostParams::default(), &cm("d", json!({ "tier": "fe" })))
        .await
        .unwrap();
    let names = |l: kube::api::ObjectList<ConfigMap>| {
        l.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier=fe"))
                .await
                .unwrap()
        ),
        vec!["a", "c"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier notin (fe),app"))
                .await
                .unwrap()
        ),
        vec!["b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name!=a"))
                .await
                .unwrap()
        ),
        vec!["b", "c"]
    );
    let all: Api<ConfigMap> = Api::all(client.clone());
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("tier=fe"))
                .await
                .unwrap()
        ),
        vec!["a", "c", "d"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.namespace=kube-system"))
                .await
                .unwrap()
        ),
        vec!["d"]
    );
    let e = cms
        .list(&ListParams::default().fields("spec.nodeName=x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 400),
        "{e:?}"
    );

    let pods: Api<Pod> = Api::namespaced(client, "default");
    let mut p = pod("on-n1");
    p.spec.as_mut().unwrap().node_name = Some("n1".into());
    pods.create(&PostParams::default(), &p).await.unwrap();
    pods.create(&PostParams::default(), &pod("unbound"))
        .await
        .unwrap();
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1,status.phase=Pending"))
        .await
        .unwrap();
    assert_eq!(on_n1.items.len(), 1);
    assert_eq!(on_n1.items[0].metadata.name.as_deref(), Some("on-n1"));
}

#[tokio::test]
async fn paging_with_continue() {
    let (state, client) = server_with(Config {
        history_limit: 20,
        ..Config::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        seen.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => {
                assert!(page.metadata.remaining_item_count.unwrap() > 0);
                lp = lp.continue_token(&c);
            }
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, vec!["c0", "c1", "c2", "c3", "c4"]);

    // A token from before the history's horizon is 410 Expired.
    let page = cms.list(&ListParams::default().limit(1)).await.unwrap();
    let token = page.metadata.continue_.unwrap();
    for i in 0..25 {
        cms.create(&PostParams::default(), &cm(&format!("z{i}"), json!({})))
            .await
            .unwrap();
    }
    assert!(state.lock_store().compacted_rv() > 0);
    let e = cms
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 410 && s.reason == "Expired"),
        "{e:?}"
    );
}

#[tokio::test]
async fn list_resource_version_semantics() {
    let client = server();
    let (code, l) = get(&client, "/api/v1/namespaces?resourceVersion=0").await;
    assert_eq!(code, 200);
    let rv: u64 = l["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (code, _) = get(
        &client,
        &format!("/api/v1/namespaces?resourceVersion={rv}&resourceVersionMatch=NotOlderThan"),
    )
    .await;
    assert_eq!(code, 200);
    let (code, s) = get(
        &client,
        &format!("/api/v1/namespaces?resourceVersion={}", rv + 100),
    )
    .await;
    assert_eq!(code, 504, "{s}");
    let (code, _) = get(
        &client,
        "/api/v1/namespaces?resourceVersion=1&resourceVersionMatch=Exact",
    )
    .await;
    assert_eq!(code, 410);
    let (code, _) = get(
        &client,
        "/api/v1/namespaces?resourceVersionMatch=Sometimes&resourceVersion=1",
    )
    .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn kube_runtime_watcher_sees_changes_in_order() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let stream = watcher(pods.clone(), watcher::Config::default()).boxed();
    let events = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut stream = stream;
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await
        {
            match ev {
                watcher::Event::Apply(p) => seen.push(format!(
                    "apply {} {}",
                    p.metadata.name.unwrap(),
                    p.metadata
                        .labels
                        .unwrap_or_default()
                        .get("v")
                        .cloned()
                        .unwrap_or_default()
                )),
                watcher::Event::Delete(p) => {
                    seen.push(format!("delete {}", p.metadata.name.unwrap()));
                    break;
                }
                watcher::Event::InitDone => seen.push("initdone".into()),
                _ => {}
            }
        }
        seen
    });
    // Let the watcher list first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut p = pod("w");
    p.metadata.labels = Some([("v".to_string(), "1".to_string())].into());
    pods.create(&PostParams::default(), &p).await.unwrap();
    pods.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "v": "2" } } })),
    )
    .await
    .unwrap();
    pods.delete("w", &DeleteParams::default()).await.unwrap();
    let seen = events.await.unwrap();
    assert_eq!(seen, vec!["initdone", "apply w 1", "apply w 2", "delete w"]);
}

#[tokio::test]
async fn watch_replays_history_then_streams_live() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let a = cms
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let rv = a.metadata.resource_version.unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "k": "2" } })),
    )
    .await
    .unwrap();
    let mut w = WatchReader::open(
        &client,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"),
    )
    .await;
    let (t, o) = w.next_type().await;
    assert_eq!(
        (t.as_str(), o["data"]["k"].as_str()),
        ("MODIFIED", Some("2"))
    );
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let (t, o) = w.next_type().await;
    assert_eq!(t, "DELETED");
    let deleted_rv: u64 = o["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(deleted_rv > rv.parse::<u64>().unwrap());

    // rv unset: synthetic ADDED for the current state first.
    cms.create(&PostParams::default(), &cm("b", json!({})))
        .await
        .unwrap();
    let mut w = WatchReader::open(&client, "/api/v1/namespaces/default/configmaps?watch=1").await;
    let (t, o) = w.next_type().await;
    assert_eq!(
        (t.as_str(), o["metadata"]["name"].as_str()),
        ("ADDED", Some("b"))
    );
}

#[tokio::test]
async fn watch_from_compacted_history_is_410() {
    let (_, client) = server_with(Config {
        history_limit: 3,
        ..Config::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..6 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut w = WatchReader::open(
        &client,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=2",
    )
    .await;
    let (t, o) = w.next_type().await;
    assert_eq!(t, "ERROR");
    assert_eq!(o["code"], 410);
    assert_eq!(o["reason"], "Expired");
    assert!(w.next().await.is_none(), "the stream ends after the error");
    // kube-rs recovers by relisting: its watcher surfaces the 410 and restarts.
    let e = cms
        .watch(&kube::api::WatchParams::default(), "2")
        .await
        .unwrap()
        .boxed()
        .try_next()
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(e, kube::api::WatchEvent::Error(ref s) if s.code == 410),
        "{e:?}"
    );
}

#[tokio::test]
async fn bookmarks_and_initial_events() {
    let (_, client) = server_with(Config {
        bookmark_interval: Duration::from_millis(100),
        ..Config::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let mut w = WatchReader::open(&client, "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true").await;
    let (t, o) = w.next_type().await;
    assert_eq!(
        (t.as_str(), o["metadata"]["name"].as_str()),
        ("ADDED", Some("a"))
    );
    let (t, o) = w.next_type().await;
    assert_eq!(t, "BOOKMARK");
    assert_eq!(
        o["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(o["kind"], "ConfigMap");
    let c = cms
        .create(&PostParams::default(), &cm("b", json!({})))
        .await
        .unwrap();
    let (t, _) = w.next_type().await;
    assert_eq!(t, "ADDED");
    let (t, o) = w.next_type().await;
    assert_eq!(t, "BOOKMARK");
    assert_eq!(
        o["metadata"]["resourceVersion"].as_str(),
        c.metadata.resource_version.as_deref()
    );
    assert!(o["metadata"].get("annotations").is_none());
    assert!(
        o.get("data").is_none(),
        "bookmarks carry only the resourceVersion"
    );
    // kube-rs's streaming-list watcher works on top of this.
    let seen: Vec<_> = watcher(cms, watcher::Config::default().streaming_lists())
        .take(4)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert!(
        matches!(seen.last(), Some(watcher::Event::InitDone)),
        "{seen:?}"
    );
    // sendInitialEvents without NotOlderThan is invalid.
    let (code, _) = get(&client, "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true&allowWatchBookmarks=true").await;
    assert_eq!(code, 422);
}

#[tokio::test]
async fn watch_selectors_turn_transitions_into_added_and_deleted() {
    let client = server();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut w = WatchReader::open(
        &client,
        "/api/v1/namespaces/default/configmaps?watch=true&labelSelector=app%3Dweb&timeoutSeconds=3",
    )
    .await;
    cms.create(&PostParams::default(), &cm("x", json!({ "app": "db" })))
        .await
        .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "app": "web" } } })),
    )
    .await
    .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "k": "2" } })),
    )
    .await
    .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "app": "db" } } })),
    )
    .await
    .unwrap();
    let mut types = Vec::new();
    for _ in 0..3 {
        types.push(w.next_type().await.0);
    }
    assert_eq!(types, vec!["ADDED", "MODIFIED", "DELETED"]);
    // timeoutSeconds closes the stream.
    let started = std::time::Instant::now();
    assert!(w.next().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn tables_for_kubectl_get() {
    let client = server();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("web"))
        .await
        .unwrap();
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
    let (code, t) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/pods?limit=500",
        None,
        Some(accept),
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        vec![
            "Name",
            "Ready",
            "Status",
            "Restarts",
            "Age",
            "IP",
            "Node",
            "Nominated Node",
            "Readiness Gates"
        ]
    );
    assert_eq!(t["rows"][0]["cells"][0], "web");
    assert_eq!(t["rows"][0]["cells"][1], "0/1");
    assert_eq!(t["rows"][0]["cells"][2], "Pending");
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    let (_, t) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/pods/web?includeObject=Object",
        None,
        Some(accept),
        "",
    )
    .await;
    assert_eq!(t["rows"][0]["object"]["kind"], "Pod");
    let (_, t) = raw(&client, "GET", "/api/v1/namespaces", None, Some(accept), "").await;
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, vec!["Name", "Status", "Age"]);
    assert_eq!(t["rows"][0]["cells"][1], "Active");
    for (uri, want) in [
        (
            "/api/v1/nodes",
            vec![
                "Name",
                "Status",
                "Roles",
                "Age",
                "Version",
                "Internal-IP",
                "External-IP",
                "OS-Image",
                "Kernel-Version",
                "Container-Runtime",
            ],
        ),
        (
            "/apis/networking.k8s.io/v1/networkpolicies",
            vec!["Name", "Pod-Selector", "Age"],
        ),
        ("/api/v1/configmaps", vec!["Name", "Data", "Age"]),
        (
            "/apis/coordination.k8s.io/v1/leases",
            vec!["Name", "Holder", "Age"],
        ),
        (
            "/api/v1/events",
            vec![
                "Last Seen",
                "Type",
                "Reason",
                "Object",
                "Subobject",
                "Source",
                "Message",
                "First Seen",
                "Count",
                "Name",
            ],
        ),
        (
            "/apis/apps/v1/daemonsets",
            vec![
                "Name",
                "Desired",
                "Current",
                "Ready",
                "Up-to-date",
                "Available",
                "Node Selector",
                "Age",
                "Containers",
                "Images",
                "Selector",
            ],
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            vec!["Name", "Created At"],
        ),
    ] {
        let (_, t) = raw(&client, "GET", uri, None, Some(accept), "").await;
        let cols: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, want, "{uri}");
    }
    // Watch as Table (kubectl get -w).
    let req = axum::http::Request::builder()
        .uri("/api/v1/namespaces/default/pods?watch=true")
        .header("accept", accept)
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let mut w = WatchReader {
        stream: AxumBody::new(resp.into_body()).into_data_stream().boxed(),
        buf: Vec::new(),
    };
    let (t, o) = w.next_type().await;
    assert_eq!((t.as_str(), o["kind"].as_str()), ("ADDED", Some("Table")));
}

#[tokio::test]
async fn discovery_and_openapi() {
    let client = server();
    let (_, v) = get(&client, "/version").await;
    assert!(v["gitVersion"].as_str().unwrap().starts_with("v1.33."));
    let (_, a) = get(&client, "/api").await;
    assert_eq!(a["versions"], json!(["v1"]));
    let (_, g) = get(&client, "/apis").await;
    assert_eq!(g["kind"], "APIGroupList");
    let (_, l) = get(&client, "/apis/coordination.k8s.io/v1").await;
    assert_eq!(l["resources"][0]["name"], "leases");
    let (_, idx) = get(&client, "/openapi/v3").await;
    let url = idx["paths"]["apis/networking.k8s.io/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, doc) = get(&client, &url).await;
    assert_eq!(code, 200);
    assert!(doc["paths"]
        ["/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{name}"]["patch"]
        .is_object());
    for probe in ["/healthz", "/readyz", "/livez"] {
        let req = axum::http::Request::builder()
            .uri(probe)
            .body(kube::client::Body::empty())
            .unwrap();
        assert_eq!(client.send(req).await.unwrap().status().as_u16(), 200);
    }
    // kube-rs discovery resolves the served kinds.
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let (ar, _) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
        ))
        .unwrap();
    assert_eq!(ar.plural, "networkpolicies");
}

#[tokio::test]
async fn leases_networkpolicies_and_events() {
    let client = server();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let l: Lease = serde_json::from_value(json!({ "metadata": { "name": "n1" }, "spec": { "holderIdentity": "n1", "leaseDurationSeconds": 40 } })).unwrap();
    // PUT creates leases (as the real server allows).
    let created = leases
        .replace("n1", &PostParams::default(), &l)
        .await
        .unwrap();
    assert_eq!(created.spec.unwrap().holder_identity.as_deref(), Some("n1"));

    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
    let np: NetworkPolicy = serde_json::from_value(json!({ "metadata": { "name": "deny" }, "spec": {
        "podSelector": { "matchLabels": { "app": "web" } }, "egress": [{ "ports": [{ "port": 53 }] }] } })).unwrap();
    let np = nps.create(&PostParams::default(), &np).await.unwrap();
    let spec = np.spec.unwrap();
    assert_eq!(spec.policy_types.unwrap(), vec!["Ingress", "Egress"]);
    assert_eq!(
        spec.egress.unwrap()[0].ports.as_ref().unwrap()[0]
            .protocol
            .as_deref(),
        Some("TCP")
    );

    // kube-runtime's event recorder (events.k8s.io/v1): create, then merge-patch the series.
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter::from("veilnet-test"),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods
        .create(&PostParams::default(), &pod("evt"))
        .await
        .unwrap();
    let reference = kube::Resource::object_ref(&p, &());
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "Tested".into(),
        note: Some("hello".into()),
        action: "Testing".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].series.as_ref().map(|s| s.count), Some(2));
}
