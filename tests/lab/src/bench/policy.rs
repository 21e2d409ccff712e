//! NetworkPolicy enforcer timings on a synthetic cluster (pods, namespaces and policies as API
//! objects, no pod namespaces): the agent's own sync path — watch caches → `ClusterState` (reusing
//! the conversion of unchanged objects) → compile → render (against the ruleset in the kernel) →
//! diff → one `nft -f` transaction — against a throwaway network namespace.
//!
//! - full sync: from nothing to the applied ruleset (the full replace);
//! - one pod label change: the same path after relabelling one local pod, which the applier
//!   sends as an incremental update (set and map elements, the pod's chain).
//!
//! The cross-node throughput part of `scripts/bench-policy.sh` runs in a lab.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use veilnet_cni::agent_protocol::PodAttachment;

use veilnet::agent::policy::attachments::Attachments;
use veilnet::agent::policy::state::{cluster_state, StateCache};
use veilnet::agent::policy::status::CounterBank;
use veilnet::netns;

use super::ms;
use veilnet::policy::{
    compile_with, diff, render, render_nft, ApplyOutcome, CompileOptions, NftApplier, Plan,
    PolicyError,
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyBenchError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("synthetic object: {0}")]
    Fixture(#[from] serde_json::Error),
    #[error("attachment: {0}")]
    Attachment(#[from] veilnet::agent::policy::attachments::AttachmentError),
}

#[derive(Debug, clap::Args)]
pub struct PolicyBenchArgs {
    #[arg(long, default_value_t = 1000)]
    pub policies: usize,
    #[arg(long, default_value_t = 5000)]
    pub pods: usize,
    /// Nodes the pods spread over (the measured node holds pods/nodes of them).
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    #[arg(long, default_value_t = 50)]
    pub namespaces: usize,
    /// Label changes to time.
    #[arg(long, default_value_t = 20)]
    pub label_changes: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the full ruleset script here (to inspect or to time `nft -f` alone).
    #[arg(long)]
    pub write_script: Option<std::path::PathBuf>,
}

const APPS: usize = 100;

struct Cluster {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    policies: Vec<Arc<NetworkPolicy>>,
    attachments: Attachments,
    local: Vec<usize>,
}

fn pod_ip(node: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        200 + (node / 250) as u8,
        (node % 250) as u8,
        (slot + 2) as u8,
    )
}

fn pod_object(
    i: usize,
    nodes: usize,
    namespaces: usize,
    app: usize,
) -> Result<Pod, serde_json::Error> {
    let node = i % nodes;
    serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns-{}", i % namespaces), "name": format!("pod-{i}"),
                     "uid": format!("uid-{i}"),
                     "labels": {"app": format!("app-{app}"), "tier": format!("t{}", i % 3)}},
        "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "c",
                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": pod_ip(node, i / nodes).to_string()}
    }))
}

/// A mix of what real clusters write: pod + namespace selectors, expressions, ports, named ports,
/// ipBlocks with excepts, ingress and egress.
fn policy_object(j: usize, namespaces: usize) -> Result<NetworkPolicy, serde_json::Error> {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("app-{}", j % APPS)}},
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"app": format!("app-{}", (j + 1) % APPS)}},
                 "namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 5)}}},
                {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}}
            ],
            "ports": [{"port": 80 + (j % 20) as i32, "protocol": "TCP"}, {"port": "http"}]
        }],
        "policyTypes": ["Ingress"]
    });
    if j % 4 == 0 {
        spec["egress"] = json!([{
            "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.200.{}.0/24", j % 50)]}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 1000, "endPort": 2000, "protocol": "TCP"}]
        }]);
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns-{}", j % namespaces), "name": format!("pol-{j}")},
        "spec": spec
    }))
}

