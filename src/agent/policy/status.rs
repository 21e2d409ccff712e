//! Per-policy counters and the status file `<runDir>/policy-status.json`.
//!
//! The kernel's named counters start at zero with every ruleset (the tables are replaced whole), so
//! the agent banks their values just before each change and reports banked + current: counters
//! that only grow, per policy (by `namespace/name`, across ruleset generations) plus the default
//! deny and anti-spoofing drops.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::{
    CompiledPolicy, CounterValue, DENY_EGRESS_COUNTER, DENY_INGRESS_COUNTER, SPOOF_COUNTER,
};

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.packets = self.packets.saturating_add(other.packets);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// One policy's counter: new connections its rules allowed on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCounter {
    pub namespace: String,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Everything counted on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterSnapshot {
    pub policies: Vec<PolicyCounter>,
    pub deny_ingress: Count,
    pub deny_egress: Count,
    pub spoofed: Count,
}

/// Banks kernel counters across ruleset changes.
#[derive(Debug, Default)]
pub struct CounterBank {
    banked: BTreeMap<String, Count>,
}

/// Maps a kernel counter to its stable key (`ns/name` for policies) under `model`.
fn key_of(model: &CompiledPolicy, c: &CounterValue) -> Option<String> {
    match c.name.as_str() {
        DENY_INGRESS_COUNTER | DENY_EGRESS_COUNTER | SPOOF_COUNTER => Some(c.name.clone()),
        name => {
            let id: usize = name.strip_prefix("pol_")?.parse().ok()?;
            model.policies.get(id).map(|p| p.to_string())
        }
    }
}

impl CounterBank {
    /// Adds the kernel's values (read under `model`, the ruleset that produced them) to the bank;
    /// call right before replacing that ruleset.
    pub fn bank(&mut self, model: &CompiledPolicy, kernel: &[CounterValue]) {
        for c in kernel {
            if let Some(key) = key_of(model, c) {
                self.banked.entry(key).or_default().add(Count {
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
    }

    /// Banked + current values. Policies that select no local pod any more keep their count.
    pub fn snapshot(&self, model: &CompiledPolicy, kernel: &[CounterValue]) -> CounterSnapshot {
        let mut all = self.banked.clone();
        for c in kernel {
            if let Some(key) = key_of(model, c) {
                all.entry(key).or_default().add(Count {
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
        for p in &model.policies {
            all.entry(p.to_string()).or_default();
        }
        let mut out = CounterSnapshot::default();
        for (key, count) in all {
            match key.as_str() {
                DENY_INGRESS_COUNTER => out.deny_ingress = count,
                DENY_EGRESS_COUNTER => out.deny_egress = count,
                SPOOF_COUNTER => out.spoofed = count,
                _ => {
                    let (namespace, name) = key.split_once('/').unwrap_or(("", key.as_str()));
                    out.policies.push(PolicyCounter {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        packets: count.packets,
                        bytes: count.bytes,
                    });
                }
            }
        }
        out
    }
}

/// `<runDir>/policy-status.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub node: String,
    /// Incremented by every successful sync; ADD waits for the generation that holds its pod.
    pub generation: u64,
    /// RFC 3339 time of the last successful sync.
    pub synced_at: Option<String>,
    /// Policies in the cluster / selecting at least one local pod.
    pub policies_total: usize,
    pub policies_local: usize,
    pub local_pods: usize,
    pub pod_chains: usize,
    pub guarded_ports: usize,
    /// Duration of the last sync (build, compile, render, apply), in milliseconds.
    pub last_sync_ms: f64,
    pub warnings: Vec<String>,
    pub last_error: Option<String>,
    pub counters: CounterSnapshot,
}

impl PolicyStatus {
    /// Writes the file atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(path, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ObjectRef;

    fn counter(name: &str, packets: u64) -> CounterValue {
        CounterValue {
            family: "inet".into(),
            name: name.into(),
            packets,
            bytes: packets * 60,
        }
    }

    fn model(policies: &[&str]) -> CompiledPolicy {
        CompiledPolicy {
            policies: policies
                .iter()
                .map(|p| {
                    let (ns, n) = p.split_once('/').unwrap();
                    ObjectRef::new(ns, n)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn counts_survive_ruleset_changes_and_renumbering() {
        let mut bank = CounterBank::default();
        let first = model(&["x/allow-a", "x/allow-b"]);
        let k1 = [
            counter("pol_0", 3),
            counter("pol_1", 5),
            counter(DENY_INGRESS_COUNTER, 7),
        ];
        bank.bank(&first, &k1);
        // The new ruleset renumbers: allow-b is now pol_0, allow-a selects no local pod any more.
        let second = model(&["x/allow-b"]);
        let k2 = [counter("pol_0", 2), counter(SPOOF_COUNTER, 1)];
        let snap = bank.snapshot(&second, &k2);
        let by_name: BTreeMap<&str, u64> = snap
            .policies
            .iter()
            .map(|p| (p.name.as_str(), p.packets))
            .collect();
        assert_eq!(by_name["allow-a"], 3);
        assert_eq!(by_name["allow-b"], 7);
        assert_eq!(snap.deny_ingress.packets, 7);
        assert_eq!(
            snap.spoofed,
            Count {
                packets: 1,
                bytes: 60
            }
        );
        // Unknown kernel counters are ignored.
        let snap = bank.snapshot(&second, &[counter("pol_9", 100), counter("other", 1)]);
        assert_eq!(snap.policies.iter().map(|p| p.packets).sum::<u64>(), 8);
    }
}
