//! `veilnet observe`: who talked to whom, across every node — the flow logs of all agents merged,
//! oldest first, filtered, as a table or JSON lines (Hubble's job, from the agents' flow logs).
//!
//! Where the lines come from:
//! - `--lab NAME`: the lab's node run directories, read directly (the lab is on this machine).
//! - a cluster (`--kubeconfig`, else `$KUBECONFIG`, `~/.kube/config`, in-cluster): each agent's
//!   flows endpoint through the API server's proxy, so Kubernetes authorizes every read: the
//!   agent pods' `pods/proxy` in the agent namespace (the `veilnet-flow-reader` Role of the
//!   manifest), or, where no agent pod exists (the lab's API), `nodes/proxy`.

pub mod filter;
mod source;

use std::collections::BTreeSet;
use std::time::Duration;

use filter::{Filter, FilterArgs, FilterError, FlowLine};
pub use source::Source;

/// Exit status when the flows could not be read at all or an option is wrong (1: some node's
/// could not be read, the others were printed).
pub const EXIT_ERROR: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
}

#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// The cluster (its agents' flows through the API server), or with `--lab` a lab's node
    /// files, read directly.
    #[command(flatten)]
    pub cluster: crate::policy::cli::ClusterSource,
    #[command(flatten)]
    pub view: ViewArgs,
}

/// What to show (shared with `kubectl veilnet observe`, whose cluster options are its own).
#[derive(Debug, Clone, clap::Args)]
pub struct ViewArgs {
    /// Keep printing new lines as the agents log them (until interrupted).
    #[arg(long, short)]
    pub follow: bool,
    /// Only flows from or to pods of this namespace.
    #[arg(long, short)]
    pub namespace: Option<String>,
    /// Only flows from or to this pod (NAME with --namespace, or NAMESPACE/NAME).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this verdict (allow, deny, spoof, vxlan-rejected, dns-untrusted, dns, egress).
    #[arg(long)]
    pub verdict: Option<String>,
    /// Only flows this policy decided (NAMESPACE/NAME, or "default deny", "anti-spoofing",
    /// "trusted DNS", "vxlan source check", "new-destination watch").
    #[arg(long)]
    pub policy: Option<String>,
    /// Only flows whose pair was (true) or was not (false) encrypted.
    #[arg(long, action = clap::ArgAction::Set)]
    pub encrypted: Option<bool>,
    /// Only lines logged by this node's agent.
    #[arg(long)]
    pub node: Option<String>,
    /// Only lines at most this old (30s, 5m, 2h) or at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// JSON lines, as the agents logged them.
    #[arg(long)]
    pub json: bool,
    /// The agents' flows port (their `--flows-addr`).
    #[arg(long, default_value_t = source::DEFAULT_FLOWS_PORT)]
    pub flows_port: u16,
    /// The namespace of the agent pods (the manifest's).
    #[arg(long, default_value = crate::agent::config::DEFAULT_NAMESPACE)]
    pub agent_namespace: String,
}

/// A line as read: its parsed fields, its time, and its text.
#[derive(Clone, Debug)]
pub struct Read {
    pub line: FlowLine,
    pub time: jiff::Timestamp,
    pub raw: String,
}

/// Reads lines, skipping what is not a flow line (counted in `skipped`).
pub fn parse_lines(text: &str, skipped: &mut usize) -> Vec<Read> {
    let mut out = Vec::new();
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = serde_json::from_str::<FlowLine>(raw)
            .ok()
            .and_then(|line| Some((line.time.parse::<jiff::Timestamp>().ok()?, line)));
        match parsed {
            Some((time, line)) => out.push(Read {
                line,
                time,
                raw: raw.to_string(),
            }),
            None => *skipped += 1,
        }
    }
    out
}

/// Every node's lines merged, oldest first (a stable sort: one node's order is kept at equal
/// times), filtered (pure).
pub fn merge(per_node: Vec<Vec<Read>>, filter: &Filter) -> Vec<Read> {
    let mut all: Vec<Read> = per_node
        .into_iter()
        .flatten()
        .filter(|r| filter.matches(&r.line))
        .collect();
    all.sort_by_key(|r| r.time);
    all
}

/// The table's header.
pub const HEADER: &str = "TIME                      NODE         VERDICT        SOURCE -> DESTINATION                                   PROTO  POLICY                  PATH";

/// One table row.
pub fn row(r: &Read) -> String {
    let l = &r.line;
    let path = match (&l.path, l.encrypted) {
        (Some(p), Some(true)) => format!("{p} (encrypted)"),
        (Some(p), _) => p.clone(),
        (None, _) => "-".into(),
    };
    let time = r
        .time
        .round(jiff::TimestampRound::new().smallest(jiff::Unit::Millisecond))
        .unwrap_or(r.time);
    format!(
        "{:<25} {:<12} {:<14} {:<55} {:<6} {:<23} {}",
        time.to_string(),
        l.node,
        l.verdict,
        format!("{} -> {}", l.src.label(), l.dst.label()),
        l.protocol,
        l.policy,
        path
    )
}

