//! Where `veilnet observe` reads each node's flow log: a lab's files, or each agent's flows
//! endpoint through the API server's proxy.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::Api;

use crate::lab_paths::LabPaths;
use crate::policy::cli::PolicyCliError;

/// The agents' flows port by default (`--flows-addr`).
pub const DEFAULT_FLOWS_PORT: u16 = 9893;
/// The agent pods' labels in the manifest.
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=veilnet,app.kubernetes.io/component=agent";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Cluster(#[from] PolicyCliError),
    #[error("lab {name}: no nodes under {dir} (is it up? `veilnet lab up --name {name}`)")]
    NoLabNodes { name: String, dir: PathBuf },
    #[error("reading {dir}: {source}")]
    LabDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("kubernetes API: listing {what}: {}", api_message(source))]
    List {
        what: &'static str,
        source: kube::Error,
    },
}

/// The API server's own words for a refusal, not the whole status object.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// Each node's answer: its flow lines, or why they could not be read.
pub type PerNode = Vec<(String, Result<String, String>)>;

pub enum Source {
    Lab(LabPaths),
    Cluster {
        runtime: tokio::runtime::Runtime,
        client: kube::Client,
        port: u16,
        agent_namespace: String,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Lab(l) => write!(f, "lab {}", l.name()),
            Source::Cluster { port, .. } => write!(f, "cluster (flows port {port})"),
        }
    }
}

impl Source {
    pub fn new(
        lab: Option<String>,
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
        port: u16,
        agent_namespace: String,
    ) -> Result<Source, SourceError> {
        if let Some(name) = lab {
            return Ok(Source::Lab(
                LabPaths::new(&name).map_err(PolicyCliError::from)?,
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SourceError::Runtime)?;
        let client = runtime.block_on(crate::policy::cli::kube_client(
            kubeconfig.as_ref(),
            context.as_deref(),
        ))?;
        Ok(Source::Cluster {
            runtime,
            client,
            port,
            agent_namespace,
        })
    }

    /// Every node's lines at or after `since`.
    pub fn fetch(&self, since: Option<jiff::Timestamp>) -> Result<PerNode, SourceError> {
        match self {
            Source::Lab(lab) => lab_fetch(lab, since),
            Source::Cluster {
                runtime,
                client,
                port,
                agent_namespace,
            } => runtime.block_on(cluster_fetch(client, *port, agent_namespace, since)),
        }
    }
}

fn lab_fetch(lab: &LabPaths, since: Option<jiff::Timestamp>) -> Result<PerNode, SourceError> {
    let dir = lab.root().join("nodes");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::NoLabNodes {
                name: lab.name().to_string(),
                dir,
            })
        }
        Err(source) => return Err(SourceError::LabDir { dir, source }),
    };
    let mut nodes: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    if nodes.is_empty() {
        return Err(SourceError::NoLabNodes {
            name: lab.name().to_string(),
            dir,
        });
    }
    Ok(nodes
        .into_iter()
        .map(|node| {
            let path = lab.node_run_dir(&node).join("flows.jsonl");
            let text = crate::agent::flows::read_lines(&path, since)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| format!("{}: {e}", path.display()));
            (node, text)
        })
        .collect())
}

/// The proxy path of every agent: its pod's where agent pods exist, else its node's.
async fn proxy_targets(
    client: &kube::Client,
    port: u16,
    agent_namespace: &str,
) -> Result<Vec<(String, String)>, SourceError> {
    let pods = Api::<Pod>::namespaced(client.clone(), agent_namespace)
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await;
    let pods = match pods {
        Ok(list) => list.items,
        // Not allowed to list pods there: try the nodes.
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => Vec::new(),
        Err(source) => {
            return Err(SourceError::List {
                what: "agent pods",
                source,
            })
        }
    };
    let mut targets: Vec<(String, String)> = pods
        .iter()
        .filter_map(|p| {
            let name = p.metadata.name.as_deref()?;
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some((
                node,
                format!("/api/v1/namespaces/{agent_namespace}/pods/{name}:{port}/proxy/flows"),
            ))
        })
        .collect();
    if targets.is_empty() {
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|source| SourceError::List {
                what: "nodes",
                source,
            })?;
        targets = nodes
            .items
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .map(|n| {
                let path = format!("/api/v1/nodes/{n}:{port}/proxy/flows");
                (n, path)
            })
            .collect();
    }
    targets.sort();
    Ok(targets)
}

async fn cluster_fetch(
    client: &kube::Client,
    port: u16,
    agent_namespace: &str,
    since: Option<jiff::Timestamp>,
) -> Result<PerNode, SourceError> {
    let targets = proxy_targets(client, port, agent_namespace).await?;
    let query = since.map_or_else(String::new, |t| format!("?since={t}"));
    let mut out = Vec::new();
    for (node, path) in targets {
        let request = http::Request::get(format!("{path}{query}")).body(Vec::new());
        let text = match request {
            Ok(r) => client.request_text(r).await.map_err(|e| match e {
                kube::Error::Api(s) if s.code == 403 => format!(
                    "forbidden: {} (reading flows needs get on pods/proxy in the agent \
                     namespace, or nodes/proxy: README \"veilnet observe\")",
                    s.message
                ),
                other => api_message(&other),
            }),
            Err(e) => Err(e.to_string()),
        };
        out.push((node, text));
    }
    Ok(out)
}
