//! `veilnet doctor`'s host checks (kernel, cni, sysctl, ports) against a live lab node, broken one
//! way after another and restored each time. Needs root. Kernel modules cannot be unloaded here
//! (global kernel state): that case is unit-tested only (`doctor::kernel`).
//!
//! Control planes: both (the checks read the node's namespace and directories, which are the same
//! on either control plane; only the agent's liveness comes from its status file).

mod common;

use std::time::Duration;

use common::*;

/// The checks this file is about: every name with one of these prefixes.
const HOST: [&str; 4] = ["kernel.", "cni.", "sysctl.", "ports."];

/// `veilnet doctor --lab NAME --node node-1 --json`: (exit status, checks by name).
fn doctor(lab: &Lab) -> (i32, Vec<serde_json::Value>) {
    let out = veilnet()
        .args(["doctor", "--lab", &lab.name, "--node", "node-1", "--json"])
        .args(["--no-probe"])
        .output()
        .expect("spawn veilnet doctor");
    let reports: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{}", text(&out)));
    let checks = reports[0]["checks"].as_array().unwrap().clone();
    (out.status.code().unwrap_or(-1), checks)
}

fn find<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {checks:#?}"))
}

fn verdict(checks: &[serde_json::Value], name: &str) -> String {
    find(checks, name)["verdict"].as_str().unwrap().to_string()
}

fn evidence(checks: &[serde_json::Value], name: &str) -> String {
    find(checks, name)["evidence"].as_str().unwrap().to_string()
}

fn host_checks_all_ok(checks: &[serde_json::Value]) {
    let host: Vec<_> = checks
        .iter()
        .filter(|c| {
            HOST.iter()
                .any(|p| c["name"].as_str().unwrap().starts_with(p))
        })
        .collect();
    assert!(host.len() >= 14, "{host:#?}");
    let bad: Vec<_> = host.iter().filter(|c| c["verdict"] != "OK").collect();
    assert!(bad.is_empty(), "not OK on a healthy node: {bad:#?}");
}

/// Sets a sysctl inside the node's namespace (never the host's).
fn sysctl_in(lab: &Lab, key_value: &str) {
    ok(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &lab.node_netns(1),
        "sysctl",
        "-qw",
        key_value,
    ]));
}

/// Restores a sysctl of the node's namespace when dropped, also when an assertion fails first.
struct SysctlGuard<'a> {
    lab: &'a Lab,
    restore: String,
}

impl Drop for SysctlGuard<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.lab.node_netns(1), "sysctl", "-qw"])
            .arg(&self.restore)
            .status();
    }
}

