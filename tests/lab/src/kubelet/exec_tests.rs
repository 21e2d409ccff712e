//! Tests that execute plugins and processes: a recording fake plugin (exact env, stdin,
//! prevResult and chain order, no root needed), and, as root, the Debian reference plugins
//! (bridge + host-local) driven through the sandbox and pod worker code inside a throwaway "node"
//! namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Map, Value};

use super::cni::{self, CniError, CniRuntime, PluginCallError, RuntimeConf};
use super::network::NetworkState;
use super::pods::{EventRecord, NodeContext, PodApi, PodApiError, PodWorker};
use super::sandbox::{self, PodKey, SandboxError, Sandboxes};
use veilnet::netns;

pub(super) const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A plugin that records its CNI_* env and stdin as `<rec>/<seq>-<name>-<CMD>.{env,json}` and
/// answers ADD with a result naming itself.
fn fake_plugin(dir: &Path, rec: &Path, name: &str, ip: &str) {
    let body = format!(
        r#"#!/bin/sh
rec={rec}
n=$(ls "$rec" | wc -l)
base="$rec/$(printf %03d "$n")-{name}-$CNI_COMMAND"
env | grep '^CNI_' | sort > "$base.env.tmp"
cat > "$base.json"
mv "$base.env.tmp" "$base.env"
if [ "$CNI_COMMAND" = ADD ]; then
  printf '{{"cniVersion":"1.0.0","interfaces":[{{"name":"{name}"}}],"ips":[{{"address":"{ip}"}}]}}'
fi
exit 0
"#,
        rec = rec.display()
    );
    write_script(&dir.join(name), &body);
}

/// Records: `(plugin, command, env, stdin)` in call order.
fn records(rec: &Path) -> Vec<(String, String, BTreeMap<String, String>, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(rec)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let stem = n.trim_end_matches(".json");
            let mut parts = stem.splitn(3, '-');
            let _seq = parts.next();
            let plugin = parts.next().unwrap().to_string();
            let command = parts.next().unwrap().to_string();
            let env = std::fs::read_to_string(rec.join(format!("{stem}.env")))
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let stdin = serde_json::from_slice(&std::fs::read(rec.join(&n)).unwrap()).unwrap();
            (plugin, command, env, stdin)
        })
        .collect()
}

fn runtime_conf() -> RuntimeConf {
    let mut caps = Map::new();
    caps.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80}]),
    );
    RuntimeConf {
        container_id: sandbox::sandbox_id("1a2b3c4d-0000-4000-8000-00000000abcd"),
        netns: "/run/netns/veiltest-fake".into(),
        ifname: "eth0".into(),
        args: cni::kubernetes_cni_args(
            "default",
            "web-0",
            &sandbox::sandbox_id("1a2b3c4d-0000-4000-8000-00000000abcd"),
            "1a2b3c4d-0000-4000-8000-00000000abcd",
        ),
        capability_args: caps,
    }
}

