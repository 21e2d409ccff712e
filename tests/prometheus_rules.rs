//! The alert rules (`manifests/prometheus-rules.yaml`, a PrometheusRule, and
//! `manifests/prometheus-rules.rules.yml`, the same groups as a plain rules file): both hold the
//! same rules, and Debian's `promtool` checks the rules file and runs its unit tests
//! (`tests/prometheus/rules-test.yml`). No root needed when promtool is installed; as root
//! (`./scripts/test.sh`, which installs the `prometheus` package) a missing promtool fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_prometheus_rule_and_the_rules_file_hold_the_same_groups() {
    let object = yaml(&root().join("manifests/prometheus-rules.yaml"));
    let plain = yaml(&root().join("manifests/prometheus-rules.rules.yml"));
    assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(object["kind"], "PrometheusRule");
    assert_eq!(object["metadata"]["namespace"], "veilnet-system");
    let groups = plain["groups"]
        .as_array()
        .expect("groups in the rules file");
    assert!(!groups.is_empty());
    assert_eq!(&object["spec"]["groups"], &plain["groups"]);
    let alerts: Vec<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().expect("every rule is an alert"))
        .collect();
    for want in [
        "VeilnetDatapathDown",
        "VeilnetHandshakeStale",
        "VeilnetPlaintextPath",
        "VeilnetIpamNearlyExhausted",
        "VeilnetSpoofedPackets",
        "VeilnetAgentRestarted",
        "VeilnetPolicySyncFailing",
        "VeilnetWireguardFlood",
    ] {
        assert!(alerts.contains(&want), "{want} missing from {alerts:?}");
    }
}

fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !nix::unistd::geteuid().is_root(),
                "promtool is not installed (Debian's `prometheus` package; ./scripts/test.sh installs it)"
            );
            eprintln!("skipped: promtool is not installed (apt-get install prometheus)");
            None
        }
        Err(e) => panic!("promtool: {e}"),
    }
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    for args in [
        &["check", "rules", "manifests/prometheus-rules.rules.yml"][..],
        &["test", "rules", "tests/prometheus/rules-test.yml"][..],
    ] {
        let Some(out) = promtool(args) else { return };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}