/// Removes a file when dropped.
struct FileGuard(std::path::PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn doctor_host_checks_find_each_breakage_on_a_lab_node() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("dochost", &["--nodes", "2"]);
    let paths = veilnet::lab_paths::LabPaths::new(&lab.name).unwrap();
    let conf_dir = paths.node_cni_conf_dir("node-1");
    // The agent installs its conflist once its dataplane is in place.
    eventually(Duration::from_secs(60), "a healthy report", || {
        let (code, checks) = doctor(&lab);
        code == 0
            && checks.iter().all(|c| {
                !HOST
                    .iter()
                    .any(|p| c["name"].as_str().unwrap().starts_with(p))
                    || c["verdict"] == "OK"
            })
    });
    let (code, checks) = doctor(&lab);
    host_checks_all_ok(&checks);
    assert_eq!(code, 0, "{checks:#?}");
    assert!(
        evidence(&checks, "ports.wireguard").contains("veilnet"),
        "{checks:#?}"
    );
    assert!(
        evidence(&checks, "ports.vxlan").contains("kernel, veilvx"),
        "{checks:#?}"
    );

    // (a) Another CNI's config sorting first wins.
    {
        let other = conf_dir.join("05-other.conflist");
        let _guard = FileGuard(other.clone());
        std::fs::write(
            &other,
            r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"}]}"#,
        )
        .unwrap();
        let (code, checks) = doctor(&lab);
        assert_eq!(verdict(&checks, "cni.config"), "FAIL", "{checks:#?}");
        assert!(
            evidence(&checks, "cni.config").contains("05-other.conflist"),
            "{checks:#?}"
        );
        assert!(
            evidence(&checks, "cni.config").contains("wins"),
            "{checks:#?}"
        );
        assert_eq!(code, 1);
    }
    let (code, checks) = doctor(&lab);
    assert_eq!(verdict(&checks, "cni.config"), "OK", "{checks:#?}");
    assert_eq!(code, 0);

    // (b) Forwarding off in the node's namespace.
    {
        let _guard = SysctlGuard {
            lab: &lab,
            restore: "net.ipv4.ip_forward=1".into(),
        };
        sysctl_in(&lab, "net.ipv4.ip_forward=0");
        let (code, checks) = doctor(&lab);
        assert_eq!(verdict(&checks, "sysctl.ip_forward"), "FAIL", "{checks:#?}");
        assert!(
            find(&checks, "sysctl.ip_forward")["fix"]
                .as_str()
                .unwrap()
                .contains("sysctl -w net.ipv4.ip_forward=1"),
            "{checks:#?}"
        );
        assert_eq!(code, 1);
    }
    assert_eq!(verdict(&doctor(&lab).1, "sysctl.ip_forward"), "OK");

    // (c) Strict reverse-path filtering on the VXLAN device.
    {
        let dev = "veilvx1";
        let key = format!("net.ipv4.conf.{dev}.rp_filter");
        let before = ok(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &lab.node_netns(1),
            "sysctl",
            "-n",
            &key,
        ]));
        let _guard = SysctlGuard {
            lab: &lab,
            restore: format!("{key}={}", before.trim()),
        };
        sysctl_in(&lab, &format!("{key}=1"));
        let (_, checks) = doctor(&lab);
        assert_eq!(verdict(&checks, "sysctl.rp_filter"), "FAIL", "{checks:#?}");
        assert!(
            evidence(&checks, "sysctl.rp_filter").contains(&format!("strict on {dev}")),
            "{checks:#?}"
        );
        assert!(
            find(&checks, "sysctl.rp_filter")["fix"]
                .as_str()
                .unwrap()
                .contains(&format!("{key}=2")),
            "{checks:#?}"
        );
    }
    let (code, checks) = doctor(&lab);
    host_checks_all_ok(&checks);
    assert_eq!(code, 0);

    // (d) The agent and datapath down, another process on the WireGuard port.
    lab.kill_daemon("agent-node-1");
    lab.kill_daemon("datapath-node-1");
    // Held by this test process, bound inside the node's namespace; closed when dropped.
    let holder = veilnet::netns::run_in(&lab.node_netns(1), || {
        std::net::UdpSocket::bind("0.0.0.0:51820")
    })
    .unwrap()
    .expect("bind the WireGuard port in the node's namespace");
    // The agent counts as down once its status file is older than 10 s.
    eventually(
        Duration::from_secs(30),
        "the agent to count as down",
        || verdict(&doctor(&lab).1, "agent.up") == "FAIL",
    );
    let (code, checks) = doctor(&lab);
    assert_eq!(code, 1);
    assert_eq!(verdict(&checks, "ports.wireguard"), "FAIL", "{checks:#?}");
    let pid = std::process::id();
    assert!(
        evidence(&checks, "ports.wireguard").contains(&format!("held by pid {pid} (")),
        "{checks:#?}"
    );
    assert!(
        find(&checks, "ports.wireguard")["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("kill {pid}")),
        "{checks:#?}"
    );
    assert_eq!(verdict(&checks, "cni.installed"), "WARN", "{checks:#?}");
    assert!(
        evidence(&checks, "cni.installed").contains("while the agent is down"),
        "{checks:#?}"
    );
    // The health and metrics ports are free now: fine with the agent down.
    assert_eq!(verdict(&checks, "ports.health"), "OK", "{checks:#?}");
    drop(holder);
    let (_, checks) = doctor(&lab);
    assert_eq!(verdict(&checks, "ports.wireguard"), "OK", "{checks:#?}");
}
