//! The agent's status file (`<run dir>/status.json`), read by `veilnet status`: this node (CIDR,
//! key fingerprint, mode), every peer's path with WireGuard handshake age and bytes, and the
//! cluster's node-pair path matrix. Field names are part of the CLI's contract (README).

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::AgentConfig;
use super::plan::{NodePlan, PathMatrix};
use super::snapshot::SelfInfo;
use super::wireguard::WireGuard;
use crate::model::encryption::{Mode, Path, PeerPath};
use crate::model::overlay::AcceptedPeer;
use crate::wg::keys;

pub const STATUS_FILE: &str = "status.json";

/// What one reconcile pass decided (kept between passes to refresh the counters).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub mode: Mode,
    pub pod_mtu: u32,
    pub paths: Vec<PeerPath>,
    pub rejected: BTreeMap<String, String>,
    pub matrix: PathMatrix,
    /// The peers this pass accepted: the bindings the next pass defends against newcomers.
    pub bindings: BTreeMap<String, AcceptedPeer>,
}

impl Snapshot {
    pub fn of(plan: &NodePlan) -> Self {
        Snapshot {
            mode: plan.mode,
            pod_mtu: plan.cni.mtu,
            paths: plan.paths.clone(),
            rejected: plan
                .overlay
                .rejected
                .iter()
                .map(|r| (r.node.clone(), r.reason.to_string()))
                .collect(),
            matrix: plan.matrix.clone(),
            bindings: plan
                .overlay
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    pub mode: Mode,
    pub pod_cidrs: Vec<String>,
    pub underlay_ip: String,
    pub underlay_dev: String,
    pub pod_mtu: u32,
    pub public_key: String,
    pub key_fingerprint: String,
    pub peers: Vec<PeerStatus>,
    /// Peers the overlay refused (no routes at all), with why.
    pub rejected: BTreeMap<String, String>,
    /// node → peer → path, as each node's published mode and key imply.
    pub matrix: BTreeMap<String, BTreeMap<String, String>>,
    /// The WireGuard datapath process (absent in status files of older agents).
    #[serde(default)]
    pub datapath: Option<DatapathStatus>,
    /// Packets the wire table dropped, by counter (`raw_pod_traffic`, `plaintext_vxlan`,
    /// `vxlan_rejected`, `wireguard_rejected`).
    #[serde(default)]
    pub wire_drops: BTreeMap<String, u64>,
    /// Connections from pods masqueraded to the node's address (egress), since the wire table
    /// was loaded.
    #[serde(default)]
    pub masqueraded: u64,
    /// Why the requested WireGuard key rotation (`veilnet.io/rotate-key`) has not happened yet
    /// (e.g. the state dir is read-only or full): the node keeps its current key and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation_error: Option<String>,
    /// The agent binary's version (absent in status files of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    pub pid: Option<u32>,
    pub version: Option<String>,
    /// Unix seconds when the datapath process started: a change means it restarted.
    pub started_at: Option<u64>,
    pub offloads: Option<String>,
    /// Why the last call to it failed; `None` while it answers.
    pub error: Option<String>,
    /// Datagrams on the WireGuard port dropped before any peer took them, by reason
    /// (`invalid`: not WireGuard, a bad MAC, or an initiation for no key of ours; `unknown_peer`: no current key or session index;
    /// `rate_limited`: a source's initiations past 20 a second). What a flood shows up as.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
    /// Cookie replies sent because handshakes came faster than the device's limit.
    #[serde(default)]
    pub cookie_replies: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub node: String,
    pub mode: Option<Mode>,
    /// `wireguard`, `vxlan` or `blocked`.
    pub path: String,
    pub reason: Option<String>,
    pub endpoint: Option<String>,
    /// The peer's underlay address as the overlay accepted it (absent for a rejected peer and in
    /// status files of older agents): what `veilnet doctor` probes the path MTU to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<String>,
    /// The pod CIDRs the overlay accepted for the peer (absent for a rejected peer and in status
    /// files of older agents): who is a pod, for the flow log and the flows endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    pub last_handshake_seconds: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Datagrams from the peer's address that its tunnel rejected: a failed authentication, a
    /// replayed counter (a duplicated or very late datagram), a handshake message out of turn.
    /// A few around a handshake are normal; a steady climb is a hostile or broken underlay.
    /// Absent from older agents' status files, hence the default.
    #[serde(default)]
    pub rx_rejected: u64,
    /// A WireGuard key rotation (ours or the peer's) is under way: traffic rides the previous
    /// key's session until the handshake under the new keys completes (`lastHandshakeSeconds` is
    /// that new session's). Absent when false, and from older agents.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_rotation: bool,
}

/// The peer row's note on datagrams its tunnel rejected (duplicates, replays, failed
/// authentication): nothing when there are none.
fn rejected_note(rejected: u64) -> String {
    match rejected {
        0 => String::new(),
        1 => "  (1 datagram rejected)".to_string(),
        n => format!("  ({n} datagrams rejected)"),
    }
}

pub fn build<D>(
    cfg: &AgentConfig,
    me: &SelfInfo,
    wg: &WireGuard<D>,
    last: &Snapshot,
    wire_drops: &BTreeMap<String, u64>,
    masqueraded: u64,
) -> NodeStatus {
    // By key: a linear search per peer was nodes² at 1,000 nodes.
    let stats: BTreeMap<&[u8; 32], &crate::wg::PeerStats> = wg
        .stats()
        .iter()
        .map(|s| (s.public_key.as_bytes(), s))
        .collect();
    let peers = last
        .paths
        .iter()
        .map(|p| {
            let (reason, wg_stats) = match &p.path {
                Path::Blocked(r) => (Some(r.to_string()), None),
                Path::Wireguard { public_key, .. } => (None, stats.get(public_key).copied()),
                Path::Vxlan => (None, None),
            };
            PeerStatus {
                node: p.node.clone(),
                mode: p.mode,
                path: p.path.name().to_string(),
                reason,
                endpoint: wg_stats.map(|s| s.endpoint.to_string()),
                underlay_ip: last
                    .bindings
                    .get(&p.node)
                    .map(|b| b.underlay_ip.to_string()),
                pod_cidrs: last.bindings.get(&p.node).map_or_else(Vec::new, |b| {
                    b.pod_cidrs.iter().map(ToString::to_string).collect()
                }),
                last_handshake_seconds: wg_stats
                    .and_then(|s| s.last_handshake_age)
                    .map(|d| d.as_secs()),
                rx_bytes: wg_stats.map_or(0, |s| s.rx_bytes),
                tx_bytes: wg_stats.map_or(0, |s| s.tx_bytes),
                rx_rejected: wg_stats.map_or(0, |s| s.rx_errors),
                key_rotation: wg_stats.is_some_and(|s| s.on_previous_key),
            }
        })
        .collect();
    NodeStatus {
        node: cfg.node_name.clone(),
        mode: last.mode,
        pod_cidrs: me.pod_cidrs.iter().map(ToString::to_string).collect(),
        underlay_ip: me.underlay.ip.to_string(),
        underlay_dev: me.underlay.dev.clone(),
        pod_mtu: last.pod_mtu,
        public_key: wg.public_key_b64(),
        key_fingerprint: keys::fingerprint(wg.public_key()),
        peers,
        rejected: last.rejected.clone(),
        matrix: last.matrix.clone(),
        datapath: Some(datapath_status(wg)),
        wire_drops: wire_drops.clone(),
        masqueraded,
        key_rotation_error: wg.rotation_error().map(str::to_string),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        updated_at: jiff::Timestamp::now().to_string(),
    }
}

fn datapath_status<D>(wg: &WireGuard<D>) -> DatapathStatus {
    let view = wg.datapath();
    let info = view.info.as_ref();
    DatapathStatus {
        pid: info.map(|i| i.pid),
        version: info.map(|i| i.version.clone()),
        started_at: info.map(|i| i.started_at),
        offloads: info
            .and_then(|i| i.device.as_ref())
            .map(|d| d.offloads.clone()),
        error: view.error.clone(),
        drops: wireguard_drops(wg.device_stats()),
        cookie_replies: wg.device_stats().cookies_sent,
    }
}

/// [`DatapathStatus::drops`] from the datapath's device counters.
pub fn wireguard_drops(d: &crate::wg::DeviceStats) -> BTreeMap<String, u64> {
    [
        ("invalid", d.rx_invalid),
        ("unknown_peer", d.rx_unknown_peer),
        ("rate_limited", d.rx_rate_limited),
    ]
    .into_iter()
    .map(|(reason, n)| (reason.to_string(), n))
    .collect()
}

pub fn path(run_dir: &FsPath) -> PathBuf {
    run_dir.join(STATUS_FILE)
}

pub fn write(run_dir: &FsPath, st: &NodeStatus) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(&path(run_dir), &body)
}

pub fn read(run_dir: &FsPath) -> std::io::Result<NodeStatus> {
    let text = std::fs::read_to_string(path(run_dir))?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

/// The human-readable rendering of `veilnet status`.
pub fn render(st: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "node {}: mode {}, pod CIDR {}, pod MTU {}",
        st.node,
        st.mode,
        st.pod_cidrs.join(","),
        st.pod_mtu
    );
    let _ = writeln!(
        s,
        "underlay {} on {}; WireGuard key {}",
        st.underlay_ip, st.underlay_dev, st.key_fingerprint
    );
    if let Some(e) = &st.key_rotation_error {
        let _ = writeln!(
            s,
            "key rotation FAILED, keeping key {} and retrying: {e}",
            st.key_fingerprint
        );
    }
    if let Some(dp) = &st.datapath {
        let _ = writeln!(s, "{}", render_datapath(dp, jiff::Timestamp::now()));
    }
    let _ = writeln!(
        s,
        "\n{:<16} {:<7} {:<10} {:<22} {:>10} {:>12} {:>12}",
        "PEER", "MODE", "PATH", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    for p in &st.peers {
        let _ = writeln!(
            s,
            "{:<16} {:<7} {:<10} {:<22} {:>10} {:>12} {:>12}{}",
            p.node,
            p.mode.map_or("-".to_string(), |m| m.to_string()),
            p.path,
            p.endpoint.as_deref().unwrap_or("-"),
            p.last_handshake_seconds
                .map_or("-".to_string(), |s| format!("{s}s ago")),
            p.rx_bytes,
            p.tx_bytes,
            match (&p.reason, p.key_rotation) {
                (Some(r), _) => format!("  ({r})"),
                (None, true) => "  (key rotation: on the previous key's session)".to_string(),
                (None, false) => String::new(),
            } + &rejected_note(p.rx_rejected),
        );
    }
    for (node, reason) in &st.rejected {
        let _ = writeln!(s, "{node:<16} ignored: {reason}");
    }
    if st.matrix.is_empty() && st.peers.len() >= super::plan::MATRIX_MAX_NODES {
        let _ = writeln!(
            s,
            "\npath matrix: not kept above {} nodes (each node's status shows its own peers)",
            super::plan::MATRIX_MAX_NODES
        );
    }
    if !st.matrix.is_empty() {
        let names: Vec<&String> = st.matrix.keys().collect();
        let _ = write!(s, "\npath matrix (row → column)\n{:<12}", "");
        for n in &names {
            let _ = write!(s, " {:<10}", n);
        }
        let _ = writeln!(s);
        for row in &names {
            let _ = write!(s, "{:<12}", row);
            for col in &names {
                let cell = if row == col {
                    "-"
                } else {
                    st.matrix[*row].get(*col).map_or("?", String::as_str)
                };
                let _ = write!(s, " {:<10}", cell);
            }
            let _ = writeln!(s);
        }
    }
    let drops: Vec<String> = st
        .wire_drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if !drops.is_empty() {
        let _ = writeln!(s, "\nwire drops: {}", drops.join(", "));
    }
    if let Some(line) = st.datapath.as_ref().and_then(render_wireguard_drops) {
        let _ = writeln!(s, "{line}");
    }
    if st.masqueraded > 0 {
        let _ = writeln!(
            s,
            "egress: {} connections masqueraded to {}",
            st.masqueraded, st.underlay_ip
        );
    }
    let _ = writeln!(s, "\nupdated {}", st.updated_at);
    s
}

/// What the WireGuard port refused, e.g. `wireguard drops: invalid 41, rate_limited 7 (cookie
/// replies 3)`; `None` while nothing was.
fn render_wireguard_drops(dp: &DatapathStatus) -> Option<String> {
    let drops: Vec<String> = dp
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if drops.is_empty() && dp.cookie_replies == 0 {
        return None;
    }
    let drops = if drops.is_empty() {
        "none".to_string()
    } else {
        drops.join(", ")
    };
    let mut line = format!("wireguard drops: {drops}");
    if dp.cookie_replies > 0 {
        line.push_str(&format!(" (cookie replies {})", dp.cookie_replies));
    }
    Some(line)
}

/// One line about the datapath process, e.g. `datapath pid 812 (0.1.0), up 3h12m, offloads …`.
fn render_datapath(dp: &DatapathStatus, now: jiff::Timestamp) -> String {
    let pid = dp.pid.map_or("?".to_string(), |p| p.to_string());
    let version = dp.version.as_deref().unwrap_or("?");
    let up = dp
        .started_at
        .and_then(|t| i64::try_from(t).ok())
        .map(|t| (now.as_second() - t).max(0))
        .map_or("?".to_string(), |secs| {
            let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
            if h > 0 {
                format!("{h}h{m:02}m")
            } else if m > 0 {
                format!("{m}m{s:02}s")
            } else {
                format!("{s}s")
            }
        });
    let offloads = dp.offloads.as_deref().unwrap_or("-");
    match &dp.error {
        None => format!("datapath pid {pid} ({version}), up {up}, offloads {offloads}"),
        Some(e) => format!("datapath UNREACHABLE (last seen pid {pid}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_peers_and_the_matrix() {
        let st = NodeStatus {
            node: "a".into(),
            mode: Mode::On,
            pod_cidrs: vec!["10.244.1.0/24".into()],
            underlay_ip: "172.30.0.11".into(),
            underlay_dev: "eth0".into(),
            pod_mtu: 1440,
            public_key: "k".into(),
            key_fingerprint: "abcd…".into(),
            peers: vec![PeerStatus {
                node: "b".into(),
                mode: Some(Mode::On),
                path: "wireguard".into(),
                reason: None,
                endpoint: Some("172.30.0.12:51820".into()),
                underlay_ip: Some("172.30.0.12".into()),
                pod_cidrs: vec!["10.244.2.0/24".into()],
                last_handshake_seconds: Some(3),
                rx_bytes: 10,
                tx_bytes: 20,
                rx_rejected: 5,
                key_rotation: false,
            }],
            rejected: BTreeMap::new(),
            wire_drops: BTreeMap::from([("vxlan_rejected".to_string(), 4)]),
            masqueraded: 0,
            key_rotation_error: None,
            agent_version: None,
            matrix: BTreeMap::from([
                (
                    "a".to_string(),
                    BTreeMap::from([("b".into(), "wireguard".into())]),
                ),
                (
                    "b".to_string(),
                    BTreeMap::from([("a".into(), "wireguard".into())]),
                ),
            ]),
            datapath: Some(DatapathStatus {
                pid: Some(812),
                version: Some("0.1.0".into()),
                started_at: Some(0),
                offloads: None,
                error: None,
                drops: wireguard_drops(&crate::wg::DeviceStats {
                    rx_invalid: 41,
                    rx_rate_limited: 7,
                    ..Default::default()
                }),
                cookie_replies: 3,
            }),
            updated_at: "now".into(),
        };
        let text = render(&st);
        assert!(text.contains("datapath pid 812 (0.1.0)"), "{text}");
        assert!(text.contains("(5 datagrams rejected)"), "{text}");
        assert!(
            text.contains("wireguard") && text.contains("3s ago"),
            "{text}"
        );
        assert!(text.contains("path matrix"), "{text}");
        assert!(text.contains("wire drops: vxlan_rejected 4"), "{text}");
        assert!(
            text.contains("wireguard drops: invalid 41, rate_limited 7 (cookie replies 3)"),
            "{text}"
        );
        assert!(!text.contains("key rotation"), "{text}");
        let json = serde_json::to_value(&st).unwrap();
        assert!(json["peers"][0].get("keyRotation").is_none(), "{json}");
        let mut rotating = st.clone();
        rotating.peers[0].key_rotation = true;
        let text = render(&rotating);
        assert!(
            text.contains("(key rotation: on the previous key's session)"),
            "{text}"
        );
        let json = serde_json::to_value(&rotating).unwrap();
        assert_eq!(json["peers"][0]["keyRotation"], true, "{json}");
    }

    #[test]
    fn the_datapath_line_says_who_runs_it_for_how_long_or_why_it_is_unreachable() {
        let now: jiff::Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
        let mut dp = DatapathStatus {
            pid: Some(812),
            version: Some("0.1.0".into()),
            started_at: Some((now.as_second() - 3 * 3600 - 12 * 60) as u64),
            offloads: Some("tun:csum,tso4 udp:gso,gro".into()),
            error: None,
            drops: BTreeMap::new(),
            cookie_replies: 0,
        };
        assert_eq!(
            render_datapath(&dp, now),
            "datapath pid 812 (0.1.0), up 3h12m, offloads tun:csum,tso4 udp:gso,gro"
        );
        dp.started_at = Some((now.as_second() - 42) as u64);
        assert!(render_datapath(&dp, now).contains("up 42s"));
        dp.error = Some("cannot reach the datapath at /run/veilnet/datapath.sock".into());
        assert_eq!(
            render_datapath(&dp, now),
            "datapath UNREACHABLE (last seen pid 812): cannot reach the datapath at /run/veilnet/datapath.sock"
        );
        // A status file from an agent without a datapath field still reads.
        let old = serde_json::json!({"node": "n", "mode": "on", "podCidrs": [], "underlayIp": "x",
            "underlayDev": "eth0", "podMtu": 1440, "publicKey": "", "keyFingerprint": "",
            "peers": [], "rejected": {}, "matrix": {}, "updatedAt": ""});
        let st: NodeStatus = serde_json::from_value(old).unwrap();
        assert!(st.datapath.is_none());
    }
}
