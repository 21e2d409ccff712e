//! The flow log: packets the ruleset logs to NFLOG group 100 (default denies, anti-spoofing drops,
//! and with `--flow-log-allowed` the first packet of allowed connections), as JSON lines.
//!
//! One line per logged packet (the ruleset rate-limits them):
//!
//! ```json
//! {"time":"2025-01-01T00:00:00Z","node":"node-1","verdict":"deny","direction":"ingress",
//!  "policy":"default deny","pod":"x/a","protocol":"TCP",
//!  "src":{"ip":"10.244.2.5","port":40000,"namespace":"y","pod":"b","node":"node-2"},
//!  "dst":{"ip":"10.244.1.7","port":80,"namespace":"x","pod":"a","node":"node-1"}}
//! ```
//!
//! `verdict` is `allow`, `deny` or `spoof`; `policy` is the deciding `namespace/name` for allows,
//! `default deny` for denies and `anti-spoofing` for spoofed frames; `pod` is the pod whose chain or
//! port decided. Endpoints that are not pods have only `ip` (and `port`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::state::IpIndex;
use super::Shared;
use crate::policy::nflog::{parse_flow, LoggedPacket, NflogError, NflogSocket};
use crate::policy::{parse_prefix, CompileOptions, LogVerdict};

/// The flow log file is rotated (to `<file>.1`) beyond this size.
const MAX_FILE_BYTES: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One flow log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub time: String,
    pub node: String,
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    pub policy: String,
    /// The pod whose chain or port decided (`namespace/name`).
    pub pod: String,
    pub protocol: String,
    pub src: Endpoint,
    pub dst: Endpoint,
}

/// Turns one logged packet into a record (pure). `None` for packets veilnet did not log or
/// cannot read.
pub fn record(
    packet: &LoggedPacket,
    index: &IpIndex,
    node: &str,
    time: String,
) -> Option<FlowRecord> {
    let prefix = parse_prefix(&packet.prefix)?;
    let flow = parse_flow(packet)?;
    let endpoint = |ip: IpAddr, port: Option<u16>| {
        let who = index.pod(&ip);
        Endpoint {
            ip,
            port,
            namespace: who.map(|w| w.pod.namespace.clone()),
            pod: who.map(|w| w.pod.name.clone()),
            node: who.map(|w| w.node.clone()),
        }
    };
    let (verdict, policy) = match prefix.verdict {
        LogVerdict::Allow => ("allow", prefix.object.to_string()),
        LogVerdict::Deny => ("deny", "default deny".to_string()),
        LogVerdict::Spoof => ("spoof", "anti-spoofing".to_string()),
    };
    Some(FlowRecord {
        time,
        node: node.to_string(),
        verdict,
        direction: prefix.direction.map(|d| d.as_str()),
        policy,
        pod: prefix.object.to_string(),
        protocol: flow.protocol.as_str(),
        src: endpoint(flow.src, flow.src_port),
        dst: endpoint(flow.dst, flow.dst_port),
    })
}

/// Stops the reader thread when dropped or stopped.
pub struct FlowLogHandle {
    stop: Arc<AtomicBool>,
}