pub(super) fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn fake_plugins_see_libcni_env_stdin_prev_result_and_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin1, bin2, rec) = (
        tmp.path().join("bin1"),
        tmp.path().join("bin2"),
        tmp.path().join("rec"),
    );
    for d in [&bin1, &bin2, &rec] {
        std::fs::create_dir_all(d).unwrap();
    }
    fake_plugin(&bin1, &rec, "alpha", "10.9.0.1/24");
    // Found through the second CNI_PATH entry.
    fake_plugin(&bin2, &rec, "beta", "10.9.0.2/24");
    let list = cni::parse_conflist(
        br#"{"cniVersion":"1.0.0","name":"fakenet","plugins":[
            {"type":"alpha","capabilities":{"portMappings":true}},
            {"type":"beta","answer":42}]}"#,
        "test",
    )
    .unwrap();
    let runtime = CniRuntime::new(vec![bin1.clone(), bin2.clone()], tmp.path().join("cache"));
    let rt = runtime_conf();
    let cni_path = format!("{}:{}", bin1.display(), bin2.display());

    current_thread_rt().block_on(async {
        let result = runtime.add_network_list(&list, &rt).await.unwrap();
        assert_eq!(
            result.pod_ips(),
            vec!["10.9.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let cached = runtime.cached("fakenet", &rt.container_id, "eth0").unwrap();
        assert_eq!(cached.result.as_ref(), Some(&result.raw));
        assert_eq!(cached.config_list().unwrap().name, "fakenet");
        runtime.check_network_list(&list, &rt).await.unwrap();
        runtime.del_network_list(&list, &rt).await.unwrap();
        assert!(runtime
            .cached("fakenet", &rt.container_id, "eth0")
            .is_none());
        // DEL again: no cache left, still called and still fine.
        runtime.del_network_list(&list, &rt).await.unwrap();
    });

    let calls = records(&rec);
    let order: Vec<(String, String)> = calls
        .iter()
        .map(|(p, c, _, _)| (p.clone(), c.clone()))
        .collect();
    let expect = |p: &str, c: &str| (p.to_string(), c.to_string());
    assert_eq!(
        order,
        vec![
            expect("alpha", "ADD"),
            expect("beta", "ADD"),
            expect("alpha", "CHECK"),
            expect("beta", "CHECK"),
            expect("beta", "DEL"),
            expect("alpha", "DEL"),
            expect("beta", "DEL"),
            expect("alpha", "DEL"),
        ]
    );
    let alpha_result = json!({"cniVersion":"1.0.0","interfaces":[{"name":"alpha"}],"ips":[{"address":"10.9.0.1/24"}]});
    let beta_result = json!({"cniVersion":"1.0.0","interfaces":[{"name":"beta"}],"ips":[{"address":"10.9.0.2/24"}]});
    for (i, (plugin, command, env, stdin)) in calls.iter().enumerate() {
        assert_eq!(env["CNI_COMMAND"], *command);
        assert_eq!(env["CNI_CONTAINERID"], rt.container_id);
        assert_eq!(env["CNI_NETNS"], "/run/netns/veiltest-fake");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        assert_eq!(env["CNI_PATH"], cni_path);
        assert_eq!(
            env["CNI_ARGS"],
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=1a2b3c4d-0000-4000-8000-00000000abcd",
                rt.container_id
            )
        );
        assert_eq!(stdin["name"], "fakenet");
        assert_eq!(stdin["cniVersion"], "1.0.0");
        let expected_prev = match (i, plugin.as_str()) {
            (0, _) => None,
            (1, _) => Some(&alpha_result),
            (6 | 7, _) => None, // second DEL: the cache is gone
            _ => Some(&beta_result),
        };
        assert_eq!(
            stdin.get("prevResult"),
            expected_prev,
            "call {i} {plugin} {command}"
        );
        if plugin == "alpha" {
            assert_eq!(stdin["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        } else {
            assert!(stdin.get("runtimeConfig").is_none());
            assert_eq!(stdin["answer"], 42);
        }
    }
}

#[test]
fn plugin_failures_become_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_script(
        &bin.join("failer"),
        "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then\n  printf '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"no IP addresses available in range set\",\"details\":\"10.9.0.0/30\"}'\n  exit 1\nfi\nexit 0\n",
    );
    write_script(
        &bin.join("crasher"),
        "#!/bin/sh\necho 'panic: boom' >&2\nexit 2\n",
    );
    write_script(&bin.join("sleeper"), "#!/bin/sh\nexec sleep 5\n");
    let mut runtime = CniRuntime::new(vec![bin.clone()], tmp.path().join("cache"));
    runtime.timeout = Duration::from_millis(300);
    let rt = runtime_conf();
    let list = |t: &str| {
        cni::parse_conflist(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{{"type":"{t}"}}]}}"#)
                .as_bytes(),
            "t",
        )
        .unwrap()
    };
    current_thread_rt().block_on(async {
        let err = runtime.add_network_list(&list("failer"), &rt).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"plugin type="failer" failed (add): no IP addresses available in range set; 10.9.0.0/30"#
        );
        assert!(runtime.cached("n", &rt.container_id, "eth0").is_none());
        let err = runtime.add_network_list(&list("crasher"), &rt).await.unwrap_err();
        assert!(err.to_string().contains("panic: boom"), "{err}");
        let err = runtime.add_network_list(&list("sleeper"), &rt).await.unwrap_err();
        assert!(
            matches!(err, CniError::Plugin { source: PluginCallError::Timeout(_), .. }),
            "{err}"
        );
        let err = runtime.add_network_list(&list("absent"), &rt).await.unwrap_err();
        assert!(matches!(err, CniError::PluginNotFound { .. }), "{err}");
    });
}

