//! A soak: pods created and deleted continuously on 3 nodes, in rounds. Each round applies a
//! batch of pods spread over the nodes (50 at once every third round, 15 otherwise: 50 parallel
//! ADDs, and then 50 DELs, at the peaks), flips a NetworkPolicy's allowed role, relabels a third
//! of the batch, toggles node-3's encryption (plaintext VXLAN ↔ WireGuard) and rotates one node's
//! key, then deletes the batch. It runs for `$VEILNET_SOAK_MINUTES` minutes (default 5, as in
//! `./scripts/test.sh`; `./scripts/soak.sh --minutes M` for long runs).
//!
//! Every round: no address is held by two live pods, each pod's address is in its node's pod
//! CIDR, the policy's verdicts for the batch's pods match their current labels, and the path to
//! node-3 follows its mode. At the end, with the cluster back in its start state: each node's
//! kernel state (links, addresses, routes of every table, rules, permanent neighbours, static FDB
//! entries, the nft ruleset with its set elements) equals the start's, each node's IPAM store
//! holds exactly its live pods' addresses, no pod network namespace is left, no agent or datapath
//! was restarted, their RSS is flat (start and end printed), and no log of veilnet's own daemons
//! has a panic, an ERROR line or a failed sandbox setup. Needs root.
//!
//! Control plane: kubernetes only, because the soak churns the API server operators run and one
//! run is its budget in test.sh (`VEILNET_SOAK_CONTROL_PLANE=stand-in`, or `soak.sh
//! --control-plane stand-in`, runs it on the stand-in).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;

const NODES: usize = 3;
/// The daemons whose memory and pid the soak watches.
const WATCHED: [&str; 6] = [
    "agent-node-1",
    "agent-node-2",
    "agent-node-3",
    "datapath-node-1",
    "datapath-node-2",
    "datapath-node-3",
];

fn policy(allowed_role: &str) -> String {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "guard-from-role", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "guard"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": allowed_role}}}]}],
        }
    })
    .to_string()
}

fn soak_minutes() -> f64 {
    match std::env::var("VEILNET_SOAK_MINUTES") {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|m| *m > 0.0)
            .unwrap_or_else(|| panic!("VEILNET_SOAK_MINUTES={v:?} is not a positive number")),
        Err(_) => 5.0,
    }
}

fn soak_plane() -> ControlPlane {
    match std::env::var("VEILNET_SOAK_CONTROL_PLANE").as_deref() {
        Ok("stand-in") => ControlPlane::StandIn,
        Ok("kubernetes") | Err(_) => ControlPlane::Kubernetes,
        Ok(other) => panic!("VEILNET_SOAK_CONTROL_PLANE={other:?}: want stand-in or kubernetes"),
    }
}

/// A soak's end check: `last` within half again of `first`, plus 8 MiB for allocator warm-up.
fn flat(first: u64, last: u64) -> bool {
    last <= first + first / 2 + 8 * 1024
}

/// Every pod the API holds: name → (node, phase, IP, deleting).
struct PodView {
    node: String,
    phase: String,
    ip: Option<IpAddr>,
    deleting: bool,
}

fn pods(lab: &Lab, selector: Option<&str>) -> BTreeMap<String, PodView> {
    let mut args = vec!["get", "pods", "-A"];
    if let Some(s) = selector {
        args.extend(["-l", s]);
    }
    let v = lab.kubectl_json(&args);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let name = format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap_or(""),
                p["metadata"]["name"].as_str().unwrap_or("")
            );
            let view = PodView {
                node: p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                phase: p["status"]["phase"].as_str().unwrap_or("").to_string(),
                ip: p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()),
                deleting: p["metadata"]["deletionTimestamp"].is_string(),
            };
            (name, view)
        })
        .collect()
}

/// Panics if two pods the API shows hold the same address, or a pod's address is outside its
/// node's pod CIDR.
fn assert_unique_addresses(lab: &Lab, cidrs: &BTreeMap<String, ipnet::IpNet>, when: &str) {
    let mut holder: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (name, p) in pods(lab, None) {
        let Some(ip) = p.ip else { continue };
        if p.phase == "Succeeded" || p.phase == "Failed" {
            continue;
        }
        if let Some(other) = holder.insert(ip, name.clone()) {
            panic!("{when}: {ip} is held by both {other} and {name}");
        }
        let cidr = cidrs
            .get(&p.node)
            .unwrap_or_else(|| panic!("{name} runs on unknown node {:?}", p.node));
        assert!(
            cidr.contains(&ip),
            "{when}: {name} on {} has {ip}, outside {cidr}",
            p.node
        );
    }
}

