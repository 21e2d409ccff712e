//! `veilnet policy explain FROM TO PORT/PROTO`: which policies apply to a connection and the
//! verdict, computed by the same compiler the agents enforce with (each side's node model).
//!
//! The cluster is read through a kubeconfig (`--kubeconfig`, `$KUBECONFIG`, in-cluster), or with
//! `--lab NAME` from a `veilnet lab`: its kubeconfig and control-plane namespace (where its API
//! listens) are found by the [`crate::lab_paths`] convention, without any lab code.

use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::Api;

use super::{
    ClusterState, Decision, Endpoint, Explainer, Explanation, NamespaceInfo, PodInfo, Protocol,
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyCliError {
    #[error("{what} {value:?}: {reason}")]
    Argument {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("no pod {0} with an IP in the cluster")]
    NoSuchPod(String),
    #[error(transparent)]
    LabName(#[from] crate::lab_paths::InvalidLabName),
    #[error("lab {name:?} is not up (no {})", kubeconfig.display())]
    LabNotUp { name: String, kubeconfig: PathBuf },
    #[error("lab: {0}")]
    LabNetns(#[from] crate::netns::NetnsError),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Explain whether FROM may connect to TO on PORT/PROTO, and which policies decide.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Source: NAMESPACE/POD or an IP address.
    pub from: String,
    /// Destination: NAMESPACE/POD or an IP address.
    pub to: String,
    /// PORT/PROTO, e.g. 80/tcp, 53/udp, 9000/sctp (PORT alone means TCP).
    pub port: String,
    #[command(flatten)]
    pub cluster: ClusterSource,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `80`, `80/tcp`, `53/UDP`.
pub fn parse_port(s: &str) -> Result<(u16, Protocol), PolicyCliError> {
    let bad = |reason: &str| PolicyCliError::Argument {
        what: "port",
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("not a port number 1..65535"))?;
    let proto = Protocol::from_k8s(&proto.to_ascii_uppercase())
        .ok_or_else(|| bad("protocol must be tcp, udp or sctp"))?;
    Ok((port, proto))
}

/// `ns/pod` → the pod's first IP, or an IP as given.
pub fn resolve(state: &ClusterState, s: &str) -> Result<IpAddr, PolicyCliError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (ns, name) = s.split_once('/').ok_or_else(|| PolicyCliError::Argument {
        what: "endpoint",
        value: s.to_string(),
        reason: "expected NAMESPACE/POD or an IP address".into(),
    })?;
    state
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .and_then(|p| p.ips.first().copied())
        .ok_or_else(|| PolicyCliError::NoSuchPod(s.to_string()))
}

/// Reads pods, namespaces, policies and node addresses.
async fn fetch(client: kube::Client) -> Result<(ClusterState, Vec<IpAddr>), PolicyCliError> {
    let lp = ListParams::default();
    let pods = Api::<Pod>::all(client.clone()).list(&lp).await?;
    let namespaces = Api::<Namespace>::all(client.clone()).list(&lp).await?;
    let policies = Api::<NetworkPolicy>::all(client.clone()).list(&lp).await?;
    let nodes = Api::<Node>::all(client).list(&lp).await?;
    let node_addrs = nodes
        .items
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    Ok((
        ClusterState {
            pods: pods.items.iter().filter_map(PodInfo::from_k8s).collect(),
            namespaces: namespaces
                .items
                .iter()
                .filter_map(NamespaceInfo::from_k8s)
                .collect(),
            policies: policies.items,
        },
        node_addrs,
    ))
}

/// A client for the kubeconfig at `path` (else `$KUBECONFIG`, `~/.kube/config`, in-cluster), with
/// `context` instead of its current context, as kubectl picks one.
pub async fn kube_client(
    path: Option<&PathBuf>,
    context: Option<&str>,
) -> Result<kube::Client, PolicyCliError> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| PolicyCliError::Kubeconfig(format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| PolicyCliError::Kubeconfig(e.to_string()))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| PolicyCliError::Kubeconfig(e.to_string()))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| PolicyCliError::Kubeconfig(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Where a one-shot command reads the cluster from: a kubeconfig (`None`: inferred) and context,
/// or a `veilnet lab` by name.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClusterSource {
    /// Kubeconfig of the cluster (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, conflicts_with = "lab")]
    pub context: Option<String>,
    /// The `veilnet lab` with this name instead of a kubeconfig.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub lab: Option<String>,
}

impl ClusterSource {
    /// Runs `read` with a client for this cluster, on a runtime of its own. A lab's API listens
    /// inside its control plane's namespace, so `read` then runs from there.
    pub fn read<T, E, F, Fut>(self, read: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<PolicyCliError> + Send + 'static,
        F: FnOnce(kube::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let on_runtime = move |kubeconfig: Option<PathBuf>, context: Option<String>| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(PolicyCliError::Runtime)?
                .block_on(async {
                    read(kube_client(kubeconfig.as_ref(), context.as_deref()).await?).await
                })
        };
        match self.lab {
            Some(name) => {
                let lab = crate::lab_paths::LabPaths::new(&name).map_err(PolicyCliError::from)?;
                let kubeconfig = lab.kubeconfig();
                if !kubeconfig.exists() {
                    return Err(PolicyCliError::LabNotUp { name, kubeconfig }.into());
                }
                crate::netns::run_in(&lab.control_plane_netns(), move || {
                    on_runtime(Some(kubeconfig), None)
                })
                .map_err(PolicyCliError::from)?
            }
            None => on_runtime(self.kubeconfig, self.context),
        }
    }
}

/// Runs the command and returns what to print.
pub fn run(cmd: PolicyCommand) -> Result<String, PolicyCliError> {
    let PolicyCommand::Explain(args) = cmd;
    let (port, protocol) = parse_port(&args.port)?;
    let (state, node_addrs) = args.cluster.clone().read(fetch)?;
    let from = resolve(&state, &args.from)?;
    let to = resolve(&state, &args.to)?;
    let explanation = Explainer::new(&state)
        .with_node_addrs(&node_addrs)
        .explain(from, to, port, protocol);
    Ok(if args.json {
        explanation_json(&explanation).to_string()
    } else {
        explanation.to_string()
    })
}

fn decision_json(d: &Decision) -> serde_json::Value {
    let refs = |l: &[super::ObjectRef]| l.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    let (allowed, by, isolated_by) = match d {
        Decision::Allowed { by, isolated_by } => (
            true,
            by.iter()
                .map(|r| serde_json::json!({"policy": r.policy.to_string(), "rule": r.rule_index}))
                .collect(),
            refs(isolated_by),
        ),
        Decision::Denied { isolated_by } => (false, Vec::new(), refs(isolated_by)),
        _ => (true, Vec::new(), Vec::new()),
    };
    serde_json::json!({"allowed": allowed, "reason": d.to_string(), "allowedBy": by, "isolatedBy": isolated_by})
}

/// The explanation as JSON (for scripts and tests).
pub fn explanation_json(e: &Explanation) -> serde_json::Value {
    let side = |ep: &Endpoint, ip: &IpAddr| match ep {
        Endpoint::Pod { pod, node } => {
            serde_json::json!({"ip": ip, "namespace": pod.namespace, "pod": pod.name, "node": node})
        }
        Endpoint::External => serde_json::json!({"ip": ip}),
    };
    serde_json::json!({
        "from": side(&e.from, &e.from_ip),
        "to": side(&e.to, &e.to_ip),
        "port": e.port,
        "protocol": e.protocol.to_string(),
        "egress": decision_json(&e.egress),
        "ingress": decision_json(&e.ingress),
        "allowed": e.allowed(),
        "verdict": e.verdict(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_endpoints_parse() {
        assert_eq!(parse_port("80").unwrap(), (80, Protocol::Tcp));
        assert_eq!(parse_port("53/udp").unwrap(), (53, Protocol::Udp));
        assert_eq!(parse_port("9/SCTP").unwrap(), (9, Protocol::Sctp));
        for bad in ["", "0", "70000", "80/icmp", "x/tcp"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        let state = crate::policy::testutil::e2e_state(Vec::new());
        assert_eq!(
            resolve(&state, "y/b").unwrap(),
            crate::policy::testutil::ip_of("y", "b")
        );
        assert_eq!(
            resolve(&state, "192.0.2.1").unwrap().to_string(),
            "192.0.2.1"
        );
        assert!(matches!(
            resolve(&state, "q/z"),
            Err(PolicyCliError::NoSuchPod(_))
        ));
        assert!(resolve(&state, "nonsense").is_err());
    }

    #[test]
    fn json_names_the_deciding_policy() {
        let deny = crate::policy::testutil::policy(serde_json::json!({
            "metadata": {"namespace": "x", "name": "only-b"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}
        }));
        let state = crate::policy::testutil::e2e_state(vec![deny]);
        let ip = |n, p| crate::policy::testutil::ip_of(n, p);
        let mut ex = Explainer::new(&state);
        let ok = explanation_json(&ex.explain(ip("x", "b"), ip("x", "a"), 80, Protocol::Tcp));
        assert_eq!(ok["allowed"], true);
        assert_eq!(ok["ingress"]["allowedBy"][0]["policy"], "x/only-b");
        let no = explanation_json(&ex.explain(ip("x", "c"), ip("x", "a"), 80, Protocol::Tcp));
        assert_eq!(no["allowed"], false);
        assert_eq!(no["ingress"]["isolatedBy"][0], "x/only-b");
        assert_eq!(no["from"]["pod"], "c");
    }
}
