//! `veilnet lab …`: bring a lab up and down, look at it, and use it.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::Api;
use serde::Serialize;

use super::client::{kubeconfig, with_client};
use super::control_plane::kubernetes;
use super::daemon::{lab_binary, running_pid, veilnet_binary, Daemon};
use super::layout::{self, CniMode, ControlPlane, LabLayout, LabSpec, NodeLayout, PodCidrMode};
use super::{agnhost, apiserver, kubelet, topology};
use veilnet::model::encryption::Mode;
use veilnet::netns;

/// Name of the lab when `--name` is not given.
pub const DEFAULT_LAB: &str = "veilnet";
/// veilnet's own namespace (the install manifest creates it on a real cluster).
pub const VEILNET_NAMESPACE: &str = "veilnet-system";
/// The agent's ServiceAccount in the install manifest (what the agents run as on the real control
/// plane).
pub const VEILNET_SERVICE_ACCOUNT: &str = "veilnet";
/// Sets `lab up --control-plane` when the flag is absent (e.g. to run a whole test suite on the
/// real control plane).
pub const CONTROL_PLANE_ENV: &str = "VEILNET_LAB_CONTROL_PLANE";
/// Debian's containernetworking-plugins.
pub const REFERENCE_CNI_DIR: &str = "/usr/lib/cni";

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Create the lab (idempotent): namespaces, underlay, control plane, kubelets.
    Up(UpArgs),
    /// Remove every namespace, process and file of the lab (idempotent).
    Down(NameArg),
    /// Show the lab's nodes, pods and namespaces.
    Status(StatusArgs),
    /// Run the installed kubectl against the lab's API: `veilnet lab kubectl -- get pods`.
    Kubectl {
        #[command(flatten)]
        name: NameArg,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside a pod's network namespace: `veilnet lab exec NS/POD -- CMD…`.
    Exec {
        #[command(flatten)]
        name: NameArg,
        /// NAMESPACE/POD (or POD in namespace `default`).
        pod: String,
        /// The command and its arguments, run in the pod's network namespace (after `--` when
        /// they start with `-`); `veilnet` on its PATH is this build.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// The built-in test workload.
    #[command(subcommand)]
    Agnhost(agnhost::AgnhostCommand),
    /// Serve the Kubernetes API stand-in (started by `lab up`).
    #[command(hide = true)]
    Apiserver(apiserver::ApiServerArgs),
    /// Run the lab kubelet of one node (started by `lab up`).
    #[command(hide = true)]
    Kubelet(kubelet::KubeletArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct NameArg {
    /// Lab name (namespaces are called NAME.cp, NAME.ul, NAME.n1, …).
    #[arg(long, default_value = DEFAULT_LAB)]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// MTU of the underlay (try 1500, 9000, 1400).
    #[arg(long, default_value_t = 1500)]
    pub underlay_mtu: u32,
    /// Underlay subnet: .1 is the control plane, nodes are .11, .12, …
    #[arg(long, default_value = "172.30.0.0/24")]
    pub underlay_cidr: Ipv4Net,
    /// Cluster pod CIDR, split into one subnet per node.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_prefix: u8,
    /// CNI plugin chain of the kubelets.
    #[arg(long, value_enum, default_value_t = CniMode::Veilnet)]
    pub cni: CniMode,
    /// Who sets the Nodes' pod CIDRs.
    #[arg(long, value_enum, default_value_t = PodCidrMode::Assigned)]
    pub pod_cidrs: PodCidrMode,
    /// Default encryption mode of the agents; per node, label `veilnet.io/encryption=on|off|strict`.
    #[arg(long, value_enum, default_value_t = Mode::On)]
    pub encryption: Mode,
    /// The agents' `--policy-strict-mode` (cut established connections a policy change denies);
    /// the agents' default when absent.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub policy_strict_mode: Option<bool>,
    /// Who serves the Kubernetes API: veilnet's embedded stand-in, or the real kube-apiserver,
    /// etcd, kube-controller-manager and kube-scheduler (built by scripts/build-kubernetes.sh).
    #[arg(long, value_enum, env = CONTROL_PLANE_ENV, default_value_t = ControlPlane::StandIn)]
    pub control_plane: ControlPlane,
    /// Add an external host on the underlay (netns NAME.ext, the underlay's last address, e.g.
    /// 172.30.0.254): not a node, no route to the pods; it answers TCP and UDP on port 8080 with
    /// the source address it sees (egress and masquerade tests).
    #[arg(long)]
    pub external_host: bool,
    /// The agents' `--dns-mode` (off, monitor, enforce); their default when absent.
    #[arg(long, value_enum)]
    pub dns_mode: Option<veilnet::dns::DnsMode>,
    /// The agents' `--trusted-dns`: addresses or CIDRs, comma-separated (e.g. a DNS pod's
    /// address, known once it runs: `lab up` again with the same flags plus this one restarts
    /// nothing, so give it at first `up`).
    #[arg(long, value_delimiter = ',', value_parser = veilnet::dns::parse_net)]
    pub trusted_dns: Vec<ipnet::IpNet>,
    /// The agents' `--flow-log-allowed`: the flow log also has the first packet of every allowed
    /// connection (rate-limited), with the policy that allowed it (`veilnet observe`).
    #[arg(long)]
    pub flow_log_allowed: bool,
    /// Every agent's config file (`veilnet agent --config`, keys as in the manifest's
    /// ConfigMap), e.g. `{"alerts": {"enabled": false}}`; the lab's flags win over it.
    #[arg(long)]
    pub agent_config: Option<std::path::PathBuf>,
    /// How long to wait for every node to become Ready.
    #[arg(long, default_value = "90s", value_parser = veilnet::duration::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Machine-readable output (see README: "lab status --json").
    #[arg(long)]
    pub json: bool,
}

impl LabCommand {
    /// Long-running processes started by `lab up` (as opposed to one-shot commands).
    pub fn is_daemon(&self) -> bool {
        matches!(self, LabCommand::Apiserver(_) | LabCommand::Kubelet(_))
    }
}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up(args) => up(args),
        LabCommand::Down(n) => down(&n.name),
        LabCommand::Status(args) => status(args),
        LabCommand::Kubectl { name, args } => kubectl(&name.name, &args),
        LabCommand::Exec { name, pod, cmd } => exec(&name.name, &pod, &cmd),
        LabCommand::Agnhost(cmd) => {
            let code = agnhost::run(cmd)?;
            std::process::exit(code)
        }
        LabCommand::Apiserver(args) => block_on(async { Ok(apiserver::run(args).await?) }),
        LabCommand::Kubelet(args) => block_on(async { Ok(kubelet::run(args).await?) }),
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn need_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab needs root: it creates network namespaces");
    }
    Ok(())
}

/// Loads a lab's saved spec.
pub fn load(name: &str) -> anyhow::Result<LabLayout> {
    layout::validate_name(name)?;
    let path = layout::labs_root().join(name).join("lab.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("lab {name:?} is not up (no {})", path.display()))?;
    let spec: LabSpec =
        serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
    Ok(LabLayout::new(spec)?)
}

fn step(n: usize, total: usize, what: &str) {
    eprintln!("==> [{n}/{total}] {what}");
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    need_root()?;
    let started = Instant::now();
    let spec = LabSpec {
        name: args.name.name.clone(),
        nodes: args.nodes,
        underlay_mtu: args.underlay_mtu,
        underlay_cidr: args.underlay_cidr,
        cluster_cidr: args.cluster_cidr,
        node_cidr_prefix: args.node_cidr_prefix,
        cni: args.cni,
        pod_cidrs: args.pod_cidrs,
        encryption: args.encryption,
        policy_strict_mode: args.policy_strict_mode,
        control_plane: args.control_plane,
        external_host: args.external_host,
        dns_mode: args.dns_mode,
        flow_log_allowed: args.flow_log_allowed,
        agent_config: match &args.agent_config {
            Some(p) => Some(
                std::fs::canonicalize(p)
                    .with_context(|| format!("--agent-config {}", p.display()))?,
            ),
            None => None,
        },
        trusted_dns: args.trusted_dns.iter().map(|n| n.trunc()).collect(),
    };
    if spec.cni == CniMode::Reference && spec.pod_cidrs == PodCidrMode::Agent {
        bail!("--cni reference needs --pod-cidrs assigned: without an agent nobody allocates the CIDRs");
    }
    let lab = LabLayout::new(spec.clone())?;
    let pid_dir = lab.root().join("pids");
    let log_dir = lab.log_dir();
    if let Ok(existing) = load(lab.name()) {
        if existing.spec != spec {
            bail!(
                "lab {:?} is already up with a different configuration; run `veilnet lab down --name {}` first",
                lab.name(),
                lab.name()
            );
        }
        // Already up: bring dead node daemons back first, as a kubelet restarts a crashed
        // DaemonSet pod, before the full idempotent pass below (which can take a second on a
        // loaded machine, and every millisecond an agent is down its node's datapath is too).
        let namespaces_up = netns::exists(&lab.control_plane_netns())
            && lab.nodes().iter().all(|n| netns::exists(&n.netns));
        if namespaces_up && wait_api(&lab, Duration::ZERO).is_ok() {
            start_node_daemons(&lab, &pid_dir, &log_dir)?;
        }
    }
    if lab.spec.control_plane == ControlPlane::Kubernetes {
        // Before anything is created: a missing build is the likeliest failure, and says what to run.
        kubernetes::bin_dir()?;
    }
    if lab.spec.cni == CniMode::Reference && !Path::new(REFERENCE_CNI_DIR).join("bridge").exists() {
        bail!("--cni reference needs Debian's containernetworking-plugins in {REFERENCE_CNI_DIR} (apt install containernetworking-plugins)");
    }
    let total = if lab.spec.cni == CniMode::Veilnet {
        6
    } else {
        5
    };
    step(
        1,
        total,
        &format!(
            "namespaces and the underlay ({} nodes, MTU {})",
            spec.nodes, spec.underlay_mtu
        ),
    );
    std::fs::create_dir_all(lab.root())?;
    topology::up(&lab)?;
    write_json(&lab.spec_file(), &lab.spec)?;
    if lab.spec.external_host {
        start_external_host(&lab, &pid_dir, &log_dir)?;
    }

    match lab.spec.control_plane {
        ControlPlane::StandIn => {
            write_json(&lab.kubeconfig(), &kubeconfig(&lab))?;
            step(
                2,
                total,
                &format!(
                    "API stand-in at {} (netns {})",
                    lab.api_url(),
                    lab.control_plane_netns()
                ),
            );
            Daemon {
                role: "apiserver".into(),
                program: lab_binary()?,
                netns: lab.control_plane_netns(),
                args: vec![
                    "apiserver".into(),
                    "--listen".into(),
                    lab.api_addr().to_string(),
                ],
                pid_dir: &pid_dir,
                log_dir: &log_dir,
            }
            .ensure_started()?;
            wait_api(&lab, Duration::from_secs(20))?;
        }
        ControlPlane::Kubernetes => {
            step(
                2,
                total,
                &format!(
                    "Kubernetes {} control plane at {} (netns {}): etcd, kube-apiserver, kube-controller-manager, kube-scheduler",
                    kubernetes::pinned_version(),
                    lab.api_url(),
                    lab.control_plane_netns()
                ),
            );
            kubernetes::prepare(&lab)?;
            kubernetes::start_apiserver(&lab, &pid_dir, &log_dir)?;
            wait_api(&lab, Duration::from_secs(90))?;
            kubernetes::start_controllers(&lab, &pid_dir, &log_dir)?;
            // The ServiceAccount admission plugin refuses pods until their namespace's `default`
            // ServiceAccount exists, which kube-controller-manager creates a moment after start.
            wait_default_service_account(&lab, Duration::from_secs(60))?;
        }
    }

    step(3, total, "Node objects");
    register_nodes(&lab)?;
    if lab.spec.cni == CniMode::Veilnet {
        match lab.spec.control_plane {
            // What `kubectl apply -f manifests/veilnet.yaml` creates on a real cluster.
            ControlPlane::StandIn => create_namespace(&lab, VEILNET_NAMESPACE)?,
            // The same objects, applied for real, and the agents' identity: a token of the
            // manifest's ServiceAccount, so RBAC decides every call an agent makes.
            ControlPlane::Kubernetes => {
                kubernetes::apply_manifest_rbac(&lab)?;
                kubernetes::write_agent_kubeconfigs(
                    &lab,
                    VEILNET_NAMESPACE,
                    VEILNET_SERVICE_ACCOUNT,
                )?;
            }
        }
    }

    step(
        4,
        total,
        &format!("kubelets ({:?} CNI)", lab.spec.cni).to_lowercase(),
    );
    if lab.spec.cni == CniMode::Veilnet {
        step(5, total, "veilnet datapaths and agents");
    }
    for node in lab.nodes() {
        prepare_node(&lab, &node)?;
    }
    start_node_daemons(&lab, &pid_dir, &log_dir)?;

    step(total, total, "waiting for every node to be Ready");
    wait_nodes_ready(&lab, args.timeout)?;
    eprintln!(
        "lab {:?} is up in {:.1}s: `veilnet lab status{}` and `veilnet lab kubectl{} -- get nodes`",
        lab.name(),
        started.elapsed().as_secs_f64(),
        name_flag(lab.name()),
        name_flag(lab.name())
    );
    Ok(())
}

/// Role (pid and log file name) of the external host's server.
pub const EXTERNAL_ROLE: &str = "external";

/// The external host's server: agnhost answering with the client's address, TCP and UDP.
fn start_external_host(lab: &LabLayout, pid_dir: &Path, log_dir: &Path) -> anyhow::Result<()> {
    let port = layout::EXTERNAL_PORT.to_string();
    Daemon {
        role: EXTERNAL_ROLE.into(),
        program: lab_binary()?,
        netns: lab.external_netns(),
        args: [
            "agnhost",
            "serve",
            "--tcp",
            &port,
            "--udp",
            &port,
            "--name",
            "external",
            "--report-client",
        ]
        .map(String::from)
        .to_vec(),
        pid_dir,
        log_dir,
    }
    .ensure_started()?;
    Ok(())
}

/// Starts every node's kubelet and (with veilnet's CNI) agent that is not running. The nodes'
/// directories and plugin must be in place (`prepare_node`).
fn start_node_daemons(lab: &LabLayout, pid_dir: &Path, log_dir: &Path) -> anyhow::Result<()> {
    for node in lab.nodes() {
        Daemon {
            role: format!("kubelet-{}", node.name),
            program: lab_binary()?,
            netns: node.netns.clone(),
            args: kubelet_args(lab, &node),
            pid_dir,
            log_dir,
        }
        .ensure_started()?;
    }
    if lab.spec.cni == CniMode::Veilnet {
        let veilnet = veilnet_binary()?;
        // The datapath first: the agent waits for it. It is a process of its own, as on a real
        // node (a DaemonSet of its own), so restarting an agent never stops encrypted traffic.
        for node in lab.nodes() {
            Daemon {
                role: format!("datapath-{}", node.name),
                program: veilnet.clone(),
                netns: node.netns.clone(),
                args: vec![
                    "datapath".into(),
                    "--run-dir".into(),
                    node.run_dir().display().to_string(),
                ],
                pid_dir,
                log_dir,
            }
            .ensure_started()?;
        }
        for node in lab.nodes() {
            Daemon {
                role: format!("agent-{}", node.name),
                program: veilnet.clone(),
                netns: node.netns.clone(),
                args: agent_args(lab, &node),
                pid_dir,
                log_dir,
            }
            .ensure_started()?;
        }
    }
    Ok(())
}

fn name_flag(name: &str) -> String {
    if name == DEFAULT_LAB {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    veilnet::fsutil::write_atomic(path, &serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn wait_api(lab: &LabLayout, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = with_client(lab, |client| async move {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            client.request_text(req).await
        })?;
        match ready {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let log = match lab.spec.control_plane {
                    ControlPlane::StandIn => "apiserver.log",
                    ControlPlane::Kubernetes => "kube-apiserver.log",
                };
                bail!(
                    "the lab's API did not answer within {timeout:?}: {e} (see {}/{log})",
                    lab.log_dir().display()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn wait_default_service_account(lab: &LabLayout, timeout: Duration) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let deadline = Instant::now() + timeout;
    loop {
        let found = with_client(lab, |client| async move {
            Api::<ServiceAccount>::namespaced(client, "default")
                .get_opt("default")
                .await
        })?;
        if let Ok(Some(_)) = found {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "kube-controller-manager created no default ServiceAccount within {timeout:?} (see {}/kube-controller-manager.log)",
                lab.log_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the Node objects, as the nodes' provisioning would; in `assigned` mode on the stand-in
/// with their pod CIDRs set, as kube-controller-manager's node IPAM does on the real control plane.
fn register_nodes(lab: &LabLayout) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for n in lab.nodes() {
        let mut node = Node {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_string(), n.name.clone()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    (
                        "kubernetes.io/arch".to_string(),
                        std::env::consts::ARCH
                            .replace("x86_64", "amd64")
                            .replace("aarch64", "arm64"),
                    ),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        if lab.spec.pod_cidrs == PodCidrMode::Assigned
            && lab.spec.control_plane == ControlPlane::StandIn
        {
            let cidr = lab
                .assigned_pod_cidr(n.index)
                .context("the cluster CIDR has too few subnets for this many nodes")?
                .to_string();
            node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
                pod_cidr: Some(cidr.clone()),
                pod_cidrs: Some(vec![cidr]),
                ..Default::default()
            });
        }
        nodes.push(node);
    }
    with_client(lab, |client| async move {
        let api: Api<Node> = Api::all(client);
        for node in nodes {
            match api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(anyhow::Error::from(e).context("creating Node objects")),
            }
        }
        Ok(())
    })?
}

fn create_namespace(lab: &LabLayout, name: &'static str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    with_client(lab, move |client| async move {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(anyhow::Error::from(e).context(format!("creating namespace {name}"))),
        }
    })?
}

/// The `veilnet-cni` binary built beside this `veilnet-lab` binary.
fn cni_plugin_binary() -> anyhow::Result<std::path::PathBuf> {
    let plugin = std::env::current_exe()?.with_file_name("veilnet-cni");
    if !plugin.exists() {
        bail!(
            "{} not found: build the whole workspace (cargo build --workspace) so the CNI plugin sits beside veilnet-lab",
            plugin.display()
        );
    }
    Ok(plugin)
}

fn prepare_node(lab: &LabLayout, node: &NodeLayout) -> anyhow::Result<()> {
    for dir in [
        node.cni_conf_dir(),
        node.cni_bin_dir(),
        node.state_dir(),
        node.run_dir(),
        node.kubelet_dir(),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if lab.spec.cni == CniMode::Veilnet {
        // The DaemonSet's init container does this on a real node. Copy to a temporary name and
        // rename, so a kubelet never executes a half-written plugin.
        let dst = node.cni_bin_dir().join("veilnet-cni");
        let tmp = node.cni_bin_dir().join(".veilnet-cni.tmp");
        std::fs::copy(cni_plugin_binary()?, &tmp)
            .with_context(|| format!("installing {}", dst.display()))?;
        std::fs::rename(&tmp, &dst).with_context(|| format!("installing {}", dst.display()))?;
    }
    if lab.spec.cni == CniMode::Reference {
        let subnet = lab
            .assigned_pod_cidr(node.index)
            .context("the cluster CIDR has too few subnets for this many nodes")?;
        let conf = reference_conflist(
            &subnet.to_string(),
            lab.spec.underlay_mtu,
            &node.state_dir(),
        );
        write_json(&node.cni_conf_dir().join("10-reference.conflist"), &conf)?;
    }
    Ok(())
}

/// Debian's bridge + host-local plugins: same-node pod networking without veilnet.
fn reference_conflist(subnet: &str, mtu: u32, state_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab-reference",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": state_dir.join("host-local"),
            }
        }]
    })
}

