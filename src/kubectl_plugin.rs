//! `kubectl veilnet …`: the `veilnet` binary run as `kubectl-veilnet` (a symlink or copy on PATH,
//! which is how kubectl finds plugins), or as `veilnet kubectl-plugin …`.
//!
//! kubectl hands a plugin its arguments as typed, so `--kubeconfig` and `--context` are parsed
//! here, and the cluster is the one kubectl would use: `--kubeconfig`, else `$KUBECONFIG`, else
//! `~/.kube/config`, with its current context unless `--context` names another.
//!
//! What works through the API: `status` (every Node's veilnet annotations: what its agent
//! published), `explain` (`veilnet policy explain`) and `doctor` (every node's checks, which each
//! agent serves on its metrics port: `veilnet doctor --all-nodes`), `audit` (`veilnet audit`)
//! and `observe` (`veilnet observe`, through the API server's proxy). An agent's live detail —
//! handshakes, byte counters — lives in the node's status file, which only `veilnet status` on
//! that node reads; `status` says so.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::Api;

use crate::model::annotations;
use crate::policy::cli::{ExplainArgs, PolicyCliError, PolicyCommand};

/// The name kubectl runs the plugin by.
pub const PLUGIN_BINARY: &str = "kubectl-veilnet";

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Cluster(#[from] PolicyCliError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Doctor(#[from] crate::doctor::DoctorError),
    #[error(transparent)]
    Audit(#[from] crate::audit::cli::AuditError),
    #[error(transparent)]
    Observe(#[from] crate::observe::ObserveError),
}

impl PluginError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            PluginError::Audit(_) => crate::audit::cli::EXIT_ERROR,
            PluginError::Observe(_) => crate::observe::EXIT_ERROR,
            _ => 1,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "kubectl veilnet",
    bin_name = "kubectl veilnet",
    version,
    about = "veilnet from kubectl: the cluster of the current kubeconfig context"
)]
pub struct PluginCli {
    /// Kubeconfig (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Every node's veilnet state as its agent published it on the Node: pod CIDR, underlay
    /// address, encryption mode, WireGuard key. (Handshakes and counters: `veilnet status` on
    /// the node.)
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain whether FROM may connect to TO on PORT/PROTO (`veilnet policy explain`).
    Explain {
        /// Source: NAMESPACE/POD or an IP address.
        from: String,
        /// Destination: NAMESPACE/POD or an IP address.
        to: String,
        /// PORT/PROTO, e.g. 80/tcp, 53/udp (PORT alone means TCP).
        port: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every node's `veilnet doctor` report (each agent's `/doctor` on its metrics port, at the
    /// Node's InternalIP): exit status 1 if any check FAILs.
    Doctor {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// The agents' metrics port.
        #[arg(long, default_value_t = 9892)]
        metrics_port: u16,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// What weakens isolation in the cluster (`veilnet audit`): exit status 1 when anything is
    /// found.
    Audit {
        /// Also audit the system namespaces.
        #[arg(long)]
        include_system: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Who talked to whom (`veilnet observe`): every node's flow log through the API server's
    /// proxy, merged oldest first and filtered; --follow for new lines.
    Observe(crate::observe::ViewArgs),
}

/// One row of `kubectl veilnet status`.
#[derive(Debug, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub node: String,
    pub pod_cidrs: Option<String>,
    pub underlay_ip: Option<String>,
    /// The mode the agent applies (`veilnet.io/encryption-mode`); none: no agent published yet.
    pub encryption_mode: Option<String>,
    /// The operator's label `veilnet.io/encryption`, if set.
    pub encryption_label: Option<String>,
    pub wg_public_key: Option<String>,
}

impl NodeRow {
    pub fn from_node(node: &Node) -> Self {
        let ann = |k: &str| {
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .cloned()
        };
        let label = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(annotations::ENCRYPTION_LABEL))
            .cloned();
        let spec_cidrs = node.spec.as_ref().and_then(|s| {
            s.pod_cidrs
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| c.join(","))
                .or_else(|| s.pod_cidr.clone())
        });
        NodeRow {
            node: node.metadata.name.clone().unwrap_or_default(),
            pod_cidrs: spec_cidrs.or_else(|| ann(annotations::POD_CIDRS)),
            underlay_ip: ann(annotations::UNDERLAY_IP),
            encryption_mode: ann(annotations::ENCRYPTION_MODE),
            encryption_label: label,
            wg_public_key: ann(annotations::WG_PUBLIC_KEY),
        }
    }
}

