//! Per-policy counters and the status file `<runDir>/policy-status.json`.
//!
//! A kernel named counter lives as long as its object: an incremental update keeps every counter
//! of a policy that still selects a local pod, but a policy that stops selecting any (and every
//! counter, on a full replace) loses its counter. The applier reads exactly those counters right
//! before the transaction that destroys them and the agent banks them here; the agent reports
//! banked + current: counters that only grow, per policy (by `namespace/name`, across ruleset
//! generations and renumbering) plus the default deny and anti-spoofing drops.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::{
    CounterValue, Ruleset, DENY_EGRESS_COUNTER, DENY_INGRESS_COUNTER, SPOOF_COUNTER,
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

/// One local pod's DNS: queries to trusted or untrusted servers (UDP datagrams and TCP
/// connections to a DNS port), or NXDOMAIN answers it received, since it came under the guard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsCounter {
    pub namespace: String,
    pub pod: String,
    /// `trusted`, `untrusted` (queries) or `nxdomain` (answers).
    pub server: String,
    pub queries: u64,
}

/// Everything counted on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterSnapshot {
    pub policies: Vec<PolicyCounter>,
    pub deny_ingress: Count,
    pub deny_egress: Count,
    pub spoofed: Count,
    #[serde(default)]
    pub dns: Vec<DnsCounter>,
}

/// The bank's key of a DNS counter: `dns:<trusted|untrusted|nxdomain>:<ns>/<pod>`.
fn dns_key(pod: &crate::policy::ObjectRef, counts: crate::policy::DnsCount) -> String {
    format!("dns:{}:{pod}", counts.as_str())
}

/// Banks kernel counters across ruleset changes.
#[derive(Debug, Default)]
pub struct CounterBank {
    banked: BTreeMap<String, Count>,
}

/// Maps a kernel counter to its stable key (`ns/name` for policies) under `ruleset`, the ruleset
/// that named it.
fn key_of(ruleset: &Ruleset, c: &CounterValue) -> Option<String> {
    match c.name.as_str() {
        DENY_INGRESS_COUNTER | DENY_EGRESS_COUNTER | SPOOF_COUNTER => Some(c.name.clone()),
        name => match ruleset.counter_dns(name) {
            Some((pod, trusted)) => Some(dns_key(pod, trusted)),
            None => ruleset.counter_policy(name).map(|p| p.to_string()),
        },
    }
}

impl CounterBank {
    /// Adds the kernel's values (read under `ruleset`, the ruleset that named them) to the bank;
    /// call with the counters a change destroyed, once it has committed.
    pub fn bank(&mut self, ruleset: &Ruleset, kernel: &[CounterValue]) {
        for c in kernel {
            if let Some(key) = key_of(ruleset, c) {
                self.banked.entry(key).or_default().add(Count {
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
    }

    /// Drops the banked DNS counts of pods `current` no longer watches (deleted, or moved out of
    /// the guard): a pod's series ends with the pod, where a policy's outlives its selection.
    pub fn forget_gone_pods(&mut self, current: &Ruleset) {
        let live: std::collections::HashSet<String> = current
            .dns_counters()
            .map(|(_, pod, trusted)| dns_key(pod, trusted))
            .collect();
        self.banked
            .retain(|k, _| !k.starts_with("dns:") || live.contains(k));
    }

    /// Banked + current values. Policies that select no local pod any more keep their count.
    pub fn snapshot(&self, ruleset: &Ruleset, kernel: &[CounterValue]) -> CounterSnapshot {
        let mut all = self.banked.clone();
        for c in kernel {
            if let Some(key) = key_of(ruleset, c) {
                all.entry(key).or_default().add(Count {
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
        for (_, p) in ruleset.policy_counters() {
            all.entry(p.to_string()).or_default();
        }
        let mut live_dns = std::collections::HashSet::new();
        for (_, pod, trusted) in ruleset.dns_counters() {
            let key = dns_key(pod, trusted);
            all.entry(key.clone()).or_default();
            live_dns.insert(key);
        }
        let mut out = CounterSnapshot::default();
        for (key, count) in all {
            if let Some(rest) = key.strip_prefix("dns:") {
                if !live_dns.contains(&key) {
                    continue;
                }
                let (server, pod) = rest.split_once(':').unwrap_or((rest, ""));
                let (namespace, pod) = pod.split_once('/').unwrap_or(("", pod));
                out.dns.push(DnsCounter {
                    namespace: namespace.to_string(),
                    pod: pod.to_string(),
                    server: server.to_string(),
                    queries: count.packets,
                });
                continue;
            }
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
    /// Why the last sync failed; `None` once one succeeds.
    pub last_error: Option<String>,
    /// Syncs that failed since the agent started (the metric `veilnet_policy_sync_errors_total`).
    #[serde(default)]
    pub sync_errors: u64,
    pub counters: CounterSnapshot,
    /// Strict mode: established connections cut because a ruleset change denied them, since
    /// the agent started.
    #[serde(default)]
    pub connections_cut: u64,
    /// Network anomaly alerts raised since the agent started, by kind.
    #[serde(default)]
    pub alerts: BTreeMap<String, u64>,
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
    use crate::policy::{render, CompiledPolicy, ObjectRef};

    fn counter(name: &str, packets: u64) -> CounterValue {
        CounterValue {
            family: "inet".into(),
            name: name.into(),
            packets,
            bytes: packets * 60,
        }
    }

    fn ruleset(policies: &[&str], previous: Option<&Ruleset>) -> Ruleset {
        let model = CompiledPolicy {
            policies: policies
                .iter()
                .map(|p| {
                    let (ns, n) = p.split_once('/').unwrap();
                    ObjectRef::new(ns, n)
                })
                .collect(),
            ..Default::default()
        };
        render(&model, previous)
    }

    #[test]
    fn counts_survive_ruleset_changes_and_renumbering() {
        let mut bank = CounterBank::default();
        let first = ruleset(&["x/allow-a", "x/allow-b"], None);
        let k1 = [
            counter("pol_0", 3),
            counter("pol_1", 5),
            counter(DENY_INGRESS_COUNTER, 7),
        ];
        // A full replace destroyed everything first counted.
        bank.bank(&first, &k1);
        // The fresh ruleset renumbers: allow-b is now pol_0, allow-a selects no local pod any more.
        let second = ruleset(&["x/allow-b"], None);
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

    #[test]
    fn incremental_updates_bank_only_the_destroyed_counter() {
        let mut bank = CounterBank::default();
        let first = ruleset(&["x/a", "x/b", "x/c"], None);
        let before = bank.snapshot(
            &first,
            &[
                counter("pol_0", 1),
                counter("pol_1", 10),
                counter("pol_2", 100),
            ],
        );
        // x/b stops selecting local pods: its counter is deleted, the others keep counting
        // under the names they had.
        let second = ruleset(&["x/a", "x/c"], Some(&first));
        assert_eq!(
            second.policy_counters().map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["pol_0", "pol_2"]
        );
        bank.bank(&first, &[counter("pol_1", 11)]);
        let after = bank.snapshot(&second, &[counter("pol_0", 2), counter("pol_2", 100)]);
        let get = |s: &CounterSnapshot, n: &str| {
            s.policies.iter().find(|p| p.name == n).map(|p| p.packets)
        };
        for name in ["a", "b", "c"] {
            assert!(get(&after, name) >= get(&before, name), "{name} went down");
        }
        assert_eq!(
            (get(&after, "a"), get(&after, "b"), get(&after, "c")),
            (Some(2), Some(11), Some(100))
        );
    }
}
