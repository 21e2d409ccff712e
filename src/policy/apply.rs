//! The thin applier: hands rendered scripts to nftables (in-process libnftables through
//! [`crate::netfilter::nft`], the `nft` binary only as a fallback), one transaction each, in the
//! node's network namespace, and reads counters back ([`crate::netfilter::counters`]).
//!
//! Why nft's text language rather than raw netlink or the `nftables` JSON crate: the script is the
//! golden-tested artefact itself (what tests check, what `nft -c` validates and what an operator
//! reads in `nft list ruleset`), and libnftables already turns a whole script into one atomic
//! netlink batch. Nothing here parses nft's text output; counters are read as JSON.
//!
//! [`NftApplier::update`] remembers the [`Ruleset`] it loaded last and sends only the
//! [`diff`](super::diff::diff) to the next one (a few set elements and pod chains for a label
//! change, instead of every object of both tables). It falls back to the full replace when there
//! is no previous ruleset, when the diff cannot express the change, or when the incremental
//! transaction fails (the kernel then still holds the old ruleset, as transactions are atomic).
//!
//! Everything is synchronous (a script takes milliseconds); async callers use
//! `tokio::task::spawn_blocking`.

use super::compile::CompiledPolicy;
use super::diff::{diff, Plan};
use super::render::render_nft;
use super::ruleset::{Family, Ruleset, TABLE};
use super::PolicyError;
use crate::netfilter::counters::{read_counters_of, CounterValue};
use crate::netfilter::nft::{self, Flags};
use crate::netns;

/// Result of [`NftApplier::apply`] and [`NftApplier::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A script (or the whole ruleset) replaced both tables.
    Applied,
    /// [`NftApplier::update`] replaced both tables instead of updating them, and why.
    Replaced { reason: String },
    /// [`NftApplier::update`] sent only what changed, in this many operations.
    Updated { operations: usize },
    /// Identical to what this applier loaded last; nothing was sent to the kernel.
    Unchanged,
}

/// Applies scripts in one namespace (`None`: the caller's own), remembering the last one.
#[derive(Debug, Default)]
pub struct NftApplier {
    netns: Option<String>,
    last_applied: Option<String>,
    /// The ruleset [`Self::update`] loaded last, if the kernel still holds it as far as we know.
    current: Option<Ruleset>,
}

impl NftApplier {
    pub fn new(netns: Option<&str>) -> Self {
        NftApplier {
            netns: netns.map(str::to_string),
            last_applied: None,
            current: None,
        }
    }

    /// Renders and applies `policy`.
    pub fn apply_compiled(&mut self, policy: &CompiledPolicy) -> Result<ApplyOutcome, PolicyError> {
        self.apply(&render_nft(policy))
    }

    /// Loads `script` atomically unless it equals the last script loaded by this applier.
    pub fn apply(&mut self, script: &str) -> Result<ApplyOutcome, PolicyError> {
        if self.last_applied.as_deref() == Some(script) {
            return Ok(ApplyOutcome::Unchanged);
        }
        self.current = None;
        run_nft(self.netns.as_deref(), script, Flags::default(), "apply")?;
        self.last_applied = Some(script.to_string());
        Ok(ApplyOutcome::Applied)
    }

    /// The ruleset [`Self::update`] loaded last (render the next one against it, so that names
    /// stay stable and the diff small).
    pub fn current(&self) -> Option<&Ruleset> {
        self.current.as_ref()
    }

