//! The Grafana dashboard (`manifests/grafana-dashboard.json`) is a dashboard with a Prometheus
//! data source variable and the panels the operator needs, and every metric name in its queries
//! and in the alert rules (`manifests/prometheus-rules.rules.yml`) is one the agent exports:
//! checked against `veilnet::agent::metrics::exported_names()`, the names the agent's encoder
//! writes (`tests/lab_prometheus.rs` checks those against real agents' scrapes). Pure.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `veilnet_…` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("veilnet_"))
        .map(str::to_string)
        .collect()
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(root().join("manifests/grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// `(where, expr)` of every query of the dashboard: panel targets and templating queries.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or_default();
        for t in p["targets"].as_array().unwrap_or(&Vec::new()) {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            out.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

#[test]
fn the_dashboard_has_a_datasource_variable_and_the_panels_it_promises() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "no Prometheus datasource variable"
    );
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are not unique");
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
    // Each subject of the issue, by the metric its panel shows.
    let shown: BTreeSet<String> = dashboard_queries(&d)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for want in [
        "veilnet_wireguard_sent_bytes_total",
        "veilnet_wireguard_received_bytes_total",
        "veilnet_wireguard_handshake_age_seconds",
        "veilnet_peer_path",
        "veilnet_policy_allowed_packets_total",
        "veilnet_policy_denied_packets_total",
        "veilnet_wire_dropped_packets_total",
        "veilnet_ipam_addresses_used",
        "veilnet_datapath_up",
    ] {
        assert!(shown.contains(want), "no panel shows {want}");
    }
}

#[test]
fn dashboard_and_alert_queries_use_only_metrics_the_agent_exports() {
    let exported = veilnet::agent::metrics::exported_names();
    let mut queries = dashboard_queries(&dashboard());
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("manifests/prometheus-rules.rules.yml")).unwrap(),
    )
    .unwrap();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            queries.push((
                format!("alert {}", r["alert"]),
                r["expr"].as_str().unwrap().into(),
            ));
        }
    }
    let mut unknown = Vec::new();
    for (at, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{at}: no veilnet metric in {expr:?}");
        unknown.extend(
            names
                .into_iter()
                .filter(|n| !exported.contains(n))
                .map(|n| format!("{at}: {n}")),
        );
    }
    assert!(
        unknown.is_empty(),
        "metrics the agent does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
}

#[test]
fn an_unknown_metric_is_caught() {
    let exported = veilnet::agent::metrics::exported_names();
    let names = metric_names(r#"rate(veilnet_wireguard_sent_bytes[5m]) + veilnet_datapath_up"#);
    assert_eq!(
        names,
        ["veilnet_wireguard_sent_bytes", "veilnet_datapath_up"]
    );
    assert!(
        !exported.contains(&names[0]),
        "a counter is exported as _total only"
    );
    assert!(exported.contains(&names[1]));
}