fn cluster(args: &PolicyBenchArgs) -> Result<Cluster, PolicyBenchError> {
    let nodes = args.nodes.max(1);
    let namespaces = args.namespaces.max(1);
    let mut attachments = Attachments::in_memory();
    let mut pods = Vec::with_capacity(args.pods);
    let mut local = Vec::new();
    for i in 0..args.pods {
        pods.push(Arc::new(pod_object(i, nodes, namespaces, i % APPS)?));
        if i % nodes == 0 {
            local.push(i);
            attachments.insert(PodAttachment {
                container_id: format!("c{i}"),
                ifname: "eth0".into(),
                namespace: format!("ns-{}", i % namespaces),
                name: format!("pod-{i}"),
                uid: Some(format!("uid-{i}")),
                ips: vec![IpAddr::V4(pod_ip(0, i / nodes))],
                mac: format!("0a:58:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff),
                host_veth: format!("veil{i:011x}"),
            })?;
        }
    }
    let namespaces_objs = (0..namespaces)
        .map(|n| {
            serde_json::from_value(json!({"metadata": {"name": format!("ns-{n}"),
                "labels": {"team": format!("t{}", n % 5)}}}))
            .map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let policies = (0..args.policies)
        .map(|j| policy_object(j, namespaces).map(Arc::new))
        .collect::<Result<_, _>>()?;
    Ok(Cluster {
        pods,
        namespaces: namespaces_objs,
        policies,
        attachments,
        local,
    })
}

/// Deletes the bench's namespace, also on panic.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = netns::delete(&self.0);
    }
}

#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Phases {
    pub state_ms: f64,
    pub compile_ms: f64,
    pub render_ms: f64,
    /// Diff and nft: the applier's whole update (counters it must bank included).
    pub apply_ms: f64,
    pub total_ms: f64,
    /// The diff alone (measured apart, not part of the total).
    pub diff_ms: f64,
    /// Operations of an incremental update (0 for a full replace).
    pub operations: usize,
    /// Bytes sent to `nft -f`.
    pub script_bytes: usize,
    pub incremental: bool,
}