#[test]
fn status_and_gc_for_cni_1_1() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin, rec) = (tmp.path().join("bin"), tmp.path().join("rec"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&rec).unwrap();
    fake_plugin(&bin, &rec, "alpha", "10.9.0.1/24");
    write_script(
        &bin.join("notready"),
        "#!/bin/sh\ncat >/dev/null\nprintf '{\"code\":50,\"msg\":\"plugin not available\"}'\nexit 1\n",
    );
    let runtime = CniRuntime::new(vec![bin.clone()], tmp.path().join("cache"));
    let v11 = |t: &str| {
        cni::parse_conflist(
            format!(r#"{{"cniVersion":"1.1.0","name":"n11","plugins":[{{"type":"{t}"}}]}}"#)
                .as_bytes(),
            "t",
        )
        .unwrap()
    };
    current_thread_rt().block_on(async {
        runtime.status(&v11("alpha")).await.unwrap();
        let valid = vec![cni::Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        }];
        runtime.gc(&v11("alpha"), &valid).await.unwrap();
        let err = runtime.status(&v11("notready")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"plugin type="notready" failed (status): plugin not available"#
        );
        // Before 1.1.0 STATUS is not called at all.
        let v10 = cni::parse_conflist(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"notready"}]}"#,
            "t",
        )
        .unwrap();
        runtime.status(&v10).await.unwrap();
    });
    let calls = records(&rec);
    assert_eq!(calls.len(), 2);
    let (_, cmd, env, _) = &calls[0];
    assert_eq!(cmd, "STATUS");
    assert!(!env.contains_key("CNI_CONTAINERID") && !env.contains_key("CNI_NETNS"));
    let (_, cmd, _, stdin) = &calls[1];
    assert_eq!(cmd, "GC");
    assert_eq!(
        stdin[cni::VALID_ATTACHMENTS_KEY],
        json!([{"containerID": "c1", "ifname": "eth0"}])
    );
}

// ---------------------------------------------------------------------------------------------
// Root tests: real namespaces and the Debian reference plugins.

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub(super) fn can_run_root_tests() -> bool {
    let ok = nix::unistd::getuid().is_root()
        && Path::new(REFERENCE_PLUGINS).join("bridge").exists()
        && Path::new(REFERENCE_PLUGINS).join("host-local").exists();
    if !ok {
        eprintln!("skipped: needs root and {REFERENCE_PLUGINS}/{{bridge,host-local}}");
    }
    ok
}

/// A "node" namespace plus everything created under its prefix; removed on drop.
pub(super) struct NodeNs {
    pub(super) name: String,
    pub(super) pod_prefix: String,
    pub(super) bridge: String,
}

impl NodeNs {
    pub(super) fn new() -> Self {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id();
        let name = format!("veiltest-kl-{id}-{n}");
        netns::add(&name).unwrap();
        Self {
            pod_prefix: format!("{name}-p-"),
            bridge: format!("veilbr{}", (id as usize * 10 + n) % 100_000_000),
            name,
        }
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        for ns in netns::list() {
            if ns.starts_with(&self.pod_prefix) || ns == self.name {
                for pid in netns::pids(&ns).unwrap_or_default() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = netns::delete(&ns);
            }
        }
    }
}

pub(super) fn bridge_conflist(bridge: &str, data_dir: &Path, subnet: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "cniVersion": "1.0.0",
        "name": "veiltest",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": data_dir,
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    }))
    .unwrap()
}

fn ip_output(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn key(uid: &str, name: &str) -> PodKey {
    PodKey {
        namespace: "default".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[test]
fn reference_plugins_sandbox_add_check_del() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let ipam_dir = tmp.path().join("ipam");
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &ipam_dir, "10.250.0.0/24"),
        "t",
    )
    .unwrap();
    let sandboxes = Sandboxes::new(
        CniRuntime::new(
            vec![PathBuf::from(REFERENCE_PLUGINS)],
            tmp.path().join("cni-cache"),
        ),
        node.pod_prefix.clone(),
        tmp.path().join("kubelet"),
    );
    let pod = key("5e1f0c2a-1111-4222-8333-444455556666", "web-0");

    let (sb, l) = (sandboxes.clone(), list.clone());
    let pk = pod.clone();
    let record = netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let record = sb.create(&pk, &l, Map::new()).await?;
            sb.check(&record, &l, Map::new()).await?;
            Ok::<_, SandboxError>(record)
        })
    })
    .unwrap()
    .unwrap();

    assert_eq!(record.netns, format!("{}5e1f0c2a1111", node.pod_prefix));
    assert!(netns::exists(&record.netns));
    let ip = record.ips[0];
    assert!(ip.to_string().starts_with("10.250.0."), "{ip}");
    let addrs = ip_output(&["-n", &record.netns, "-4", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    let routes = ip_output(&["-n", &record.netns, "-4", "route", "show", "default"]);
    assert!(
        routes.contains("default via 10.250.0.1 dev eth0"),
        "{routes}"
    );
    // Plugins ran in the node namespace (inherited from the thread), not in the root one.
    assert!(ip_output(&["-n", &node.name, "link", "show", &node.bridge]).contains(&node.bridge));
    assert!(!ip_output(&["link", "show"]).contains(&node.bridge));
    let lease = ipam_dir.join("veiltest").join(ip.to_string());
    assert!(lease.exists(), "host-local lease {}", lease.display());
    assert_eq!(sandboxes.discover(), vec![record.clone()]);

    let (sb, l, r) = (sandboxes.clone(), list.clone(), record.clone());
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            sb.teardown(&r, Some(&l)).await?;
            // Idempotent: the namespace is gone, DEL is still called and succeeds.
            sb.teardown(&r, Some(&l)).await
        })
    })
    .unwrap()
    .unwrap();
    assert!(!netns::exists(&record.netns));
    assert!(!lease.exists(), "address not released");
    assert!(sandboxes.cni.cached_attachments().is_empty());
}

