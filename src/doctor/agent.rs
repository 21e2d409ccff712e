//! The agent: is it up (its status file, rewritten every 2 s, is fresh), does its health
//! endpoint answer, which peers did the overlay reject, are the WireGuard sessions alive, and is
//! any peer reached in plaintext while this node wants encryption?

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{Check, Context};
use crate::agent::status::{self, NodeStatus};
use crate::model::encryption::Mode;

/// WireGuard's REJECT_AFTER_TIME: a session older than this can no longer carry data.
pub const HANDSHAKE_STALE_AFTER: Duration = Duration::from_secs(180);

/// The agent rewrites its status file every 2 s; older than this, it is down or stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// What was read from the node.
#[derive(Debug, Clone, Default)]
pub struct AgentFacts {
    /// The parsed status file, if there is one.
    pub status: Option<NodeStatus>,
    /// Why there is none (missing, unreadable, unparsable).
    pub status_error: Option<String>,
    /// `GET /healthz`: the status code and body, or why there was no answer.
    pub healthz: Option<Result<(u16, String), String>>,
    pub health_addr: Option<SocketAddr>,
}

pub fn gather(ctx: &Context) -> AgentFacts {
    let mut facts = match status::read(&ctx.run_dir) {
        Ok(st) => AgentFacts {
            status: Some(st),
            ..AgentFacts::default()
        },
        Err(e) => AgentFacts {
            status_error: Some(format!("{}: {e}", status::path(&ctx.run_dir).display())),
            ..AgentFacts::default()
        },
    };
    let addr = ctx.health_addr;
    facts.health_addr = Some(addr);
    facts.healthz = Some(match &ctx.netns {
        None => http_get(addr, "/healthz"),
        Some(ns) => crate::netns::run_in(ns, move || http_get(addr, "/healthz"))
            .unwrap_or_else(|e| Err(e.to_string())),
    });
    facts
}

/// A blocking HTTP/1.0 GET with a 2 s budget per step: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    parse_http_response(&String::from_utf8_lossy(&raw))
}

/// The status code and body of an HTTP/1.x response (pure).
pub fn parse_http_response(text: &str) -> Result<(u16, String), String> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {status_line:?}"))?;
    Ok((code, body.trim().to_string()))
}

pub fn check(facts: &AgentFacts, now: jiff::Timestamp) -> Vec<Check> {
    let mut checks = check_up(facts, now);
    checks.extend(check_health(facts));
    if let Some(st) = &facts.status {
        checks.push(check_rejected(st));
        checks.push(check_handshakes(st));
        checks.push(check_plaintext(st));
    }
    checks
}

fn check_health(facts: &AgentFacts) -> Option<Check> {
    const NAME: &str = "agent.health";
    let addr = facts.health_addr?;
    let version = facts
        .status
        .as_ref()
        .and_then(|s| s.agent_version.as_deref())
        .map_or(String::new(), |v| format!(", agent {v}"));
    Some(match facts.healthz.as_ref()? {
        Ok((200, _)) => Check::ok(NAME, format!("GET http://{addr}/healthz: 200{version}")),
        Ok((code, body)) => Check::fail(
            NAME,
            format!("GET http://{addr}/healthz: {code} {body}"),
            "the agent's reconcile loop is stalled: its log says where; restart its pod (kubectl -n veilnet-system delete pod …)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("GET http://{addr}/healthz: no answer ({e})"),
            "the agent is down, stuck or serves health elsewhere (--health-addr): check its pod and log",
        ),
    })
}

fn check_rejected(st: &NodeStatus) -> Check {
    const NAME: &str = "agent.rejected";
    if st.rejected.is_empty() {
        return Check::ok(NAME, "the overlay accepted every peer");
    }
    let list: Vec<String> = st
        .rejected
        .iter()
        .map(|(node, reason)| format!("{node}: {reason}"))
        .collect();
    Check::warn(
        NAME,
        format!(
            "{} peer(s) rejected, no pod traffic with them: {}",
            list.len(),
            list.join("; ")
        ),
        "fix the named Node objects (addresses, pod CIDRs, annotations); kubectl get node NAME -o yaml",
    )
}

/// WireGuard handshakes only when there is traffic to send (the agent sets no persistent
/// keepalive), so an idle pair legitimately has no session, or one older than 3 minutes: that is
/// a WARN, not a FAIL. Traffic that waits for a handshake the peer never answers does show here
/// too, so the WARN says what to look at.
fn check_handshakes(st: &NodeStatus) -> Check {
    const NAME: &str = "agent.handshakes";
    let wg: Vec<_> = st.peers.iter().filter(|p| p.path == "wireguard").collect();
    let stale: Vec<String> = wg
        .iter()
        .filter_map(|p| match p.last_handshake_seconds {
            // Nothing sent to it yet: no session is needed (WireGuard handshakes on demand).
            None if p.tx_bytes == 0 => None,
            // A key rotation: the previous key's session carries traffic meanwhile (bounded).
            None if p.key_rotation => None,
            None => Some(format!("{}: no handshake yet", p.node)),
            Some(s) if s > HANDSHAKE_STALE_AFTER.as_secs() => {
                Some(format!("{}: last handshake {s} s ago", p.node))
            }
            Some(_) => None,
        })
        .collect();
    if stale.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "{} WireGuard peer(s), every handshake within {} s (or nothing sent to it yet)",
                wg.len(),
                HANDSHAKE_STALE_AFTER.as_secs()
            ),
        );
    }
    Check::warn(
        NAME,
        format!(
            "{} of {} WireGuard peer(s) without a live session: {}",
            stale.len(),
            wg.len(),
            stale.join("; ")
        ),
        "fine if nothing talked to them; otherwise check that their WireGuard UDP port is reachable on the underlay (veilnet doctor on that node: datapath, ports) and that both run the same keys (veilnet status)",
    )
}