/// The kubeconfig a node's kubelet uses: its own `system:node:<name>` identity on the real control
/// plane, the lab's (credential-less) one on the stand-in.
fn kubelet_kubeconfig(lab: &LabLayout, node: &NodeLayout) -> std::path::PathBuf {
    match lab.spec.control_plane {
        ControlPlane::StandIn => lab.kubeconfig(),
        ControlPlane::Kubernetes => node.kubelet_kubeconfig(),
    }
}

/// The kubeconfig a node's agent uses: a token of the `veilnet` ServiceAccount on the real
/// control plane, the lab's one on the stand-in.
fn agent_kubeconfig(lab: &LabLayout, node: &NodeLayout) -> std::path::PathBuf {
    match lab.spec.control_plane {
        ControlPlane::StandIn => lab.kubeconfig(),
        ControlPlane::Kubernetes => node.agent_kubeconfig(),
    }
}

fn kubelet_args(lab: &LabLayout, node: &NodeLayout) -> Vec<String> {
    let mut args = vec![
        "kubelet".to_string(),
        "--node-name".into(),
        node.name.clone(),
        "--node-ip".into(),
        node.ip.to_string(),
        "--kubeconfig".into(),
        kubelet_kubeconfig(lab, node).display().to_string(),
        "--cni-conf-dir".into(),
        node.cni_conf_dir().display().to_string(),
        "--cni-bin-dir".into(),
        node.cni_bin_dir().display().to_string(),
        "--kubelet-dir".into(),
        node.kubelet_dir().display().to_string(),
        "--netns-prefix".into(),
        node.pod_netns_prefix(),
    ];
    if lab.spec.cni == CniMode::Reference {
        args.extend(["--cni-bin-dir".into(), REFERENCE_CNI_DIR.into()]);
    }
    args
}