/// A CNI GC waits for the ADDs in flight, and lists their attachments as valid: a GC that ran
/// beside a burst of ADDs used to tell the plugin that their attachments were stale.
#[test]
fn a_gc_waits_for_the_adds_in_flight_and_keeps_their_attachments() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root (a sandbox's network namespace)");
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let (bin, rec) = (tmp.path().join("bin"), tmp.path().join("rec"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&rec).unwrap();
    // ADD takes a second and marks its end; GC notes whether the ADD had ended when it began.
    write_script(
        &bin.join("slow"),
        &format!(
            r#"#!/bin/sh
rec={rec}
case "$CNI_COMMAND" in
ADD) cat >/dev/null; sleep 1; touch "$rec/add-done"
  printf '{{"cniVersion":"1.1.0","interfaces":[{{"name":"eth0"}}],"ips":[{{"address":"10.9.0.5/24"}}]}}' ;;
GC) if [ -e "$rec/add-done" ]; then echo after > "$rec/gc-began"; else echo during > "$rec/gc-began"; fi
  cat > "$rec/gc.json" ;;
*) cat >/dev/null ;;
esac
exit 0
"#,
            rec = rec.display()
        ),
    );
    let list = cni::parse_conflist(
        br#"{"cniVersion":"1.1.0","name":"gcnet","plugins":[{"type":"slow"}]}"#,
        "t",
    )
    .unwrap();
    let sandboxes = Sandboxes::new(
        CniRuntime::new(vec![bin.clone()], tmp.path().join("cache")),
        node.pod_prefix.clone(),
        tmp.path().join("kubelet"),
    );
    let pod = key("7a1f0c2a-2222-4333-8444-555566667777", "burst-0");
    let record = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (sb, l, pk) = (sandboxes.clone(), list.clone(), pod.clone());
            let add = tokio::spawn(async move { sb.create(&pk, &l, Map::new()).await });
            tokio::time::sleep(Duration::from_millis(300)).await;
            sandboxes.gc(&list).await.unwrap();
            let record = add.await.unwrap().unwrap();
            sandboxes.teardown(&record, Some(&list)).await.unwrap();
            record
        });
    assert_eq!(
        std::fs::read_to_string(rec.join("gc-began"))
            .unwrap()
            .trim(),
        "after",
        "GC ran while an ADD was in flight"
    );
    let gc: Value =
        serde_json::from_str(&std::fs::read_to_string(rec.join("gc.json")).unwrap()).unwrap();
    let valid = gc["cni.dev/valid-attachments"].as_array().unwrap();
    assert!(
        valid
            .iter()
            .any(|a| a["containerID"] == record.sandbox_id.as_str() && a["ifname"] == "eth0"),
        "the new attachment is valid: {gc}"
    );
    assert!(!netns::exists(&record.netns));
}

#[test]
fn reference_plugin_failure_is_reported_and_undone() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut conf: Value =
        serde_json::from_slice(&bridge_conflist(&node.bridge, tmp.path(), "10.250.1.0/24"))
            .unwrap();
    conf["plugins"][0]["ipam"]["type"] = json!("veil-no-such-ipam");
    let list = cni::parse_conflist(&serde_json::to_vec(&conf).unwrap(), "t").unwrap();
    let sandboxes = Sandboxes::new(
        CniRuntime::new(
            vec![PathBuf::from(REFERENCE_PLUGINS)],
            tmp.path().join("cni-cache"),
        ),
        node.pod_prefix.clone(),
        tmp.path().join("kubelet"),
    );
    let pod = key("77777777-1111-4222-8333-444455556666", "broken");
    let (sb, l, pk) = (sandboxes.clone(), list.clone(), pod.clone());
    let err = netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move { sb.create(&pk, &l, Map::new()).await })
    })
    .unwrap()
    .unwrap_err();
    let msg = err.to_string();
    let id = sandbox::sandbox_id(&pod.uid);
    assert!(
        msg.starts_with(&format!(
            "failed to setup network for sandbox \"{id}\": plugin type=\"bridge\" failed (add): "
        )),
        "{msg}"
    );
    assert!(msg.contains("veil-no-such-ipam"), "{msg}");
    assert!(!netns::exists(&sandbox::netns_name(
        &node.pod_prefix,
        &pod.uid
    )));
}

