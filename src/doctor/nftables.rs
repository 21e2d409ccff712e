//! veilnet's nftables tables in the node's namespace: present, and what the agent last applied
//! (its record in the run directory, [`crate::netfilter::applied`]), compared without counters,
//! dynamic set elements and handles.

use super::{Check, Context};
use crate::agent::status::NodeStatus;
use crate::netfilter::applied;

/// The tables, and whether the agent always loads it (the wire table) or only when its record
/// says so (the policy tables: absent with `--no-policy`).
pub const TABLES: [(&str, &str, bool); 3] = [
    ("inet", crate::kernel::wire::TABLE, true),
    ("inet", crate::policy::TABLE, false),
    ("bridge", crate::policy::TABLE, false),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    pub family: String,
    pub table: String,
    pub always: bool,
    /// The agent's record (canonical), if any.
    pub recorded: Option<String>,
    /// The kernel's listing, canonicalised: `None` when the table is absent; or why it could not
    /// be listed.
    pub current: Result<Option<String>, String>,
}

pub fn gather(ctx: &Context) -> Vec<TableFacts> {
    TABLES
        .iter()
        .map(|&(family, table, always)| {
            let record =
                || std::fs::read_to_string(applied::record_path(&ctx.run_dir, family, table)).ok();
            let attempt = || {
                let before = record();
                let current = list(ctx.netns.as_deref(), family, table);
                (before.clone(), current, before == record())
            };
            // The agent may load a change between our two reads: then try once more.
            let (mut recorded, mut current, stable) = attempt();
            if !stable {
                (recorded, current, _) = attempt();
            }
            TableFacts {
                family: family.into(),
                table: table.into(),
                always,
                recorded,
                current,
            }
        })
        .collect()
}

fn list(netns: Option<&str>, family: &str, table: &str) -> Result<Option<String>, String> {
    let (f, t) = (family.to_string(), table.to_string());
    let run = move || {
        applied::list_here(&f, &t)
            .map(|l| l.map(|text| applied::canonical(&text)))
            .map_err(|e| e.to_string())
    };
    match netns {
        None => run(),
        Some(ns) => crate::netns::run_in(ns, run).unwrap_or_else(|e| Err(e.to_string())),
    }
}

pub fn check(tables: &[TableFacts], status: Option<&NodeStatus>) -> Vec<Check> {
    tables
        .iter()
        .filter_map(|t| check_table(t, status.is_some()))
        .collect()
}

fn check_table(t: &TableFacts, agent_ran: bool) -> Option<Check> {
    let name = format!("nftables.{}.{}", t.family, t.table);
    let spec = format!("{} {}", t.family, t.table);
    let current = match &t.current {
        Err(e) => {
            return Some(Check::warn(
                &name,
                format!("cannot list table {spec}: {e}"),
                "run as root on the node (nft list ruleset needs CAP_NET_ADMIN)",
            ))
        }
        Ok(c) => c,
    };
    let expected = t.always && agent_ran || t.recorded.is_some();
    Some(match (current, &t.recorded) {
        (None, _) if !expected => return None,
        (None, _) => Check::fail(
            &name,
            format!("table {spec} is missing: the agent applied it, something removed it"),
            "restart the agent (it loads every table at start; it restores the wire table by itself within seconds); find what deletes it (another firewall manager, a flush ruleset)",
        ),
        (Some(text), None) => Check::ok(
            &name,
            format!(
                "table {spec} present, {} lines (no record of what the agent applied to compare with)",
                text.lines().count()
            ),
        ),
        (Some(text), Some(recorded)) => match applied::first_difference(recorded, text) {
            None => Check::ok(
                &name,
                format!(
                    "table {spec} present, {} lines, as the agent applied it",
                    text.lines().count()
                ),
            ),
            Some(diff) => Check::fail(
                &name,
                format!("table {spec} differs from what the agent applied: {diff}"),
                format!("something edited veilnet's table: find it (nft list table {spec}); restart the agent to reload it"),
            ),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    const WIRE: &str = "table inet veilnet_wire {\n\tchain forward {\n\t\tdrop\n\t}\n}\n";

    fn table(
        always: bool,
        recorded: Option<&str>,
        current: Result<Option<&str>, &str>,
    ) -> TableFacts {
        TableFacts {
            family: "inet".into(),
            table: if always { "veilnet_wire" } else { "veilnet" }.into(),
            always,
            recorded: recorded.map(str::to_string),
            current: current
                .map(|c| c.map(str::to_string))
                .map_err(str::to_string),
        }
    }

    #[test]
    fn a_table_as_applied_is_ok() {
        let c = check_table(&table(true, Some(WIRE), Ok(Some(WIRE))), true).unwrap();
        assert_eq!(c.verdict, Verdict::Ok);
        assert_eq!(c.name, "nftables.inet.veilnet_wire");
        let c = check_table(&table(true, None, Ok(Some(WIRE))), true).unwrap();
        assert_eq!(c.verdict, Verdict::Ok);
    }

    #[test]
    fn a_missing_table_fails_when_expected() {
        let c = check_table(&table(true, Some(WIRE), Ok(None)), true).unwrap();
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.evidence.contains("inet veilnet_wire is missing"),
            "{}",
            c.evidence
        );
        let c = check_table(&table(true, None, Ok(None)), true).unwrap();
        assert_eq!(c.verdict, Verdict::Fail);
        // A policy table without a record: policy enforcement is off, nothing to say.
        assert!(check_table(&table(false, None, Ok(None)), true).is_none());
        let c = check_table(&table(false, Some(WIRE), Ok(None)), true).unwrap();
        assert_eq!(c.verdict, Verdict::Fail);
    }

    #[test]
    fn drift_fails_naming_the_first_difference() {
        let edited = WIRE.replace("\t\tdrop\n", "\t\tip saddr 1.2.3.4 accept\n\t\tdrop\n");
        let c = check_table(&table(true, Some(WIRE), Ok(Some(&edited))), true).unwrap();
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.evidence.contains("ip saddr 1.2.3.4 accept"),
            "{}",
            c.evidence
        );
    }

    #[test]
    fn an_unlistable_table_warns() {
        let c = check_table(&table(true, None, Err("Operation not permitted")), true).unwrap();
        assert_eq!(c.verdict, Verdict::Warn);
    }
}
