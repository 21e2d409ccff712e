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
//! `verdict` is `allow`, `deny`, `spoof`, `vxlan-rejected`, `dns-untrusted`, `dns` or `egress`
//! (a watched pod's new connection to outside the cluster, policy `new-destination watch`); `policy` is the deciding
//! `namespace/name` for allows, `default deny` for denies, `anti-spoofing` for spoofed frames and
//! `vxlan source check` for rejected VXLAN; `pod` is the pod whose chain or port decided (none for
//! VXLAN). Endpoints that are not pods have only `ip` (and `port`). A rejected VXLAN datagram's
//! `src` and `dst` are its *outer* addresses (who sent it on the underlay); `reason` says which
//! check failed and `inner` holds the encapsulated packet's addresses when they can be read.
//! Spoofed frames that carry no IP or ARP (say LLDP to `01:80:c2:00:00:0e`) are logged by MAC:
//! `"protocol":"ether-0x88cc"`, `"src":{"mac":…}`, `"dst":{"mac":…}`. A rejected VXLAN line:
//!
//! ```json
//! {"time":"…","node":"node-1","verdict":"vxlan-rejected","policy":"vxlan source check",
//!  "reason":"not-a-vxlan-peer","protocol":"UDP","src":{"ip":"172.30.0.99","port":40000},
//!  "dst":{"ip":"172.30.0.11","port":8472},"inner":{"src":"10.244.2.5","dst":"10.244.1.7"}}
//! ```

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::paths::PairPaths;
use super::state::IpIndex;
use super::Shared;
use crate::agent::alerts::Observation;
use crate::netfilter::nflog::{LoggedPacket, NflogSocket};
use crate::netfilter::NetfilterError;
use crate::policy::flow::parse_flow;
use crate::policy::ObjectRef;
use crate::policy::{parse_prefix, CompileOptions, LogVerdict};

/// Why the flow log could not start.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error("NFLOG: {0}")]
    Nflog(#[from] NetfilterError),
    #[error("cannot start the flow log reader thread: {0}")]
    Thread(std::io::Error),
}

/// The flow log file is rotated (to `<file>.1`) beyond this size.
const MAX_FILE_BYTES: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Only for frames without IP or ARP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
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
    /// The nodes of the two ends (pods by the pod index, host-network addresses by the node
    /// list): present when both are known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodePair>,
    /// The pair's path as this node's plan has it: `local` (same node), `wireguard`, `vxlan`
    /// or `blocked`; absent when an end is outside the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The packet travelled between two nodes over WireGuard.
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    pub policy: String,
    /// The pod whose chain or port decided (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Why a VXLAN datagram was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub protocol: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The encapsulated packet's addresses (rejected VXLAN only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner: Option<InnerAddresses>,
    /// The query of a DNS line, when its datagram could be read (TCP's first segment, the SYN,
    /// carries none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsQuery>,
}

/// The nodes a flow runs between.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePair {
    pub src: String,
    pub dst: String,
}

/// The question of a logged DNS query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsQuery {
    pub qname: String,
    pub qtype: String,
}

