//! `veilnet bench scale`: what a big cluster costs one node (issue 16). A two-node lab on the API
//! stand-in, where node-1 runs the real agent and datapath, is joined by synthetic Nodes (no
//! processes, only the Node objects a provisioned veilnet node would have: annotations with a
//! fresh WireGuard key, `spec.podCIDR`, an InternalIP on the underlay) until the cluster has
//! `--nodes` Nodes. Measured on node-1:
//!
//! - the burst: every synthetic Node created at once, until node-1's kernel routes every pod CIDR
//!   and its datapath holds every peer; meanwhile a pod on node-1 pings a pod on node-2 (an
//!   encrypted flow that is already up) every 10 ms, and the largest gap between replies is the
//!   stall the burst caused;
//! - the agent's and the datapath's memory before and after;
//! - WireGuard handshakes sent to the synthetic peers (lazy: none, since nothing is sent to them);
//! - one Node change, end to end (API write to kernel or datapath): a new Node, a key rotation, a
//!   removed Node, each five times;
//! - a full resync (the agent's own pass duration, `veilnet_reconcile_duration_seconds`, over the
//!   passes at rest) and the Node watch traffic at rest (bytes the agent's API connections received,
//!   from `ss`);
//! - an agent restart: SIGKILL, then `lab up` starts it again, until `/readyz` answers 200.
//!
//! It measures and never asserts: scripts/bench-scale.sh prints the table for the closing notes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use veilnet::datapath::client::DatapathClient;
use veilnet::datapath::protocol::{Outcome, Reply, Request};
use veilnet::model::annotations;
use veilnet::model::mac::derive_vtep_mac;
use veilnet::netns;
use veilnet::wg::keys;