/// Records what the worker asks of the API server.
#[derive(Default)]
struct FakeApi {
    statuses: Mutex<Vec<Value>>,
    events: Mutex<Vec<EventRecord>>,
    deleted: Mutex<Vec<PodKey>>,
}

impl PodApi for FakeApi {
    async fn patch_status(&self, _pod: &PodKey, patch: Value) -> Result<(), PodApiError> {
        self.statuses.lock().unwrap().push(patch);
        Ok(())
    }
    async fn delete_pod(&self, pod: &PodKey) -> Result<(), PodApiError> {
        self.deleted.lock().unwrap().push(pod.clone());
        Ok(())
    }
    async fn record_event(&self, _pod: &PodKey, event: EventRecord) -> Result<(), PodApiError> {
        self.events.lock().unwrap().push(event);
        Ok(())
    }
}

impl FakeApi {
    fn last_status(&self) -> Value {
        self.statuses
            .lock()
            .unwrap()
            .last()
            .map(|p| p["status"].clone())
            .unwrap_or(Value::Null)
    }
}

fn test_pod(uid: &str, containers: Value, restart_policy: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "web-0", "namespace": "default", "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": node, "restartPolicy": restart_policy,
                 "terminationGracePeriodSeconds": 1, "containers": containers}
    }))
    .unwrap()
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn network_ready(list: cni::NetworkConfigList) -> NetworkState {
    NetworkState {
        ready: true,
        config: Some(Arc::new(list)),
        message: String::new(),
    }
}

fn node_context(
    node: &NodeNs,
    tmp: &Path,
    list: cni::NetworkConfigList,
) -> (Arc<NodeContext>, tokio::sync::watch::Sender<NetworkState>) {
    let (tx, rx) = tokio::sync::watch::channel(network_ready(list));
    let ctx = Arc::new(NodeContext {
        node_name: "node-1".into(),
        node_ip: "172.30.0.11".parse().unwrap(),
        sandboxes: Sandboxes::new(
            CniRuntime::new(
                vec![PathBuf::from(REFERENCE_PLUGINS)],
                tmp.join("cni-cache"),
            ),
            node.pod_prefix.clone(),
            tmp.join("kubelet"),
        ),
        network: rx,
        path: super::containers::lab_path(),
        max_grace: Duration::from_secs(2),
    });
    (ctx, tx)
}