/// The table `kubectl veilnet status` prints.
pub fn render_status(rows: &[NodeRow]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<20} {:<18} {:<16} {:<11} {:<6} {}\n",
        "NODE", "POD CIDR", "UNDERLAY", "ENCRYPTION", "LABEL", "WG KEY"
    );
    for r in rows {
        let key = r
            .wg_public_key
            .as_deref()
            .map(|k| format!("{}…", &k[..k.len().min(8)]))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20} {:<18} {:<16} {:<11} {:<6} {}\n",
            r.node,
            dash(&r.pod_cidrs),
            dash(&r.underlay_ip),
            dash(&r.encryption_mode),
            dash(&r.encryption_label),
            key
        ));
    }
    let unpublished = rows.iter().filter(|r| r.encryption_mode.is_none()).count();
    if unpublished > 0 {
        out.push_str(&format!(
            "{unpublished} node(s) without a veilnet agent's annotations (agent not running there yet?)\n"
        ));
    }
    out.push_str(
        "peers, handshakes and counters: `veilnet status` on the node (e.g. kubectl exec into its \
         veilnet-agent pod)\n",
    );
    out
}

/// Runs `kubectl veilnet ARGS…` and returns what to print and the exit status.
pub fn run(cli: PluginCli) -> Result<(String, i32), PluginError> {
    match cli.command {
        PluginCommand::Doctor {
            node,
            metrics_port,
            json,
        } => doctor(
            crate::doctor::remote::Remote {
                kubeconfig: cli.kubeconfig,
                context: cli.context,
                metrics_port,
                node,
            },
            json,
        ),
        // It prints as it reads (--follow never ends), so nothing is left to print after it.
        PluginCommand::Observe(view) => Ok((
            String::new(),
            crate::observe::run(crate::observe::ObserveArgs {
                cluster: crate::policy::cli::ClusterSource {
                    kubeconfig: cli.kubeconfig,
                    context: cli.context,
                    lab: None,
                },
                view,
            })?,
        )),
        PluginCommand::Audit {
            include_system,
            json,
        } => Ok(crate::audit::cli::run(crate::audit::cli::AuditArgs {
            cluster: crate::policy::cli::ClusterSource {
                kubeconfig: cli.kubeconfig,
                context: cli.context,
                lab: None,
            },
            include_system,
            json,
        })?),
        PluginCommand::Explain {
            from,
            to,
            port,
            json,
        } => Ok((
            crate::policy::cli::run(PolicyCommand::Explain(ExplainArgs {
                from,
                to,
                port,
                cluster: crate::policy::cli::ClusterSource {
                    kubeconfig: cli.kubeconfig,
                    context: cli.context,
                    lab: None,
                },
                json,
            }))?,
            0,
        )),
        PluginCommand::Status { json } => {
            let nodes = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(PluginError::Runtime)?
                .block_on(async {
                    let client = crate::policy::cli::kube_client(
                        cli.kubeconfig.as_ref(),
                        cli.context.as_deref(),
                    )
                    .await?;
                    Ok::<_, PluginError>(
                        Api::<Node>::all(client)
                            .list(&ListParams::default())
                            .await?,
                    )
                })?;
            let mut rows: Vec<NodeRow> = nodes.items.iter().map(NodeRow::from_node).collect();
            rows.sort_by(|a, b| a.node.cmp(&b.node));
            let text = if json {
                serde_json::to_string_pretty(&rows)?
            } else {
                render_status(&rows).trim_end().to_string()
            };
            Ok((text, 0))
        }
    }
}

/// `kubectl veilnet doctor`: every node's report; exit status 1 if any check FAILs.
fn doctor(remote: crate::doctor::remote::Remote, json: bool) -> Result<(String, i32), PluginError> {
    use crate::doctor;
    let reports = doctor::fetch_all(remote, None)?;
    let text = if json {
        serde_json::to_string_pretty(&reports)?
    } else {
        doctor::render(&reports).trim_end().to_string()
    };
    Ok((text, doctor::exit_code(&reports)))
}

/// Whether the program was started under the plugin's name (argv\[0\]'s file name).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == PLUGIN_BINARY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_spec_and_annotations() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-1",
                "labels": {"veilnet.io/encryption": "strict"},
                "annotations": {"veilnet.io/underlay-ip": "172.30.0.11",
                    "veilnet.io/encryption-mode": "strict",
                    "veilnet.io/wg-public-key": "axTZ/yEbAAAAAAAA"}},
            "spec": {"podCIDR": "10.244.1.0/24"}
        }))
        .unwrap();
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "node-2"}})).unwrap();
        let rows = vec![NodeRow::from_node(&node), NodeRow::from_node(&bare)];
        assert_eq!(rows[0].pod_cidrs.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(rows[0].encryption_mode.as_deref(), Some("strict"));
        assert_eq!(rows[1].underlay_ip, None);
        let text = render_status(&rows);
        assert!(text.contains("node-1"), "{text}");
        assert!(text.contains("axTZ/yEb…"), "{text}");
        assert!(
            text.contains("1 node(s) without a veilnet agent's annotations"),
            "{text}"
        );
    }

    #[test]
    fn plugin_name_is_the_file_name() {
        assert!(invoked_as_plugin("/usr/local/bin/kubectl-veilnet".as_ref()));
        assert!(invoked_as_plugin("kubectl-veilnet".as_ref()));
        assert!(!invoked_as_plugin("/usr/bin/veilnet".as_ref()));
    }
}