use super::{ms, percentile};
use crate::cli;
use crate::client::with_client;
use crate::layout::LabLayout;

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("{0}")]
    Setup(String),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error(transparent)]
    Lab(#[from] anyhow::Error),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("API: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, clap::Args)]
pub struct ScaleBenchArgs {
    /// Nodes in the cluster, the two real ones included.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// How long to watch the node at rest (watch traffic, resync passes).
    #[arg(long, default_value = "65s", value_parser = veilnet::duration::parse_duration)]
    pub rest: Duration,
    /// Lab name (default: vscale<pid>).
    #[arg(long)]
    pub name: Option<String>,
}

/// The lab is taken down on every exit, a panic included.
struct LabGuard {
    exe: PathBuf,
    name: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .args(["down", "--name", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One synthetic Node: what a provisioned veilnet node would have published.
struct Synthetic {
    name: String,
    underlay: Ipv4Addr,
    pod_cidr: Ipv4Net,
}

impl Synthetic {
    fn new(lab: &LabLayout, seq: usize, subnet: usize) -> Result<Synthetic, ScaleError> {
        // Synthetic underlay addresses start at the underlay's 257th address, far from the real
        // nodes (.11, .12) and the external host (the last one).
        let base = u32::from(lab.spec.underlay_cidr.network()) + 256;
        let underlay = Ipv4Addr::from(base + seq as u32);
        if !lab.spec.underlay_cidr.contains(&underlay) {
            return Err(ScaleError::Setup(format!(
                "the underlay {} is too small for {seq} synthetic nodes",
                lab.spec.underlay_cidr
            )));
        }
        let pod_cidr = lab.assigned_pod_cidr(subnet).ok_or_else(|| {
            ScaleError::Setup(format!(
                "the cluster CIDR {} has no subnet #{subnet}",
                lab.spec.cluster_cidr
            ))
        })?;
        Ok(Synthetic {
            name: format!("synth-{seq:04}"),
            underlay,
            pod_cidr,
        })
    }

    fn node(&self, public_key: &str) -> Node {
        let ip = self.underlay.to_string();
        let cidr = self.pod_cidr.to_string();
        let annotations = [
            (annotations::UNDERLAY_IP, ip.clone()),
            (
                annotations::VTEP_MAC,
                derive_vtep_mac(&self.name).to_string(),
            ),
            (annotations::VXLAN_VNI, "1".to_string()),
            (annotations::POD_CIDRS, cidr.clone()),
            (annotations::WG_PUBLIC_KEY, public_key.to_string()),
            (annotations::WG_ENDPOINT, format!("{ip}:51820")),
            (annotations::ENCRYPTION_MODE, "on".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(
                    [
                        ("kubernetes.io/hostname", self.name.as_str()),
                        ("kubernetes.io/os", "linux"),
                        ("kubernetes.io/arch", "amd64"),
                        ("node.kubernetes.io/instance-type", "m6i.4xlarge"),
                        ("topology.kubernetes.io/region", "eu-west-1"),
                        ("topology.kubernetes.io/zone", "eu-west-1b"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.clone()),
                pod_cidrs: Some(vec![cidr]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The status a kubelet reports, at a real node's size (about 9 KB of JSON: conditions,
    /// capacity, node info, 30 images), so memory figures are not flattered by tiny objects.
    fn status_patch(&self) -> serde_json::Value {
        let now = "2026-12-01T00:00:00Z";
        let condition = |type_: &str, status: &str, reason: &str| {
            serde_json::json!({"type": type_, "status": status, "reason": reason,
                "message": format!("kubelet reports {type_} {status} ({reason})"),
                "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let images: Vec<serde_json::Value> = (0..30)
            .map(|i| {
                serde_json::json!({"names": [
                    format!("registry.example.com/team-{}/service-{i}@sha256:{:064x}", i % 7, i * 7919 + 1),
                    format!("registry.example.com/team-{}/service-{i}:v1.{i}.3", i % 7),
                ], "sizeBytes": 20_000_000 + i * 1_234_567})
            })
            .collect();
        let resources = serde_json::json!({"cpu": "16", "memory": "65843012Ki",
            "pods": "110", "ephemeral-storage": "101430960Ki", "hugepages-2Mi": "0"});
        serde_json::json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": self.underlay.to_string()},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady"),
            ],
            "capacity": resources, "allocatable": resources,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": format!("{:032x}", self.seq_hash()),
                "systemUUID": format!("{:032x}", self.seq_hash() ^ 0x5a5a),
                "bootID": format!("{:032x}", self.seq_hash() ^ 0xa5a5),
                "kernelVersion": "6.1.0-27-amd64", "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://2.1.4", "kubeletVersion": "v1.33.5",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": images,
        }})
    }

    fn seq_hash(&self) -> u128 {
        u128::from(u32::from(self.underlay)).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834)
    }
}

fn fresh_public_key() -> String {
    keys::encode_public(&keys::public_key(&keys::generate()))
}

/// Creates the Nodes (then their status, as a kubelet would), one request at a time.
fn create_nodes(lab: &LabLayout, nodes: Vec<(Node, serde_json::Value)>) -> Result<(), ScaleError> {
    with_client(lab, |client| async move {
        let api: Api<Node> = Api::all(client);
        for (node, status) in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &node).await?;
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
        }
        Ok::<(), kube::Error>(())
    })??;
    Ok(())
}

/// One Node change at a time, end to end: from the API write (on a client already connected)
/// until node-1's kernel or datapath shows it. Per extra node: it joins (until its pod CIDR is
/// routed), a target rotates its key (until the datapath holds the new key), it leaves (until
/// its route is gone). Returns the three series.
fn measure_changes(
    lab: &LabLayout,
    extras: Vec<Synthetic>,
    targets: Vec<String>,
    netns_name: String,
    socket: PathBuf,
) -> Result<[Vec<Duration>; 3], ScaleError> {
    with_client(lab, move |client| async move {
        let api: Api<Node> = Api::all(client);
        let (mut added, mut rotated, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        let timeout = Duration::from_secs(30);
        let every = Duration::from_millis(2);
        // Each change meets an agent at rest: the one before, and the status refresh that
        // follows every pass, are done.
        let settle = || std::thread::sleep(Duration::from_millis(300));
        for (extra, target) in extras.iter().zip(&targets) {
            let node = extra.node(&fresh_public_key());
            settle();
            let t = Instant::now();
            api.create(&PostParams::default(), &node).await?;
            api.patch_status(
                &extra.name,
                &PatchParams::default(),
                &Patch::Merge(&extra.status_patch()),
            )
            .await?;
            added.push(wait_until(t, "a new Node's route", timeout, every, || {
                routed(&netns_name, &extra.pod_cidr)
            })?);

            let key = fresh_public_key();
            let patch = serde_json::json!(
                {"metadata": {"annotations": {annotations::WG_PUBLIC_KEY: key}}}
            );
            settle();
            let t = Instant::now();
            api.patch(target, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            rotated.push(wait_until(
                t,
                "a rotated key in the datapath",
                timeout,
                every,
                || Ok(datapath_peers(&socket)?.iter().any(|(p, _)| *p == key)),
            )?);

            settle();
            let t = Instant::now();
            api.delete(&extra.name, &DeleteParams::default()).await?;
            removed.push(wait_until(
                t,
                "a removed Node's route to go",
                timeout,
                every,
                || Ok(!routed(&netns_name, &extra.pod_cidr)?),
            )?);
        }
        Ok::<_, ScaleError>([added, rotated, removed])
    })?
}

/// Two pods (a on node-1, b on node-2) for the flow that must not stall; returns b's address.
fn start_pods(lab: &LabLayout) -> Result<String, ScaleError> {
    let pods: Vec<Pod> = [("a", "node-1"), ("b", "node-2")]
        .into_iter()
        .map(|(name, node)| {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "veilnet/agnhost",
                    "command": ["veilnet", "lab", "agnhost", "serve", "--tcp", "80"]}]},
            }))
            .expect("a valid Pod")
        })
        .collect();
    with_client(lab, |client| async move {
        let api: Api<Pod> = Api::namespaced(client, "default");
        for pod in pods {
            api.create(&PostParams::default(), &pod).await?;
        }
        Ok::<(), kube::Error>(())
    })??;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ip = with_client(lab, |client| async move {
            let api: Api<Pod> = Api::namespaced(client, "default");
            let a = api.get("a").await?;
            let b = api.get("b").await?;
            let ip = |p: &Pod| p.status.as_ref().and_then(|s| s.pod_ip.clone());
            Ok::<_, kube::Error>(ip(&a).and(ip(&b)))
        })??;
        if let Some(ip) = ip {
            return Ok(ip);
        }
        if Instant::now() > deadline {
            return Err(ScaleError::Timeout {
                what: "pods a and b to get addresses".into(),
                secs: 60,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every route destination in a namespace, all tables (`ip -4 route show table all`).
fn route_destinations(netns: &str) -> Result<BTreeSet<String>, ScaleError> {
    let out = Command::new("ip")
        .args(["-n", netns, "-4", "route", "show", "table", "all"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Whether `cidr` is routed in `netns` (a cheap exact lookup, no full dump).
fn routed(netns: &str, cidr: &Ipv4Net) -> Result<bool, ScaleError> {
    let out = Command::new("ip")
        .args(["-n", netns, "-4", "route", "show", "table", "all", "exact"])
        .arg(cidr.to_string())
        .output()?;
    Ok(!out.stdout.is_empty())
}

/// The datapath's peers' public keys and their handshake initiations. (On a thread of its own:
/// callers may be inside an async runtime, where another cannot block.)
fn datapath_peers(socket: &Path) -> Result<Vec<(String, u64)>, ScaleError> {
    let socket = socket.to_path_buf();
    let response = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut client = DatapathClient::new(&socket);
        rt.block_on(client.call(&Request::Stats))
            .map_err(|e| ScaleError::Setup(format!("datapath stats: {e}")))
    })
    .join()
    .map_err(|_| ScaleError::Setup("the datapath stats thread panicked".into()))??;
    match response.outcome {
        Outcome::Ok(Reply::Stats { peers, .. }) => Ok(peers
            .iter()
            .map(|p| (keys::encode_public(&p.public_key), p.handshakes_sent))
            .collect()),
        other => Err(ScaleError::Setup(format!(
            "datapath answered {other:?} to stats"
        ))),
    }
}

/// Polls `done` every `every` until it holds; returns the time since `since`.
fn wait_until(
    since: Instant,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> Result<bool, ScaleError>,
) -> Result<Duration, ScaleError> {
    loop {
        if done()? {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            return Err(ScaleError::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(every);
    }
}

/// A lab daemon's pid, if it runs (`lab up` records it).
fn daemon_pid(lab: &LabLayout, role: &str) -> Option<i32> {
    crate::daemon::running_pid(&lab.root().join("pids"), role)
}

/// A daemon's resident and anonymous memory, MiB.
fn memory_mib(lab: &LabLayout, role: &str) -> (f64, f64) {
    let status = daemon_pid(lab, role)
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// A plain HTTP GET inside a namespace: (status code, body).
fn http_get(netns_name: &str, addr: &str, path: &str) -> Result<(u16, String), ScaleError> {
    let (addr, path) = (addr.to_string(), path.to_string());
    let text = netns::run_in(netns_name, move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// `veilnet_reconcile_duration_seconds`' sum and count.
fn reconcile_totals(lab: &LabLayout) -> Result<(f64, f64), ScaleError> {
    let node = lab.node(1);
    let (_, body) = http_get(&node.netns, &format!("{}:9892", node.ip), "/metrics")?;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("veilnet_reconcile_duration_seconds_sum"),
        value("veilnet_reconcile_duration_seconds_count"),
    ))
}

/// Bytes received so far on the namespace's TCP connections to the API server (`ss -tin`).
fn api_bytes_received(netns_name: &str, api: &str) -> Result<u64, ScaleError> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns_name, "ss", "-tinH", "dst", api])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_received:")?.parse::<u64>().ok())
        .sum())
}

/// A ping every 10 ms from pod a to pod b, timestamped (`ping -D`).
fn start_ping(exe: &Path, lab: &str, to: &str) -> Result<Child, ScaleError> {
    Ok(Command::new(exe)
        .args(["exec", "--name", lab, "default/a", "--"])
        .args(["ping", "-D", "-n", "-i", "0.01", "-W", "1", to])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?)
}

/// (replies, sent, largest gap between two replies) of a stopped ping.
fn ping_summary(child: Child) -> Result<(usize, u64, Duration), ScaleError> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = Vec::new();
    let mut last_seq = 0u64;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((stamp, tail)) = rest.split_once(']') else {
            continue;
        };
        if let (Ok(t), Some(seq)) = (
            stamp.parse::<f64>(),
            tail.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|s| s.parse::<u64>().ok()),
        ) {
            times.push(t);
            last_seq = last_seq.max(seq);
        }
    }
    let gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0_f64, f64::max);
    Ok((times.len(), last_seq, Duration::from_secs_f64(gap)))
}

/// How many times each kind of Node change is measured.
const CHANGES: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 50.0)
}

