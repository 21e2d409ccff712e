//! `veilnet doctor`: preflight and health checks for one node, each one line with a verdict
//! (OK / WARN / FAIL), the evidence, and the fix.
//!
//! Split as everywhere else: each concern's file has a `gather` (reads the node: files, sysctls,
//! sockets; the only impure part) and a `check` (a pure function from what was gathered to
//! [`Check`]s, unit-tested without root). [`run_checks`] calls them in order.
//!
//! Where the checks run: on the node itself (the defaults are the agent's), in a lab node
//! (`--lab NAME --node N`: the node's namespace and directories), or for every node through the
//! API (`--all-nodes`, `kubectl veilnet doctor`, and `--lab NAME` without `--node`): each agent
//! serves its own report on its metrics port (`GET /doctor`, [`endpoint`]), [`remote`] fetches
//! them.

pub mod agent;
pub mod clock;
pub mod cni;
pub mod datapath;
pub mod endpoint;
pub mod kernel;
pub mod keys;
pub mod mtu;
pub mod nftables;
pub mod ports;
pub mod remote;
pub mod sysctl;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::config;
use crate::lab_paths::{InvalidLabName, LabPaths};

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    LabName(#[from] InvalidLabName),
    #[error("{node} is not a lab node name (node-1, node-2, …)")]
    LabNode { node: String },
    #[error("--node names a lab node (with --lab) or one node of --all-nodes")]
    NodeWithoutScope,
    #[error("kubernetes API: {0}")]
    Api(String),
    #[error("no Node named {node} in the cluster")]
    NoSuchNode { node: String },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("failed to encode the report: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("failed to write the report: {0}")]
    Write(#[from] std::io::Error),
}

/// How bad one finding is. Ordered: the worst of a report is its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// Stable, dotted name (`kernel.vxlan`, `cni.conflict`, `agent.up`): what scripts match on.
    pub name: String,
    pub verdict: Verdict,
    /// What was found, in one line: the evidence.
    pub evidence: String,
    /// What to do about it (absent when OK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &str, evidence: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            verdict: Verdict::Ok,
            evidence: evidence.into(),
            fix: None,
        }
    }
    pub fn warn(name: &str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            verdict: Verdict::Warn,
            evidence: evidence.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn fail(name: &str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            verdict: Verdict::Fail,
            evidence: evidence.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every finding for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub node: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn worst(&self) -> Verdict {
        self.checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Ok)
    }
}

/// Exit status for a set of reports: 0 when nothing failed, 1 on any FAIL (warnings pass).
pub fn exit_code(reports: &[Report]) -> i32 {
    i32::from(reports.iter().any(|r| r.worst() == Verdict::Fail))
}

/// The text rendering: one line per check, the fix indented under anything not OK.
pub fn render(reports: &[Report]) -> String {
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(s, "node {}", r.node);
        let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &r.checks {
            let _ = writeln!(
                s,
                "  {:<4}  {:<width$}  {}",
                c.verdict.as_str(),
                c.name,
                c.evidence
            );
            if let Some(fix) = &c.fix {
                let _ = writeln!(s, "        {:<width$}  fix: {fix}", "");
            }
        }
        let count = |v| r.checks.iter().filter(|c| c.verdict == v).count();
        let _ = writeln!(
            s,
            "  {} OK, {} WARN, {} FAIL",
            count(Verdict::Ok),
            count(Verdict::Warn),
            count(Verdict::Fail)
        );
    }
    s
}