fn check_plaintext(st: &NodeStatus) -> Check {
    const NAME: &str = "agent.plaintext";
    let plain: Vec<_> = st.peers.iter().filter(|p| p.path == "vxlan").collect();
    if !st.mode.wants_encryption() || plain.is_empty() {
        return Check::ok(
            NAME,
            format!("mode {}: {} peer(s) in plaintext", st.mode, plain.len()),
        );
    }
    // A strict node never sends plaintext; an `on` node only to peers that do not encrypt.
    let wrong: Vec<String> = plain
        .iter()
        .filter(|p| st.mode == Mode::Strict || p.mode.is_some_and(Mode::wants_encryption))
        .map(|p| {
            format!(
                "{} (mode {})",
                p.node,
                p.mode.map_or("?".to_string(), |m| m.to_string())
            )
        })
        .collect();
    if !wrong.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "mode {} but plaintext VXLAN to {}",
                st.mode,
                wrong.join(", ")
            ),
            "the path plan disagrees with the modes: restart the agent and report it (veilnet status shows each peer's path)",
        );
    }
    let names: Vec<&str> = plain.iter().map(|p| p.node.as_str()).collect();
    Check::warn(
        NAME,
        format!(
            "mode on, plaintext VXLAN to {} peer(s) whose mode is off: {}",
            names.len(),
            names.join(", ")
        ),
        "label them veilnet.io/encryption=on (or this node strict to block them instead)",
    )
}

