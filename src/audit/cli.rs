//! `veilnet audit [--lab NAME | --kubeconfig K] [--json]` (and `kubectl veilnet audit`): reads
//! pods, namespaces, NetworkPolicies and Nodes, prints the findings, and exits 1 when there are
//! any (0 when clean, 2 when the cluster could not be read).

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::Api;

use super::findings::{audit, Inputs, Report, SYSTEM_NAMESPACES};
use crate::policy::cli::{ClusterSource, PolicyCliError};

/// Exit status when something was found.
pub const EXIT_FOUND: i32 = 1;
/// Exit status when the audit could not run (so CI tells "findings" from "broken").
pub const EXIT_ERROR: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Cluster(#[from] PolicyCliError),
    #[error("kubernetes API: listing {what}: {source}")]
    List {
        what: &'static str,
        source: kube::Error,
    },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub cluster: ClusterSource,
    /// Also audit the system namespaces (kube-system, kube-public, kube-node-lease,
    /// veilnet-system), whose pods need host access by design.
    #[arg(long)]
    pub include_system: bool,
    /// Print JSON (`{"findings": [{kind, object, risk, fix}], …}`).
    #[arg(long)]
    pub json: bool,
}

/// The objects the audit reads, listed once each.
#[derive(Debug, Default)]
struct Objects {
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
    policies: Vec<NetworkPolicy>,
    nodes: Vec<Node>,
}

/// Every object of a kind, in all namespaces.
async fn list<K>(client: &kube::Client, what: &'static str) -> Result<Vec<K>, AuditError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|source| AuditError::List { what, source })
}

async fn fetch(client: kube::Client) -> Result<Objects, AuditError> {
    Ok(Objects {
        pods: list(&client, "pods").await?,
        namespaces: list(&client, "namespaces").await?,
        policies: list(&client, "networkpolicies").await?,
        nodes: list(&client, "nodes").await?,
    })
}

/// Runs the audit: what to print and the exit status ([`EXIT_FOUND`] when anything is found).
pub fn run(args: AuditArgs) -> Result<(String, i32), AuditError> {
    let objects = args.cluster.read(fetch)?;
    let report = audit(Inputs {
        pods: &objects.pods,
        namespaces: &objects.namespaces,
        policies: &objects.policies,
        nodes: &objects.nodes,
        include_system: args.include_system,
    });
    let text = if args.json {
        serde_json::to_string_pretty(&report)?
    } else {
        render(&report)
    };
    let code = if report.findings.is_empty() {
        0
    } else {
        EXIT_FOUND
    };
    Ok((text, code))
}

/// The findings, a block each, then a summary line.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for f in &report.findings {
        out.push_str(&format!(
            "{:<24} {}\n  risk: {}\n  fix:  {}\n",
            f.kind.as_str(),
            f.object,
            f.risk,
            f.fix
        ));
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &report.findings {
        *counts.entry(f.kind.as_str()).or_default() += 1;
    }
    let summary = if counts.is_empty() {
        "no findings".to_string()
    } else {
        let by_kind: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "{} finding(s): {}",
            report.findings.len(),
            by_kind.join(", ")
        )
    };
    out.push_str(&format!(
        "{summary} (audited {} pod(s) in {} namespace(s), {} node(s))",
        report.pods_audited, report.namespaces_audited, report.nodes_audited
    ));
    if report.system_pods_skipped > 0 {
        out.push_str(&format!(
            "\n{} pod(s) in system namespaces ({}) not audited: --include-system to audit them",
            report.system_pods_skipped,
            SYSTEM_NAMESPACES.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Finding, Kind};

    #[test]
    fn the_text_names_each_finding_and_sums_them_up() {
        let report = Report {
            findings: vec![
                Finding {
                    kind: Kind::HostNetwork,
                    object: "Pod app/h".into(),
                    risk: "r1".into(),
                    fix: "f1".into(),
                },
                Finding {
                    kind: Kind::HostNetwork,
                    object: "Pod app/i".into(),
                    risk: "r2".into(),
                    fix: "f2".into(),
                },
            ],
            pods_audited: 3,
            namespaces_audited: 1,
            nodes_audited: 2,
            system_pods_skipped: 4,
        };
        let text = render(&report);
        assert!(
            text.starts_with("host-network             Pod app/h\n  risk: r1\n  fix:  f1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "2 finding(s): 2 host-network (audited 3 pod(s) in 1 namespace(s), 2 node(s))"
            ),
            "{text}"
        );
        assert!(text.contains("4 pod(s) in system namespaces"), "{text}");
        let clean = render(&Report::default());
        assert_eq!(
            clean,
            "no findings (audited 0 pod(s) in 0 namespace(s), 0 node(s))"
        );
    }

    #[test]
    fn json_names_kinds_in_kebab_case() {
        let report = Report {
            findings: vec![Finding {
                kind: Kind::NetRawNotDropped,
                object: "Pod a/b".into(),
                risk: "r".into(),
                fix: "f".into(),
            }],
            ..Default::default()
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["findings"][0]["kind"], "net-raw-not-dropped");
        assert_eq!(v["podsAudited"], 0);
    }
}