impl DnsQuery {
    fn of(data: &[u8]) -> Option<DnsQuery> {
        let m = crate::dns::message::Message::parse(data).ok()?;
        Some(DnsQuery {
            qname: m.question.name,
            qtype: crate::dns::message::qtype_name(m.question.qtype),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InnerAddresses {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// The inner IPv4 addresses of a VXLAN datagram whose payload starts at the outer IPv4 header
/// (pure; `None` for anything else or too short).
fn vxlan_inner(payload: &[u8]) -> Option<InnerAddresses> {
    let ihl = usize::from(payload.first()? & 0x0f) * 4;
    // UDP (8) + VXLAN (8) + Ethernet (14).
    let eth = ihl + 16;
    if payload.get(eth + 12..eth + 14)? != [0x08, 0x00] {
        return None;
    }
    let ip = eth + 14;
    let addr = |at: usize| -> Option<IpAddr> {
        let o: [u8; 4] = payload.get(at..at + 4)?.try_into().ok()?;
        Some(IpAddr::from(o))
    };
    Some(InnerAddresses {
        src: addr(ip + 12)?,
        dst: addr(ip + 16)?,
    })
}

/// A line's `time`: the kernel's timestamp of the packet when NFLOG carries one, else `read`
/// (when the batch was read; the kernel sends none for an skb without a receive timestamp, which
/// is the common case for forwarded pod traffic: IP and bridge forwarding clear it).
pub fn packet_time(packet: &LoggedPacket, read: jiff::Timestamp) -> String {
    packet
        .timestamp
        .and_then(|d| jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).ok())
        .unwrap_or(read)
        .to_string()
}

/// Turns one logged packet into a record (pure). `None` for packets veilnet did not log or
/// cannot read.
pub fn record(
    packet: &LoggedPacket,
    index: &IpIndex,
    pairs: &PairPaths,
    node: &str,
    time: String,
) -> Option<FlowRecord> {
    let prefix = parse_prefix(&packet.prefix)?;
    let Some(flow) = parse_flow(packet) else {
        return l2_record(packet, &prefix, node, time);
    };
    let endpoint = |ip: IpAddr, port: Option<u16>| {
        let who = index.pod(&ip);
        Endpoint {
            ip: Some(ip),
            mac: None,
            port,
            namespace: who.map(|w| w.pod.namespace.clone()),
            pod: who.map(|w| w.pod.name.clone()),
            node: who
                .map(|w| w.node.clone())
                .or_else(|| pairs.node_of(&ip).map(str::to_string)),
        }
    };
    let (src, dst) = (
        endpoint(flow.src, flow.src_port),
        endpoint(flow.dst, flow.dst_port),
    );
    // A rejected VXLAN datagram never reached a pair's path: its addresses are the underlay's.
    let pair = match prefix.verdict {
        LogVerdict::VxlanRejected => pairs.judge(None, None),
        _ => pairs.judge(src.node.as_deref(), dst.node.as_deref()),
    };
    let nodes = match (&src.node, &dst.node) {
        (Some(s), Some(d)) => Some(NodePair {
            src: s.clone(),
            dst: d.clone(),
        }),
        _ => None,
    };
    let mut object = prefix.object.as_ref().map(ToString::to_string);
    let (verdict, policy) = match prefix.verdict {
        LogVerdict::Allow => ("allow", object.clone().unwrap_or_default()),
        LogVerdict::Deny => ("deny", "default deny".to_string()),
        LogVerdict::Spoof => ("spoof", "anti-spoofing".to_string()),
        LogVerdict::VxlanRejected => ("vxlan-rejected", "vxlan source check".to_string()),
        LogVerdict::DnsUntrusted => ("dns-untrusted", "trusted DNS".to_string()),
        LogVerdict::DnsQuery => ("dns", "trusted DNS".to_string()),
        LogVerdict::EgressNew => ("egress", "new-destination watch".to_string()),
    };
    let dns_line = matches!(
        prefix.verdict,
        LogVerdict::DnsUntrusted | LogVerdict::DnsQuery
    );
    if dns_line || prefix.verdict == LogVerdict::EgressNew {
        // One rule logs for every watched pod: the pod is the packet's source.
        object = index.pod(&flow.src).map(|w| w.pod.to_string());
    }
    let dns = flow
        .udp_data(packet)
        .filter(|_| dns_line)
        .and_then(DnsQuery::of);
    let inner = match prefix.verdict {
        LogVerdict::VxlanRejected => vxlan_inner(&packet.payload),
        _ => None,
    };
    Some(FlowRecord {
        time,
        node: node.to_string(),
        verdict,
        nodes,
        path: pair.path,
        encrypted: pair.encrypted,
        direction: prefix.direction.map(|d| d.as_str()),
        policy,
        pod: object,
        reason: prefix.reason.clone(),
        protocol: flow.protocol.as_str(),
        src,
        dst,
        inner,
        dns,
    })
}

/// A spoofed frame without IP or ARP (e.g. to a link-local group), by MAC and ethertype.
fn l2_record(
    packet: &LoggedPacket,
    prefix: &crate::policy::LogPrefix,
    node: &str,
    time: String,
) -> Option<FlowRecord> {
    if prefix.verdict != LogVerdict::Spoof {
        return None;
    }
    let (dst, src) = packet.ether_addrs()?;
    let endpoint = |mac: [u8; 6]| Endpoint {
        ip: None,
        mac: Some(veilnet_cni::netlink::format_mac(&mac)),
        port: None,
        namespace: None,
        pod: None,
        node: None,
    };
    Some(FlowRecord {
        time,
        node: node.to_string(),
        verdict: "spoof",
        nodes: None,
        path: None,
        encrypted: false,
        direction: None,
        policy: "anti-spoofing".to_string(),
        pod: prefix.object.as_ref().map(ToString::to_string),
        reason: None,
        protocol: format!("ether-0x{:04x}", packet.hw_protocol),
        src: endpoint(src),
        dst: endpoint(dst),
        inner: None,
        dns: None,
    })
}

/// What a flow-log line tells the anomaly detector (owned, so the record can be serialised after).
pub struct RecordObservation<'a> {
    record: &'a FlowRecord,
    pod: ObjectRef,
}

impl RecordObservation<'_> {
    /// An untrusted query's name is judged like any sampled query's too (tunnelling).
    pub fn untrusted_query(&self) -> Option<Observation<'_>> {
        let dns = self.record.dns.as_ref()?;
        (self.record.verdict == "dns-untrusted").then_some(Observation::DnsQuery {
            pod: &self.pod,
            qname: &dns.qname,
        })
    }

    pub fn as_observation(&self) -> Observation<'_> {
        let r = self.record;
        match r.verdict {
            "deny" => Observation::Denied {
                src: &self.pod,
                dst: r.dst.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                port: r.dst.port,
                protocol: &r.protocol,
            },
            "spoof" => Observation::Spoofed {
                pod: &self.pod,
                detail: match (&r.src.ip, &r.src.mac) {
                    (Some(ip), _) => format!("{} from {ip}", r.protocol),
                    (None, Some(mac)) => format!("{} from {mac}", r.protocol),
                    _ => r.protocol.clone(),
                },
            },
            "egress" => Observation::NewEgress {
                pod: &self.pod,
                dst: r.dst.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                port: r.dst.port,
                protocol: &r.protocol,
            },
            "dns-untrusted" => Observation::UntrustedDns {
                pod: &self.pod,
                server: r.dst.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                qname: r.dns.as_ref().map(|d| d.qname.as_str()),
                dropped: r.reason.as_deref() == Some("drop"),
            },
            _ => Observation::DnsQuery {
                pod: &self.pod,
                qname: r.dns.as_ref().map(|d| d.qname.as_str()).unwrap_or(""),
            },
        }
    }
}