fn agent_args(lab: &LabLayout, node: &NodeLayout) -> Vec<String> {
    let path = |p: std::path::PathBuf| p.display().to_string();
    let mut args = vec![
        "agent".to_string(),
        "--node-name".into(),
        node.name.clone(),
        "--kubeconfig".into(),
        path(agent_kubeconfig(lab, node)),
        "--namespace".into(),
        VEILNET_NAMESPACE.into(),
        "--cluster-cidr".into(),
        lab.spec.cluster_cidr.to_string(),
        "--node-cidr-prefix".into(),
        lab.spec.node_cidr_prefix.to_string(),
        "--state-dir".into(),
        path(node.state_dir()),
        "--run-dir".into(),
        path(node.run_dir()),
        "--cni-conf-dir".into(),
        path(node.cni_conf_dir()),
        "--cni-bin-dir".into(),
        path(node.cni_bin_dir()),
        "--underlay-ip".into(),
        node.ip.to_string(),
        "--encryption".into(),
        lab.spec.encryption.to_string(),
        // As on a real node (the manifest's defaults): health on the node's loopback, where only
        // the node itself reaches it, metrics on the node's address.
        "--health-addr".into(),
        "127.0.0.1:9891".into(),
        "--metrics-addr".into(),
        format!("{}:9892", node.ip),
        "--flows-addr".into(),
        format!("{}:9893", node.ip),
    ];
    if lab.spec.flow_log_allowed {
        args.push("--flow-log-allowed".into());
    }
    if let Some(config) = &lab.spec.agent_config {
        args.extend(["--config".into(), path(config.clone())]);
    }
    if let Some(strict) = lab.spec.policy_strict_mode {
        args.push(format!("--policy-strict-mode={strict}"));
    }
    if let Some(mode) = lab.spec.dns_mode {
        args.extend(["--dns-mode".into(), mode.to_string()]);
    }
    if !lab.spec.trusted_dns.is_empty() {
        let list: Vec<String> = lab.spec.trusted_dns.iter().map(|n| n.to_string()).collect();
        args.extend(["--trusted-dns".into(), list.join(",")]);
    }
    args
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn wait_nodes_ready(lab: &LabLayout, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let want = lab.spec.nodes;
    let mut last = usize::MAX;
    loop {
        let nodes = with_client(lab, |client| async move {
            Api::<Node>::all(client).list(&ListParams::default()).await
        })??;
        let ready = nodes.items.iter().filter(|n| node_ready(n)).count();
        if ready != last {
            eprintln!("    {ready}/{want} nodes Ready");
            last = ready;
        }
        if ready >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "only {ready}/{want} nodes became Ready within {timeout:?}; see the logs in {}",
                lab.log_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn down(name: &str) -> anyhow::Result<()> {
    need_root()?;
    layout::validate_name(name)?;
    let root = layout::labs_root().join(name);
    let had = !topology::lab_namespaces(name).is_empty() || root.exists();
    topology::down(name, &root)?;
    if had {
        eprintln!("lab {name:?} removed");
    } else {
        eprintln!("lab {name:?} is not up: nothing to remove");
    }
    Ok(())
}

/// The first line of `lab status`: the modes spelled as on the command line and in the JSON.
fn headline(st: &LabStatus) -> String {
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|v| v.get_name().to_string()).unwrap_or_default()
    };
    format!(
        "lab {}: {} nodes, CNI {}, pod CIDRs {}",
        st.name,
        st.nodes.len(),
        name(st.cni.to_possible_value()),
        name(st.pod_cidrs.to_possible_value())
    )
}

/// `lab status --json` output. Field names are part of the CLI's contract (see the README).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabStatus {
    pub name: String,
    pub api_url: String,
    pub api_reachable: bool,
    pub control_plane_netns: String,
    /// `stand-in` or `kubernetes`.
    pub control_plane: ControlPlane,
    /// The API server's `/version` gitVersion, when it answers.
    pub server_version: Option<String>,
    pub underlay_netns: String,
    pub underlay_cidr: String,
    pub underlay_mtu: u32,
    pub cni: CniMode,
    pub pod_cidrs: PodCidrMode,
    pub kubeconfig: String,
    /// With `--external-host`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_host: Option<ExternalHostStatus>,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalHostStatus {
    pub netns: String,
    pub ip: String,
    /// TCP and UDP port of the server that answers with the source address it sees.
    pub port: u16,
    pub running: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    pub pod_cidr: Option<String>,
    pub ready: bool,
    pub kubelet_running: bool,
    /// Only meaningful with `--cni veilnet`.
    pub agent_running: bool,
    /// Only meaningful with `--cni veilnet`.
    pub datapath_running: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Option<String>,
    pub phase: Option<String>,
    pub netns: Option<String>,
}