impl FlowLogHandle {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Subscribes to the ruleset's NFLOG group (in this thread's netns, the node's) and appends
/// records to `path` from a dedicated thread.
pub fn spawn(shared: Arc<Shared>, path: PathBuf) -> Result<FlowLogHandle, NflogError> {
    let group = CompileOptions::default().log_group;
    let mut socket = NflogSocket::open(group, Duration::from_millis(500))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("veilnet-flowlog".into())
        .spawn(move || {
            let mut file = None;
            let mut dropped_reported = false;
            while !stopped.load(Ordering::Relaxed) {
                let packets = match socket.recv() {
                    Ok(p) => p,
                    Err(e) => {
                        // ENOBUFS: the kernel dropped logs faster than we read; keep going.
                        if !dropped_reported {
                            tracing::warn!(error = %e, "flow log: receive failed");
                            dropped_reported = true;
                        }
                        continue;
                    }
                };
                if packets.is_empty() {
                    continue;
                }
                let index = shared
                    .index
                    .read()
                    .map(|i| i.clone())
                    .unwrap_or_else(|e| e.into_inner().clone());
                let now = jiff::Timestamp::now().to_string();
                let mut lines = Vec::new();
                for p in &packets {
                    if let Some(r) = record(p, &index, &shared.options.node, now.clone()) {
                        if let Ok(mut l) = serde_json::to_vec(&r) {
                            l.push(b'\n');
                            lines.extend(l);
                        }
                    }
                }
                if let Err(e) = append(&mut file, &path, &lines) {
                    tracing::warn!(path = %path.display(), error = %e, "flow log: write failed");
                    file = None;
                }
            }
        })
        .map_err(|source| NflogError::Socket {
            op: "spawn reader thread",
            source,
        })?;
    Ok(FlowLogHandle { stop })
}

fn append(file: &mut Option<std::fs::File>, path: &PathBuf, lines: &[u8]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    if file.is_none() || std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE_BYTES) {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE_BYTES) {
            let _ = std::fs::rename(path, path.with_extension("jsonl.1"));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        *file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                // A symlink planted as the flow log is refused, not appended through.
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)?,
        );
    }
    match file {
        Some(f) => f.write_all(lines),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClusterState, PodInfo};

    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            ..Default::default()
        }
    }

    fn tcp_packet(prefix: &str, src: [u8; 4], dst: [u8; 4], dport: u16) -> LoggedPacket {
        let mut payload = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        payload.extend_from_slice(&src);
        payload.extend_from_slice(&dst);
        payload.extend_from_slice(&40000u16.to_be_bytes());
        payload.extend_from_slice(&dport.to_be_bytes());
        payload.extend_from_slice(&[0; 16]);
        LoggedPacket {
            family: 2,
            hw_protocol: 0x0800,
            prefix: prefix.into(),
            payload,
            ..Default::default()
        }
    }

    fn index() -> IpIndex {
        IpIndex::new(&ClusterState {
            pods: vec![
                pod("x", "a", "node-1", "10.244.1.7"),
                pod("y", "b", "node-2", "10.244.2.5"),
            ],
            ..Default::default()
        })
    }

    #[test]
    fn deny_record_names_both_pods_and_the_default_deny() {
        let p = tcp_packet(
            "veilnet:deny:ingress:x/a",
            [10, 244, 2, 5],
            [10, 244, 1, 7],
            80,
        );
        let r = record(&p, &index(), "node-1", "T".into()).unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "T", "node": "node-1", "verdict": "deny", "direction": "ingress",
                "policy": "default deny", "pod": "x/a", "protocol": "TCP",
                "src": {"ip": "10.244.2.5", "port": 40000, "namespace": "y", "pod": "b", "node": "node-2"},
                "dst": {"ip": "10.244.1.7", "port": 80, "namespace": "x", "pod": "a", "node": "node-1"},
            })
        );
    }

    #[test]
    fn allow_names_the_policy_and_unknown_ips_stay_bare() {
        let p = tcp_packet(
            "veilnet:allow:egress:x/to-dns",
            [10, 244, 1, 7],
            [8, 8, 8, 8],
            53,
        );
        let r = record(&p, &index(), "node-1", "T".into()).unwrap();
        assert_eq!((r.verdict, r.policy.as_str()), ("allow", "x/to-dns"));
        assert_eq!(r.direction, Some("egress"));
        assert_eq!(r.dst.pod, None);
        assert!(!serde_json::to_string(&r.dst).unwrap().contains("namespace"));
        // Spoofing: no direction, the forged source is reported as it came.
        let p = tcp_packet("veilnet:spoof:y/b", [10, 244, 1, 7], [10, 244, 2, 1], 80);
        let r = record(&p, &index(), "node-2", "T".into()).unwrap();
        assert_eq!(
            (r.verdict, r.policy.as_str(), r.pod.as_str()),
            ("spoof", "anti-spoofing", "y/b")
        );
        assert_eq!(r.direction, None);
        // Foreign prefixes and unreadable payloads give nothing.
        assert!(record(
            &tcp_packet("other", [1; 4], [2; 4], 1),
            &index(),
            "n",
            "T".into()
        )
        .is_none());
        let mut junk = tcp_packet("veilnet:deny:ingress:x/a", [1; 4], [2; 4], 1);
        junk.payload.truncate(3);
        assert!(record(&junk, &index(), "n", "T".into()).is_none());
    }
}