    /// Brings the kernel to `new` in one transaction: the incremental delta from
    /// [`Self::current`] when possible, else the full replace.
    ///
    /// Named counters the transaction destroys are read just before it and handed to `bank`
    /// (with the ruleset that named them) once it has committed, so that whoever reports
    /// counters can keep them monotonic. An incremental update destroys only the counters of
    /// policies that no longer select a local pod — usually none, so a label change reads
    /// nothing from the kernel; a full replace destroys them all.
    pub fn update(
        &mut self,
        new: Ruleset,
        bank: &mut dyn FnMut(&Ruleset, &[CounterValue]),
    ) -> Result<ApplyOutcome, PolicyError> {
        let plan = match &self.current {
            Some(old) => diff(old, &new),
            None => Plan::Full {
                reason: "no ruleset loaded by this applier yet".into(),
            },
        };
        let reason = match plan {
            Plan::Incremental(delta) if delta.is_empty() => {
                self.current = Some(new);
                return Ok(ApplyOutcome::Unchanged);
            }
            Plan::Incremental(delta) => {
                let doomed: Vec<(Family, &str)> = delta.deleted_counters().collect();
                let read = if doomed.is_empty() {
                    Vec::new()
                } else {
                    self.read_counters_before_change(|c| {
                        doomed
                            .iter()
                            .any(|(f, n)| f.as_str() == c.family && *n == c.name)
                    })
                };
                let script = delta.script();
                match run_nft(self.netns.as_deref(), &script, Flags::default(), "update") {
                    Ok(_) => {
                        if let Some(old) = &self.current {
                            bank(old, &read);
                        }
                        self.current = Some(new);
                        self.last_applied = None;
                        return Ok(ApplyOutcome::Updated {
                            operations: delta.ops.len(),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "incremental nft update failed; replacing the whole ruleset");
                        format!("incremental update failed: {e}")
                    }
                }
            }
            Plan::Full { reason } => reason,
        };
        // Everything the old ruleset counted goes with it.
        let read = match &self.current {
            Some(_) => self.read_counters_before_change(|_| true),
            None => Vec::new(),
        };
        // On failure the kernel still holds the old ruleset (the transaction is atomic), so
        // `current` stays, and nothing was destroyed to bank.
        run_nft(
            self.netns.as_deref(),
            &new.script(),
            Flags::default(),
            "apply",
        )?;
        if let Some(old) = &self.current {
            bank(old, &read);
        }
        self.current = Some(new);
        self.last_applied = None;
        Ok(ApplyOutcome::Replaced { reason })
    }

    /// Counters that pass `keep`, read right before a transaction destroys them. A failed read
    /// costs only those counts, never the change.
    fn read_counters_before_change(
        &self,
        keep: impl Fn(&CounterValue) -> bool,
    ) -> Vec<CounterValue> {
        match self.counters() {
            Ok(all) => all.into_iter().filter(|c| keep(c)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the counters a ruleset change destroys");
                Vec::new()
            }
        }
    }

    /// Validates `script` against the kernel without committing it (`nft -c`).
    pub fn check(&self, script: &str) -> Result<(), PolicyError> {
        let flags = Flags {
            dry_run: true,
            ..Flags::default()
        };
        run_nft(self.netns.as_deref(), script, flags, "check").map(|_| ())
    }

    /// Forces the next [`apply`](Self::apply) or [`update`](Self::update) to replace the whole
    /// ruleset (e.g. after someone flushed it).
    pub fn forget(&mut self) {
        self.last_applied = None;
        self.current = None;
    }

    /// Deletes both veilnet tables (absent is fine), in one transaction.
    pub fn remove(&mut self) -> Result<(), PolicyError> {
        let script = format!(
            "table inet {TABLE} {{\n}}\ndelete table inet {TABLE}\n\
             table bridge {TABLE} {{\n}}\ndelete table bridge {TABLE}\n"
        );
        self.last_applied = None;
        self.current = None;
        run_nft(self.netns.as_deref(), &script, Flags::default(), "remove")?;
        Ok(())
    }

    /// Named counters of the veilnet tables (both families), from one netlink dump of the
    /// counter objects (see `counters`); through `nft -j list counters` only if netlink fails.
    pub fn counters(&self) -> Result<Vec<CounterValue>, PolicyError> {
        let read = match &self.netns {
            None => read_counters_of(TABLE),
            Some(ns) => netns::run_in(ns, || read_counters_of(TABLE))?,
        };
        read.or_else(|e| {
            tracing::debug!(error = %e, "netlink counter dump failed; asking nft");
            let flags = Flags {
                json: true,
                ..Flags::default()
            };
            let out = run_nft(
                self.netns.as_deref(),
                "list counters",
                flags,
                "list counters",
            )?;
            parse_counters(&out)
        })
    }
}

/// Picks veilnet's counters out of `nft -j list counters`.
pub fn parse_counters(json: &str) -> Result<Vec<CounterValue>, PolicyError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| PolicyError::Json(e.to_string()))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| PolicyError::Json("no \"nftables\" array".into()))?;
    Ok(items
        .iter()
        .filter_map(|item| item.get("counter"))
        .filter(|c| c["table"] == TABLE)
        .filter_map(|c| {
            Some(CounterValue {
                family: c["family"].as_str()?.to_string(),
                name: c["name"].as_str()?.to_string(),
                packets: c["packets"].as_u64().unwrap_or(0),
                bytes: c["bytes"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// Runs `script` through the shared runner (inside `netns` if given), returning its output.
fn run_nft(
    netns_name: Option<&str>,
    script: &str,
    flags: Flags,
    action: &str,
) -> Result<String, PolicyError> {
    Ok(nft::run(netns_name, script, flags, action)?)
}

/// Makes bridged IPv4/IPv6 frames traverse the inet hooks (with conntrack) in `netns`, so that
/// same-node pod-to-pod traffic meets the forward chain. br_netfilter's switches are per network
/// namespace; they are written from a thread inside it.
pub fn enable_bridge_netfilter(netns_name: Option<&str>) -> Result<(), PolicyError> {
    // Read first and write only what differs: in a container /proc/sys is read-only, and the
    // install manifest's init container has already set these through the host's /proc.
    fn write_switches() -> std::io::Result<()> {
        for key in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
            let path = format!("/proc/sys/net/bridge/{key}");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                continue;
            }
            std::fs::write(path, "1")?;
        }
        Ok(())
    }
    let label = netns_name.unwrap_or("current").to_string();
    let result = match netns_name {
        Some(ns) => netns::run_in(ns, write_switches)?,
        None => write_switches(),
    };
    result.map_err(|source| PolicyError::BrNetfilter {
        netns: label,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_filtered_to_veilnet() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"counter": {"family": "inet", "name": "pol_0", "table": "veilnet", "handle": 1, "packets": 3, "bytes": 180}},
          {"counter": {"family": "bridge", "name": "spoofed", "table": "veilnet", "handle": 2, "packets": 1, "bytes": 42}},
          {"counter": {"family": "inet", "name": "other", "table": "filter", "handle": 3, "packets": 9, "bytes": 9}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            CounterValue {
                family: "inet".into(),
                name: "pol_0".into(),
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(c[1].name, "spoofed");
        assert!(parse_counters("not json").is_err());
        assert!(parse_counters("{}").is_err());
    }
}
