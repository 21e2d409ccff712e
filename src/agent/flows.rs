//! The flows endpoint (`--flows-addr`, default `0.0.0.0:9893`): `GET /flows?since=T` answers
//! this node's flow log (`<runDir>/flows.jsonl` and its rotated `.1`), oldest first, as JSON
//! lines, for `veilnet observe`.
//!
//! Who may read it: the flow log names every pod's peers, so **no pod may**. Each connection's
//! source is checked before a byte is read: an address in any node's pod CIDR (this node's and
//! every accepted peer's, from the agent's plan) or in the cluster CIDR is closed at once and counted
//! (`veilnet_connections_refused_total{listener="flows"}`). Pods cannot forge another source
//! (anti-spoofing), and their traffic to a node's address is never masqueraded (it rides the
//! pair's path with its own source), so the check sees the pod. Until the first plan names the
//! pod CIDRs only loopback is served. What remains is the host network of the nodes and the
//! underlay: operators read it through the API server's pod or node proxy
//! (`pods/proxy` in the agent's namespace, or `nodes/proxy`), which Kubernetes authorizes.

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ipnet::IpNet;
use serde::Deserialize;

use super::policy::paths::PairPaths;

pub const DEFAULT_FLOWS_ADDR: &str = "0.0.0.0:9893";

/// One answer holds at most this many bytes of lines (the newest are kept): two full files.
const MAX_ANSWER_BYTES: usize = 40 << 20;

/// Whether a connection from `source` may read the flows (pure; see the module documentation).
/// `cluster_cidr` is refused too: a pod of a node whose record the plan rejected is in no accepted
/// pod CIDR, but it is in the cluster's.
pub fn admits(pairs: &PairPaths, cluster_cidr: &IpNet, source: IpAddr) -> bool {
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
        v4 => v4,
    };
    if source.is_loopback() {
        return true;
    }
    // No plan yet: we cannot tell pods from hosts, so refuse all but the node itself.
    !pairs.pod_cidrs.is_empty() && !pairs.is_pod_address(&source) && !cluster_cidr.contains(&source)
}

#[derive(Debug, Deserialize)]
struct FlowsQuery {
    /// RFC 3339; lines older than it are left out.
    since: Option<String>,
}

/// `/flows`, over the flow log at `path`.
pub fn router(path: PathBuf) -> Router {
    Router::new()
        .route("/flows", get(flows))
        .with_state(Arc::new(path))
}

async fn flows(State(path): State<Arc<PathBuf>>, Query(q): Query<FlowsQuery>) -> Response {
    let since = match q.since.as_deref().map(str::parse::<jiff::Timestamp>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("since: not an RFC 3339 time ({e})\n"),
            )
                .into_response()
        }
    };
    let path = (*path).clone();
    match tokio::task::spawn_blocking(move || read_lines(&path, since)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the flow log: {e}\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The lines of the rotated file, then the current one, at or after `since`, within
/// [`MAX_ANSWER_BYTES`] (the oldest dropped first). A missing file is no lines.
pub fn read_lines(path: &Path, since: Option<jiff::Timestamp>) -> std::io::Result<Vec<u8>> {
    let mut out = std::collections::VecDeque::new();
    let mut bytes = 0usize;
    for file in [path.with_extension("jsonl.1"), path.to_path_buf()] {
        let f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // The writer rotates past 16 MiB; a file far beyond that is not ours to stream.
        let reader = BufReader::new(f.take((MAX_ANSWER_BYTES / 2) as u64 + (1 << 20)));
        for line in reader.split(b'\n') {
            let line = line?;
            if line.is_empty() || !at_or_after(&line, since) {
                continue;
            }
            bytes += line.len() + 1;
            out.push_back(line);
            while bytes > MAX_ANSWER_BYTES {
                match out.pop_front() {
                    Some(old) => bytes -= old.len() + 1,
                    None => break,
                }
            }
        }
    }
    let mut body = Vec::with_capacity(bytes);
    for line in out {
        body.extend(line);
        body.push(b'\n');
    }
    Ok(body)
}

/// A line's `time` is at or after `since` (lines without a readable time are kept: the reader
/// decides what to do with them).
fn at_or_after(line: &[u8], since: Option<jiff::Timestamp>) -> bool {
    let Some(since) = since else {
        return true;
    };
    #[derive(Deserialize)]
    struct Time {
        time: String,
    }
    match serde_json::from_slice::<Time>(line)
        .ok()
        .and_then(|t| t.time.parse::<jiff::Timestamp>().ok())
    {
        Some(t) => t >= since,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> PairPaths {
        PairPaths {
            me: "node-1".into(),
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "10.244.2.0/24".parse().unwrap(),
            ],
            ..Default::default()
        }
    }

    fn cluster() -> IpNet {
        "10.244.0.0/16".parse().unwrap()
    }

    #[test]
    fn pods_of_every_node_are_refused_hosts_and_loopback_admitted() {
        let p = pairs();
        // 10.244.9.0/24: a node the plan rejected, still inside the cluster CIDR.
        for pod in [
            "10.244.1.5",
            "10.244.2.9",
            "::ffff:10.244.2.9",
            "10.244.9.3",
        ] {
            assert!(!admits(&p, &cluster(), pod.parse().unwrap()), "{pod}");
        }
        for host in ["172.30.0.12", "127.0.0.1", "::1", "::ffff:172.30.0.1"] {
            assert!(admits(&p, &cluster(), host.parse().unwrap()), "{host}");
        }
    }

    #[test]
    fn before_the_first_plan_only_loopback_is_served() {
        let none = PairPaths::default();
        assert!(admits(&none, &cluster(), "127.0.0.1".parse().unwrap()));
        assert!(!admits(&none, &cluster(), "172.30.0.12".parse().unwrap()));
    }

    #[test]
    fn lines_come_oldest_first_from_both_files_and_since_cuts_the_older() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        std::fs::write(
            path.with_extension("jsonl.1"),
            "{\"time\":\"2026-01-01T00:00:00Z\",\"n\":1}\n{\"time\":\"2026-01-01T00:01:00Z\",\"n\":2}\n",
        )
        .unwrap();
        std::fs::write(
            &path,
            "{\"time\":\"2026-01-01T00:02:00Z\",\"n\":3}\nnot json\n",
        )
        .unwrap();
        let all = String::from_utf8(read_lines(&path, None).unwrap()).unwrap();
        assert_eq!(all.lines().count(), 4, "{all}");
        assert!(all.starts_with("{\"time\":\"2026-01-01T00:00:00Z\""));
        let since = "2026-01-01T00:01:00Z".parse().unwrap();
        let some = String::from_utf8(read_lines(&path, Some(since)).unwrap()).unwrap();
        assert_eq!(
            some.lines().collect::<Vec<_>>(),
            [
                "{\"time\":\"2026-01-01T00:01:00Z\",\"n\":2}",
                "{\"time\":\"2026-01-01T00:02:00Z\",\"n\":3}",
                "not json"
            ]
        );
        assert!(read_lines(&dir.path().join("none.jsonl"), None)
            .unwrap()
            .is_empty());
    }
}