#[test]
fn pod_worker_runs_restarts_reports_and_tears_down() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let ipam_dir = tmp.path().join("ipam");
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &ipam_dir, "10.250.2.0/24"),
        "t",
    )
    .unwrap();
    let (ctx, _network) = node_context(&node, tmp.path(), list);
    let api = Arc::new(FakeApi::default());
    let uid = "9a9a9a9a-1111-4222-8333-444455556666";
    let pod = test_pod(
        uid,
        json!([
            {"name": "app", "image": "busybox", "command": ["sleep", "300"],
             "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}},
            {"name": "crash", "command": ["sh", "-c", "echo hello from $POD_IP; exit 3"],
             "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}
        ]),
        "Always",
        "node-1",
    );
    let pod_ns = sandbox::netns_name(&node.pod_prefix, uid);
    let kubelet_dir = tmp.path().join("kubelet");
    let (ctx2, api2, pod_ns2) = (ctx.clone(), api.clone(), pod_ns.clone());
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(pod.clone())));
            let worker = PodWorker::new(
                ctx2.clone(),
                api2.clone(),
                PodKey::from_pod(&pod).unwrap(),
                rx,
            );
            let handle = tokio::spawn(worker.run());

            wait_for("Running + ready app + a restart of crash", 20, || {
                let s = api2.last_status();
                let statuses = s["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let app = statuses.iter().find(|c| c["name"] == "app");
                let crash = statuses.iter().find(|c| c["name"] == "crash");
                s["phase"] == "Running"
                    && app.is_some_and(|a| a["ready"] == true)
                    && crash.is_some_and(|c| c["restartCount"].as_i64().unwrap_or(0) >= 1)
            })
            .await;
            let s = api2.last_status();
            let pod_ip = s["podIP"].as_str().unwrap().to_string();
            assert!(pod_ip.starts_with("10.250.2."), "{s}");
            assert_eq!(s["hostIP"], "172.30.0.11");
            let app = s["containerStatuses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "app")
                .unwrap()
                .clone();
            let pid: i32 = app["containerID"]
                .as_str()
                .unwrap()
                .trim_start_matches("veilnet-lab://")
                .parse()
                .unwrap();
            assert!(app["state"]["running"]["startedAt"].is_string());
            // The container process lives in the pod's namespace.
            assert!(netns::pids(&pod_ns2).unwrap().contains(&pid));
            let crash = s["containerStatuses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "crash")
                .unwrap()
                .clone();
            let last_exit = crash["lastState"]["terminated"]["exitCode"].as_i64();
            assert_eq!(last_exit, Some(3), "{crash}");
            let dir = ctx2.sandboxes.pod_dir(&PodKey::from_pod(&pod).unwrap());
            let log = std::fs::read_to_string(dir.join("crash.log")).unwrap();
            assert!(log.contains(&format!("hello from {pod_ip}")), "{log}");
            let ready = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "PodReadyToStartContainers")
                .unwrap()
                .clone();
            assert_eq!(ready["status"], "True");
            assert!(api2
                .events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.reason == "BackOff"));

            // Deletion: processes stopped, network released, pod dir removed, final delete.
            let mut deleting = pod.clone();
            deleting.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
            );
            deleting.metadata.resource_version = Some("2".into());
            tx.send(Some(Arc::new(deleting))).unwrap();
            let exit = tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(exit, super::pods::WorkerExit::TornDown);
            assert!(!dir.exists());
            assert!(super::containers::process_start_ticks(pid).is_none());
            drop(tx);
        })
    })
    .unwrap();
    assert!(!netns::exists(&pod_ns));
    assert_eq!(api.deleted.lock().unwrap().len(), 1);
    assert!(std::fs::read_dir(ipam_dir.join("veiltest"))
        .unwrap()
        .all(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            !n.starts_with("10.250.2.")
        }));
    assert!(std::fs::read_dir(kubelet_dir.join("pods"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn pod_worker_reports_cni_errors_as_a_real_kubelet() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut conf: Value =
        serde_json::from_slice(&bridge_conflist(&node.bridge, tmp.path(), "10.250.3.0/24"))
            .unwrap();
    conf["plugins"][0]["ipam"]["type"] = json!("veil-no-such-ipam");
    let list = cni::parse_conflist(&serde_json::to_vec(&conf).unwrap(), "t").unwrap();
    let (ctx, network) = node_context(&node, tmp.path(), list);
    let api = Arc::new(FakeApi::default());
    let uid = "bbbbbbbb-1111-4222-8333-444455556666";
    let pod = test_pod(
        uid,
        json!([{"name": "app", "command": ["sleep", "300"]}]),
        "Always",
        "node-1",
    );
    let api2 = api.clone();
    let good = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &tmp.path().join("ipam"), "10.250.3.0/24"),
        "t",
    )
    .unwrap();
    let pod_ns = sandbox::netns_name(&node.pod_prefix, uid);
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(pod.clone())));
            let worker = PodWorker::new(ctx, api2.clone(), PodKey::from_pod(&pod).unwrap(), rx);
            let handle = tokio::spawn(worker.run());
            wait_for("FailedCreatePodSandBox", 10, || {
                api2.events
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| e.reason == "FailedCreatePodSandBox")
            })
            .await;
            wait_for("a Pending status", 5, || {
                api2.last_status()["phase"] == "Pending"
            })
            .await;
            // The failed ADD was undone: no namespace is left behind.
            assert!(!netns::exists(&pod_ns));
            // The pod goes away. Its DEL keeps failing with this config (as a real runtime's
            // would, and the teardown is retried) until the config is fixed.
            tx.send(None).unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(!handle.is_finished());
            network.send_replace(network_ready(good));
            tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .unwrap()
                .unwrap();
        })
    })
    .unwrap();
    let events = api.events.lock().unwrap();
    let ev = events
        .iter()
        .find(|e| e.reason == "FailedCreatePodSandBox")
        .unwrap();
    assert_eq!(ev.type_, "Warning");
    let id = sandbox::sandbox_id(uid);
    assert!(
        ev.message.starts_with(&format!(
            "Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox \"{id}\": plugin type=\"bridge\" failed (add): "
        )),
        "{}",
        ev.message
    );
    let s = api.last_status();
    assert_eq!(s["phase"], "Pending");
    assert!(s["podIP"].is_null());
    let waiting = &s["containerStatuses"][0]["state"]["waiting"]["reason"];
    assert_eq!(waiting, "ContainerCreating");
    // A pod that vanished from the API is not deleted again.
    assert!(api.deleted.lock().unwrap().is_empty());
    assert!(!tmp
        .path()
        .join("kubelet/pods")
        .read_dir()
        .unwrap()
        .any(|_| true));
}

