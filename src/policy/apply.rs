//! The thin applier: hands a rendered script to `nft -f -` as one transaction, in the node's
//! network namespace, and reads counters back.
//!
//! Why the `nft` binary and a text script rather than netlink or the `nftables` JSON crate: the
//! script is the golden-tested artefact itself (what tests check, what `nft -c` validates and what
//! an operator reads in `nft list ruleset`), and `nft -f` already turns a whole file into one
//! atomic netlink batch. Nothing here parses nft's text output; counters are read as JSON.
//!
//! Everything is synchronous (spawning nft takes milliseconds); async callers use
//! `tokio::task::spawn_blocking`.

use std::io::Write;
use std::process::{Command, Stdio};

use super::compile::CompiledPolicy;
use super::render::{render_nft, TABLE};
use super::PolicyError;
use crate::netns;

/// Result of [`NftApplier::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    /// Identical to the last script this applier loaded; nothing was sent to the kernel.
    Unchanged,
}

/// Applies scripts in one namespace (`None`: the caller's own), remembering the last one.
#[derive(Debug, Default)]
pub struct NftApplier {
    netns: Option<String>,
    last_applied: Option<String>,
}

impl NftApplier {
    pub fn new(netns: Option<&str>) -> Self {
        NftApplier {
            netns: netns.map(str::to_string),
            last_applied: None,
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
        run_nft(self.netns.as_deref(), &["-f", "-"], Some(script), "apply")?;
        self.last_applied = Some(script.to_string());
        Ok(ApplyOutcome::Applied)
    }

    /// True if `script` is what this applier loaded last (so `apply` would not touch the kernel).
    pub fn is_current(&self, script: &str) -> bool {
        self.last_applied.as_deref() == Some(script)
    }

    /// Validates `script` against the kernel without committing it (`nft -c`).
    pub fn check(&self, script: &str) -> Result<(), PolicyError> {
        run_nft(
            self.netns.as_deref(),
            &["-c", "-f", "-"],
            Some(script),
            "check",
        )
        .map(|_| ())
    }

    /// Forces the next [`apply`](Self::apply) to reach the kernel (e.g. after someone flushed
    /// the ruleset).
    pub fn forget(&mut self) {
        self.last_applied = None;
    }

    /// Deletes both veilnet tables (absent is fine), in one transaction.
    pub fn remove(&mut self) -> Result<(), PolicyError> {
        let script = format!(
            "table inet {TABLE} {{\n}}\ndelete table inet {TABLE}\n\
             table bridge {TABLE} {{\n}}\ndelete table bridge {TABLE}\n"
        );
        run_nft(self.netns.as_deref(), &["-f", "-"], Some(&script), "remove")?;
        self.last_applied = None;
        Ok(())
    }

    /// Named counters of the veilnet tables (both families).
    pub fn counters(&self) -> Result<Vec<CounterValue>, PolicyError> {
        let out = run_nft(
            self.netns.as_deref(),
            &["-j", "list", "counters"],
            None,
            "list counters",
        )?;
        parse_counters(&out)
    }
}

/// One named counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterValue {
    pub family: String,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
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

/// Runs `nft ARGS` (inside `netns` if given) with `stdin`, returning stdout.
fn run_nft(
    netns_name: Option<&str>,
    args: &[&str],
    stdin: Option<&str>,
    action: &str,
) -> Result<String, PolicyError> {
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns_name {
        netns::command_in(ns, &mut cmd)?;
    }
    let spawn_err = |source| PolicyError::Spawn {
        action: action.to_string(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads the whole script before it answers, so writing first cannot deadlock on a
        // full stdout pipe.
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(PolicyError::Nft {
            action: action.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