/// The detector's view of a line (pure): a deny by its source pod (a scan is judged by who sends,
/// wherever its targets are), a spoofed frame or a DNS line by the pod that sent it. `None` for
/// lines about no pod, and allows.
pub fn observation(r: &FlowRecord) -> Option<RecordObservation<'_>> {
    let pod = match r.verdict {
        "deny" => ObjectRef::new(r.src.namespace.clone()?, r.src.pod.clone()?),
        "spoof" if r.src.ip.is_some_and(is_link_local_chatter) => return None,
        // A sampled query says something only with its question.
        "dns" if r.dns.is_none() => return None,
        "spoof" | "dns-untrusted" | "egress" | "dns" => {
            let (ns, name) = r.pod.as_deref()?.split_once('/')?;
            ObjectRef::new(ns, name)
        }
        _ => return None,
    };
    Some(RecordObservation { record: r, pod })
}

/// A pod's kernel sends IPv6 from `::` (duplicate address detection) and from its link-local
/// address (router and neighbour solicitations, MLD) on its own, whether or not it has an IPv6
/// address: the ruleset drops and logs it as spoofed (pods are IPv4-only), but every pod doing it
/// is no anomaly, and alerting on it would put a spoofing Event on every new pod.
fn is_link_local_chatter(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_unicast_link_local(),
        IpAddr::V4(_) => false,
    }
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
pub fn spawn(shared: Arc<Shared>, path: PathBuf) -> Result<FlowLogHandle, FlowLogError> {
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
                let pairs = shared.pairs();
                let now = jiff::Timestamp::now();
                let mut lines = Vec::new();
                for p in &packets {
                    if let Some(r) =
                        record(p, &index, &pairs, &shared.options.node, packet_time(p, now))
                    {
                        if let Some(obs) = observation(&r) {
                            shared.observe(obs.as_observation());
                            if let Some(query) = obs.untrusted_query() {
                                shared.observe(query);
                            }
                        }
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
        .map_err(FlowLogError::Thread)?;
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

    fn pairs() -> PairPaths {
        PairPaths {
            me: "node-1".into(),
            peers: [("node-2".to_string(), "wireguard".to_string())].into(),
            node_by_ip: [
                ("172.30.0.11".parse().unwrap(), "node-1".to_string()),
                ("172.30.0.12".parse().unwrap(), "node-2".to_string()),
            ]
            .into(),
            pod_cidrs: Vec::new(),
        }
    }

    #[test]
    fn lines_carry_the_node_pair_its_path_and_whether_it_was_encrypted() {
        // A remote node's host network to a local pod: the node is named by its address.
        let p = tcp_packet(
            "veilnet:allow:ingress:x/web",
            [172, 30, 0, 12],
            [10, 244, 1, 7],
            80,
        );
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!(r.src.node.as_deref(), Some("node-2"));
        assert_eq!(r.src.pod, None);
        assert_eq!((r.path.as_deref(), r.encrypted), (Some("wireguard"), true));
        // The same pair once the plan says VXLAN (a toggle to off).
        let mut vxlan = pairs();
        vxlan.peers.insert("node-2".into(), "vxlan".into());
        let r = record(&p, &index(), &vxlan, "node-1", "T".into()).unwrap();
        assert_eq!((r.path.as_deref(), r.encrypted), (Some("vxlan"), false));
        // Same node: local, never encrypted; to the outside: no pair, no path.
        let p = tcp_packet(
            "veilnet:deny:ingress:x/a",
            [172, 30, 0, 11],
            [10, 244, 1, 7],
            80,
        );
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!((r.path.as_deref(), r.encrypted), (Some("local"), false));
        let p = tcp_packet(
            "veilnet:allow:egress:x/out",
            [10, 244, 1, 7],
            [8, 8, 8, 8],
            53,
        );
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!(
            (r.nodes.clone(), r.path.clone(), r.encrypted),
            (None, None, false)
        );
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains("\"encrypted\":false") && !line.contains("\"path\""),
            "{line}"
        );
        // Before the agent's first pass nothing is known: nothing is claimed.
        let r = record(&p, &index(), &PairPaths::default(), "node-1", "T".into()).unwrap();
        assert!(!r.encrypted);
    }

    #[test]
    fn deny_record_names_both_pods_and_the_default_deny() {
        let p = tcp_packet(
            "veilnet:deny:ingress:x/a",
            [10, 244, 2, 5],
            [10, 244, 1, 7],
            80,
        );
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "T", "node": "node-1", "verdict": "deny", "direction": "ingress",
                "nodes": {"src": "node-2", "dst": "node-1"}, "path": "wireguard",
                "encrypted": true,
                "policy": "default deny", "pod": "x/a", "protocol": "TCP",
                "src": {"ip": "10.244.2.5", "port": 40000, "namespace": "y", "pod": "b", "node": "node-2"},
                "dst": {"ip": "10.244.1.7", "port": 80, "namespace": "x", "pod": "a", "node": "node-1"},
            })
        );
    }

    #[test]
    fn the_detector_sees_denies_by_their_sender_and_spoofing_but_not_link_local_chatter() {
        let deny = tcp_packet(
            "veilnet:deny:ingress:x/a",
            [10, 244, 2, 5],
            [10, 244, 1, 7],
            80,
        );
        let r = record(&deny, &index(), &pairs(), "node-1", "T".into()).unwrap();
        let obs = observation(&r).unwrap();
        assert_eq!(
            obs.as_observation(),
            Observation::Denied {
                src: &ObjectRef::new("y", "b"),
                dst: "10.244.1.7".parse().unwrap(),
                port: Some(80),
                protocol: "TCP",
            }
        );
        let spoof = tcp_packet("veilnet:spoof:y/b", [10, 244, 1, 7], [10, 244, 2, 1], 80);
        let mut r = record(&spoof, &index(), &pairs(), "node-2", "T".into()).unwrap();
        assert!(matches!(
            observation(&r).unwrap().as_observation(),
            Observation::Spoofed { pod, .. } if *pod == ObjectRef::new("y", "b")
        ));
        // Every pod's kernel sends these (DAD from ::, solicitations from fe80::/10).
        for chatter in ["::", "fe80::a8bb:ccff:fedd:eeff"] {
            r.src.ip = Some(chatter.parse().unwrap());
            assert!(observation(&r).is_none(), "{chatter}");
        }
        // A forged global IPv6 source is still spoofing.
        r.src.ip = Some("2001:db8::7".parse().unwrap());
        assert!(observation(&r).is_some());
        let allow = tcp_packet(
            "veilnet:allow:egress:x/to-dns",
            [10, 244, 1, 7],
            [8, 8, 8, 8],
            53,
        );
        let r = record(&allow, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert!(observation(&r).is_none());
    }

    #[test]
    fn packet_time_prefers_the_kernel_timestamp() {
        let read: jiff::Timestamp = "2025-06-01T12:00:05Z".parse().unwrap();
        let mut p = LoggedPacket::default();
        assert_eq!(packet_time(&p, read), "2025-06-01T12:00:05Z");
        p.timestamp = Some(std::time::Duration::new(1_748_779_200, 250_000_000));
        assert_eq!(packet_time(&p, read), "2025-06-01T12:00:00.25Z");
    }

    #[test]
    fn allow_names_the_policy_and_unknown_ips_stay_bare() {
        let p = tcp_packet(
            "veilnet:allow:egress:x/to-dns",
            [10, 244, 1, 7],
            [8, 8, 8, 8],
            53,
        );
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!((r.verdict, r.policy.as_str()), ("allow", "x/to-dns"));
        assert_eq!(r.direction, Some("egress"));
        assert_eq!(r.dst.pod, None);
        assert!(!serde_json::to_string(&r.dst).unwrap().contains("namespace"));
        // Spoofing: no direction, the forged source is reported as it came.
        let p = tcp_packet("veilnet:spoof:y/b", [10, 244, 1, 7], [10, 244, 2, 1], 80);
        let r = record(&p, &index(), &pairs(), "node-2", "T".into()).unwrap();
        assert_eq!(
            (r.verdict, r.policy.as_str(), r.pod.as_deref()),
            ("spoof", "anti-spoofing", Some("y/b"))
        );
        assert_eq!(r.direction, None);
        // Foreign prefixes and unreadable payloads give nothing.
        assert!(record(
            &tcp_packet("other", [1; 4], [2; 4], 1),
            &index(),
            &pairs(),
            "n",
            "T".into()
        )
        .is_none());
        let mut junk = tcp_packet("veilnet:deny:ingress:x/a", [1; 4], [2; 4], 1);
        junk.payload.truncate(3);
        assert!(record(&junk, &index(), &pairs(), "n", "T".into()).is_none());
    }

    /// An outer IPv4/UDP datagram to port 8472 carrying VXLAN, Ethernet and an inner IPv4 header.
    fn vxlan_packet(outer_src: [u8; 4], inner_src: [u8; 4], inner_dst: [u8; 4]) -> LoggedPacket {
        let mut b = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        b.extend(outer_src);
        b.extend([172, 30, 0, 11]);
        b.extend(40000u16.to_be_bytes());
        b.extend(8472u16.to_be_bytes());
        b.extend([0, 0, 0, 0]);
        b.extend([0x08, 0, 0, 0, 0, 0, 1, 0]); // VXLAN, VNI 1
        b.extend([0x06, 0, 0, 0, 0, 1, 0x06, 0, 0, 0, 0, 2, 0x08, 0x00]);
        b.extend([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
        b.extend(inner_src);
        b.extend(inner_dst);
        LoggedPacket {
            family: 2,
            prefix: "veilnet:vxlan-rejected:not-a-vxlan-peer".into(),
            payload: b,
            ..Default::default()
        }
    }

    #[test]
    fn rejected_vxlan_names_the_outer_sender_the_reason_and_the_forged_inner_source() {
        let p = vxlan_packet([172, 30, 0, 99], [10, 244, 2, 5], [10, 244, 1, 7]);
        let r = record(&p, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!(r.verdict, "vxlan-rejected");
        assert_eq!(r.reason.as_deref(), Some("not-a-vxlan-peer"));
        assert_eq!(r.pod, None);
        assert_eq!(r.src.ip, Some(IpAddr::from([172, 30, 0, 99])));
        assert_eq!(r.dst.port, Some(8472));
        let inner = r.inner.clone().unwrap();
        assert_eq!(inner.src, IpAddr::from([10, 244, 2, 5]));
        assert_eq!(inner.dst, IpAddr::from([10, 244, 1, 7]));
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains("\"pod\""), "{line}");
        // Too short to hold an inner header: the line still names the sender.
        let mut short = p.clone();
        short.payload.truncate(40);
        let r = record(&short, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!(r.inner, None);
    }

    #[test]
    fn a_spoofed_frame_without_ip_is_logged_by_mac() {
        let mut hw_header = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 0x0a, 0x58, 0, 0, 0x78, 0x61];
        hw_header.extend_from_slice(&[0x88, 0xcc]);
        let lldp = LoggedPacket {
            family: 7,
            hw_protocol: 0x88cc,
            prefix: "veilnet:spoof:x/a".into(),
            payload: vec![2, 7, 4],
            hw_header,
            ..Default::default()
        };
        let r = record(&lldp, &index(), &pairs(), "node-1", "T".into()).unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "time": "T", "node": "node-1", "verdict": "spoof", "policy": "anti-spoofing",
                "pod": "x/a", "protocol": "ether-0x88cc", "encrypted": false,
                "src": {"mac": "0a:58:00:00:78:61"}, "dst": {"mac": "01:80:c2:00:00:0e"},
            })
        );
        // Only spoof verdicts; a frame without its header gives nothing.
        let deny = LoggedPacket {
            prefix: "veilnet:deny:ingress:x/a".into(),
            ..lldp.clone()
        };
        assert!(record(&deny, &index(), &pairs(), "n", "T".into()).is_none());
        let bare = LoggedPacket {
            hw_header: Vec::new(),
            ..lldp
        };
        assert!(record(&bare, &index(), &pairs(), "n", "T".into()).is_none());
    }
}
