//! The WireGuard datapath process: does its control socket answer, is its packet thread turning,
//! and does it run the same release as this binary and the agent?

use std::time::Duration;

use super::{Check, Context};
use crate::agent::status::NodeStatus;
use crate::datapath::client::DatapathClient;
use crate::datapath::protocol::{Info, Request};

/// How long the doctor waits for the datapath's answer (it answers in microseconds when well).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// The packet thread goes round its loop at least every timer tick (a fraction of a second) even
/// when idle; the datapath's own liveness probe calls it stuck past this (`veilnet datapath
/// --probe`), and the doctor agrees with it.
pub const STALL_LIMIT: Duration = crate::datapath::STALL_LIMIT;

#[derive(Debug, Clone)]
pub struct DatapathFacts {
    pub socket: String,
    /// The `hello` answer, or why there was none.
    pub info: Result<Info, String>,
    /// Unix seconds at gather time (for the uptime).
    pub now: u64,
    /// This binary's version.
    pub our_version: String,
}

pub fn gather(ctx: &Context) -> DatapathFacts {
    // A Unix socket in the file system: reachable from any namespace.
    let socket = crate::datapath::socket_path(&ctx.run_dir);
    let info = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
        .and_then(|rt| {
            rt.block_on(async {
                let mut client = DatapathClient::new(&socket);
                match tokio::time::timeout(ANSWER_TIMEOUT, client.call(&Request::Hello)).await {
                    Err(_) => Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())),
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(resp)) => Ok(resp.info),
                }
            })
        });
    DatapathFacts {
        socket: socket.display().to_string(),
        info,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        our_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

pub fn check(facts: &DatapathFacts, status: Option<&NodeStatus>) -> Vec<Check> {
    const UP: &str = "datapath.up";
    const THREAD: &str = "datapath.packet-thread";
    const VERSION: &str = "datapath.version";
    let info = match &facts.info {
        Ok(info) => info,
        Err(e) => {
            let agent_says = match status.and_then(|s| s.datapath.as_ref()) {
                Some(dp) => match (&dp.error, dp.pid) {
                    (Some(err), _) => format!("the agent cannot reach it either: {err}"),
                    (None, Some(pid)) => format!(
                        "the agent's status says it runs (pid {pid}) and answered at its last call"
                    ),
                    (None, None) => "the agent's status has no datapath pid".to_string(),
                },
                None => "no datapath in the agent's status".to_string(),
            };
            return vec![Check::fail(
                UP,
                format!(
                    "the control socket {} does not answer ({e}); {agent_says}",
                    facts.socket
                ),
                "check the datapath container of the veilnet pod on this node (kubectl -n veilnet-system logs POD -c datapath); a stopped or stuck process: restart the pod. Encrypted traffic is stopped meanwhile",
            )];
        }
    };
    let uptime = facts.now.saturating_sub(info.started_at);
    let mut checks = Vec::new();
    let offloads = info
        .device
        .as_ref()
        .map_or("no device yet".to_string(), |d| {
            format!(
                "{} ({} peers, offloads {})",
                d.tun_name, d.peers, d.offloads
            )
        });
    checks.push(Check::ok(
        UP,
        format!(
            "datapath {} pid {} up {}: {offloads}",
            info.version,
            info.pid,
            human(uptime)
        ),
    ));
    match &info.device {
        None => checks.push(Check::warn(
            THREAD,
            "the datapath has no device yet: the agent has not configured it",
            "wait for the agent's first pass; if it stays so, the agent's log says why (agent.up)",
        )),
        Some(d) if Duration::from_millis(d.turn_age_ms) > STALL_LIMIT => checks.push(Check::fail(
            THREAD,
            format!(
                "the packet thread of pid {} has not turned for {:.1} s (limit {} s): stuck",
                info.pid,
                d.turn_age_ms as f64 / 1000.0,
                STALL_LIMIT.as_secs()
            ),
            "no packet moves through WireGuard: restart the datapath (its liveness probe does so too), and report it with its log",
        )),
        Some(d) => checks.push(Check::ok(
            THREAD,
            format!("the packet thread turned {} ms ago", d.turn_age_ms),
        )),
    }
    let agent_version = status.and_then(|s| s.agent_version.as_deref());
    let mut differ = Vec::new();
    if info.version != facts.our_version {
        differ.push(format!("this binary {}", facts.our_version));
    }
    if let Some(v) = agent_version.filter(|v| *v != info.version) {
        differ.push(format!("the agent {v}"));
    }
    checks.push(if differ.is_empty() {
        Check::ok(VERSION, format!("datapath {} matches", info.version))
    } else {
        Check::warn(
            VERSION,
            format!("datapath {} but {}", info.version, differ.join(", ")),
            "normal during a rollout; otherwise roll the veilnet DaemonSet so both containers run one release",
        )
    });
    checks
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::protocol::{DeviceInfo, PROTOCOL};
    use crate::doctor::Verdict;

    fn info(turn_age_ms: u64, version: &str) -> Info {
        Info {
            protocol: PROTOCOL,
            version: version.into(),
            instance: "i".into(),
            pid: 42,
            started_at: 1000,
            device: Some(DeviceInfo {
                tun_name: "veilwg0".into(),
                listen_port: 51820,
                mtu: 1380,
                public_key: "k".into(),
                peers: 2,
                offloads: "tun:csum udp:gso,gro".into(),
                turn_age_ms,
            }),
        }
    }

    fn facts(info: Result<Info, String>) -> DatapathFacts {
        DatapathFacts {
            socket: "/run/veilnet/datapath.sock".into(),
            info,
            now: 1090,
            our_version: "0.1.0".into(),
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_healthy_datapath_is_ok_with_its_details() {
        let c = check(&facts(Ok(info(3, "0.1.0"))), None);
        assert!(c.iter().all(|c| c.verdict == Verdict::Ok), "{c:?}");
        let up = &find(&c, "datapath.up").evidence;
        assert!(up.contains("pid 42"), "{up}");
        assert!(up.contains("tun:csum udp:gso,gro"), "{up}");
        assert!(up.contains("0.1.0"), "{up}");
    }

    #[test]
    fn no_answer_fails_and_says_what_the_agent_thinks() {
        let status: NodeStatus = serde_json::from_value(serde_json::json!({
            "node": "node-1", "mode": "on", "podCidrs": [], "underlayIp": "", "underlayDev": "",
            "podMtu": 1370, "publicKey": "k", "keyFingerprint": "f", "peers": [], "rejected": {},
            "matrix": {}, "updatedAt": "2026-01-01T00:00:00Z",
            "datapath": {"pid": 7, "version": "0.1.0", "startedAt": 1, "offloads": null, "error": null}
        }))
        .unwrap();
        let c = check(&facts(Err("no answer within 3 s".into())), Some(&status));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(
            c[0].evidence.contains("no answer within 3 s"),
            "{}",
            c[0].evidence
        );
        assert!(
            c[0].evidence.contains("says it runs (pid 7)"),
            "{}",
            c[0].evidence
        );
    }

    #[test]
    fn a_stuck_packet_thread_fails() {
        let c = check(&facts(Ok(info(12_000, "0.1.0"))), None);
        let t = find(&c, "datapath.packet-thread");
        assert_eq!(t.verdict, Verdict::Fail);
        assert!(t.evidence.contains("12.0 s"), "{}", t.evidence);
        let mut idle = info(0, "0.1.0");
        idle.device = None;
        assert_eq!(
            find(&check(&facts(Ok(idle)), None), "datapath.packet-thread").verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn a_different_release_warns() {
        let c = check(&facts(Ok(info(1, "0.0.9"))), None);
        let v = find(&c, "datapath.version");
        assert_eq!(v.verdict, Verdict::Warn);
        assert!(v.evidence.contains("this binary 0.1.0"), "{}", v.evidence);
    }
}
