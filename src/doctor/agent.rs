//! The agent: is it up (its status file, rewritten every 2 s, is fresh)?

use std::time::Duration;

use super::{Check, Context};
use crate::agent::status::{self, NodeStatus};

/// The agent rewrites its status file every 2 s; older than this, it is down or stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// What was read from the node.
#[derive(Debug, Clone, Default)]
pub struct AgentFacts {
    /// The parsed status file, if there is one.
    pub status: Option<NodeStatus>,
    /// Why there is none (missing, unreadable, unparsable).
    pub status_error: Option<String>,
}

pub fn gather(ctx: &Context) -> AgentFacts {
    match status::read(&ctx.run_dir) {
        Ok(st) => AgentFacts {
            status: Some(st),
            status_error: None,
        },
        Err(e) => AgentFacts {
            status: None,
            status_error: Some(format!("{}: {e}", status::path(&ctx.run_dir).display())),
        },
    }
}

pub fn check(facts: &AgentFacts, now: jiff::Timestamp) -> Vec<Check> {
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
            status_error: None,
        };
        assert_eq!(check(&fresh, now)[0].verdict, super::super::Verdict::Ok);
        let stale = AgentFacts {
            status: Some(status_at("2026-12-02T09:58:00Z")),
            status_error: None,
        };
        let c = &check(&stale, now)[0];
        assert_eq!(c.verdict, super::super::Verdict::Fail);
        assert!(c.evidence.contains("150 s ago"), "{}", c.evidence);
        let missing = AgentFacts {
            status: None,
            status_error: Some("/run/veilnet/status.json: No such file".into()),
        };
        let c = &check(&missing, now)[0];
        assert_eq!(c.verdict, super::super::Verdict::Fail);
        assert!(c.evidence.contains("No such file"), "{}", c.evidence);
    }
}
