//! `veilnet status`: what this node's agent is doing, read from its status file.

use std::path::PathBuf;

use anyhow::Context;

use crate::agent::status;
use crate::lab_paths::LabPaths;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's run directory (where it writes status.json).
    #[arg(long, env = "VEILNET_RUN_DIR", default_value = "/run/veilnet")]
    pub run_dir: PathBuf,
    /// In a lab: the lab's name (use with --node instead of --run-dir).
    #[arg(long, requires = "node")]
    pub lab: Option<String>,
    /// In a lab: the node, e.g. node-1.
    #[arg(long, requires = "lab")]
    pub node: Option<String>,
    /// Machine-readable output (the status file as is).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let run_dir = match (&args.lab, &args.node) {
        (Some(lab), Some(node)) => LabPaths::new(lab)?.node_run_dir(node),
        _ => args.run_dir.clone(),
    };
    let st = status::read(&run_dir).with_context(|| {
        format!(
            "no agent status in {} (is the agent running on this node?)",
            run_dir.display()
        )
    })?;
    // The policy enforcer's own status file, when it runs.
    let policy: Option<serde_json::Value> =
        std::fs::read_to_string(run_dir.join(crate::agent::policy::STATUS_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    if args.json {
        let mut v = serde_json::to_value(&st)?;
        v["policy"] = policy.unwrap_or(serde_json::Value::Null);
        crate::stdout::println(&serde_json::to_string_pretty(&v)?)?;
    } else {
        let mut text = status::render(&st);
        if let Some(p) = policy {
            text += &format!(
                "policy: {} NetworkPolicies ({} select pods here), {} local pods, ruleset generation {}, last sync {:.1} ms",
                p["policiesTotal"], p["policiesLocal"], p["localPods"], p["generation"], p["lastSyncMs"].as_f64().unwrap_or(0.0)
            );
            text.push('\n');
        }
        crate::stdout::print(&text)?;
    }
    Ok(())
}