/// Pod network namespaces of this lab that exist now.
fn pod_netns(lab: &Lab) -> Vec<String> {
    lab_netns(&lab.name)
        .into_iter()
        .filter(|n| n.contains(".p-"))
        .collect()
}

/// A batch's manifest: `count` pods `s<round>-<i>` spread over the nodes, half `role=a`.
fn batch(round: usize, count: usize) -> String {
    (0..count)
        .map(|i| {
            let role = if i % 2 == 0 { "a" } else { "b" };
            pod_manifest(
                "default",
                &format!("s{round}-{i}"),
                &format!("node-{}", i % NODES + 1),
                &[("soak", &format!("r{round}")), ("role", role)],
                SERVE,
            )
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Waits until every pod of `selector` (`want` of them) runs with an address.
fn wait_running(lab: &Lab, selector: &str, want: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now = pods(lab, Some(selector));
        let running = now
            .values()
            .filter(|p| p.phase == "Running" && p.ip.is_some())
            .count();
        if running == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{running} of {want} pods of {selector} running after {within:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until no pod of `selector` is left in the API.
fn wait_gone(lab: &Lab, selector: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let left = pods(lab, Some(selector)).len();
        if left == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{left} pods of {selector} still there after {within:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The lines of veilnet's own daemons' logs (agents, datapaths, kubelets) that report a panic,
/// an error, or a failed sandbox setup (every ADD of a healthy node succeeds the first time: a
/// retried one hides a fault, such as a GC that deleted the veths of ADDs in flight); and apart,
/// the lab kubelets' API client's transport errors on a pooled connection the API server had
/// just closed (`SendRequest`: kube-rs logs each at ERROR, the kubelet retries the call; about
/// one in half an hour of soak). The agents get no such allowance.
fn bad_log_lines(lab: &Lab) -> (Vec<String>, Vec<String>) {
    let dir = std::path::Path::new("/var/lib/veilnet-lab")
        .join(&lab.name)
        .join("logs");
    let (mut bad, mut transport) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if !["agent-", "datapath-", "kubelet-"]
            .iter()
            .any(|p| file.starts_with(p))
        {
            continue;
        }
        for line in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            if file.starts_with("kubelet-")
                && line.contains(" ERROR kube_client::client::builder: ")
                && line.ends_with("client error (SendRequest)")
            {
                transport.push(format!("{file}: {line}"));
            } else if line.contains(" ERROR ")
                || line.contains("panicked")
                || line.contains("sandbox creation failed")
            {
                bad.push(format!("{file}: {line}"));
            }
        }
    }
    (bad, transport)
}

#[test]
fn a_soak_of_pod_policy_label_mode_and_key_churn_leaks_nothing() {
    veilnet_test_support::require_root!();
    let plane = soak_plane();
    if plane == ControlPlane::Kubernetes {
        require_kubernetes!();
    }
    let minutes = soak_minutes();
    let lab = Lab::up_on(plane, "sk", &["--nodes", &NODES.to_string()]);

    // The standing pods: a guarded server on node-1 and one long-lived pod on the other nodes.
    lab.apply(&policy("a"));
    lab.apply(&pod_manifest(
        "default",
        "guard",
        "node-1",
        &[("app", "guard")],
        SERVE,
    ));
    for n in 2..=NODES {
        lab.apply(&pod_manifest(
            "default",
            &format!("anchor-{n}"),
            &format!("node-{n}"),
            &[("app", "anchor")],
            SERVE,
        ));
    }
    let guard_ip = lab.wait_pod_ip("default/guard", Duration::from_secs(60));
    for n in 2..=NODES {
        lab.wait_pod_ip(&format!("default/anchor-{n}"), Duration::from_secs(60));
    }
    let cidrs: BTreeMap<String, ipnet::IpNet> = lab.kubectl_json(&["get", "nodes"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap().to_string(),
                n["spec"]["podCIDR"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    wait_path(
        &lab,
        "node-1",
        "node-3",
        "wireguard",
        Duration::from_secs(30),
    );
    let start_state: Vec<String> = (1..=NODES).map(|n| settled_kernel_state(&lab, n)).collect();
    let pids: BTreeMap<&str, i32> = WATCHED
        .iter()
        .map(|r| (*r, lab.daemon_pid(r).unwrap()))
        .collect();
    let guard = format!("{guard_ip}:80");

    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut rss: BTreeMap<&str, Vec<DaemonMemory>> = BTreeMap::new();
    let mut ready_times = Vec::new();
    let mut gone_times = Vec::new();
    let mut pods_made = 0;
    let mut round = 0;
    let mut node3_plain = false;
    while round == 0 || Instant::now() < deadline {
        let count = if round % 3 == 0 { 50 } else { 15 };
        let selector = format!("soak=r{round}");
        lab.apply(&batch(round, count));
        ready_times.push(wait_running(
            &lab,
            &selector,
            count,
            Duration::from_secs(180),
        ));
        pods_made += count;
        assert_unique_addresses(&lab, &cidrs, &format!("round {round}, batch up"));

        // The policy now allows the other role; a third of the batch changes role.
        let allowed = if round % 2 == 0 { "b" } else { "a" };
        lab.apply(&policy(allowed));
        let mut roles: BTreeMap<String, &str> = (0..count)
            .map(|i| (format!("s{round}-{i}"), if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        for i in (0..count).step_by(3) {
            let name = format!("s{round}-{i}");
            let flipped = if roles[&name] == "a" { "b" } else { "a" };
            lab.kubectl_ok(&[
                "label",
                "pod",
                &name,
                &format!("role={flipped}"),
                "--overwrite",
            ]);
            roles.insert(name, flipped);
        }
        // node-3's encryption toggles; one node's key rotates.
        node3_plain = !node3_plain;
        if node3_plain {
            set_mode(&lab, "node-3", "off");
        } else {
            lab.kubectl_ok(&["label", "node", "node-3", "veilnet.io/encryption-"]);
        }
        let rotated = format!("node-{}", round % NODES + 1);
        let old_key = lab.annotation(&rotated, "veilnet.io/wg-public-key");
        lab.kubectl_ok(&[
            "annotate",
            "node",
            &rotated,
            &format!("veilnet.io/rotate-key=soak-{round}"),
            "--overwrite",
        ]);
        eventually(
            Duration::from_secs(60),
            &format!("round {round}: {rotated} publishes a new key"),
            || lab.annotation(&rotated, "veilnet.io/wg-public-key") != old_key,
        );
        wait_path(
            &lab,
            "node-1",
            "node-3",
            if node3_plain { "vxlan" } else { "wireguard" },
            Duration::from_secs(60),
        );

        // Six of the batch's pods, two per node, probe the guard: the verdict follows their
        // current role (once the agents have caught up with the relabelling).
        let status = lab.status_json();
        let netns_of = |name: &str| -> String {
            status["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["namespace"] == "default" && p["name"] == name)
                .and_then(|p| p["netns"].as_str())
                .unwrap_or_else(|| panic!("pod {name} has no netns in lab status"))
                .to_string()
        };
        for i in [0, 1, 2, 3, 4, 5] {
            let name = format!("s{round}-{i}");
            let netns = netns_of(&name);
            let want_answer = roles[&name] == allowed;
            eventually(
                Duration::from_secs(30),
                &format!(
                    "round {round}: {name} (role={}) {} by the guard (allowed role {allowed})",
                    roles[&name],
                    if want_answer { "answered" } else { "refused" }
                ),
                || (probe_in(&netns, &guard, "tcp", "1s") == Some(0)) == want_answer,
            );
        }

        for r in WATCHED {
            rss.entry(r).or_default().push(lab.daemon_memory(r));
        }
        lab.kubectl_ok(&["delete", "pods", "-l", &selector, "--wait=false"]);
        gone_times.push(wait_gone(&lab, &selector, Duration::from_secs(180)));
        assert_unique_addresses(&lab, &cidrs, &format!("round {round}, batch deleted"));
        // RSS on every line, so a soak that fails late still leaves its memory curve.
        let mib = |prefix: &str| {
            WATCHED
                .iter()
                .filter(|r| r.starts_with(prefix))
                .map(|r| {
                    let m = rss[r].last().unwrap();
                    format!(
                        "{:.1} ({:.1})",
                        m.rss as f64 / 1024.0,
                        m.anon as f64 / 1024.0
                    )
                })
                .collect::<Vec<_>>()
                .join("/")
        };
        eprintln!(
            "round {round}: {count} pods up in {:.1} s, gone in {:.1} s; node-3 {}; {rotated}'s key rotated; RSS (anon) MiB agents {}, datapaths {}",
            ready_times.last().unwrap().as_secs_f64(),
            gone_times.last().unwrap().as_secs_f64(),
            if node3_plain { "plaintext" } else { "encrypted" },
            mib("agent-"),
            mib("datapath-"),
        );
        round += 1;
    }

    // Back to the start: the first policy, node-3 unlabelled.
    lab.apply(&policy("a"));
    if node3_plain {
        lab.kubectl_ok(&["label", "node", "node-3", "veilnet.io/encryption-"]);
    }
    wait_path(
        &lab,
        "node-1",
        "node-3",
        "wireguard",
        Duration::from_secs(60),
    );
    let live = pods(&lab, None);
    for n in 1..=NODES {
        let node = format!("node-{n}");
        let want: BTreeSet<IpAddr> = live
            .values()
            .filter(|p| p.node == node && !p.deleting)
            .filter_map(|p| p.ip)
            .collect();
        assert_eq!(
            ipam_addresses(&lab, n),
            want,
            "{node}'s IPAM store does not hold exactly its live pods' addresses"
        );
        let end = settled_kernel_state(&lab, n);
        assert!(
            end == start_state[n - 1],
            "{node}'s kernel state differs from the start's after {round} rounds:\n{}",
            kernel_state_diff(&start_state[n - 1], &end)
        );
    }
    let netns = pod_netns(&lab);
    assert_eq!(netns.len(), live.len(), "pod netns left: {netns:?}");
    for (role, pid) in &pids {
        assert_eq!(
            lab.daemon_pid(role),
            Some(*pid),
            "{role} was restarted during the soak"
        );
    }
    // Memory: the first sample (after round 0's 50 pods, once allocators have warmed up) against
    // the last.
    eprintln!(
        "soak: {minutes} min, {round} rounds, {pods_made} pods created and deleted; \
         batch up p50 {:.1} s max {:.1} s, gone max {:.1} s",
        median(&ready_times),
        ready_times.iter().max().unwrap().as_secs_f64(),
        gone_times.iter().max().unwrap().as_secs_f64(),
    );
    for (role, samples) in &rss {
        // The curve, at most 12 points of it.
        let step = samples.len().div_ceil(12);
        let resident: Vec<u64> = samples.iter().map(|m| m.rss).collect();
        let anonymous: Vec<u64> = samples.iter().map(|m| m.anon).collect();
        for (what, values) in [("RSS", resident), ("RssAnon", anonymous)] {
            let (first, last) = (values[0], *values.last().unwrap());
            let curve: Vec<String> = values
                .iter()
                .step_by(step)
                .chain(std::iter::once(&last))
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect();
            eprintln!(
                "  {role}: {what} {:.1} MiB after round 0, {:.1} MiB at the end (max {:.1} MiB); MiB every {step} rounds: {}",
                first as f64 / 1024.0,
                last as f64 / 1024.0,
                *values.iter().max().unwrap() as f64 / 1024.0,
                curve.join(" ")
            );
        }
    }
    let (bad, transport) = bad_log_lines(&lab);
    if !transport.is_empty() {
        eprintln!(
            "  the lab kubelets' API client reported {} failed request(s) on a pooled connection (retried by the kubelet): {}",
            transport.len(),
            transport.join("; ")
        );
    }
    assert!(bad.is_empty(), "errors in the logs:\n{}", bad.join("\n"));
    for (role, samples) in &rss {
        let (first, last) = (samples[0], *samples.last().unwrap());
        assert!(
            flat(first.rss, last.rss) && flat(first.anon, last.anon),
            "{role}'s memory grew from {first:?} KiB to {last:?} KiB: {samples:?}"
        );
    }
}

fn median(d: &[Duration]) -> f64 {
    let mut s: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