pub fn run(args: ScaleBenchArgs) -> Result<(), ScaleError> {
    if args.nodes < 3 {
        return Err(ScaleError::Setup("--nodes must be at least 3".into()));
    }
    let exe = std::env::current_exe()?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("vscale{}", std::process::id() % 100_000));
    let _guard = LabGuard {
        exe: exe.clone(),
        name: name.clone(),
    };
    // Room for the synthetic nodes: a /20 underlay and a /14 cluster CIDR in /24s (1,024 nodes).
    let subnets = args.nodes + 8;
    let node_prefix = 24u8;
    let cluster_prefix = node_prefix - (usize::BITS - (subnets - 1).leading_zeros()) as u8;
    let cluster = format!("10.64.0.0/{cluster_prefix}");
    eprintln!("==> lab up ({name}: 2 real nodes, cluster CIDR {cluster})");
    let up_args = [
        "up",
        "--name",
        &name,
        "--nodes",
        "2",
        "--underlay-cidr",
        "172.31.0.0/16",
        "--cluster-cidr",
        &cluster,
        "--node-cidr-prefix",
        "24",
    ];
    let up = Command::new(&exe)
        .args(up_args)
        .stdout(Stdio::null())
        .status()?;
    if !up.success() {
        return Err(ScaleError::Setup(format!("lab up failed: {up}")));
    }
    let lab = cli::load(&name)?;
    let node1 = lab.node(1).netns;
    let socket = veilnet::datapath::socket_path(&lab.node(1).run_dir());
    let b_ip = start_pods(&lab)?;
    eprintln!("==> pods up; pod b at {b_ip}");
    let api = lab.api_addr().to_string();

    let (agent0, agent0_anon) = memory_mib(&lab, "agent-node-1");
    let (dp0, dp0_anon) = memory_mib(&lab, "datapath-node-1");

    let synthetic: Vec<Synthetic> = (0..args.nodes - 2)
        .map(|i| Synthetic::new(&lab, i, i + 3))
        .collect::<Result<_, _>>()?;
    let objects: Vec<(Node, serde_json::Value)> = synthetic
        .iter()
        .map(|s| (s.node(&fresh_public_key()), s.status_patch()))
        .collect();
    let want_routes: BTreeSet<String> = synthetic.iter().map(|s| s.pod_cidr.to_string()).collect();
    let want_peers = args.nodes - 1;

    // A flow that is up before the burst: it must not stall.
    let ping = start_ping(&exe, &name, &b_ip)?;
    std::thread::sleep(Duration::from_secs(2));
    eprintln!("==> creating {} synthetic Nodes", synthetic.len());
    let burst = Instant::now();
    create_nodes(&lab, objects)?;
    let api_time = burst.elapsed();
    let complete = wait_until(
        burst,
        "the complete dataplane",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || {
            let routes = route_destinations(&node1)?;
            if !want_routes.is_subset(&routes) {
                return Ok(false);
            }
            Ok(datapath_peers(&socket)?.len() >= want_peers)
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let (replies, sent, stall) = ping_summary(ping)?;

    let peers = datapath_peers(&socket)?;
    let synthetic_handshakes: u64 = peers.iter().map(|(_, h)| h).sum::<u64>();

    eprintln!("==> one Node change at a time");
    let extras = (0..CHANGES)
        .map(|k| Synthetic::new(&lab, args.nodes - 2 + k, args.nodes + 1 + k))
        .collect::<Result<Vec<_>, _>>()?;
    let targets: Vec<String> = (0..CHANGES)
        .map(|k| synthetic[k * synthetic.len() / CHANGES].name.clone())
        .collect();
    let [added, rotated, removed] =
        measure_changes(&lab, extras, targets, node1.clone(), socket.clone())?;

    eprintln!("==> at rest for {} s", args.rest.as_secs());
    let (sum0, count0) = reconcile_totals(&lab)?;
    let bytes0 = api_bytes_received(&node1, &api)?;
    std::thread::sleep(args.rest);
    let (sum1, count1) = reconcile_totals(&lab)?;
    let bytes1 = api_bytes_received(&node1, &api)?;
    let passes = count1 - count0;
    let resync = if passes > 0.0 {
        Duration::from_secs_f64((sum1 - sum0) / passes)
    } else {
        Duration::ZERO
    };
    let per_minute = (bytes1.saturating_sub(bytes0)) as f64 * 60.0 / args.rest.as_secs_f64();
    let (agent1, agent1_anon) = memory_mib(&lab, "agent-node-1");
    let (dp1, dp1_anon) = memory_mib(&lab, "datapath-node-1");

    eprintln!("==> agent restart");
    let pid = daemon_pid(&lab, "agent-node-1")
        .ok_or_else(|| ScaleError::Setup("agent-node-1 is not running".into()))?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let up = Command::new(&exe)
        .args(up_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let restart = wait_until(
        t,
        "the restarted agent's /readyz",
        Duration::from_secs(120),
        Duration::from_millis(10),
        || {
            Ok(http_get(&node1, "127.0.0.1:9891", "/readyz")
                .map(|(c, _)| c == 200)
                .unwrap_or(false))
        },
    )?;
    let up = up.wait_with_output()?;
    if !up.status.success() {
        return Err(ScaleError::Setup(format!(
            "lab up after the agent's kill: {}",
            String::from_utf8_lossy(&up.stderr)
        )));
    }

    println!();
    println!(
        "veilnet bench scale: {} Nodes ({} synthetic), node-1's agent and datapath, {} CPUs",
        args.nodes,
        synthetic.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<52} {:>12}", "measure", "value");
    let row = |k: &str, v: String| println!("{k:<52} {v:>12}");
    row(
        &format!("API: create {} Nodes (+ status)", synthetic.len()),
        format!("{:.0} ms", ms(api_time)),
    );
    row(
        &format!(
            "complete dataplane ({} routes, {want_peers} peers)",
            want_routes.len()
        ),
        format!("{:.0} ms", ms(complete)),
    );
    row(
        "  flow a -> b during the burst: longest gap",
        format!("{:.0} ms", ms(stall)),
    );
    row("  flow a -> b: replies / sent", format!("{replies}/{sent}"));
    row(
        "handshakes sent to peers (lazy: only node-2)",
        synthetic_handshakes.to_string(),
    );
    row(
        "one new Node (median of 5)",
        format!("{:.1} ms", ms(median(added))),
    );
    row(
        "one key rotation (median of 5)",
        format!("{:.1} ms", ms(median(rotated))),
    );
    row(
        "one removed Node (median of 5)",
        format!("{:.1} ms", ms(median(removed))),
    );
    row(
        &format!("full pass at rest (mean of {passes:.0})"),
        format!("{:.1} ms", ms(resync)),
    );
    row(
        "API watch traffic at rest",
        format!("{:.1} KiB/min", per_minute / 1024.0),
    );
    row("agent restart to /readyz", format!("{:.0} ms", ms(restart)));
    row(
        "agent RSS before -> after (anon)",
        format!("{agent0:.1} -> {agent1:.1} ({agent0_anon:.1} -> {agent1_anon:.1}) MiB"),
    );
    row(
        "datapath RSS before -> after (anon)",
        format!("{dp0:.1} -> {dp1:.1} ({dp0_anon:.1} -> {dp1_anon:.1}) MiB"),
    );
    Ok(())
}