/// Where the node's files and sockets are: the agent's own settings.
#[derive(Debug, Clone)]
pub struct Context {
    pub node: String,
    /// The node's network namespace when it is not the caller's (a lab node).
    pub netns: Option<String>,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub vxlan_port: u16,
    pub wireguard_port: u16,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// For the checks against the API (clock skew); none when absent.
    pub kubeconfig: Option<PathBuf>,
    /// Without a kubeconfig, reach the API as a pod does (the in-cluster service account): the
    /// agent's own `/doctor` in a DaemonSet. Off for the command, where no API is no check.
    pub in_cluster_api: bool,
    /// The namespace the API is reached from when not the caller's (a lab's control plane).
    pub api_netns: Option<String>,
    /// Send DF probes to each peer at the pod MTU's wire size (`--no-probe` turns it off).
    pub probe_mtu: bool,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The agent's run directory (status file, datapath socket).
    #[arg(long, env = "VEILNET_RUN_DIR", default_value = config::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// The agent's state directory (its WireGuard key).
    #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The CNI configuration directory the container runtime reads.
    #[arg(long, default_value = config::DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The VXLAN UDP port the agent uses.
    #[arg(long, default_value_t = config::DEFAULT_VXLAN_PORT)]
    pub vxlan_port: u16,
    /// The WireGuard UDP port the datapath listens on.
    #[arg(long, default_value_t = crate::model::encryption::DEFAULT_WG_PORT)]
    pub wireguard_port: u16,
    /// The agent's health address.
    #[arg(long, default_value = config::DEFAULT_HEALTH_ADDR)]
    pub health_addr: SocketAddr,
    /// The agent's metrics address.
    #[arg(long, default_value = config::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// This node's name (for the report; the status file's name when omitted).
    #[arg(long)]
    pub node_name: Option<String>,
    /// A kubeconfig: for the checks against the API (clock skew), and for --all-nodes.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context for --all-nodes (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
    /// Every node's report, through the API: the Nodes' InternalIPs, each agent's `/doctor` on
    /// its metrics port (--metrics-addr's port).
    #[arg(long, conflicts_with = "lab")]
    pub all_nodes: bool,
    /// In a lab: the lab's name; with --node that node's checks, run here, else every node's
    /// report through the lab's API.
    #[arg(long)]
    pub lab: Option<String>,
    /// The node: a lab node (with --lab, e.g. node-1), or the one node of --all-nodes.
    #[arg(long)]
    pub node: Option<String>,
    /// Skip the DF path probes to peers.
    #[arg(long)]
    pub no_probe: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Where the checks of one invocation run.
#[derive(Debug)]
pub enum Scope {
    /// Here, on this node (or in a lab node's namespace and directories).
    Local(Box<Context>),
    /// Every node's agent, through the API; from inside `netns` when set (a lab's API).
    AllNodes {
        remote: remote::Remote,
        netns: Option<String>,
    },
}

impl Context {
    /// The agent's own settings: what its `/doctor` endpoint checks.
    pub fn of_agent(cfg: &crate::agent::config::AgentConfig) -> Context {
        Context {
            node: cfg.node_name.clone(),
            netns: None,
            run_dir: cfg.run_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            cni_conf_dir: cfg.cni_conf_dir.clone(),
            vxlan_port: cfg.vxlan_port,
            wireguard_port: cfg.wireguard_port,
            health_addr: cfg.health_addr,
            metrics_addr: cfg.metrics_addr,
            kubeconfig: cfg.kubeconfig.clone(),
            in_cluster_api: cfg.kubeconfig.is_none(),
            api_netns: None,
            probe_mtu: true,
        }
    }
}

impl DoctorArgs {
    pub fn scope(&self) -> Result<Scope, DoctorError> {
        let remote = |kubeconfig: Option<PathBuf>, node: Option<String>| remote::Remote {
            kubeconfig,
            context: self.context.clone(),
            metrics_port: self.metrics_addr.port(),
            node,
        };
        match (&self.lab, self.all_nodes) {
            (Some(lab), _) if self.node.is_none() => {
                let paths = LabPaths::new(lab)?;
                Ok(Scope::AllNodes {
                    remote: remote(Some(paths.kubeconfig()), None),
                    netns: Some(paths.control_plane_netns()),
                })
            }
            (_, true) => Ok(Scope::AllNodes {
                remote: remote(self.kubeconfig.clone(), self.node.clone()),
                netns: None,
            }),
            (None, false) if self.node.is_some() => Err(DoctorError::NodeWithoutScope),
            _ => Ok(Scope::Local(Box::new(self.context()?))),
        }
    }