#[test]
fn host_network_pods_run_without_cni_even_when_the_network_is_not_ready() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, tmp.path(), "10.250.5.0/24"),
        "t",
    )
    .unwrap();
    let (ctx, network) = node_context(&node, tmp.path(), list);
    network.send_replace(NetworkState {
        ready: false,
        config: None,
        message: "cni plugin not initialized".into(),
    });
    let api = Arc::new(FakeApi::default());
    let uid = "cccccccc-1111-4222-8333-444455556666";
    let mut pod = test_pod(
        uid,
        json!([{"name": "agent", "command": ["sleep", "300"]}]),
        "Always",
        "node-1",
    );
    pod.spec.as_mut().unwrap().host_network = Some(true);
    let (api2, node_name) = (api.clone(), node.name.clone());
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(pod.clone())));
            let worker = PodWorker::new(ctx, api2.clone(), PodKey::from_pod(&pod).unwrap(), rx);
            let handle = tokio::spawn(worker.run());
            wait_for("a running host-network pod", 10, || {
                api2.last_status()["phase"] == "Running"
            })
            .await;
            let s = api2.last_status();
            assert_eq!(s["podIP"], "172.30.0.11");
            let pid: i32 = s["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap()
                .trim_start_matches("veilnet-lab://")
                .parse()
                .unwrap();
            assert!(netns::pids(&node_name).unwrap().contains(&pid));
            tx.send(None).unwrap();
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .unwrap()
                .unwrap();
            assert!(super::containers::process_start_ticks(pid).is_none());
        })
    })
    .unwrap();
    assert!(!netns::list()
        .iter()
        .any(|n| n.starts_with(&node.pod_prefix)));
}

#[test]
fn completed_pods_succeed_and_release_their_address() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let ipam_dir = tmp.path().join("ipam");
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &ipam_dir, "10.250.6.0/24"),
        "t",
    )
    .unwrap();
    let (ctx, _network) = node_context(&node, tmp.path(), list);
    let api = Arc::new(FakeApi::default());
    let uid = "dddddddd-1111-4222-8333-444455556666";
    let pod = test_pod(
        uid,
        json!([{"name": "job", "command": ["true"]}]),
        "Never",
        "node-1",
    );
    let api2 = api.clone();
    let pod_ns = sandbox::netns_name(&node.pod_prefix, uid);
    let pod_ns2 = pod_ns.clone();
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(pod.clone())));
            let worker = PodWorker::new(ctx, api2.clone(), PodKey::from_pod(&pod).unwrap(), rx);
            let handle = tokio::spawn(worker.run());
            wait_for("Succeeded", 10, || {
                api2.last_status()["phase"] == "Succeeded"
            })
            .await;
            wait_for("network released", 10, || !netns::exists(&pod_ns2)).await;
            let s = api2.last_status();
            assert!(s["podIP"].as_str().unwrap().starts_with("10.250.6."), "{s}");
            let term = &s["containerStatuses"][0]["state"]["terminated"];
            assert_eq!(term["exitCode"], 0);
            assert_eq!(term["reason"], "Completed");
            assert_eq!(s["containerStatuses"][0]["restartCount"], 0);
            // Nothing restarts.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(
                api2.last_status()["containerStatuses"][0]["restartCount"],
                0
            );
            tx.send(None).unwrap();
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .unwrap()
                .unwrap();
        })
    })
    .unwrap();
    assert!(std::fs::read_dir(ipam_dir.join("veiltest"))
        .unwrap()
        .all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("10.250.6.")
        }));
}

#[test]
fn probes_reach_the_pod_and_failed_liveness_restarts() {
    if !can_run_root_tests() || !Path::new("/usr/bin/python3").exists() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &tmp.path().join("ipam"), "10.250.7.0/24"),
        "t",
    )
    .unwrap();
    let (ctx, _network) = node_context(&node, tmp.path(), list);
    let api = Arc::new(FakeApi::default());
    let uid = "eeeeeeee-1111-4222-8333-444455556666";
    let pod = test_pod(
        uid,
        json!([
            {"name": "web", "command": ["/usr/bin/python3", "-m", "http.server", "8080"],
             "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1},
             "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "initialDelaySeconds": 3}},
            {"name": "closed", "command": ["sleep", "300"],
             "readinessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1}},
            {"name": "dying", "command": ["sleep", "300"],
             "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}}
        ]),
        "Always",
        "node-1",
    );
    let api2 = api.clone();
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(pod.clone())));
            let worker = PodWorker::new(ctx, api2.clone(), PodKey::from_pod(&pod).unwrap(), rx);
            let handle = tokio::spawn(worker.run());
            let container = |name: &str| {
                api2.last_status()["containerStatuses"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["name"] == name).cloned())
                    .unwrap_or(Value::Null)
            };
            wait_for("web ready through its HTTP probe", 20, || {
                container("web")["ready"] == true
            })
            .await;
            wait_for("dying restarted by its liveness probe", 20, || {
                container("dying")["restartCount"].as_i64().unwrap_or(0) >= 1
            })
            .await;
            // Past the liveness delay, the live web server is not restarted.
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert_eq!(container("web")["restartCount"], 0);
            assert_eq!(container("web")["ready"], true);
            assert_eq!(container("closed")["ready"], false);
            assert_eq!(container("closed")["restartCount"], 0);
            let s = api2.last_status();
            let ready = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()
                .clone();
            assert_eq!(ready["status"], "False");
            let events = api2.events.lock().unwrap().clone();
            assert!(events.iter().any(
                |e| e.reason == "Killing" && e.message.contains("dying failed liveness probe")
            ));
            assert!(events
                .iter()
                .any(|e| e.reason == "Unhealthy" && e.message == "Readiness probe failed"));
            tx.send(None).unwrap();
            tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .unwrap()
                .unwrap();
        })
    })
    .unwrap();
}

