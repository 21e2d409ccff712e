//! `veilnet doctor --all-nodes` and `kubectl veilnet doctor`: every node's report through the
//! API. The API lists the Nodes; each node's agent serves its own report on its metrics port
//! (`GET /doctor`, see [`super::endpoint`]), fetched from each Node's InternalIP in parallel. A
//! node whose agent does not answer gets one FAIL saying so: that is the finding.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Check, DoctorError, Report};
use crate::agent::snapshot::recorded_addresses;

/// The name of the one check a node gets when its agent's report cannot be fetched.
pub const UNREACHABLE: &str = "agent.reachable";
/// Connecting to an agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole request: the agent answers within its own deadline (12 s), under the listener's
/// 15 s connection lifetime.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(16);
/// Bound on a report's size (a few KiB in practice).
const MAX_BODY: u64 = 1 << 20;

/// Which cluster and nodes.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// The agents' metrics port (`--metrics-addr`'s port, 9892 by default).
    pub metrics_port: u16,
    /// Only this node (all when `None`).
    pub node: Option<String>,
}

/// Lists the Nodes and fetches every agent's report, sorted by node name.
pub async fn reports(remote: &Remote) -> Result<Vec<Report>, DoctorError> {
    let client =
        crate::policy::cli::kube_client(remote.kubeconfig.as_ref(), remote.context.as_deref())
            .await
            .map_err(|e| DoctorError::Api(e.to_string()))?;
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .map_err(|e| DoctorError::Api(e.to_string()))?;
    let mut wanted: Vec<(String, Option<IpAddr>)> = nodes
        .items
        .iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            (name, internal_ip(n))
        })
        .filter(|(name, _)| remote.node.as_ref().is_none_or(|want| want == name))
        .collect();
    if let Some(want) = &remote.node {
        if wanted.is_empty() {
            return Err(DoctorError::NoSuchNode { node: want.clone() });
        }
    }
    wanted.sort();
    let port = remote.metrics_port;
    let fetches = wanted.into_iter().map(|(name, ip)| async move {
        let Some(ip) = ip else {
            return unreachable(&name, "the Node records no InternalIP".to_string());
        };
        let addr = SocketAddr::new(ip, port);
        match fetch(addr).await {
            Ok(mut report) => {
                // The agent names itself; the API's name is the one the operator asked about.
                report.node = name;
                report
            }
            Err(why) => unreachable(&name, format!("GET http://{addr}/doctor: {why}")),
        }
    });
    Ok(futures::future::join_all(fetches).await)
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    let internal = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok());
    internal.or_else(|| recorded_addresses(node).into_iter().next())
}

fn unreachable(node: &str, evidence: String) -> Report {
    Report {
        node: node.to_string(),
        checks: vec![Check::fail(
            UNREACHABLE,
            evidence,
            "the agent is down or its metrics port is not reachable from here: `kubectl -n veilnet-system get pods -o wide`, then `veilnet doctor` on that node",
        )],
    }
}

/// One `GET /doctor` over plain HTTP/1.1 (the metrics listener speaks nothing else).
async fn fetch(addr: SocketAddr) -> Result<Report, String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    let exchange = async {
        stream
            .write_all(
                format!("GET /doctor HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.take(MAX_BODY).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    parse_response(&raw)
}

/// The report in an HTTP response (status line, headers, JSON body).
fn parse_response(raw: &[u8]) -> Result<Report, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        let line = head.lines().next().unwrap_or("");
        return Err(format!("{line}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|e| format!("not a doctor report ({e}): an older agent?"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    #[test]
    fn a_report_is_read_from_the_response() {
        let body =
            r#"{"node":"node-2","checks":[{"name":"agent.up","verdict":"OK","evidence":"up"}]}"#;
        let raw = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{body}");
        let r = parse_response(raw.as_bytes()).unwrap();
        assert_eq!(r.checks[0].verdict, Verdict::Ok);
        let err = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert!(err.contains("404"), "{err}");
        let err = parse_response(b"HTTP/1.1 200 OK\r\n\r\n# HELP metrics").unwrap_err();
        assert!(err.contains("older agent"), "{err}");
        assert!(parse_response(b"garbage").is_err());
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_is_a_fail() {
        // A port nobody listens on (bound, then closed).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch(addr).await.unwrap_err();
        let r = unreachable("node-9", format!("GET http://{addr}/doctor: {err}"));
        assert_eq!(r.worst(), Verdict::Fail);
        assert!(
            r.checks[0].evidence.contains("refused"),
            "{:?}",
            r.checks[0]
        );
    }
}