pub fn collect_status(lab: &LabLayout) -> anyhow::Result<LabStatus> {
    let listed = with_client(lab, |client| async move {
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        // Best effort: a `/version` the client cannot read does not make the API unreachable.
        let version = client.apiserver_version().await.ok().map(|v| v.git_version);
        Ok::<_, kube::Error>((nodes.items, pods.items, version))
    });
    let (api_nodes, api_pods, server_version, reachable) = match listed {
        Ok(Ok((n, p, v))) => (n, p, v, true),
        _ => (Vec::new(), Vec::new(), None, false),
    };
    let pid_dir = lab.root().join("pids");
    let nodes = lab
        .nodes()
        .into_iter()
        .map(|n| {
            let api = api_nodes
                .iter()
                .find(|a| a.metadata.name.as_deref() == Some(&n.name));
            NodeStatus {
                pod_cidr: api
                    .and_then(|a| a.spec.as_ref())
                    .and_then(|s| s.pod_cidr.clone()),
                ready: api.is_some_and(node_ready),
                kubelet_running: running_pid(&pid_dir, &format!("kubelet-{}", n.name)).is_some(),
                agent_running: running_pid(&pid_dir, &format!("agent-{}", n.name)).is_some(),
                datapath_running: running_pid(&pid_dir, &format!("datapath-{}", n.name)).is_some(),
                name: n.name,
                netns: n.netns,
                underlay_ip: n.ip.to_string(),
            }
        })
        .collect();
    let pods = api_pods
        .iter()
        .map(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            let netns = node
                .as_deref()
                .and_then(|n| node_by_name(lab, n))
                .zip(p.metadata.uid.as_deref())
                .map(|(n, uid)| n.pod_netns(uid))
                .filter(|ns| netns::exists(ns));
            PodStatus {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                phase: p.status.as_ref().and_then(|s| s.phase.clone()),
                node,
                netns,
            }
        })
        .collect();
    Ok(LabStatus {
        name: lab.name().to_string(),
        api_url: lab.api_url(),
        api_reachable: reachable,
        control_plane_netns: lab.control_plane_netns(),
        control_plane: lab.spec.control_plane,
        server_version,
        underlay_netns: lab.underlay_netns(),
        underlay_cidr: lab.spec.underlay_cidr.to_string(),
        underlay_mtu: lab.spec.underlay_mtu,
        cni: lab.spec.cni,
        pod_cidrs: lab.spec.pod_cidrs,
        kubeconfig: lab.kubeconfig().display().to_string(),
        external_host: lab.spec.external_host.then(|| ExternalHostStatus {
            netns: lab.external_netns(),
            ip: lab.external_ip().to_string(),
            port: layout::EXTERNAL_PORT,
            running: running_pid(&pid_dir, EXTERNAL_ROLE).is_some(),
        }),
        nodes,
        pods,
    })
}