fn check_up(facts: &AgentFacts, now: jiff::Timestamp) -> Vec<Check> {
    const NAME: &str = "agent.up";
    let Some(st) = &facts.status else {
        return vec![Check::fail(
            NAME,
            format!(
                "no agent status ({})",
                facts.status_error.as_deref().unwrap_or("not read")
            ),
            "start the agent (the veilnet DaemonSet's pod on this node); its log says why it stopped",
        )];
    };
    let Ok(updated) = st.updated_at.parse::<jiff::Timestamp>() else {
        return vec![Check::fail(
            NAME,
            format!(
                "the status file's updatedAt {:?} is not a time",
                st.updated_at
            ),
            "restart the agent; it rewrites the file every 2 s",
        )];
    };
    let age = now.duration_since(updated);
    let age_s = age.as_secs_f64().max(0.0);
    if age > jiff::SignedDuration::try_from(STALE_AFTER).unwrap_or_default() {
        vec![Check::fail(
            NAME,
            format!("the agent last wrote its status {age_s:.0} s ago (every 2 s when running)"),
            "the agent is down or stuck: check its pod and log (kubectl -n veilnet-system logs)",
        )]
    } else {
        vec![Check::ok(
            NAME,
            format!(
                "agent of {} up: status {age_s:.0} s old, mode {}, {} peers",
                st.node,
                st.mode,
                st.peers.len()
            ),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_at(updated_at: &str) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "node": "node-1", "mode": "on", "podCidrs": ["10.244.1.0/24"],
            "underlayIp": "10.0.0.11", "underlayDev": "eth0", "podMtu": 1370,
            "publicKey": "k", "keyFingerprint": "f", "peers": [], "rejected": {},
            "matrix": {}, "updatedAt": updated_at,
        }))
        .unwrap()
    }

    #[test]
    fn fresh_status_is_ok_and_stale_or_missing_fails() {
        let now: jiff::Timestamp = "2026-12-02T10:00:30Z".parse().unwrap();
        let fresh = AgentFacts {
            status: Some(status_at("2026-12-02T10:00:28Z")),
            ..AgentFacts::default()
        };
        assert_eq!(check(&fresh, now)[0].verdict, super::super::Verdict::Ok);
        let stale = AgentFacts {
            status: Some(status_at("2026-12-02T09:58:00Z")),
            ..AgentFacts::default()
        };
        let c = &check(&stale, now)[0];
        assert_eq!(c.verdict, super::super::Verdict::Fail);
        assert!(c.evidence.contains("150 s ago"), "{}", c.evidence);
        let missing = AgentFacts {
            status: None,
            status_error: Some("/run/veilnet/status.json: No such file".into()),
            ..AgentFacts::default()
        };
        let c = &check(&missing, now)[0];
        assert_eq!(c.verdict, super::super::Verdict::Fail);
        assert!(c.evidence.contains("No such file"), "{}", c.evidence);
    }

    fn peer(node: &str, mode: &str, path: &str, handshake: Option<u64>) -> serde_json::Value {
        serde_json::json!({"node": node, "mode": mode, "path": path, "reason": null,
            "endpoint": null, "lastHandshakeSeconds": handshake, "rxBytes": 0, "txBytes": 0})
    }

    fn sent_to(mut peer: serde_json::Value) -> serde_json::Value {
        peer["txBytes"] = 500.into();
        peer
    }

    fn with(mode: &str, peers: Vec<serde_json::Value>) -> NodeStatus {
        let mut st = status_at("2026-12-02T10:00:28Z");
        let mut v = serde_json::to_value(&st).unwrap();
        v["mode"] = mode.into();
        v["peers"] = peers.into();
        st = serde_json::from_value(v).unwrap();
        st
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn health_endpoint_answers_or_fails() {
        use super::super::Verdict;
        let now: jiff::Timestamp = "2026-12-02T10:00:30Z".parse().unwrap();
        let mut facts = AgentFacts {
            status: Some(status_at("2026-12-02T10:00:28Z")),
            health_addr: Some("127.0.0.1:9891".parse().unwrap()),
            healthz: Some(Ok((200, "ok".into()))),
            ..AgentFacts::default()
        };
        assert_eq!(
            find(&check(&facts, now), "agent.health").verdict,
            Verdict::Ok
        );
        facts.healthz = Some(Ok((503, "reconcile loop stalled".into())));
        let c = find(&check(&facts, now), "agent.health").clone();
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.evidence.contains("503 reconcile loop stalled"),
            "{}",
            c.evidence
        );
        facts.healthz = Some(Err("Connection refused".into()));
        let c = find(&check(&facts, now), "agent.health").clone();
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("Connection refused"), "{}", c.evidence);
        assert_eq!(
            parse_http_response("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
            Ok((200, "ok".into()))
        );
        assert!(parse_http_response("garbage").is_err());
    }

    #[test]
    fn rejected_peers_are_named_with_their_reason() {
        use super::super::Verdict;
        let mut st = with("on", vec![]);
        assert_eq!(check_rejected(&st).verdict, Verdict::Ok);
        st.rejected
            .insert("node-9".into(), "its pod CIDR overlaps node-2's".into());
        let c = check_rejected(&st);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.evidence
                .contains("node-9: its pod CIDR overlaps node-2's"),
            "{}",
            c.evidence
        );
    }

    #[test]
    fn stale_or_missing_handshakes_warn() {
        use super::super::Verdict;
        let ok = with("on", vec![peer("node-2", "on", "wireguard", Some(100))]);
        assert_eq!(check_handshakes(&ok).verdict, Verdict::Ok);
        let stale = with(
            "on",
            vec![
                peer("node-2", "on", "wireguard", Some(181)),
                sent_to(peer("node-3", "on", "wireguard", None)),
                peer("node-4", "off", "vxlan", None),
                // Never sent to: idle, no session needed.
                peer("node-5", "on", "wireguard", None),
            ],
        );
        let c = check_handshakes(&stale);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.evidence.contains("2 of 3"), "{}", c.evidence);
        assert!(!c.evidence.contains("node-5"), "{}", c.evidence);
        let idle = with("on", vec![peer("node-5", "on", "wireguard", None)]);
        assert_eq!(check_handshakes(&idle).verdict, Verdict::Ok);
        // A peer's WARN does not make the agent down (cni.installed and ports judge by that).
        let facts = AgentFacts {
            status: Some(stale),
            ..AgentFacts::default()
        };
        let now: jiff::Timestamp = "2026-12-02T10:00:30Z".parse().unwrap();
        assert!(super::super::cni::agent_up(&facts, now));
        assert!(
            c.evidence.contains("node-2: last handshake 181 s ago"),
            "{}",
            c.evidence
        );
        assert!(
            c.evidence.contains("node-3: no handshake yet"),
            "{}",
            c.evidence
        );
        assert!(!c.evidence.contains("node-4"), "{}", c.evidence);
    }

    #[test]
    fn plaintext_while_encryption_is_wanted() {
        use super::super::Verdict;
        let off = with("off", vec![peer("node-2", "off", "vxlan", None)]);
        assert_eq!(check_plaintext(&off).verdict, Verdict::Ok);
        let on_to_off = with("on", vec![peer("node-2", "off", "vxlan", None)]);
        let c = check_plaintext(&on_to_off);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.evidence.contains("node-2"), "{}", c.evidence);
        let on_to_on = with("on", vec![peer("node-2", "on", "vxlan", None)]);
        assert_eq!(check_plaintext(&on_to_on).verdict, Verdict::Fail);
        let strict = with("strict", vec![peer("node-2", "off", "vxlan", None)]);
        let c = check_plaintext(&strict);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("mode strict"), "{}", c.evidence);
        let encrypted = with("strict", vec![peer("node-2", "on", "wireguard", Some(1))]);
        assert_eq!(check_plaintext(&encrypted).verdict, Verdict::Ok);
    }
}