#[test]
fn init_containers_run_in_order_before_the_containers() {
    if !can_run_root_tests() {
        return;
    }
    let node = NodeNs::new();
    let tmp = tempfile::tempdir().unwrap();
    let list = cni::parse_conflist(
        &bridge_conflist(&node.bridge, &tmp.path().join("ipam"), "10.250.8.0/24"),
        "t",
    )
    .unwrap();
    let (ctx, _network) = node_context(&node, tmp.path(), list);
    let marker = tmp.path().join("setup-ran");
    let marker_s = marker.display().to_string();
    let good = test_pod(
        "f0f0f0f0-1111-4222-8333-444455556666",
        json!([{"name": "app", "command": ["sleep", "300"]}]),
        "Always",
        "node-1",
    );
    let mut good = good;
    good.spec.as_mut().unwrap().init_containers = Some(
        serde_json::from_value(json!([
            {"name": "setup", "command": ["sh", "-c", format!("sleep 1; touch {marker_s}")]},
            {"name": "check", "command": ["test", "-f", marker_s]}
        ]))
        .unwrap(),
    );
    let mut bad = test_pod(
        "f1f1f1f1-1111-4222-8333-444455556666",
        json!([{"name": "app", "command": ["sleep", "300"]}]),
        "Never",
        "node-1",
    );
    bad.metadata.name = Some("bad".into());
    bad.spec.as_mut().unwrap().init_containers =
        Some(serde_json::from_value(json!([{"name": "fails", "command": ["false"]}])).unwrap());
    netns::run_in(&node.name, move || {
        current_thread_rt().block_on(async move {
            let api = Arc::new(FakeApi::default());
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(good.clone())));
            let worker = PodWorker::new(
                ctx.clone(),
                api.clone(),
                PodKey::from_pod(&good).unwrap(),
                rx,
            );
            let handle = tokio::spawn(worker.run());
            wait_for("initializing", 10, || {
                let s = api.last_status();
                s["phase"] == "Pending"
                    && s["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
                    && s["initContainerStatuses"][0]["state"]["running"].is_object()
            })
            .await;
            let s = api.last_status();
            let init = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Initialized")
                .unwrap()
                .clone();
            assert_eq!(init["status"], "False");
            assert_eq!(init["reason"], "ContainersNotInitialized");
            wait_for("running", 15, || api.last_status()["phase"] == "Running").await;
            let s = api.last_status();
            let inits = s["initContainerStatuses"].as_array().unwrap();
            assert_eq!(inits[0]["name"], "setup");
            assert_eq!(inits[1]["name"], "check");
            for i in inits {
                assert_eq!(i["state"]["terminated"]["exitCode"], 0, "{i}");
                assert_eq!(i["restartCount"], 0, "{i}");
            }
            let init = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Initialized")
                .unwrap()
                .clone();
            assert_eq!(init["status"], "True");
            tx.send(None).unwrap();
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .unwrap()
                .unwrap();

            let api = Arc::new(FakeApi::default());
            let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(bad.clone())));
            let worker = PodWorker::new(ctx, api.clone(), PodKey::from_pod(&bad).unwrap(), rx);
            let handle = tokio::spawn(worker.run());
            wait_for("failed", 10, || api.last_status()["phase"] == "Failed").await;
            let s = api.last_status();
            assert_eq!(
                s["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
                1
            );
            assert_eq!(
                s["containerStatuses"][0]["state"]["waiting"]["reason"],
                "PodInitializing"
            );
            tx.send(None).unwrap();
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .unwrap()
                .unwrap();
        })
    })
    .unwrap();
}