fn node_by_name(lab: &LabLayout, name: &str) -> Option<NodeLayout> {
    lab.nodes().into_iter().find(|n| n.name == name)
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    need_root()?;
    let lab = load(&args.name.name)?;
    let st = collect_status(&lab)?;
    if args.json {
        veilnet::stdout::println(&serde_json::to_string_pretty(&st)?)?;
        return Ok(());
    }
    veilnet::stdout::print(&render_status(&st))?;
    Ok(())
}

/// `lab status` as text: the headline, control plane, underlay, nodes and pods.
fn render_status(st: &LabStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}", headline(st));
    let plane = match st.control_plane {
        ControlPlane::StandIn => "API stand-in",
        ControlPlane::Kubernetes => "Kubernetes",
    };
    let _ = writeln!(
        out,
        "control plane: {plane} {}, netns {}, API {} ({})",
        st.server_version.as_deref().unwrap_or("(version unknown)"),
        st.control_plane_netns,
        st.api_url,
        if st.api_reachable {
            "reachable"
        } else {
            "NOT reachable"
        }
    );
    let _ = writeln!(
        out,
        "underlay:      netns {}, {} MTU {}",
        st.underlay_netns, st.underlay_cidr, st.underlay_mtu
    );
    if let Some(ext) = &st.external_host {
        let _ = writeln!(
            out,
            "external host: netns {}, {} tcp+udp port {} (answers with the source address it sees), {}",
            ext.netns,
            ext.ip,
            ext.port,
            if ext.running { "running" } else { "stopped" }
        );
    }
    let _ = writeln!(out);
    let veilnet = st.cni == CniMode::Veilnet;
    let state = |running: bool| if running { "running" } else { "stopped" };
    let _ = writeln!(
        out,
        "{:<10} {:<16} {:<15} {:<18} {:<6} {:<9} {}",
        "NODE",
        "NETNS",
        "UNDERLAY IP",
        "POD CIDR",
        "READY",
        "KUBELET",
        if veilnet { "AGENT     DATAPATH" } else { "" }
    );
    for n in &st.nodes {
        let _ = writeln!(
            out,
            "{:<10} {:<16} {:<15} {:<18} {:<6} {:<9} {}",
            n.name,
            n.netns,
            n.underlay_ip,
            n.pod_cidr.as_deref().unwrap_or("<none>"),
            n.ready,
            state(n.kubelet_running),
            if veilnet {
                format!(
                    "{:<9} {}",
                    state(n.agent_running),
                    state(n.datapath_running)
                )
            } else {
                String::new()
            },
        );
    }
    let _ = writeln!(out);
    if st.pods.is_empty() {
        let _ = writeln!(out, "no pods");
    } else {
        let _ = writeln!(
            out,
            "{:<32} {:<10} {:<15} {:<10} NETNS",
            "POD", "NODE", "IP", "PHASE"
        );
        for p in &st.pods {
            let _ = writeln!(
                out,
                "{:<32} {:<10} {:<15} {:<10} {}",
                format!("{}/{}", p.namespace, p.name),
                p.node.as_deref().unwrap_or("<none>"),
                p.ip.as_deref().unwrap_or("<none>"),
                p.phase.as_deref().unwrap_or("<none>"),
                p.netns.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

fn kubectl(name: &str, args: &[String]) -> anyhow::Result<()> {
    need_root()?;
    let lab = load(name)?;
    // The installed kubectl talks to the stand-in (else the one scripts/build-kubernetes.sh
    // built); the real control plane comes with the kubectl of its own release, built beside it.
    let mut cmd = match lab.spec.control_plane {
        ControlPlane::StandIn => {
            let mut cmd = Command::new(stand_in_kubectl()?);
            cmd.env("KUBECONFIG", lab.kubeconfig());
            netns::command_in(&lab.control_plane_netns(), &mut cmd)?;
            cmd
        }
        ControlPlane::Kubernetes => kubernetes::kubectl(&lab)?,
    };
    // Discovery cached per lab: the stand-in and the real server share an address (and kubectl's
    // default cache key), and a cache filled by one would make kubectl believe the other serves
    // what it does not.
    cmd.env("KUBECACHEDIR", lab.root().join("kubectl-cache"));
    cmd.args(args);
    let err = cmd.exec();
    bail!("failed to run kubectl: {err}")
}

/// `kubectl` on PATH, else the one built with the real control plane; else an error that says
/// how to get one (Debian 12's own kubectl is far too old).
fn stand_in_kubectl() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file());
    if let Some(p) = on_path {
        return Ok(p);
    }
    match kubernetes::bin_dir() {
        Ok(dir) => Ok(dir.join("kubectl")),
        Err(_) => bail!(
            "kubectl not found: install kubectl >= 1.30 on PATH, or run ./scripts/build-kubernetes.sh \
             (it builds kubectl {} beside the real control plane)",
            kubernetes::pinned_version()
        ),
    }
}

/// PATH with the directory of this veilnet binary first, so that `veilnet …` runs this build.
pub fn path_with_self() -> String {
    let mut parts = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        parts.push(dir.display().to_string());
    }
    parts.push(std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
    parts.join(":")
}

fn exec(name: &str, pod: &str, cmd: &[String]) -> anyhow::Result<()> {
    need_root()?;
    let lab = load(name)?;
    let (ns, pod_name) = pod.split_once('/').unwrap_or(("default", pod));
    let (ns_owned, name_owned) = (ns.to_string(), pod_name.to_string());
    let found = with_client(&lab, move |client| async move {
        Api::<Pod>::namespaced(client, &ns_owned)
            .get_opt(&name_owned)
            .await
    })??;
    let Some(p) = found else {
        bail!("pod {ns}/{pod_name} not found")
    };
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("pod {ns}/{pod_name} is not bound to a node"))?;
    let node =
        node_by_name(&lab, &node).with_context(|| format!("node {node} is not a lab node"))?;
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let pod_ns = node.pod_netns(&uid);
    if !netns::exists(&pod_ns) {
        bail!(
            "pod {ns}/{pod_name} has no network namespace yet (phase {:?})",
            p.status.and_then(|s| s.phase)
        );
    }
    let (program, rest) = cmd.split_first().context("no command given")?;
    let mut c = Command::new(program);
    c.args(rest).env("PATH", path_with_self());
    netns::command_in(&pod_ns, &mut c)?;
    let err = c.exec();
    bail!("failed to run {program}: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cni: CniMode, pod_cidrs: PodCidrMode) -> LabStatus {
        LabStatus {
            name: "t".into(),
            api_url: String::new(),
            api_reachable: false,
            control_plane_netns: String::new(),
            control_plane: ControlPlane::StandIn,
            server_version: None,
            underlay_netns: String::new(),
            underlay_cidr: String::new(),
            underlay_mtu: 1500,
            cni,
            pod_cidrs,
            kubeconfig: String::new(),
            external_host: None,
            nodes: vec![],
            pods: vec![],
        }
    }

    #[test]
    fn status_shows_the_external_host_only_when_there_is_one() {
        let mut st = status(CniMode::Veilnet, PodCidrMode::Assigned);
        assert!(serde_json::to_value(&st)
            .unwrap()
            .get("externalHost")
            .is_none());
        assert!(!render_status(&st).contains("external host"));
        st.external_host = Some(ExternalHostStatus {
            netns: "t.ext".into(),
            ip: "172.30.0.254".into(),
            port: 8080,
            running: true,
        });
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["externalHost"]["ip"], "172.30.0.254");
        assert_eq!(json["externalHost"]["port"], 8080);
        assert!(render_status(&st).contains(
            "external host: netns t.ext, 172.30.0.254 tcp+udp port 8080 (answers with the source address it sees), running"
        ));
    }

    /// The text spells the modes as the flags and the JSON do.
    #[test]
    fn status_headline_uses_cli_spelling() {
        for (cni, pods) in [
            (CniMode::Veilnet, PodCidrMode::Assigned),
            (CniMode::Reference, PodCidrMode::Agent),
        ] {
            let st = status(cni, pods);
            let json = serde_json::to_value(&st).unwrap();
            let line = headline(&st);
            assert_eq!(
                line,
                format!(
                    "lab t: 0 nodes, CNI {}, pod CIDRs {}",
                    json["cni"].as_str().unwrap(),
                    json["podCidrs"].as_str().unwrap()
                )
            );
            assert!(
                !line.contains("Veilnet") && !line.contains("Assigned"),
                "{line}"
            );
        }
    }
}