    pub fn context(&self) -> Result<Context, DoctorError> {
        let mut ctx = Context {
            node: self.node_name.clone().unwrap_or_default(),
            netns: None,
            run_dir: self.run_dir.clone(),
            state_dir: self.state_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            vxlan_port: self.vxlan_port,
            wireguard_port: self.wireguard_port,
            health_addr: self.health_addr,
            metrics_addr: self.metrics_addr,
            kubeconfig: self.kubeconfig.clone(),
            in_cluster_api: false,
            api_netns: None,
            probe_mtu: !self.no_probe,
        };
        if let (Some(lab), Some(node)) = (&self.lab, &self.node) {
            let paths = LabPaths::new(lab)?;
            ctx.netns = Some(
                paths
                    .node_netns(node)
                    .ok_or_else(|| DoctorError::LabNode { node: node.clone() })?,
            );
            ctx.node = node.clone();
            ctx.run_dir = paths.node_run_dir(node);
            ctx.state_dir = paths.node_state_dir(node);
            ctx.cni_conf_dir = paths.node_cni_conf_dir(node);
            // The lab's agents serve metrics on the node's address (any address matches there).
            if ctx.kubeconfig.is_none() {
                ctx.kubeconfig = Some(paths.kubeconfig());
            }
            // The lab's API listens inside its control plane's namespace.
            ctx.api_netns = Some(paths.control_plane_netns());
        }
        Ok(ctx)
    }
}

/// Every check for the node `ctx` describes, in a fixed order.
pub fn run_checks(ctx: &Context) -> Report {
    let mut checks = Vec::new();
    let agent = agent::gather(ctx);
    checks.extend(agent::check(&agent, jiff::Timestamp::now()));
    let status = agent.status.as_ref();
    let agent_up = cni::agent_up(&agent, jiff::Timestamp::now());
    let datapath = datapath::gather(ctx);
    checks.extend(datapath::check(&datapath, status));
    checks.extend(keys::check(&keys::gather(ctx), status));
    let datapath_offloads = status
        .and_then(|s| s.datapath.as_ref())
        .and_then(|d| d.offloads.clone());
    checks.extend(kernel::check(&kernel::gather(ctx, datapath_offloads)));
    checks.extend(cni::check(&cni::gather(ctx), agent_up));
    checks.extend(sysctl::check(&sysctl::gather(ctx)));
    checks.extend(nftables::check(&nftables::gather(ctx), status));
    let datapath_port = datapath
        .info
        .as_ref()
        .ok()
        .and_then(|i| i.device.as_ref())
        .map(|d| d.listen_port);
    checks.extend(ports::check(&ports::gather(ctx), agent_up, datapath_port));
    checks.extend(mtu::check(&mtu::gather(ctx, status), status));
    checks.extend(clock::check(&clock::gather(ctx)));
    let node = if ctx.node.is_empty() {
        agent
            .status
            .as_ref()
            .map(|s| s.node.clone())
            .unwrap_or_else(|| "(unknown)".to_string())
    } else {
        ctx.node.clone()
    };
    Report { node, checks }
}

/// Every node's report through the API (blocking; from inside `netns` when set).
pub fn fetch_all(
    remote: remote::Remote,
    netns: Option<String>,
) -> Result<Vec<Report>, DoctorError> {
    let work = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DoctorError::Runtime)?
            .block_on(remote::reports(&remote))
    };
    match netns {
        Some(ns) => crate::netns::run_in(&ns, work)?,
        None => work(),
    }
}

/// `veilnet doctor`: prints the report(s) and returns the exit status.
pub fn run(args: DoctorArgs) -> Result<i32, DoctorError> {
    let reports = match args.scope()? {
        Scope::Local(ctx) => vec![run_checks(&ctx)],
        Scope::AllNodes { remote, netns } => fetch_all(remote, netns)?,
    };
    if args.json {
        crate::stdout::println(&serde_json::to_string_pretty(&reports)?)?;
    } else {
        crate::stdout::print(&render(&reports))?;
    }
    Ok(exit_code(&reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_fail_fails_and_warnings_pass() {
        let report = |checks| Report {
            node: "n".into(),
            checks,
        };
        let ok = report(vec![Check::ok("a", "fine")]);
        let warn = report(vec![
            Check::ok("a", "fine"),
            Check::warn("b", "meh", "do x"),
        ]);
        let fail = report(vec![Check::fail("c", "broken", "do y"), Check::ok("a", "")]);
        assert_eq!(exit_code(&[ok.clone(), warn.clone()]), 0);
        assert_eq!(exit_code(&[ok, fail.clone()]), 1);
        assert_eq!(warn.worst(), Verdict::Warn);
        assert_eq!(fail.worst(), Verdict::Fail);
    }

    #[test]
    fn render_puts_the_fix_under_the_finding() {
        let r = Report {
            node: "node-1".into(),
            checks: vec![
                Check::ok("agent.up", "status written 3s ago"),
                Check::fail("cni.conflict", "05-other.conf sorts first", "remove it"),
            ],
        };
        let text = render(&[r]);
        assert!(
            text.contains("  OK    agent.up      status written 3s ago\n"),
            "{text}"
        );
        assert!(
            text.contains("  FAIL  cni.conflict  05-other.conf sorts first\n"),
            "{text}"
        );
        assert!(text.contains("fix: remove it"), "{text}");
        assert!(text.contains("1 OK, 0 WARN, 1 FAIL"), "{text}");
    }

    #[test]
    fn json_verdicts_are_upper_case() {
        let c = Check::warn("x", "e", "f");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["verdict"], "WARN");
        assert_eq!(v["fix"], "f");
        assert!(serde_json::to_value(Check::ok("x", "e"))
            .unwrap()
            .get("fix")
            .is_none());
    }
}