/// One pass of the agent's sync, as `agent::policy` runs it.
fn sync(
    c: &Cluster,
    states: &mut StateCache,
    applier: &mut NftApplier,
    bank: &mut CounterBank,
) -> Result<Phases, PolicyBenchError> {
    let opts = CompileOptions {
        drop_unknown_pod_ports: true,
        ..CompileOptions::default()
    };
    let t0 = Instant::now();
    let state = states.update(
        &c.pods,
        &c.namespaces,
        &c.policies,
        &c.attachments,
        "node-0",
    );
    let t1 = Instant::now();
    let model = compile_with(state, "node-0", &[], &opts);
    let t2 = Instant::now();
    let ruleset = render(&model, applier.current());
    let t3 = Instant::now();
    let (diff_ms, script_bytes) = match applier.current() {
        Some(old) => {
            let d0 = Instant::now();
            let plan = diff(old, &ruleset);
            let bytes = match &plan {
                Plan::Incremental(delta) => delta.script().len(),
                Plan::Full { .. } => ruleset.script().len(),
            };
            (ms(d0.elapsed()), bytes)
        }
        None => (0.0, ruleset.script().len()),
    };
    let was_loaded = applier.current().is_some();
    let t4 = Instant::now();
    let outcome = applier.update(ruleset, &mut |old, destroyed| bank.bank(old, destroyed))?;
    let t5 = Instant::now();
    let (incremental, operations) = match outcome {
        ApplyOutcome::Updated { operations } => (true, operations),
        ApplyOutcome::Replaced { reason } if was_loaded => {
            eprintln!("note: full replace instead of an update: {reason}");
            (false, 0)
        }
        _ => (false, 0),
    };
    let phases = [ms(t1 - t0), ms(t2 - t1), ms(t3 - t2), ms(t5 - t4)];
    Ok(Phases {
        state_ms: phases[0],
        compile_ms: phases[1],
        render_ms: phases[2],
        apply_ms: phases[3],
        total_ms: phases.iter().sum(),
        diff_ms,
        operations,
        script_bytes,
        incremental,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(args: PolicyBenchArgs) -> Result<(), PolicyBenchError> {
    let mut c = cluster(&args)?;
    let ns = format!("veilbench-pol-{}", std::process::id());
    netns::add(&ns)?;
    let _guard = NsGuard(ns.clone());
    let mut applier = NftApplier::new(Some(&ns));
    let mut bank = CounterBank::default();
    let mut states = StateCache::default();

    let full = sync(&c, &mut states, &mut applier, &mut bank)?;
    if let Some(path) = &args.write_script {
        let state = cluster_state(
            &c.pods,
            &c.namespaces,
            &c.policies,
            &c.attachments,
            "node-0",
        );
        let model = compile_with(&state, "node-0", &[], &CompileOptions::default());
        std::fs::write(path, render_nft(&model)).map_err(|source| PolicyError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    }
    // Warm repeats (forced through the kernel as full replaces, state rebuilt from scratch) show
    // the steady cost of a full sync.
    let mut repeats = Vec::new();
    for _ in 0..3 {
        applier.forget();
        states = StateCache::default();
        repeats.push(sync(&c, &mut states, &mut applier, &mut bank)?.total_ms);
    }

    // Relabel local pods, each away and back: the pod moves between the policies selecting
    // app-N and app-M, as a peer and as a selected pod. Every change is a real one.
    let mut changes = Vec::new();
    for k in 0..args.label_changes {
        let Some(&i) = c.local.get((k / 2) % c.local.len().max(1)) else {
            break;
        };
        let app = if k % 2 == 0 {
            (i + 37) % APPS
        } else {
            i % APPS
        };
        c.pods[i] = Arc::new(pod_object(
            i,
            args.nodes.max(1),
            args.namespaces.max(1),
            app,
        )?);
        changes.push(sync(&c, &mut states, &mut applier, &mut bank)?);
    }
    let pick = |f: fn(&Phases) -> f64| median(changes.iter().map(f).collect());
    let label = Phases {
        state_ms: pick(|p| p.state_ms),
        compile_ms: pick(|p| p.compile_ms),
        render_ms: pick(|p| p.render_ms),
        apply_ms: pick(|p| p.apply_ms),
        total_ms: pick(|p| p.total_ms),
        diff_ms: pick(|p| p.diff_ms),
        operations: pick(|p| p.operations as f64) as usize,
        script_bytes: pick(|p| p.script_bytes as f64) as usize,
        incremental: changes.iter().all(|p| p.incremental),
    };
    let label_max = changes.iter().map(|p| p.total_ms).fold(0.0, f64::max);
    let incremental = changes.iter().filter(|p| p.incremental).count();

    if args.json {
        println!(
            "{}",
            json!({"policies": args.policies, "pods": args.pods, "localPods": c.local.len(),
                   "scriptBytes": full.script_bytes, "fullSync": full,
                   "fullSyncWarmMedianMs": median(repeats),
                   "labelChangeMedianMs": label.total_ms, "labelChangeMaxMs": label_max,
                   "labelChangeApplyMedianMs": label.apply_ms,
                   "labelChangesIncremental": incremental, "labelChanges": changes.len(),
                   "labelChangePhasesMedian": label})
        );
    } else {
        println!(
            "synthetic cluster: {} policies, {} pods over {} nodes ({} on the measured node), {} namespaces; ruleset {} KiB",
            args.policies, args.pods, args.nodes, c.local.len(), args.namespaces, full.script_bytes / 1024
        );
        println!(
            "full sync (cold):        {:>8.1} ms  (state {:.1}, compile {:.1}, render {:.1}, nft {:.1})",
            full.total_ms, full.state_ms, full.compile_ms, full.render_ms, full.apply_ms
        );
        println!("full sync (warm median): {:>8.1} ms", median(repeats));
        println!(
            "one pod label change:    {:>8.1} ms median, {:.1} ms max over {} changes ({} incremental)",
            label.total_ms,
            label_max,
            changes.len(),
            incremental,
        );
        println!(
            "  medians: state {:.1}, compile {:.1}, render {:.1}, diff+nft {:.1} ms (diff alone {:.2} ms); {} operations, {} bytes to nft",
            label.state_ms,
            label.compile_ms,
            label.render_ms,
            label.apply_ms,
            label.diff_ms,
            label.operations,
            label.script_bytes,
        );
    }
    Ok(())
}