/// The printed form of lines.
fn render(lines: &[Read], json: bool) -> String {
    let mut out = String::new();
    for r in lines {
        if json {
            out.push_str(&r.raw);
        } else {
            out.push_str(&row(r));
        }
        out.push('\n');
    }
    out
}

/// Runs the command, writing to stdout; the exit status.
pub fn run(args: ObserveArgs) -> Result<i32, ObserveError> {
    let ObserveArgs {
        cluster:
            crate::policy::cli::ClusterSource {
                kubeconfig,
                context,
                lab,
            },
        view: args,
    } = args;
    let filter = Filter::parse(FilterArgs {
        namespace: args.namespace.as_deref(),
        pod: args.pod.as_deref(),
        verdict: args.verdict.as_deref(),
        policy: args.policy.as_deref(),
        encrypted: args.encrypted,
        node: args.node.as_deref(),
    })?;
    let now = jiff::Timestamp::now();
    let since = args
        .since
        .as_deref()
        .map(|s| filter::parse_since(s, now))
        .transpose()?;
    let source = Source::new(
        lab,
        kubeconfig,
        context,
        args.flows_port,
        args.agent_namespace.clone(),
    )?;
    let print = |text: &str| crate::stdout::print(text).is_ok();
    if !args.json && !print(&format!("{HEADER}\n")) {
        return Ok(1);
    }
    let mut failed = false;
    let mut first = true;
    // --follow: lines already printed within the overlap each poll re-reads, oldest first.
    let mut seen: BTreeSet<(jiff::Timestamp, String)> = BTreeSet::new();
    let mut cursor = since;
    loop {
        let fetched = source.fetch(cursor)?;
        let mut skipped = 0;
        let mut per_node = Vec::new();
        for (node, result) in fetched {
            match result {
                Ok(text) => per_node.push(parse_lines(&text, &mut skipped)),
                Err(e) => {
                    if first || !args.follow {
                        eprintln!("warning: {node}: {e}");
                    }
                    failed = true;
                }
            }
        }
        if skipped > 0 && first {
            eprintln!("warning: {skipped} line(s) that are not flow lines skipped");
        }
        let mut lines = merge(per_node, &filter);
        if args.follow {
            lines.retain(|r| !seen.contains(&(r.time, r.raw.clone())));
        }
        if !print(&render(&lines, args.json)) {
            return Ok(1);
        }
        if !args.follow {
            return Ok(if failed { 1 } else { 0 });
        }
        // Re-read a window behind the newest line each time: agents flush in batches, so a
        // node's line may arrive after a later one of another node.
        let horizon = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(30))
            .unwrap_or(now);
        seen.extend(lines.into_iter().map(|r| (r.time, r.raw)));
        while seen.first().is_some_and(|(t, _)| *t < horizon) {
            seen.pop_first();
        }
        cursor = Some(match cursor {
            Some(c) if c > horizon => c,
            _ => horizon,
        });
        first = false;
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_merge_oldest_first_and_junk_is_counted_not_fatal() {
        let mut skipped = 0;
        let a = parse_lines(
            "{\"time\":\"2026-01-01T00:00:02Z\",\"node\":\"a\",\"verdict\":\"deny\"}\n\
             not json\n{\"time\":\"yesterday\"}\n\n",
            &mut skipped,
        );
        let b = parse_lines(
            "{\"time\":\"2026-01-01T00:00:01Z\",\"node\":\"b\",\"verdict\":\"allow\"}\n\
             {\"time\":\"2026-01-01T00:00:03Z\",\"node\":\"b\",\"verdict\":\"deny\"}",
            &mut skipped,
        );
        assert_eq!(skipped, 2);
        let all = merge(vec![a.clone(), b.clone()], &Filter::default());
        let order: Vec<&str> = all.iter().map(|r| r.line.node.as_str()).collect();
        assert_eq!(order, ["b", "a", "b"]);
        let denies = Filter::parse(FilterArgs {
            verdict: Some("deny"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(merge(vec![a, b], &denies).len(), 2);
    }

    #[test]
    fn json_output_is_the_line_as_logged_and_the_table_names_the_path() {
        let mut skipped = 0;
        let raw = r#"{"time":"2026-01-01T00:00:00.123456Z","node":"node-1","verdict":"allow","policy":"x/web","protocol":"TCP","path":"wireguard","encrypted":true,"src":{"ip":"10.244.2.5","port":4,"namespace":"y","pod":"c"},"dst":{"ip":"10.244.1.7","port":80,"namespace":"x","pod":"w"}}"#;
        let lines = parse_lines(raw, &mut skipped);
        assert_eq!(render(&lines, true), format!("{raw}\n"));
        let table = render(&lines, false);
        assert!(table.starts_with("2026-01-01T00:00:00.123Z"), "{table}");
        for part in ["y/c:4 -> x/w:80", "x/web", "wireguard (encrypted)"] {
            assert!(table.contains(part), "{part} in {table}");
        }
    }
}
